"""`casa train` on bad inputs, as a user runs it (a real subprocess): a one-line
error naming the input, no traceback, nothing already written changed; and the
run directory survives a kill -9 or a double Ctrl-C in the middle of a save."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_casa, snapshot

from casa.pretrained.runs import latest_checkpoint, list_checkpoints
from casa.training.checkpoint import load_state
from casa.training.config import load_config
from casa.training.trainer import Trainer

TINY = {
    "model": {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
              "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 4,
                         "d_ff": 64}},
    "train": {"steps": 2, "text_tokens": 192, "image_tokens": 512, "lr_new": 1e-3, "warmup_steps": 1,
              "save_every": 1, "keep_last": 0, "log_every": 1, "data": "color", "precision": "fp32"},
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, config) -> Path:
    """A run directory with checkpoints step_000001 and step_000002 (trained in-process)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    Trainer(*load_config(config, [f"out_dir={run}"]), quiet=True).fit()
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    return run


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override,names", [
    ("train.steps=2.5", ["train.steps", "2.5", "whole number"]),
    ("lr_new=-1", ["train.lr_new", "-1", ">= 0"]),
    ("model.lm=3", ["model.lm", "3", "table of keys"]),
])
def test_wrong_config_values_are_named(tmp_path, config, override, names):
    before = snapshot(config)
    result = run_casa("train", "--config", config, "--set", f"out_dir={tmp_path / 'run'}", "--set", override)
    assert_user_error(result, *names, before=before, after=snapshot(config))
    assert result.returncode == 2 and not (tmp_path / "run").exists()


def test_bad_config_files(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train\nsteps = 1\n")
    result = run_casa("train", "--config", bad_toml)
    assert_user_error(result, str(bad_toml), "TOML")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": {"stepz": 3}}))
    result = run_casa("train", "--config", unknown)
    assert_user_error(result, str(unknown), "stepz")
    result = run_casa("train", "--config", tmp_path / "missing.toml")
    assert_user_error(result, "missing.toml", "no such config file")


def test_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path, config):
    out = tmp_path / "out"
    out.write_text("my notes\n")
    before = snapshot(out)
    result = run_casa("train", "--config", config, "--set", f"out_dir={out}")
    assert_user_error(result, "train.out_dir", str(out), "is a file", before=before, after=snapshot(out))


def test_fresh_run_into_a_run_directory_is_refused(tmp_path, trained, config):
    """Keep-last pruning would delete the new run's checkpoints and `casa eval RUN` read the old model."""
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    result = run_casa("train", "--config", config, "--set", f"out_dir={run}")
    assert_user_error(result, str(run), "step_000002", "--resume", before=before, after=snapshot(run))


# ----------------------------------------------------------------------------- damaged and hostile files
def test_damaged_only_checkpoint_and_damaged_lm_init(tmp_path, trained, config):
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000001")
    weights = run / "checkpoints" / "step_000002" / "model.safetensors"
    truncate(weights)
    before = snapshot(run)
    result = run_casa("train", "--config", config, "--set", f"out_dir={run}", "--resume")
    assert_user_error(result, str(weights), "damaged or incomplete", before=before, after=snapshot(run))

    # an HF LM directory whose weights were cut short
    from casa.config import ModelConfig
    from casa.core.model import CasaModel
    from casa.pretrained.hf_lm import save_lm_as_hf

    lm = save_lm_as_hf(CasaModel(ModelConfig.from_dict(TINY["model"])), tmp_path / "lm")
    (lm / "model.safetensors").write_bytes(b"")
    result = run_casa("train", "--config", config, "--set", f"out_dir={tmp_path / 'r2'}", "--set", f"lm_init={lm}")
    assert_user_error(result, str(lm / "model.safetensors"), "damaged or incomplete")
    assert not (tmp_path / "r2" / "checkpoints").exists()


