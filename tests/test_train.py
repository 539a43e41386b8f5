import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from safetensors.torch import load_file

from casa.cli import main
from casa.pretrained.runs import latest_checkpoint, list_checkpoints
from casa.training.checkpoint import load_state, save_checkpoint
from casa.training.config import load_config
from casa.training.optim import lr_lambda
from casa.training.trainer import Trainer

TINY = {
    "model": {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
              "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64}},
    "train": {"steps": 6, "text_tokens": 256, "image_tokens": 1024, "lr_new": 1e-3, "lr_pretrained": 1e-4,
              "warmup_steps": 2, "save_every": 0, "log_every": 1, "grad_accum": 2,
              "data": "color,compare,video", "difficulty": {"frames": 2}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, *overrides, name="run"):
    return load_config(None, [f"out_dir={tmp_path / name}", *overrides], base=TINY)


def losses(trainer):
    return [h["loss"] for h in trainer.history]


# --------------------------------------------------------------- config
def test_config_file_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 7\n[model.lm]\nd_model = 48\nn_heads = 4\n')
    model, train = load_config(f, ["train.lr_new=0.5", "grad_accum=3", "model.fusion.variant=ca"])
    assert (train.steps, train.lr_new, train.grad_accum) == (7, 0.5, 3)
    assert model.lm.d_model == 48 and model.fusion.variant == "ca"
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match=r"c.json.*unknown keys \['stepz'\]"):
        load_config(j)
    with pytest.raises(ValueError, match=r"unknown keys \['dmodel'\]"):
        load_config(None, ["model.lm.dmodel=3"])
    with pytest.raises(ValueError, match=r"unknown keys \['optim'\]"):
        load_config(None, ["optim.lr=3"], base={"optim": {}})
    assert main(["train", "--config", str(j)]) == 2


def test_schedule_warmup_then_cosine():
    _, cfg = load_config(None, ["steps=100", "warmup_steps=10", "min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_freeze_policies_and_param_groups(tmp_path):
    model_cfg, cfg = tiny(tmp_path, "freeze_lm=true", "vision_trainable_blocks=1")
    tr = Trainer(model_cfg, cfg, quiet=True)
    trainable = {n for n, p in tr.raw.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion." in n or n.startswith("vision.") for n in trainable)
    assert not any(n.startswith("vision.encoder.blocks.0.") or "patch_embed" in n for n in trainable)
    assert any(n.startswith("vision.encoder.blocks.1.") for n in trainable)
    assert all(g["initial_lr"] == 1e-3 for g in tr.optimizer.param_groups)  # from scratch: everything is new
    # pretrained weights (init) take lr_pretrained, fusion layers and projector lr_new
    tr.cfg.eval_every, tr.cfg.eval_samples = 3, 2  # periodic evaluation on held-out samples
    tr.fit()
    assert [e["step"] for e in tr.evals] == [3, 6] and set(tr.evals[0]) == {"step", "color", "compare", "video"}
    _, cfg2 = tiny(tmp_path, f"init={latest_checkpoint(cfg.out_dir)}", name="run2")
    tr2 = Trainer(model_cfg, cfg2, quiet=True)
    lrs = {g["name"]: g["initial_lr"] for g in tr2.optimizer.param_groups}
    assert lrs == {"new": 1e-3, "new_nodecay": 1e-3, "pretrained": 1e-4, "pretrained_nodecay": 1e-4}
    new = {id(p) for g in tr2.optimizer.param_groups if g["name"].startswith("new") for p in g["params"]}
    assert new == {id(p) for p in tr2.raw.fusion_parameters()} | {id(p) for p in tr2.raw.vision.projector.parameters()}


def test_bf16_autocast_step(tmp_path):
    """bf16 autocast computes the same first loss as fp32 (same weights, same pack), to bf16 precision."""
    runs = {}
    for precision in ("fp32", "bf16"):
        model_cfg, cfg = tiny(tmp_path, f"precision={precision}", "steps=1", name=precision)
        tr = Trainer(model_cfg, cfg, quiet=True)
        tr.fit()
        runs[precision] = losses(tr)[0]
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)
    assert runs["bf16"] != runs["fp32"]  # autocast really ran in bf16


# --------------------------------------------------------------- resume
def test_resume_gives_the_same_loss_curve(tmp_path):
    model_cfg, cfg = tiny(tmp_path, name="straight")
    straight = Trainer(model_cfg, cfg, quiet=True)
    straight.fit()
    model_cfg, cfg = tiny(tmp_path, "keep_last=2", name="stopped")
    first = Trainer(model_cfg, cfg, quiet=True)
    first.fit(stop_after=2)
    first.fit(stop_after=1)
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [2, 3]
    resumed = Trainer(model_cfg, cfg, resume=True, quiet=True)
    assert resumed.step == 3 and resumed.position == first.position
    resumed.fit()
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6, rel=0)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(cfg.out_dir) / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_resume_keeps_the_runs_settings_and_applies_printed_overrides(tmp_path, capsys):
    """`casa train --config C --resume` after a run with `--set steps=2` continues that run as it was
    configured (not with the file's steps=6); `--set` given with --resume applies, is printed, and a change
    of the schedule says so; the peak learning rate set on resume is the one the optimizer uses."""
    config = tmp_path / "c.json"
    run = tmp_path / "run"
    config.write_text(json.dumps({**TINY, "train": {**TINY["train"], "out_dir": str(run), "grad_accum": 1}}))
    assert main(["train", "--config", str(config), "--quiet", "--set", "steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--quiet", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "the config gives steps=6, the run has 2: the run's value is kept" in err
    assert load_state(latest_checkpoint(run))["step"] == 2
    assert json.loads((run / "train_config.json").read_text())["train"]["steps"] == 2
    assert main(["train", "--config", str(config), "--quiet", "--resume", "--set", "steps=4",
                 "--set", "lr_new=0.002"]) == 0
    err = capsys.readouterr().err
    assert "--set steps: 2 -> 4" in err and "--set lr_new: 0.001 -> 0.002" in err
    assert "the learning-rate schedule changes (steps, lr_new)" in err and "cosine to step 4 (was 2)" in err
    state = load_state(latest_checkpoint(run))
    assert state["step"] == 4 and state["train_config"]["steps"] == 4
    _, cfg = tiny(tmp_path, "steps=4", "lr_new=0.002")
    assert state["history"][2]["lr"] == pytest.approx(0.002 * lr_lambda(cfg)(3), rel=1e-12)
    assert main(["train", "--config", str(config), "--resume", "--set", "model.lm.d_model=64"]) == 2
    assert "model settings cannot change on --resume" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    model_cfg, cfg = tiny(tmp_path, "steps=5")
    tr = Trainer(model_cfg, cfg, quiet=True)
    real = tr.train_step

    def step_then_signal(packs):
        loss = real(packs)
        if tr.step == 1:  # the signal arrives during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(tr, "train_step", step_then_signal)
    summary = tr.fit()
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 2
    assert load_state(latest_checkpoint(cfg.out_dir))["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not tr._on_signal  # handlers restored
    resumed = Trainer(model_cfg, cfg, resume=True, quiet=True)
    assert resumed.fit()["step"] == 5 and len(resumed.history) == 5


# ---------------------------------------------------------- checkpoints
def test_crashed_save_never_becomes_latest(tmp_path, monkeypatch):
    model_cfg, cfg = tiny(tmp_path, "steps=1")
    tr = Trainer(model_cfg, cfg, quiet=True)
    tr.fit()
    good = latest_checkpoint(cfg.out_dir)
    root = Path(cfg.out_dir) / "checkpoints"
    # a kill in the middle of an earlier save left a temporary directory behind
    left = root / ".tmp-step_000009-999"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"partial")
    # a crash while writing the trainer state of the next checkpoint
    import casa.training.checkpoint as ck

    def boom(tensors, f, metadata=None):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    tr.step = 2
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    assert latest_checkpoint(cfg.out_dir) == good
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())  # leftovers cleaned
    monkeypatch.undo()
    tr.save()
    assert latest_checkpoint(cfg.out_dir).name == "step_000002"


def test_keep_last_k(tmp_path):
    from casa.config import ModelConfig
    from casa.core.model import CasaModel

    model = CasaModel(ModelConfig.from_dict(TINY["model"]))
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


# ------------------------------------------------------------- bad data
def test_bad_jsonl_line_fails_training_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n{oops\n" + json.dumps(good) + "\n")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "train": {**TINY["train"], "data": str(data), "steps": 1,
                                                 "out_dir": str(tmp_path / "r"), "grad_accum": 1,
                                                 "find_unused_parameters": True}}))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 2
    assert f"{data}:2: malformed JSON" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--quiet", "--skip-bad-samples"]) == 0
    assert "skipped 1 bad samples" in capsys.readouterr().out


