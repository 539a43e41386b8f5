import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from casa.data.video import write_sample_video
from casa.study.demo import run

TINY_MODEL = {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
              "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64},
              "fusion": {"variant": "casa"}}


def test_demo_leaves_a_run_dir_and_reuses_it(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        train = {"text_tokens": 256, "image_tokens": 2048, "log_every": 1, "warmup_steps": 1}
        metrics = run(tmp_path / "demo", steps=3, eval_n=2, model=TINY_MODEL, train=train)
        out = capsys.readouterr().out
        assert "training a" in out and "CASA" in out and "blind" in out and "prior" in out
        d = tmp_path / "demo"
        assert (d / "loss.png").read_bytes()[:4] == b"\x89PNG" and len(list((d / "examples").glob("*.png"))) == 6
        saved = json.loads((d / "metrics.json").read_text())
        assert set(saved["tasks"]) == {"color", "count", "position", "video"}
        # the sample video, captioned as `casa caption` would: a caption per frame beside its reference
        captioned = saved["captioned"]
        assert [f["reference"] for f in captioned["frames"]] == write_sample_video(tmp_path / "ref.mp4", seed=0)
        spoken = [f for f in captioned["frames"] if f["caption"]]  # an empty caption leaves no subtitle
        assert (d / "sample.srt").read_text().count(" --> ") == len(spoken) and captioned["srt"] == str(d / "sample.srt")
        assert captioned["correct"] == sum(f["caption"].lower() == f["reference"].lower() for f in captioned["frames"])
        for task, r in saved["tasks"].items():
            assert r["casa"] == saved["casa"][task]["score"] and r["blind"] == saved["blind"][task]["score"]
            assert r["prior"] == saved["prior"][task]["score"]
            assert r["gain"] == pytest.approx(r["casa"] - max(r["blind"], r["prior"]))
            assert saved["casa"][task]["n"] == (8 if task == "video" else 2)  # eval_n samples; video: 4 frames each
        assert saved["steps"] == 3 and metrics["wall_seconds"] > 0
        run(tmp_path / "demo", steps=3, eval_n=2, model=TINY_MODEL, train=train)
        assert "reusing the trained model" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
