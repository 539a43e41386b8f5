"""`casa bench attention` writes the JSON the issue specifies (tiny shape)."""

import json

from casa.cli import main


def test_bench_attention_writes_the_report(tmp_path, capsys):
    out = tmp_path / "bench" / "attention.json"
    rc = main(["bench", "attention", "--json", str(out), "--windows", "3", "--image-tokens", "16",
               "--text-tokens", "8", "--heads", "2", "--head-dim", "8", "--repeats", "1",
               "--backends", "reference,windowed", "--plot", str(tmp_path / "att.png")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["shape"]["windows"] == 3 and report["gemm_gflops"] > 0
    assert [r["backend"] for r in report["results"]] == ["reference", "windowed"]
    for r in report["results"]:
        assert {"backend", "fwd_ms", "fwd_bwd_ms", "peak_mem_bytes", "max_abs_err", "gflops"} <= r.keys()
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["max_abs_err"] <= 1e-5
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["attention.json"]  # no temporary file left


def test_bench_attention_rejects_unknown_backend(tmp_path, capsys):
    rc = main(["bench", "attention", "--json", str(tmp_path / "a.json"), "--backends", "dense"])
    assert rc == 2
    assert "--backends: unknown ['dense']" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


def test_every_report_records_its_commit_and_machine(tmp_path):
    import json

    from casa.bench.report import write_report

    report = {"x": 1}
    write_report(report, tmp_path / "r.json", quiet=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == report and saved["x"] == 1
    p = saved["provenance"]
    assert p["commit"] and p["machine"]["cores"] >= 1 and p["machine"]["cpu"] and p["torch"] and p["date"]