class Payload:
    """Unpickling it opens (creates) a marker file: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_trainer_state_is_refused_and_never_run(tmp_path, trained, config):
    """A received run directory whose (old-format) trainer_state.pt would run code when unpickled."""
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000001")
    ckpt = run / "checkpoints" / "step_000002"
    for f in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / f).unlink()
    marker = tmp_path / "pwned"
    evil = ckpt / "trainer_state.pt"
    torch.save({"step": 1, "x": Payload(marker)}, evil)
    before = snapshot(run)
    result = run_casa("train", "--config", config, "--set", f"out_dir={run}", "--resume")
    assert_user_error(result, str(evil), "refused", before=before, after=snapshot(run))
    assert not marker.exists()
    # the same bytes under the new name are no safetensors file: damaged, still never unpickled
    os.replace(evil, ckpt / "trainer_state.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    result = run_casa("train", "--config", config, "--set", f"out_dir={run}", "--resume")
    assert_user_error(result, str(ckpt / "trainer_state.safetensors"), "damaged or incomplete")
    assert not marker.exists()


def test_resume_falls_back_to_the_previous_readable_checkpoint(tmp_path, trained, config):
    run = copy_run(trained, tmp_path)
    damaged = run / "checkpoints" / "step_000002" / "trainer_state.safetensors"
    truncate(damaged)
    result = run_casa("train", "--config", config, "--set", f"out_dir={run}", "--set", "steps=3", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(damaged) in result.stderr and "falling back" in result.stderr
    assert f"resuming from {run / 'checkpoints' / 'step_000001'} (step 1)" in result.stderr
    state = load_state(latest_checkpoint(run))
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- killed while saving
def start_training(config, run, *extra, pause_at=2, pause_s=60):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "CASA_TEST_SAVE_PAUSE": f"{pause_at}:{pause_s}"}
    return subprocess.Popen([sys.executable, "-m", "casa.cli", "train", "--config", str(config), "--threads", "1",
                             "--set", f"out_dir={run}", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_saving(proc, run, step, timeout=90.0) -> Path:
    """The temporary directory of the save of `step`, once its trainer state JSON is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((run / "checkpoints").glob(f".tmp-step_{step:06d}-*/trainer_state.json"))
        if found:
            return found[0].parent
        if proc.poll() is not None:
            raise AssertionError(f"casa train ended before saving step {step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no save of step {step} within {timeout} s")


def test_kill_9_while_saving_then_resume(tmp_path, config):
    run = tmp_path / "run"
    proc = start_training(config, run, "--set", "steps=3")
    tmp = wait_until_saving(proc, run, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir()  # killed mid-save: the half-written checkpoint is still lying there, under its temp name
    assert [s for s, _ in list_checkpoints(run)] == [1] and latest_checkpoint(run).name == "step_000001"

    result = run_casa("train", "--config", config, "--set", f"out_dir={run}", "--set", "steps=3", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {run / 'checkpoints' / 'step_000001'} (step 1)" in result.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the leftover was cleaned by the next save
    resumed = load_state(latest_checkpoint(run))["history"]
    # the same curve as a run that was never killed
    torch.set_num_threads(1)
    straight = Trainer(*load_config(config, [f"out_dir={tmp_path / 'straight'}", "steps=3"]), quiet=True)
    straight.fit()
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight.history], abs=1e-6, rel=0)


def test_second_ctrl_c_during_a_save_abandons_it_whole(tmp_path, config):
    run = tmp_path / "run"
    proc = start_training(config, run, "--set", "steps=3")
    wait_until_saving(proc, run, 2)
    proc.send_signal(signal.SIGINT)  # first: finish the step, save, stop
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # second, while the save still runs: stop at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    latest = run / "checkpoints" / "step_000001"
    assert "interrupted again while saving step 2" in err and f"the latest checkpoint is {latest}" in err
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "checkpoints" / "step_000002").exists()
    assert latest_checkpoint(run) == latest and load_state(latest)["step"] == 1


def test_one_ctrl_c_finishes_the_step_saves_and_names_the_checkpoint(tmp_path, config):
    run = tmp_path / "run"
    proc = start_training(config, run, "--set", "steps=5", pause_at=1, pause_s=1)
    wait_until_saving(proc, run, 1)  # a known point: the periodic save of step 1
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "caught SIGINT" in err
    saved = run / "checkpoints" / "step_000002"  # the step under way when Ctrl-C came was finished and saved
    assert f"interrupted at step 2; checkpoint saved: {saved}; continue with --resume" in err
    assert f"checkpoint: {saved}" in out
    assert [s for s, _ in list_checkpoints(run)] == [1, 2] and load_state(saved)["step"] == 2