# ---------------------------------------------------------- distributed
RANK_SCRIPT = """
import sys, torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
from casa.training.config import load_config
from casa.training.distributed import shutdown
from casa.training.trainer import Trainer
torch.set_num_threads(1)
model_cfg, cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(model_cfg, cfg, quiet=True)
tr.fit()
state = get_model_state_dict(tr.raw, options=StateDictOptions(full_state_dict=True))
torch.save({"state": state, "history": tr.history}, f"{cfg.out_dir}/rank{tr.dist.rank}.pt")
shutdown(tr.dist)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_torchrun_matches_one_process(tmp_path, mode):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(TINY))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(config),
           f"out_dir={out}", "grad_accum=1", "steps=3", f"distributed={mode}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # identical on every rank
    # one process, same global batch: 2 packs per step as gradient accumulation
    model_cfg, cfg = tiny(tmp_path, "grad_accum=2", "steps=3", name="one")
    one = Trainer(model_cfg, cfg, quiet=True)
    one.fit()
    ref = one.raw.state_dict()
    assert max(float((ref[k] - r0["state"][k]).abs().max()) for k in ref) < 1e-6
    assert [h["loss"] for h in r0["history"]] == pytest.approx(losses(one), abs=1e-6, rel=0)
    # rank 0 wrote the checkpoint, which is a model directory
    assert load_state(latest_checkpoint(out))["step"] == 3


def test_example_configs_parse():
    files = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert files
    for f in files:
        model, train = load_config(f)
        raw = tomllib.loads(f.read_text())
        for key, value in raw.get("train", {}).items():
            if not isinstance(value, dict):
                assert getattr(train, key) == value, (f.name, key)
        for key, value in raw.get("model", {}).get("lm", {}).items():
            assert getattr(model.lm, key) == value, (f.name, key)


def test_bench_train_report(tmp_path):
    from casa.bench.train import run

    out = tmp_path / "train.json"
    report = run(out, variants=("insertion", "casa"), text_tokens=32, image_ratio=4, tokens_per_image=16,
                 d_model=32, n_layers=1, repeats=1, threads=1)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["variant"] for r in saved["results"]] == ["insertion", "casa"]
    for r in saved["results"]:
        assert r["text_tok_s"] > 0 and r["peak_mem_bytes"] > 0  # RSS high-water mark, measured on Linux
    assert saved["config"]["image_tokens"] == 128 and saved["results"][0]["sequence_tokens"] == 160
    assert "throughput_x" in saved["config"]["casa_vs_insertion"]


def test_init_from_a_built_directory_takes_its_policy_tokenizer_and_processor(tmp_path):
    from casa.config import ModelConfig
    from casa.core.model import CasaModel
    from casa.pretrained.directory import processor_settings, save_pretrained
    from casa.pretrained.tokenizer import ByteTokenizer

    built = tmp_path / "built"
    save_pretrained(CasaModel(ModelConfig.from_dict(TINY["model"])), built, tokenizer=ByteTokenizer(),
                    processor={"gist": False}, extra={"build": {"freeze_lm": True, "vision_trainable_blocks": 0}})
    model_cfg, cfg = tiny(tmp_path, f"init={built}", "steps=1")
    tr = Trainer(model_cfg, cfg, quiet=True)
    trainable = {n for n, p in tr.raw.named_parameters() if p.requires_grad}
    assert all(".fusion." in n or n.startswith("vision.projector.") for n in trainable)
    assert tr.processor.gist is None
    tr.fit()
    assert processor_settings(latest_checkpoint(cfg.out_dir))["gist"] is False
    again = Trainer(*tiny(tmp_path, f"init={built}", "gist=true", "image_prefix=<|image|>", name="over"), quiet=True)
    assert again.processor.gist == "<|gist|>" and again.processor.image_prefix == "<|image|>"


# ------------------------------------------------------- trainer state files
def test_trainer_state_is_json_and_safetensors_and_legacy_pickles_still_resume(tmp_path):
    """No pickle in a checkpoint; a checkpoint of the old format (trainer_state.pt, numpy RNG arrays)
    resumes to the same curve through torch's restricted loader."""
    import random

    import numpy as np

    from casa.training.checkpoint import decode_state, encode_state

    model_cfg, cfg = tiny(tmp_path, "steps=3", name="straight")
    straight = Trainer(model_cfg, cfg, quiet=True)
    straight.fit()
    model_cfg, cfg = tiny(tmp_path, "steps=3", name="old")
    first = Trainer(model_cfg, cfg, quiet=True)
    first.fit(stop_after=1)
    ckpt = latest_checkpoint(cfg.out_dir)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json",
                                                      "trainer_state.json", "trainer_state.safetensors"]
    state = load_state(ckpt)
    tensors = {}
    back = decode_state(json.loads(json.dumps(encode_state(state, tensors))), tensors, ckpt)
    assert same_tree(back, state) and len(tensors) > 10  # optimizer moments, RNG states
    assert state["step"] == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    # rewrite it as casa wrote it before: one pickle, python/numpy RNG states as tuples and arrays
    rng = state["rng"][0]
    old_rng = {"python": (rng["python"][0], tuple(rng["python"][1]), rng["python"][2]),
               "numpy": (rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]),
               "torch": rng["torch"], "cuda": None}
    torch.save({**state, "rng": [old_rng]}, ckpt / "trainer_state.pt")
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "trainer_state.safetensors").unlink()
    random.seed(123)
    resumed = Trainer(model_cfg, cfg, resume=True, quiet=True)
    assert resumed.step == 1
    resumed.fit()
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6, rel=0)


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def test_progress_line_shows_an_eta(tmp_path, capsys):
    from casa.training.trainer import _duration

    assert [_duration(s) for s in (0.4, 59.6, 61, 3600 * 2 + 65)] == ["0s", "1m00s", "1m01s", "2h01m"]
    model_cfg, cfg = tiny(tmp_path, "steps=2")
    Trainer(model_cfg, cfg).fit()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == 2
    assert re.search(r"step 1/2 \| loss \d+\.\d{4} \| [\d,]+ tok/s \| eta \d+s$", lines[0]), lines[0]
    assert lines[1].endswith("eta 0s")


