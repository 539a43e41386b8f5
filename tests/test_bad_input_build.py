"""`casa build` on bad inputs, as a user runs it (a real subprocess): a one-line
error naming the input, no traceback, and nothing that was at `--out` lost."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_casa, snapshot

from casa.cli import main
from casa.config import FusionConfig, LMConfig, ModelConfig
from casa.core.model import CasaModel
from casa.pretrained.hf_lm import save_lm_as_hf
from casa.pretrained.model_dir import read_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny Llama-layout HF checkpoint (vocabulary large enough for the byte tokenizer)."""
    lm = LMConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    torch.manual_seed(0)
    model = CasaModel(ModelConfig(lm=lm, fusion=FusionConfig(variant="insertion")))
    return save_lm_as_hf(model, tmp_path_factory.mktemp("hf") / "llama")


def build_args(lm_dir, out, *extra):
    return ["build", "--lm", str(lm_dir), "--out", str(out), "--tokenizer", "byte", "--image-size", "16",
            "--dtype", "float32", *extra]


def test_out_that_is_a_file_or_a_foreign_folder_is_never_replaced(tmp_path, lm_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("do not lose me\n")
    before = snapshot(notes)
    result = run_casa(*build_args(lm_dir, notes))
    assert_user_error(result, str(notes), "is a file", before=before, after=snapshot(notes))

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    before = snapshot(photos)
    result = run_casa(*build_args(lm_dir, photos, "--overwrite"))  # --overwrite does not make it a model
    assert_user_error(result, str(photos), "not a casa model directory", "cat.jpg", before=before,
                      after=snapshot(photos))


def test_an_existing_model_is_replaced_only_with_overwrite(tmp_path, lm_dir, capsys):
    out = tmp_path / "vlm"
    assert main(build_args(lm_dir, out, "--fusion", "casa")) == 0
    capsys.readouterr()
    before = snapshot(out)
    result = run_casa(*build_args(lm_dir, out, "--fusion", "ca"))
    assert_user_error(result, str(out), "already holds a casa model", "--overwrite", before=before,
                      after=snapshot(out))
    result = run_casa(*build_args(lm_dir, out, "--fusion", "ca", "--overwrite"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_config(out)["model"]["fusion"]["variant"] == "ca"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no temporary left beside it


def test_damaged_lm_directory_is_named(tmp_path, lm_dir):
    import shutil

    broken = tmp_path / "lm"
    shutil.copytree(lm_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_casa(*build_args(broken, tmp_path / "out"))
    assert_user_error(result, str(weights), "damaged or incomplete")
    assert not (tmp_path / "out").exists()

    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_')
    result = run_casa(*build_args(broken, tmp_path / "out"))
    assert_user_error(result, str(broken / "config.json"), "damaged or incomplete")


@pytest.mark.parametrize("flags,names", [
    (["--every", "0"], ["--every", ">= 1"]),
    (["--fusion", "cassa"], ["--fusion", "cassa", "casa_shared"]),
    (["--vision-trainable-blocks", "-2"], ["--vision-trainable-blocks", ">= -1"]),
])
def test_flag_values_are_checked_by_the_config_rule(tmp_path, lm_dir, flags, names):
    result = run_casa(*build_args(lm_dir, tmp_path / "out", *flags))
    assert_user_error(result, *names)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_fusion_flags_cover_every_fusion_field():
    """A new FusionConfig field or variant reaches `casa build` without touching the CLI."""
    import dataclasses

    from casa.cli import build_parser
    from casa.config import FUSION_VARIANTS, PLACEMENTS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["build"]
    dests = {a.dest: a for a in sub._actions}
    assert {f"fusion_{f.name}" for f in dataclasses.fields(FusionConfig)} <= set(dests)
    for variant in FUSION_VARIANTS:
        for placement in PLACEMENTS:
            args = sub.parse_args(["--lm", "x", "--out", "y", "--fusion", variant, "--placement", placement,
                                   "--layers", "2,0", "--no-text-keys"])
            from casa.cli.build import fusion_from_args

            assert fusion_from_args(args) == FusionConfig(variant=variant, placement=placement, layers=[0, 2],
                                                          text_keys=False)
    assert json.dumps(dataclasses.asdict(fusion_from_args(sub.parse_args(["--lm", "x", "--out", "y"])))) == \
        json.dumps(dataclasses.asdict(FusionConfig()))
