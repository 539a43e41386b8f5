import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import torch

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
        assert (d / "loss.png").stat().st_size > 0 and len(list((d / "examples").glob("*.png"))) == 6
        saved = json.loads((d / "metrics.json").read_text())
        assert set(saved["tasks"]) == {"color", "count", "position"}
        for r in saved["tasks"].values():
            assert {"casa", "blind", "prior", "gain"} <= set(r)
        assert saved["steps"] == 3 and metrics["wall_seconds"] > 0
        run(tmp_path / "demo", steps=3, eval_n=2, model=TINY_MODEL, train=train)
        assert "reusing the trained model" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
