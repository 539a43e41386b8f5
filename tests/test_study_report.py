"""`casa study`'s statistics, claims and report, on results built here with
known numbers (no training): intervals, paired differences, verdicts that
follow the numbers, the reasons, and the files write_report leaves."""

import copy
import json
import math
import sys

import pytest

from casa.study.claims import claims
from casa.study.report import derive, write_report
from casa.study.stats import aggregate, category_tasks, interval, paired, t_quantile

CATEGORIES = {"coarse": ["color", "count"], "fine-grained": ["digits", "bars"], "multi-image": ["compare"]}
ARMS = {"casa": ("casa", "frozen", "samples"), "insertion": ("insertion", "frozen", "samples"),
        "ca": ("ca", "frozen", "samples"),
        "ca_ffn": ("ca_ffn", "frozen", "samples"), "insertion@flops": ("insertion", "frozen", "flops"),
        "casa@full": ("casa", "full", "samples"), "insertion@full": ("insertion", "full", "samples")}
# score of each arm per category (fractions); every task of the category gets it, plus a per-seed offset
SCORES = {"casa": {"coarse": 0.80, "fine-grained": 0.70, "multi-image": 0.60},
          "insertion": {"coarse": 0.82, "fine-grained": 0.72, "multi-image": 0.62},
          "ca": {"coarse": 0.79, "fine-grained": 0.69, "multi-image": 0.60},
          "ca_ffn": {"coarse": 0.81, "fine-grained": 0.72, "multi-image": 0.61},
          "insertion@flops": {"coarse": 0.78, "fine-grained": 0.66, "multi-image": 0.58},
          "casa@full": {"coarse": 0.85, "fine-grained": 0.75, "multi-image": 0.65},
          "insertion@full": {"coarse": 0.86, "fine-grained": 0.76, "multi-image": 0.66}}
OFFSETS = {"casa": (0.0, 0.03, -0.02), "insertion": (0.01, -0.01, 0.02), "ca": (-0.01, 0.0, 0.02)}
SEEDS = (0, 1, 2)
BLIND, PRIOR = 0.10, 0.05


