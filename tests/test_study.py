import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from casa.cli import main
from casa.data import make_sample
from casa.data.tasks import difficulty
from casa.study.gating import attention_shares, gate_values
from casa.study.report import claims
from casa.study.run import SIZES, TASKS, VARIANTS, StudyConfig, aggregate, command_line


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `casa study --quick` run through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("study") / "quick"
    docs = out.parent / "docs"
    threads = torch.get_num_threads()
    try:
        assert main(["study", "--quick", "--out", str(out), "--docs", str(docs), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, docs


def test_quick_study_writes_results_for_every_variant(quick):
    out, _ = quick
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy"]) == set(VARIANTS)
    assert len(res["runs"]) == len(VARIANTS)  # one seed
    from casa.study.run import CATEGORIES

    for name, r in res["accuracy"].items():
        assert set(r["tasks"]) == set(TASKS)
        assert set(r["categories"]) == {"coarse", "fine-grained", "multi-image"}
        [run] = [x for x in res["runs"] if x["variant"] == name]  # one seed: the category is that run's mean
        for cat, c in r["categories"].items():
            want = sum(run["tasks"][t]["score"] for t in CATEGORIES[cat]) / len(CATEGORIES[cat])
            assert c["mean"] == pytest.approx(want) and c["std"] == 0.0 and c["n"] == 1
            blind = sum(run["tasks"][t]["blind"] for t in CATEGORIES[cat]) / len(CATEGORIES[cat])
            assert r["blind_categories"][cat]["mean"] == pytest.approx(blind)
        assert set(r["blind_tasks"]) == set(TASKS)
    assert set(res["prior"]) == set(TASKS)
    for name in VARIANTS:
        t = res["bench"]["train"][name]
        assert t["text_tok_s"] > 0 and t["variant"] == name
        s = res["bench"]["stream"][name]["summary"]
        assert s["turns"] == SIZES["quick"]["stream"]["turns"]
        assert s["first_10pct"]["ttft_ms"] > 0 and s["last_10pct"]["ttft_ms"] > 0
    # insertion keeps every image token in its cache; casa only text
    kv = {n: res["bench"]["stream"][n]["kv_tokens"][-1] for n in ("casa", "insertion")}
    st = SIZES["quick"]["stream"]
    assert kv["insertion"] >= st["turns"] * st["image_tokens"]
    assert kv["casa"] < kv["insertion"] - (st["turns"] - 2) * st["image_tokens"]
    # gating: every casa-with-text-keys variant, per task and fusion layer; shares sum to one
    shares = res["gating"]["shares"]
    assert set(shares) == {"casa", "casa_before", "casa_replace", "casa_shared"}
    n_layers = SIZES["quick"]["model"]["lm"]["n_layers"]
    for per in shares.values():
        assert set(per) == set(TASKS)
        for layers in per.values():
            assert len(layers) == n_layers
            for v in layers.values():
                assert abs(v["image"]["mean"] + v["text"]["mean"] - 1) < 1e-4
                assert 0 <= v["self"]["mean"] <= v["text"]["mean"] + 1e-6
    assert set(res["gating"]["gates"]) == {"gated_ca"}
    assert len(res["gating"]["gates"]["gated_ca"]) == n_layers
    assert {c["verdict"] for c in res["claims"]} <= {"holds", "does not hold", "not testable here"}
    assert len(res["claims"]) >= 8
    assert res["command"].startswith("casa study --out") and "--quick" in res["command"]


def test_quick_study_report_and_plots(quick):
    out, docs = quick
    report = (out / "report.md").read_text()
    for section in ("## Claims of the paper", "## Accuracy", "## Training cost and streaming",
                    "## Implicit gating", "prior (most frequent answer)", "blind (images withheld",
                    "casa_no_text_keys", "gated_ca** gates", "fine-grained", "multi-image"):
        assert section in report, section
    for png in ("accuracy_memory.png", "gating.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (docs / f"study_{png}").is_file()
    doc = (docs / "study.md").read_text()
    assert "](study_accuracy_memory.png)" in doc and "](accuracy_memory.png)" in report


def test_quick_study_reuses_finished_runs(quick, capsys):
    out, _ = quick
    from casa.study.run import run

    threads = torch.get_num_threads()
    try:
        res = run(StudyConfig(out=str(out), size="quick", threads=1, variants=["casa", "insertion"]))
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("reuse ") == 2
    assert set(res["accuracy"]) == {"casa", "insertion"}


def _tiny_model(variant, **fusion):
    from casa.config import ModelConfig
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**SIZES["quick"]["model"], "fusion": {"variant": variant, **fusion}})
    return CasaModel(cfg)


def _batch(model, tasks=("color", "compare")):
    from casa.data import Processor, pack_row
    from casa.pretrained.tokenizer import ByteTokenizer

    proc = Processor(ByteTokenizer(), model.config.vision)
    d = difficulty({"image_size": 32})
    return pack_row([proc.pixels(proc.encode(make_sample(t, 0, i, d))) for t in tasks for i in range(2)])


def test_attention_shares_match_the_model_and_do_not_change_it():
    model = _tiny_model("casa").eval()
    batch = _batch(model)
    with torch.no_grad():
        before = model(batch)
    shares = attention_shares(model, batch)
    with torch.no_grad():
        after = model(batch)
    assert torch.equal(before, after)
    assert sorted(shares) == [0, 1]
    for v in shares.values():
        assert v["queries"] > 0
        assert abs(v["image"] + v["text"] - 1) < 1e-5 and 0 < v["image"] < 1
        assert 0 < v["self"] < v["text"]
    # without text keys (== ca) all the mass is on the images
    shares = attention_shares(_tiny_model("casa", text_keys=False), batch)
    assert all(abs(v["image"] - 1) < 1e-5 and v["self"] == 0 for v in shares.values())


def test_attention_shares_equal_an_explicit_softmax():
    """Shares recomputed here from the model's own q/k, one query, head and key at a time:
    scale 1/sqrt(head_dim), query head h reads kv head h // (n_heads / n_kv_heads)."""
    import math

    from conftest import make_batch

    model = _tiny_model("casa").eval()
    lm = model.config.lm
    assert lm.n_kv_heads < lm.n_heads
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random, non-zero projections: peaked, head-dependent scores
        for block in model.blocks:
            for proj in (block.fusion.attn.q_proj, block.fusion.attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.6)
    T, points = 10, [3, 7]  # windows [0, 3) without an image, [3, 7) image 0, [7, 10) image 1
    batch = make_batch(torch.randint(0, 200, (1, T), generator=g), points, image_size=32)
    batch.loss_mask = torch.zeros(1, T, dtype=torch.bool)
    batch.loss_mask[0, [1, 5, 8, 9]] = True  # token 1 has no image in its window: never counted
    captured = {}
    for i, block in enumerate(model.blocks):
        block.fusion.probe = lambda q, k_txt, k_img, layout, text_keys, i=i: captured.setdefault(i, (q, k_txt, k_img))
    with torch.no_grad():
        model(batch)
    for block in model.blocks:
        block.fusion.probe = None
    shares = attention_shares(model, batch)

    n, H, group = model.config.vision.tokens_per_image, lm.n_heads, lm.n_heads // lm.n_kv_heads
    for layer, (q, k_txt, k_img) in captured.items():
        per_query = {}
        for t in range(points[0], T):
            j = 0 if t < points[1] else 1
            start = points[j]
            image, text, own = 0.0, 0.0, 0.0
            for h in range(H):
                kv = h // group
                keys = [k_img[j * n + m, kv] for m in range(n)] + [k_txt[0, s, kv] for s in range(start, t + 1)]
                scores = torch.stack([q[0, t, h] @ k for k in keys]).double() / math.sqrt(lm.head_dim)
                p = torch.softmax(scores, dim=0)
                image += float(p[:n].sum()) / H
                text += float(p[n:].sum()) / H
                own += float(p[-1]) / H
            per_query[t] = (image, text, own)
        got = shares[layer]
        assert got["queries"] == T - points[0]
        for k, name in enumerate(("image", "text", "self")):
            want = sum(v[k] for v in per_query.values()) / len(per_query)
            assert got[name] == pytest.approx(want, abs=1e-5), (layer, name)
            answer = [per_query[t][k] for t in (5, 8, 9)]
            assert got[f"answer_{name}"] == pytest.approx(sum(answer) / 3, abs=1e-5), (layer, name)
        assert 0.05 < got["image"] < 0.95  # a real mix: a wrong scale or head would move it


def test_attention_shares_follow_the_keys():
    """With every key zeroed, each query spreads its mass evenly over the keys it sees:
    the share is a measurement of the keys, not a constant."""
    from conftest import make_batch

    model = _tiny_model("casa").eval()
    T, points = 10, [3, 7]
    batch = make_batch(torch.arange(T) + 40, points, image_size=32)
    with torch.no_grad():
        for block in model.blocks:
            block.fusion.attn.k_proj.weight.zero_()
    flat = attention_shares(model, batch)  # all scores 0: uniform over visible keys
    n = model.config.vision.tokens_per_image
    # the query j tokens into its window sees n image keys and j + 1 text keys
    js = [t - (points[0] if t < points[1] else points[1]) for t in range(points[0], T)]
    want = {"image": sum(n / (n + j + 1) for j in js) / len(js),
            "self": sum(1 / (n + j + 1) for j in js) / len(js)}
    for layer in (0, 1):
        assert flat[layer]["image"] == pytest.approx(want["image"], abs=1e-6)
        assert flat[layer]["text"] == pytest.approx(1 - want["image"], abs=1e-6)
        assert flat[layer]["self"] == pytest.approx(want["self"], abs=1e-6)


def test_gate_values_only_for_gated_ca():
    assert gate_values(_tiny_model("casa")) == {}
    g = gate_values(_tiny_model("gated_ca"))
    assert sorted(g) == [0, 1] and all(v == {"attn": 0.0, "ffn": 0.0} for v in g.values())


def _fake_results(casa_fine, insertion_fine, ca_fine, blind_fine=0.1):
    def run(name, seed, fine):
        scores = {t: 0.5 for t in TASKS}
        scores.update(docvqa=fine, chartqa=fine)
        return {"variant": name, "seed": seed, "train_seconds": 1.0, "final_loss": 1.0,
                "tasks": {t: {"score": s, "blind": blind_fine} for t, s in scores.items()}}

    runs = [run(n, s, f) for n, f in (("casa", casa_fine), ("insertion", insertion_fine), ("ca", ca_fine))
            for s in range(3)]
    return {"accuracy": aggregate(runs, list(TASKS)), "bench": {"train": {}, "stream": {}},
            "gating": {"shares": {}, "gates": {}}}


def test_claim_verdicts_are_computed_from_the_numbers():
    def verdict(res, prefix):
        return next(c["verdict"] for c in claims(res) if c["claim"].startswith(prefix)
                    and "fine-grained" in c["claim"])

    assert verdict(_fake_results(0.70, 0.72, 0.69), "CASA nearly matches insertion") == "holds"
    assert verdict(_fake_results(0.60, 0.72, 0.69), "CASA nearly matches insertion") == "does not hold"
    assert verdict(_fake_results(0.60, 0.72, 0.69), "CASA at least matches CA") == "does not hold"
    assert verdict(_fake_results(0.70, 0.72, 0.69), "CASA at least matches CA") == "holds"
    # nobody beats blind on fine-grained: ranking is noise
    assert verdict(_fake_results(0.1, 0.12, 0.1), "CASA nearly matches insertion") == "not testable here"


def test_study_config_and_command_line():
    with pytest.raises(ValueError, match="unknown variants"):
        StudyConfig(variants=["casa", "nope"])
    with pytest.raises(ValueError):
        StudyConfig(seeds=0)
    cfg = StudyConfig(out="x", size="quick", seeds=2)
    assert cfg.spec["seeds"] == 2 and SIZES["quick"]["seeds"] == 1
    assert command_line(cfg) == "casa study --out x --quick --seeds 2"
    assert StudyConfig().spec["seeds"] >= 3
