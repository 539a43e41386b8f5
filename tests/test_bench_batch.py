"""`casa bench batch` at a toy size: both parts run, every session's tokens are equal alone and
batched, the figures are consistent with each other, and the command writes JSON + plot."""

import json

import pytest

from casa.core import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")


def test_batched_and_alone_decode_the_same_tokens(tmp_path):
    from casa.bench.batch import BatchBench, run

    cfg = BatchBench(sessions=(1, 3), contexts=(20, 60), new_tokens=5, repeats=1, threads=(1, 2), image_tokens=16,
                     d_model=64, layers=2, heads=4, kv_heads=2, d_ff=128, vocab=61)
    out, png = tmp_path / "batch.json", tmp_path / "batch.png"
    result = run(cfg, json_path=out, plot_path=png, log=lambda *_: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and png.stat().st_size > 10_000
    rows = result["sessions"]
    assert [(r["context"], r["sessions"]) for r in rows] == [(20, 1), (20, 3), (60, 1), (60, 3)]
    for r in rows:
        assert r["equal_tokens"] is True
        for mode in ("alone", "batched"):  # a step gives every session a token (step_ms rounded to 0.01)
            assert r[mode]["step_ms"] == pytest.approx(1e3 * r["sessions"] / r[mode]["tokens_per_s"], abs=0.006)
        assert r["speedup"] == pytest.approx(r["batched"]["tokens_per_s"] / r["alone"]["tokens_per_s"], abs=0.01)
    assert [c["threads"] for c in result["cores"]] == [1, 2] and result["cores"][0]["speedup"] == 1.0
    assert all(c["bound_ms"] > 0 and c["bound_ratio"] > 0 for c in result["cores"])
    assert cpu_kernels.threads() == 1  # restored


def test_bench_batch_refuses_bad_counts():
    from casa.bench.batch import BatchBench

    with pytest.raises(ValueError, match="--sessions and --contexts"):
        BatchBench(sessions=(0,))
    with pytest.raises(ValueError, match="--new-tokens must be >= 2"):
        BatchBench(new_tokens=1)