def make_results(scores=None, offsets=None, blind=None, *, mem=None, tok_s=None, ttft=None, kv=None, shares=None):
    """A `casa study` results dict (the shape run.py hands to write_report) with known numbers."""
    scores = {a: {**SCORES[a], **(scores or {}).get(a, {})} for a in ARMS}
    offsets = {**OFFSETS, **(offsets or {})}
    blind = {**{a: {} for a in ARMS}, **(blind or {})}
    mem = {"insertion": 190e6, "ca": 95e6, "casa": 100e6, "ca_ffn": 150e6, **(mem or {})}
    tok_s = {"insertion": 1500.0, "ca": 1800.0, "casa": 1600.0, "ca_ffn": 1400.0, **(tok_s or {})}
    ttft = {"casa": [5.0] * 10, "insertion": [5.0 + i for i in range(10)], **(ttft or {})}
    kv = {"casa": [10 * (i + 1) for i in range(10)], "insertion": [100 * (i + 1) for i in range(10)], **(kv or {})}
    shares = shares or {"color": 0.3, "count": 0.35, "digits": 0.6, "bars": 0.55, "compare": 0.4}
    runs = []
    for seed in SEEDS:
        for arm, (variant, regime, matching) in ARMS.items():
            off = offsets.get(arm, (0.0, 0.01, -0.01))[seed]
            tasks, levels = {}, {}
            for cat, ts in CATEGORIES.items():
                b = blind[arm].get(cat, BLIND)
                for t in ts:
                    tasks[t] = {"metric": "exact", "score": scores[arm][cat] + off, "blind": b, "n": 40}
                    if cat == "fine-grained":
                        levels[t] = {"1": {"score": scores[arm][cat] + off + 0.1, "blind": b, "n": 20},
                                     "2": {"score": scores[arm][cat] + off - 0.1, "blind": b, "n": 20}}
            flops = 3e9 if variant == "insertion" else 1e9
            steps = 200 if matching == "flops" else 600
            runs.append({
                "arm": arm, "variant": variant, "regime": regime, "matching": matching, "seed": seed,
                "steps": steps, "samples": steps * 15, "sequence_tokens": steps * 400, "flops_per_step": flops,
                "train_seconds": 60.0 + seed, "final_loss": 0.4, "params": 1000, "trainable": 300,
                "tasks": tasks, "levels": levels,
                "curve": [{"step": 300, "tasks": {t: v["score"] / 2 for t, v in tasks.items()}},
                          {"step": 600, "tasks": {t: v["score"] for t, v in tasks.items()}}],
                "gating": ({t: {str(layer): {"image": s, "text": 1 - s, "self": 0.1, "answer_image": s,
                                             "answer_text": 1 - s, "answer_self": 0.1} for layer in (0, 1)}
                            for t, s in shares.items()} if variant == "casa" else {}),
                "gates": {}})
    train = {v: {"text_tok_s": tok_s[v], "peak_mem_bytes": mem[v]} for v in mem}
    stream = {v: {"summary": {"turns": 10, "first_10pct": {"ttft_ms": ttft[v][0]},
                              "last_10pct": {"ttft_ms": ttft[v][-1]},
                              "ttft_ratio_last_first": ttft[v][-1] / ttft[v][0]},
                  "ttft_ms": ttft[v], "peak_mem_bytes": [1e6] * 10, "kv_tokens": kv[v]} for v in ttft}
    return {
        "command": "casa study --out runs/study", "wall_seconds": 100.0,
        "config": {"size": "full", "spec": {}, "threads": 2, "torch": "2.x", "cpu_count": 2,
                   "categories": {**CATEGORIES, "multi-image": ["compare", "video"]},  # video not run: a subset
                   "levels": [1, 2], "primary_regime": "frozen",
                   "variants_fusion": {v: {"variant": v} for v in mem},
                   "arms": {a: {"variant": v, "regime": r, "matching": m} for a, (v, r, m) in ARMS.items()}},
        "stage0": {str(s): {"lm": {"steps": 400, "seconds": 30.0, "final_loss": 0.9},
                            "vision": {"steps": 500, "seconds": 40.0, "final_loss": 0.5, "char_accuracy": 0.95}}
                   for s in SEEDS},
        "runs": runs,
        "prior": {t: PRIOR for ts in CATEGORIES.values() for t in ts},
        "prior_levels": {t: {1: PRIOR, 2: PRIOR} for t in CATEGORIES["fine-grained"]},  # as run.py builds it
        "bench": {"train_config": {"text_tokens": 384, "image_tokens": 3840, "tokens_per_image": 64, "d_model": 128,
                                   "n_layers": 4, "threads": 2, "repeats": 3},
                  "stream_config": {"turns": 10, "image_tokens": 64, "prompt_tokens": 4, "new_tokens": 8},
                  "train": train, "stream": stream},
    }


def verdicts(results) -> dict[str, dict]:
    return {c["claim"]: c for c in derive(results)["claims"]}


def claim(results, start: str) -> dict:
    found = [c for name, c in verdicts(results).items() if name.startswith(start)]
    assert len(found) == 1, (start, [c["claim"] for c in derive(results)["claims"]])
    return found[0]


