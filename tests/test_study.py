import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from casa.cli import main
from casa.data import make_sample
from casa.data.tasks import difficulty
from casa.study.gating import attention_shares, gate_values
from casa.study.run import (
    FULL_ARMS,
    SIZES,
    TASKS,
    VARIANTS,
    StudyConfig,
    arms_of,
    command_line,
)

QUICK_ARMS = arms_of(SIZES["quick"]["variants"], SIZES["quick"]["full_arms"])


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


def test_quick_study_runs_both_stages_both_regimes_and_the_flops_matched_row(quick):
    out, _ = quick
    res = json.loads((out / "results.json").read_text())
    assert QUICK_ARMS == ["insertion", "ca", "casa", "casa_every2", "casa@full", "insertion@full", "insertion@flops"]
    assert list(res["config"]["arms"]) == QUICK_ARMS and set(res["accuracy"]) == set(QUICK_ARMS)
    assert res["config"]["arms"]["casa@full"] == {"variant": "casa", "regime": "full", "matching": "samples"}
    runs = {r["arm"]: r for r in res["runs"]}
    assert len(res["runs"]) == len(QUICK_ARMS)  # one seed
    # stage 0: both parts trained once, cached on disk
    s0 = res["stage0"]["0"]
    assert s0["lm"]["steps"] == SIZES["quick"]["stage0"]["lm_steps"] and s0["vision"]["char_accuracy"] > 0
    assert all((out / "stage0" / "s0" / f).is_file() for f in ("lm.safetensors", "vision.safetensors"))
    # sample-matched packs: every arm of the seed saw the same samples; insertion's rows are longer
    steps = SIZES["quick"]["train"]["steps"]
    matched = [r for r in res["runs"] if r["matching"] == "samples"]
    assert all(r["steps"] == steps for r in matched) and len({r["samples"] for r in matched}) == 1
    assert runs["insertion"]["sequence_tokens"] > runs["casa"]["sequence_tokens"]
    assert runs["insertion"]["flops_per_step"] > runs["casa"]["flops_per_step"] > 0
    # compute-matched insertion: as many steps as casa's FLOPs buy
    ratio = runs["casa"]["flops_per_step"] / runs["insertion"]["flops_per_step"]
    assert runs["insertion@flops"]["steps"] == max(1, round(steps * ratio))
    # regimes: the frozen LM trains only its fusion layers (+ projector and the encoder's last block)
    assert runs["casa"]["trainable"] < runs["casa@full"]["trainable"] == runs["casa@full"]["params"]
    assert runs["insertion"]["trainable"] < runs["casa"]["trainable"]  # frozen insertion: no fusion layer to train
    assert runs["casa"]["lr"] == runs["casa@full"]["lr"] == {k: SIZES["quick"]["train"][k] for k in ("lr_new", "lr_pretrained")}
    # fine-grained tasks: scored per level, the task's score is the levels' mean
    for r in res["runs"]:
        assert set(r["tasks"]) == set(TASKS)
        for t in ("digits", "bars", "table"):
            levels = r["levels"][t]
            assert sorted(levels) == ["1", "2", "3"]
            assert r["tasks"][t]["score"] == pytest.approx(sum(v["score"] for v in levels.values()) / 3)
        assert [c["step"] for c in r["curve"]] == sorted({max(1, round(r["steps"] / 2)), r["steps"]})
    assert set(res["prior"]) == set(TASKS) and set(res["prior_levels"]) == {"digits", "bars", "table"}
    # benchmarks per variant
    for name in SIZES["quick"]["variants"]:
        assert res["bench"]["train"][name]["text_tok_s"] > 0
        assert res["bench"]["stream"][name]["summary"]["turns"] == SIZES["quick"]["stream"]["turns"]
    kv = {n: res["bench"]["stream"][n]["kv_tokens"][-1] for n in ("casa", "insertion")}
    st = SIZES["quick"]["stream"]
    assert kv["insertion"] >= st["turns"] * st["image_tokens"] > kv["casa"]
    assert {c["verdict"] for c in res["claims"]} <= {"holds", "does not hold", "not testable here"}
    assert res["command"].startswith("casa study --out") and "--quick" in res["command"]


