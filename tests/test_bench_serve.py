"""`casa bench serve`: a real server process per session count, real HTTP clients on loopback,
each concurrent reply compared with the same request alone."""

import json

from casa.bench.serve import ServeBench, run


def test_the_load_test_checks_every_reply_against_the_request_alone(tmp_path):
    cfg = ServeBench(d_model=32, layers=1, heads=2, image_size=16, requests=6, max_tokens=4, sessions=(1, 2),
                     max_queue=1, distinct=3, deadline=180)
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    result = run(cfg, json_path=out, plot_path=png)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert png.stat().st_size > 10_000
    assert [r["sessions"] for r in result["runs"]] == [1, 2]
    for r in result["runs"]:
        within, over = r["phases"]["within"], r["phases"]["over"]
        capacity = r["sessions"] + 1
        assert (within["clients"], within["statuses"], within["errors"]) == (capacity, {"200": 6}, 0)
        assert over["clients"] == 3 * capacity and over["errors"] == 0 and over["ok"] >= 1
        assert set(over["statuses"]) <= {"200", "429"} and over["ok"] + over["refused"] == 6
        for phase in (within, over):  # every successful reply was compared, and equals its solo run
            assert phase["compared"] == phase["ok"] and phase["equal"] == phase["ok"]
            assert phase["equal_pct"] == 100.0 and phase["differ_examples"] == []
        assert within["latency_p50_ms"] <= within["latency_p95_ms"] and within["requests_per_s"] > 0
        assert 0 < r["server_rss_idle_bytes"] <= within["server_rss_peak_bytes"]