# -------------------------------------------------------------- statistics
def test_interval_of_a_known_sample():
    ci = interval([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["n"] == 3
    assert ci["std"] == pytest.approx(0.1)
    assert ci["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.6 - ci["half"], 0.6 + ci["half"]))
    one = interval([0.4, None])  # None is skipped; one value: a mean, no interval
    assert one["mean"] == 0.4 and one["n"] == 1 and one["half"] is None and one["lo"] is None
    assert interval([])["mean"] is None
    # the table row at or below df: wider (conservative) between rows
    assert t_quantile(1) == 12.706 and t_quantile(30) == t_quantile(35) == 2.042 and t_quantile(10**6) == 1.980


def test_aggregate_means_over_seeds_of_per_run_category_scores():
    res = make_results(scores={"casa": {"coarse": 0.5}})
    # one task of casa's coarse category differs, so the category score is the mean of its tasks per run
    for r in res["runs"]:
        if r["arm"] == "casa":
            r["tasks"]["count"]["score"] = 0.9
    acc = aggregate(res["runs"], category_tasks(res))
    per_seed = [(0.5 + o + 0.9) / 2 for o in OFFSETS["casa"]]
    want = interval(per_seed)
    got = acc["casa"]["categories"]["coarse"]
    assert got["mean"] == pytest.approx(want["mean"]) and got["half"] == pytest.approx(want["half"])
    assert acc["casa"]["blind_categories"]["coarse"]["mean"] == pytest.approx(BLIND)
    assert acc["casa"]["blind_categories"]["coarse"]["half"] == pytest.approx(0)
    assert acc["casa"]["tasks"]["count"]["mean"] == pytest.approx(0.9) and acc["casa"]["seeds"] == list(SEEDS)
    assert category_tasks(res)["multi-image"] == ["compare"]  # video was not run
    # a run just trained keys its levels 1, 2; one read back from JSON "1", "2": the same levels
    for r in res["runs"]:
        if r["seed"] == 0:
            r["levels"] = {t: {int(k): v for k, v in per.items()} for t, per in r["levels"].items()}
    acc = aggregate(res["runs"], category_tasks(res))
    lv = acc["casa"]["levels"]["digits"]
    assert list(lv) == ["1", "2"] and lv["1"]["n"] == 3
    assert lv["1"]["mean"] == pytest.approx(0.70 + 0.1 + sum(OFFSETS["casa"]) / 3)
    curve = acc["casa"]["curves"]["fine-grained"]
    assert [p["step"] for p in curve] == [300, 600] and [p["n"] for p in curve] == [3, 3]
    assert curve[0]["mean"] == pytest.approx((0.70 + sum(OFFSETS["casa"]) / 3) / 2)
    cost = acc["insertion@flops"]["cost"]
    assert cost["flops"]["mean"] == pytest.approx(200 * 3e9) and cost["samples"]["mean"] == 3000


def test_paired_differences_are_the_mean_of_per_seed_differences():
    res = make_results()
    cats = category_tasks(res)
    d = paired(res["runs"], "casa", "insertion", cats)
    per_seed = [(0.70 + a) - (0.72 + b) for a, b in zip(OFFSETS["casa"], OFFSETS["insertion"])]
    assert d["seeds"] == list(SEEDS) and d["per_seed"]["fine-grained"] == pytest.approx(per_seed)
    want = interval(per_seed)
    got = d["categories"]["fine-grained"]
    assert got["mean"] == pytest.approx(want["mean"]) and got["half"] == pytest.approx(want["half"])
    assert got["half"] == pytest.approx(4.303 * interval(per_seed)["std"] / math.sqrt(3))
    blind = paired(res["runs"], "casa", None, cats)
    assert blind["b"] == "blind"
    assert blind["categories"]["coarse"]["mean"] == pytest.approx(0.80 + sum(OFFSETS["casa"]) / 3 - BLIND)
    # only the seeds both arms ran
    res["runs"] = [r for r in res["runs"] if not (r["arm"] == "insertion" and r["seed"] == 2)]
    assert paired(res["runs"], "casa", "insertion", cats)["per_seed"]["fine-grained"] == pytest.approx(per_seed[:2])
    labels = set(derive(make_results())["paired"])
    assert {"casa - insertion", "casa - ca", "casa - insertion@flops", "ca_ffn - ca",
            "casa@full - insertion@full", "casa@full - casa", "casa - blind", "insertion@full - blind"} <= labels


# ------------------------------------------------------------------ claims
@pytest.mark.parametrize("start, good, bad", [
    ("CASA nearly matches insertion on fine-grained tasks (frozen", {}, {"casa": {"fine-grained": 0.55}}),
    ("CASA nearly matches insertion on fine-grained tasks (full", {}, {"casa@full": {"fine-grained": 0.60}}),
    ("CASA at least matches CA (fine-grained, frozen", {}, {"ca": {"fine-grained": 0.80}}),
    ("CASA at least matches CA (coarse, frozen", {}, {"casa": {"coarse": 0.70}}),
    ("CASA at least matches compute-matched insertion on fine-grained tasks (frozen", {},
     {"insertion@flops": {"fine-grained": 0.80}}),
    ("Image-token FFN updates buy accuracy", {}, {"ca_ffn": {"coarse": 0.70, "fine-grained": 0.60,
                                                             "multi-image": 0.50}}),
])
def test_accuracy_verdicts_flip_with_the_numbers(start, good, bad):
    assert claim(make_results(good), start)["verdict"] == "holds"
    c = claim(make_results(bad), start)
    assert c["verdict"] == "does not hold" and c["reason"]


@pytest.mark.parametrize("start, bad", [
    ("Training memory", {"mem": {"insertion": 120e6}}),
    ("Training memory", {"mem": {"casa": 140e6}}),
    ("Training speed", {"tok_s": {"ca": 1500.0}}),
    ("Image-token FFN updates buy accuracy", {"mem": {"ca_ffn": 100e6}}),
    ("Streaming: CASA's time to first token", {"ttft": {"casa": [5.0 + i for i in range(10)]}}),
    ("Streaming: CASA's KV cache", {"kv": {"insertion": [20 * (i + 1) for i in range(10)]}}),
    ("CASA's softmax acts as an implicit", {"shares": {t: 0.5 for t in ("color", "count", "digits", "bars")}}),
])
def test_benchmark_and_gate_verdicts_flip_with_the_numbers(start, bad):
    assert claim(make_results(), start)["verdict"] == "holds"
    c = claim(make_results(**bad), start)
    assert c["verdict"] == "does not hold" and c["reason"]


def test_clearly_beats_needs_the_interval_above_zero():
    c = claim(make_results(), "CASA at least matches CA (fine-grained, frozen")
    assert c["clearly_beats"] is False  # +1 point with seed noise of a few points
    c = claim(make_results({"casa": {"fine-grained": 0.80}}), "CASA at least matches CA (fine-grained, frozen")
    assert c["clearly_beats"] is True and c["interval"][0] > 0 and "clearly beats ca" in c["measured"]


def test_a_category_nobody_learned_is_not_testable():
    flat = {a: {"fine-grained": BLIND + 0.02} for a in ARMS}  # 2 points over blind: under the 5-point margin
    res = make_results(flat)
    for start in ("CASA nearly matches insertion on fine-grained tasks (frozen",
                  "CASA at least matches CA (fine-grained, frozen", "CASA at least matches compute-matched"):
        c = claim(res, start)
        assert c["verdict"] == "not testable here", c
        assert "beats max(blind, prior) on fine-grained by 5 points (best gain +2.7 points (insertion))" in c["reason"]
        assert "insertion still rose +6.3 points between steps 300 and 600" in c["reason"]  # the curve rule
    assert claim(res, "CASA at least matches CA (coarse, frozen")["verdict"] == "holds"
    # the reason points at the regime that did learn it
    only_full = {a: {"fine-grained": BLIND + 0.02} for a in ARMS if "@full" not in a}
    c = claim(make_results(only_full), "CASA nearly matches insertion on fine-grained tasks (frozen")
    assert c["verdict"] == "not testable here" and "the full regime learns it" in c["reason"]
    # ... or at a stage-0 encoder that cannot read
    res = make_results(flat)
    for s in res["stage0"].values():
        s["vision"]["char_accuracy"] = 0.4
    assert "reads 40% of characters" in claim(res, "CASA nearly matches insertion on fine-grained tasks (frozen")[
        "reason"]
    # nothing learned anywhere: the claims over "every learned category" have nothing to stand on
    res = make_results({a: {c: BLIND for c in CATEGORIES} for a in ARMS})
    c = claim(res, "Image-token FFN")
    assert c["verdict"] == "not testable here" and c["reason"].startswith("no category learned in the frozen")
    # the blind baseline counts per arm: a high blind score means nothing was learned from the images
    res = make_results(blind={a: {"coarse": 0.78} for a in ARMS})
    assert claim(res, "CASA at least matches CA (coarse, frozen")["verdict"] == "not testable here"


def test_reasons_point_at_the_ablation_that_explains_the_gap():
    start = "CASA nearly matches insertion on fine-grained tasks (frozen"
    # the full regime closes the gap
    c = claim(make_results({"casa": {"fine-grained": 0.55}}), start)
    assert c["reason"].startswith("it holds in the full regime") and "casa@full - insertion@full" in c["reason"]
    # not in the full regime either, but compute-matched insertion is no better than casa
    worse = {"casa": {"fine-grained": 0.55}, "casa@full": {"fine-grained": 0.55}, "insertion@flops":
             {"fine-grained": 0.56}}
    c = claim(make_results(worse), start)
    assert c["reason"].startswith("at equal training FLOPs it holds") and "3.00x the FLOPs per step" in c["reason"]
    # neither; ca (casa without its text keys) scores like casa
    worse["insertion@flops"] = {"fine-grained": 0.72}
    worse["ca"] = {"fine-grained": 0.55}
    c = claim(make_results(worse), start)
    assert c["reason"].startswith("CASA's text keys change nothing measurable") and "casa - ca = " in c["reason"]
    # nothing explains it: the numbers of every ablation tried are listed
    worse["ca"] = {"fine-grained": 0.40}
    c = claim(make_results(worse), start)
    assert c["reason"].startswith("the gap") and "insertion@flops" in c["reason"] and "full regime" in c["reason"]
    # casa clearly under ca, which is casa without its text keys: the text keys are what costs
    worse["ca"] = {"fine-grained": 0.70}
    c = claim(make_results(worse), start)
    assert c["reason"].startswith("CASA's text keys cost accuracy here") and "casa - ca = -15.0" in c["reason"]
    # seeds that disagree: the interval reaches the threshold
    noisy = make_results({"casa": {"fine-grained": 0.64}}, offsets={"casa": (0.0, 0.12, -0.12)})
    c = claim(noisy, start)
    assert c["verdict"] == "does not hold" and c["reason"].startswith("seed noise")
    assert c["interval"][0] < -5 < c["interval"][1]
    # how many seeds would settle it: the half-width shrinks as 1/sqrt(seeds) until it clears the gap
    half, gap = (c["interval"][1] - c["interval"][0]) / 2, abs(c["value"] + 5)
    assert f"about {math.ceil(3 * (half / gap) ** 2)} seeds would settle it" in c["reason"] and 3 * (half / gap) ** 2 > 100


def test_one_seed_gives_no_interval_and_says_so():
    res = make_results({"casa": {"fine-grained": 0.55}})
    res["runs"] = [r for r in res["runs"] if r["seed"] == 0]
    c = claim(res, "CASA at least matches CA (fine-grained, frozen")
    assert c["measured"] == "casa - ca = -13.0 (n=1, no interval) points" and c["interval"] is None
    assert "clearly_beats" not in c
    assert c["reason"].startswith("one seed: the gap (-13.0 < -1) has no interval, so it may be seed noise")
    assert derive(res)["accuracy"]["casa"]["categories"]["coarse"]["half"] is None


def test_claims_need_their_arms():
    res = make_results()
    res["runs"] = [r for r in res["runs"] if r["arm"] not in ("ca", "insertion@flops")]
    res["config"]["arms"] = {a: v for a, v in res["config"]["arms"].items() if a in {r["arm"] for r in res["runs"]}}
    c = claim(res, "CASA at least matches CA (fine-grained, frozen")
    assert c["verdict"] == "not testable here" and "no ca (frozen, samples-matched) arm" in c["reason"]
    assert "insertion (frozen, flops-matched)" in claim(res, "CASA at least matches compute-matched")["reason"]
    # claims of the full regime appear only for arms it has: no ca there, no full-regime CA claim
    assert not any(n.startswith("CASA at least matches CA (coarse, full") for n in verdicts(res))


def test_calibration_line():
    res = derive(make_results())
    cal = res["summary"]["calibration"]
    assert cal["met"] and cal["regimes"]["frozen"]["passed"] == ["digits", "bars"]
    res = derive(make_results({"insertion": {"fine-grained": 0.35}}))  # 25 points over blind
    cal = res["summary"]["calibration"]
    assert not cal["met"] and not cal["regimes"]["frozen"]["met"] and cal["regimes"]["full"]["met"]
    assert cal["regimes"]["frozen"]["tasks"]["digits"]["mean"] == pytest.approx(0.25 + sum(OFFSETS["insertion"]) / 3)


def test_an_uncalibrated_ladder_makes_the_fine_grained_claims_not_testable():
    """insertion only 25 points over blind in the frozen regime: the fine-grained ranking there is not
    testable (and says why); the full regime, calibrated, keeps its verdicts; coarse claims are unaffected."""
    res = derive(make_results({"insertion": {"fine-grained": 0.35}}))
    fine = claim(res, "CASA nearly matches insertion on fine-grained tasks (frozen")
    assert fine["verdict"] == "not testable here" and "not calibrated in the frozen regime" in fine["reason"]
    assert claim(res, "CASA at least matches CA (fine-grained, frozen")["verdict"] == "not testable here"
    assert claim(res, "CASA nearly matches insertion on fine-grained tasks (full")["verdict"] != "not testable here"
    assert claim(res, "CASA at least matches CA (coarse, frozen")["verdict"] != "not testable here"


def test_claims_accept_the_first_edition_runs():
    """Runs without arm/regime/matching/levels/curve (run.py before the second edition) still report."""
    res = make_results()
    for r in res["runs"]:
        for k in ("arm", "regime", "matching", "levels", "curve"):
            r.pop(k)
    res["runs"] = [r for r in res["runs"] if r["variant"] in ("casa", "insertion", "ca")][:9]
    res["config"].pop("arms")
    out = derive(res)
    assert set(out["accuracy"]) == {"casa", "insertion", "ca"}
    assert claim(res, "CASA nearly matches insertion on fine-grained tasks (frozen")["verdict"] in (
        "holds", "does not hold")
    assert out["accuracy"]["casa"]["levels"] == {} and out["accuracy"]["casa"]["curves"]["coarse"] == []


# ------------------------------------------------------------------ report
def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    res = make_results({"casa": {"fine-grained": 0.55}})
    out, docs = tmp_path / "study", tmp_path / "docs"
    back = write_report(copy.deepcopy(res), out, docs)
    for key in ("accuracy", "paired", "gating", "claims", "summary"):
        assert key in back
    saved = json.loads((out / "results.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(back["claims"]))
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0] == "# casa study (full): summary"
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table].startswith("| claim | verdict | measured")
    assert first_table < next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert lines[first_table + 2].startswith("| CASA nearly matches insertion on fine-grained tasks (frozen LM) | "
                                             "**does not hold** | casa - insertion = -17.3 [")
    for arm in ARMS:
        assert f"| {arm} |" in report, arm
    assert "| *prior* | 5.0 | 5.0 | 5.0 | 5.0 |" in lines  # per level (4 columns): int keys read like JSON's
    for section in ("**Stage 0**", "**Calibration**", "## Accuracy per arm and category", "### Per difficulty level",
                    "### Learning curves", "## Paired differences", "## Training cost per arm",
                    "## Training cost and streaming, per variant", "## Implicit gating", "A reason is the first"):
        assert section in report, section
    pngs = sorted(p.name for p in out.glob("study_*.png"))
    assert pngs == ["study_accuracy.png", "study_bench.png", "study_curves.png", "study_gating.png",
                    "study_levels.png", "study_paired.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (docs / name).read_bytes() == (out / name).read_bytes()
        assert f"]({name})" in report
    assert (docs / "study.md").read_text() == report  # links are relative to the markdown's own folder
    assert not [p for p in [*out.iterdir(), *docs.iterdir()] if p.name.startswith(".tmp")]


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    write_report(make_results(), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Plots skipped: matplotlib is not installed" in report and ".png)" not in report
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "results.json").is_file()


def test_claims_is_the_report_entry_point_too():
    res = derive(make_results())
    assert claims(res) == res["claims"]
    assert {c["verdict"] for c in res["claims"]} == {"holds"}  # the default numbers satisfy every rule


def test_per_seed_scores_and_the_evaluation_noise_are_reported():
    res = derive(make_results())
    acc = res["accuracy"]["casa"]
    assert acc["per_seed"]["coarse"] == pytest.approx([0.80, 0.83, 0.78])  # SCORES + OFFSETS, per seed
    # 2 coarse tasks of 40 questions: sqrt(2 p(1-p) / 40) / 2, largest at the seed nearest 50%
    assert acc["sampling_se"]["coarse"] == pytest.approx(math.sqrt(2 * 0.78 * 0.22 / 40) / 2)
    from casa.study.report import markdown

    text = markdown(res, None).split("## Per-seed results", 1)[1]
    assert "| casa | 0, 1, 2 | 80.0, 83.0, 78.0 · se 4.6 |" in text


def with_frequency_arms(res: dict, offsets: dict) -> dict:
    """`res` plus the frequency arms: copies of casa's runs, each category's score moved by offsets[arm]."""
    for arm, delta in offsets.items():
        for r in [r for r in res["runs"] if r["arm"] == "casa"]:
            r = copy.deepcopy(r)
            r["arm"] = r["variant"] = arm
            for t in r["tasks"].values():
                t["score"] += delta
            res["runs"].append(r)
        res["bench"]["train"][arm] = {"text_tok_s": 2000.0, "peak_mem_bytes": 80e6}
    res["config"]["spec"] = {"model": {"lm": {"n_layers": 4}}}
    from casa.study.run import VARIANTS

    res["config"]["variants_fusion"].update({a: VARIANTS[a] for a in ("casa", *offsets)})  # as run.py records it
    return res


def test_frequency_rules_follow_the_numbers():
    from casa.study.frequency import rows, section, verdicts

    res = derive(with_frequency_arms(make_results(), {"casa_every2": -0.01, "casa_every4": -0.05,
                                                      "casa_replace": 0.0, "casa_replace_every4": 0.02}))
    by_arm = {r["arm"]: r for r in rows(res)}
    assert by_arm["casa_every4"]["blocks"] == [0] and by_arm["casa_every2"]["blocks"] == [0, 2]
    assert by_arm["casa_every2"]["ratio_to_casa"]["peak_mem_bytes"] == pytest.approx(0.8)  # 80e6 / 100e6
    v = {x["rule"].split(" ")[0]: x["verdict"] for x in verdicts(res)}
    assert v == {"casa_every2": "holds", "casa_every4": "does not hold (worst: coarse)",
                 "casa_replace_every4": "holds"}
    text = section(res, figure="study_frequency.png")
    assert text.index("**Rules**") < text.index("| casa_every2 |") and "![how often" in text
    finding = text[text.index("**Finding**"):]
    assert "casa_every2 at 0.80x casa's training memory stays within 2 points of casa" in finding
    assert "casa_every4 at" in finding and "costs -5.0 points on coarse, more than the 2 the rule allows" in finding
    assert "against replace every 2, as the paper finds" in finding
    res = derive(with_frequency_arms(make_results(), {"casa_every2": 0.0, "casa_replace": 0.0,
                                                      "casa_replace_every4": -0.02}))
    assert {x["rule"].split(" ")[0]: x["verdict"] for x in verdicts(res)}["casa_replace_every4"] == "does not hold"


def test_the_protocol_says_when_some_arms_ran_fewer_seeds():
    res = make_results()
    assert "**Seeds** 3 (0, 1, 2);" in derive(copy.deepcopy(res))["summary"]["protocol"][2]
    res["runs"] = [r for r in res["runs"] if not (r["arm"] == "ca_ffn" and r["seed"] == 2)]
    line = derive(res)["summary"]["protocol"][2]
    assert line.startswith("**Seeds** 3 (0, 1, 2) (the arms the headline claims compare; the others 2);")


def test_a_collapsed_seed_is_found_with_its_story(tmp_path):
    from casa.study.stats import collapses

    res = make_results()
    casa = [r for r in res["runs"] if r["arm"] == "casa"]
    lost = casa[2]  # colour learnt at the curve's first point, then lost; the gate shut the image out
    lost["tasks"]["color"]["score"] = 0.30
    lost["curve"][0]["tasks"]["color"] = 0.90
    for layer in lost["gating"]["color"].values():
        layer["answer_image"] = 0.05
    never = [r for r in res["runs"] if r["arm"] == "insertion"][0]  # count never learnt: flat at a guess
    never["tasks"]["count"]["score"] = 0.20
    never["curve"][0]["tasks"]["count"] = 0.25
    late = [r for r in res["runs"] if r["arm"] == "ca"][1]  # digits learnt late: 0 at mid-training, 35 at the end
    late["tasks"]["digits"]["score"] = 0.35
    late["curve"][0]["tasks"]["digits"] = 0.0
    for run, task in ((lost, "color"), (never, "count"), (late, "digits")):  # a curve ends at the final score
        run["curve"][-1]["tasks"][task] = run["tasks"][task]["score"]
    found = {(c["arm"], c["seed"], c["task"]): c for c in collapses(res["runs"], ["color", "count", "digits"])}
    assert set(found) == {("casa", 2, "color"), ("insertion", 0, "count"), ("ca", 1, "digits")}
    c = found[("casa", 2, "color")]
    assert c["kind"] == "learnt, then lost" and c["peak"] == 0.90 and c["score"] == 0.30
    assert c["others"] == pytest.approx(0.815) and c["image_share"] == pytest.approx(0.05)
    assert c["others_image_share"] == pytest.approx(0.3)
    n = found[("insertion", 0, "count")]
    assert n["kind"] == "never learnt (flat curve)" and n["image_share"] is None  # insertion: no text keys
    assert found[("ca", 1, "digits")]["kind"] == "learnt late"
    # 29 points under the others is no collapse
    assert collapses(res["runs"], ["color"], drop=0.52) == []
    write_report(res, tmp_path)
    report = (tmp_path / "report.md").read_text()
    section = report[report.index("## Collapsed seeds"):]
    assert "| casa | 2 | color | 30.0 | 81.5 |" in section and "learnt, then lost | 0.05 / 0.30 |" in section
    assert ("3 collapse(s) over 21 (arm, seed) runs: 1 learnt, then lost, 1 never learnt (flat curve), "
            "1 learnt late") in section


def test_no_collapse_is_said_so(tmp_path):
    write_report(make_results(), tmp_path)
    assert "No seed collapsed on any task." in (tmp_path / "report.md").read_text()


def test_power_says_whether_every_accuracy_claim_is_decided_to_10_points(tmp_path):
    from casa.study.report import power

    narrow = {"casa": (0.0, 0.01, -0.01), "insertion": (0.0, 0.01, -0.005), "ca": (0.0, 0.005, -0.01)}
    res = derive(make_results(offsets=narrow))  # seeds within a point or two: intervals of a few points
    pw = res["summary"]["power"]
    paired_claims = [c for c in res["claims"] if c.get("paired")]
    assert set(pw["half"]) == {c["claim"] for c in paired_claims} and len(paired_claims) >= 4
    assert pw["met"] is True and all(h <= 0.10 for h in pw["half"].values())
    wide = derive(make_results(offsets={"casa": (0.0, 0.30, -0.25)}))["summary"]["power"]
    assert wide["met"] is False and max(wide["half"].values()) > 0.10
    assert power([c for c in res["claims"] if not c.get("paired")])["met"] is None
    write_report(make_results(offsets=narrow), tmp_path)
    assert "**Power** (every accuracy claim's 95% interval half-width <= 10 points): **met**" in \
        (tmp_path / "report.md").read_text()