def test_stage1_starts_from_stage0(quick):
    """Every arm's model: the stage-0 LM by name, fusion layers copied from the block's SA, the encoder loaded."""
    from safetensors.torch import load_file

    from casa.config import ModelConfig
    from casa.study.stage0 import init_stage1

    out, _ = quick
    d = out / "stage0" / "s0"
    lm, vision = load_file(str(d / "lm.safetensors")), load_file(str(d / "vision.safetensors"))
    model = init_stage1(ModelConfig.from_dict({**SIZES["quick"]["model"], "fusion": VARIANTS["casa"]}), d)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in lm.items())
    assert all(torch.equal(state["vision.encoder." + k], v) for k, v in vision.items())
    block = model.blocks[0]
    for (n, p), (_, q) in zip(block.attn.named_parameters(), block.fusion.attn.named_parameters()):
        assert torch.equal(p, q), n


def test_quick_study_report_and_plots(quick):
    out, docs = quick
    report = (out / "report.md").read_text()
    assert report.index("| claim") < report.index("## Claims")  # the one-screen summary comes first
    for section in ("## Accuracy per arm and category", "## Paired differences", "## Stage 0",
                    "## Training cost per arm", "insertion@flops", "casa@full", "fine-grained", "multi-image"):
        assert section in report, section
    for png in ("study_accuracy.png", "study_curves.png", "study_levels.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (docs / png).is_file()
    assert (docs / "study.md").read_text() == report
    # the third edition's experiments: compression of the frozen casa and insertion arms, the gate per token
    res = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in res["runs"]}
    spec = SIZES["quick"]["compression"]
    for arm in ("casa", "insertion"):
        rows = runs[arm]["compression"]["rows"]
        assert [(r["method"], r["factor"]) for r in rows] == [("none", 1)] + [
            (m, f) for m in ("pool", "topk") for f in spec["factors"] if f != 1]
        assert [r["tokens_per_window"] for r in rows[:3]] == [16, 8, 4]  # a 4 x 4 grid: none, pool 2x, pool 4x
    assert runs["insertion"]["compression"]["rows"][1]["kv_bytes_per_frame"] * 2 == \
        runs["insertion"]["compression"]["rows"][0]["kv_bytes_per_frame"]  # half the tokens, half the cache
    assert {r["kv_bytes_per_frame"] for r in runs["casa"]["compression"]["rows"]} == {0}  # never in the cache
    assert "compression" not in runs["ca"] and set(runs["casa"]["gate_tokens"]["tasks"]) == {
        "color", "count", "position", "digits", "bars", "table"}
    for section, png in (("## Image-token compression", "study_compression.png"),
                         ("## How often fusion layers occur", "study_frequency.png"),
                         ("## What the implicit gate does per token", "study_gate_heatmaps.png")):
        assert section in report and f"]({png})" in report
        assert (docs / png).read_bytes()[:4] == b"\x89PNG"


def test_quick_study_reuses_finished_runs(quick, capsys):
    out, _ = quick
    from casa.study.run import run

    threads = torch.get_num_threads()
    try:
        res = run(StudyConfig(out=str(out), size="quick", threads=1, variants=["casa", "insertion"]))
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert text.count("reuse ") == 1 + 5  # stage 0, and insertion, casa, both @full, insertion@flops
    assert set(res["accuracy"]) == {"casa", "insertion", "insertion@full", "casa@full", "insertion@flops"}
    assert res["reused"] == {"stage0_seeds": [0], "arm_runs": [f"{a}_s0" for a in res["config"]["arms"]],
                             "crossimage_runs": [f"{a}_s0" for a in SIZES["quick"]["crossimage"]["arms"]]}
    assert "not counting what it reused from an earlier run" in (out / "report.md").read_text()
    # --jobs: the units go to worker processes (here every one reused): same records
    try:
        again = run(StudyConfig(out=str(out), size="quick", threads=1, jobs=2, variants=["casa", "insertion"]))
    finally:
        torch.set_num_threads(threads)
    assert again["runs"] == res["runs"] and again["command"].endswith("--jobs 2 --variants casa,insertion")


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


