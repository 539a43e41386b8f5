"""`casa bench paper` runs end to end at its toy preset on CPU (the GPU run is the
same code at the paper's shapes): the JSON holds the shape asked for, the
sequence each variant pays for, and a KV cache that holds image tokens only
for insertion."""

import json

from casa.bench.paper import PRESETS, run


def test_tiny_preset_writes_train_and_stream_reports(tmp_path):
    p = PRESETS["tiny"]
    run("tiny", out_dir=tmp_path, device="cpu", variants=("insertion", "casa"), repeats=1)
    train = json.loads((tmp_path / "paper_tiny_train.json").read_text())
    assert train["config"]["preset"] == "tiny" and train["config"]["d_model"] == p["d_model"]
    assert train["config"]["lm"]["n_kv_heads"] == p["n_kv_heads"] and train["config"]["precision"] == "fp32"
    rows = {r["variant"]: r for r in train["results"]}
    image_tokens = p["text_tokens"] * p["image_ratio"]
    assert rows["insertion"]["sequence_tokens"] == p["text_tokens"] + image_tokens
    assert rows["casa"]["sequence_tokens"] == p["text_tokens"]
    assert all(r["oom"] is False and r["text_tok_s"] > 0 for r in rows.values())

    stream = json.loads((tmp_path / "paper_tiny_stream.json").read_text())
    assert stream["config"]["preset"] == "tiny" and stream["config"]["torch"]
    runs = {r["variant"]: r for r in stream["runs"]}
    per_turn_text = 1 + p["new_tokens"]  # one prompt token, then the generated ones
    assert [len(r["turns"]) for r in runs.values()] == [p["turns"], p["turns"]]
    # insertion caches every frame's image tokens; casa caches text plus one window's images at most
    assert runs["insertion"]["turns"][-1]["kv_tokens"] == p["turns"] * (p["tokens_per_frame"] + per_turn_text)
    assert runs["casa"]["turns"][-1]["kv_tokens"] <= (p["turns"] + 1) * per_turn_text + p["tokens_per_frame"]
    assert (tmp_path / "paper_tiny_stream.png").stat().st_size > 1000
