"""`casa bench eval-decode`: both decoders on the same prompts, same answers, a JSON report."""

import json

import pytest

from casa.cli import main


def test_bench_eval_decode_cli(tmp_path):
    out = tmp_path / "e.json"
    rc = main(["bench", "eval-decode", "--variants", "casa,ca", "--samples", "5", "--new-tokens", "3",
               "--d-model", "32", "--layers", "1", "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "e.png")])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["runs"]] == ["casa", "ca"]
    for r in data["runs"]:
        assert r["prompts"] == 5 and r["answer_tokens"] == 15 and r["same_answers"] is True  # stops disabled
        assert r["speedup"] == pytest.approx(r["uncached_s"] / r["cached_s"], rel=1e-2)
    assert (tmp_path / "e.png").stat().st_size > 1000
    assert main(["bench", "eval-decode", "--variants", "nope", "--json", str(tmp_path / "f.json")]) == 2
    assert not (tmp_path / "f.json").exists()