def test_study_config_and_command_line():
    with pytest.raises(ValueError, match="--variants: unknown"):
        StudyConfig(variants=["casa", "nope"])
    with pytest.raises(ValueError):
        StudyConfig(seeds=0)
    with pytest.raises(ValueError, match="--jobs 0"):
        StudyConfig(jobs=0)
    cfg = StudyConfig(out="x", size="quick", seeds=2)
    assert cfg.spec["seeds"] == 2 and SIZES["quick"]["seeds"] == 1
    assert command_line(cfg) == "casa study --out x --quick --seeds 2"
    assert StudyConfig().spec["seeds"] >= 3 and set(StudyConfig().spec["variants"]) == set(VARIANTS)
    assert StudyConfig(device="cuda").spec["train"]["steps"] > StudyConfig().spec["train"]["steps"]
    assert "--device cuda" in command_line(StudyConfig(out="x", device="cuda"))
    assert set(FULL_ARMS) <= set(arms_of(list(VARIANTS), list(FULL_ARMS)))
    assert VARIANTS["casa_replace"]["every"] == 2  # some blocks replaced, not all


def test_an_interrupted_stage0_keeps_the_part_it_finished_and_says_so(tmp_path, monkeypatch):
    """Stage 0 saves the text LM when it is trained and shows progress; Ctrl-C during the vision encoder
    keeps the LM, the summary names it, and a rerun trains only the encoder."""
    from casa.config import ModelConfig
    from casa.study.run import saved_summary
    from casa.study import stage0
    from casa.study.stage0 import pretrain

    monkeypatch.setattr(stage0, "PROGRESS_AFTER_S", 0.0)
    spec = SIZES["quick"]
    base = ModelConfig.from_dict({**spec["model"], "fusion": {"variant": "casa"}})
    lines = []

    def say(line):
        lines.append(line)
        if "vision encoder: step" in line:
            raise KeyboardInterrupt

    root = tmp_path / "out" / "stage0"
    with pytest.raises(KeyboardInterrupt):
        pretrain(root, base, ["color"], difficulty(spec["difficulty"]), spec["stage0"], 0, say=say)
    assert any("text LM: step 2/20, loss" in line for line in lines)  # progress every tenth of the steps
    assert any(line.endswith(f"saved in {root / 's0'}") for line in lines)
    assert (root / "s0" / "lm_stats.json").is_file() and not (root / "s0" / "stats.json").exists()
    summary = saved_summary(StudyConfig(out=str(tmp_path / "out"), size="quick"))
    assert "stage 0: seed 0: text LM; arm runs: 0 of 7" in summary and "run the same command again" in summary
    lines.clear()
    res = pretrain(root, base, ["color"], difficulty(spec["difficulty"]), spec["stage0"], 0, say=lines.append)
    assert any("reuse the text LM" in line for line in lines) and not any("text LM: step" in line for line in lines)
    assert (root / "s0" / "stats.json").is_file() and res["vision"]["steps"] == 20


def test_headline_arms_get_more_seeds_and_an_explicit_seed_count_overrides_it():
    from casa.study.run import HEADLINE_ARMS, saved_summary, seed_arms

    spec = StudyConfig(size="full").spec
    arms = arms_of(spec["variants"], spec["full_arms"])
    plan = seed_arms(spec, arms)
    assert [s for s, _ in plan] == [0, 1, 2, 3, 4] and all(a == arms for _, a in plan[:3])
    assert all(a == [x for x in arms if x in HEADLINE_ARMS] for _, a in plan[3:])
    assert set(HEADLINE_ARMS) <= set(arms) and "insertion@flops" in plan[3][1]  # flops needs casa and insertion
    assert [(s, a) for s, a in seed_arms(StudyConfig(size="full", seeds=2).spec, arms)] == [(0, arms), (1, arms)]
    # an interrupted run counts the arm runs of the whole plan
    assert "arm runs: 0 of " + str(3 * len(arms) + 2 * len(HEADLINE_ARMS)) in saved_summary(
        StudyConfig(out="/nonexistent/casa-study", size="full"))