def test_threads_flag(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 1, "out_dir": str(tmp_path / "r")}}))
    assert main(["train", "--config", str(cfg), "--quiet", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2  # the one_thread fixture restores it afterwards
    assert "step_000001" in capsys.readouterr().out


def test_freeze_policy_precedence(tmp_path):
    from casa.pretrained.directory import save_pretrained
    from casa.pretrained.freeze import FreezePolicy, resolve_policy

    built = tmp_path / "built"
    save_pretrained(CasaModel_tiny(), built, extra={"build": {"freeze_lm": True, "vision_trainable_blocks": 0}})
    assert resolve_policy() == FreezePolicy(freeze_lm=False, vision_trainable_blocks=-1)
    assert resolve_policy(init=built) == FreezePolicy(freeze_lm=True, vision_trainable_blocks=0)
    assert resolve_policy(False, None, init=built) == FreezePolicy(freeze_lm=False, vision_trainable_blocks=0)
    assert resolve_policy(None, 1, init=built) == FreezePolicy(freeze_lm=True, vision_trainable_blocks=1)


def CasaModel_tiny():
    from casa.config import ModelConfig
    from casa.core.model import CasaModel

    return CasaModel(ModelConfig.from_dict(TINY["model"]))


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys):
    from casa.files import DamagedFileError
    from casa.pretrained.runs import check_checkpoint, resolve_model_dir

    model = CasaModel_tiny()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step, "t": torch.ones(2)}, keep_last=0)
    newest = tmp_path / "checkpoints" / "step_000002"
    (newest / "model.safetensors").write_bytes(b"")
    with pytest.raises(DamagedFileError, match="model.safetensors' is damaged or incomplete"):
        check_checkpoint(newest)
    assert resolve_model_dir(tmp_path) == tmp_path / "checkpoints" / "step_000001"
    err = capsys.readouterr().err
    assert f"skipping checkpoint {str(newest)!r}" in err and "falling back to the previous one" in err
    assert resolve_model_dir(newest) == newest  # a checkpoint named explicitly is taken as given
    (tmp_path / "checkpoints" / "step_000001" / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"has no readable checkpoint; the newest: .*step_000002"):
        latest_checkpoint(tmp_path)
