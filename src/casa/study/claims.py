"""The paper's claims (docs/design.md §7) checked against a `casa study`:
each with its rule, the measured number and interval, a verdict, and for a
verdict other than "holds" the most likely reason.

Design decisions:
- Every verdict follows from the numbers by the rule written next to it;
  nothing is hard-coded, so the same code says "holds" or "does not hold"
  whichever way the numbers fall.
- Accuracy claims use the paired difference of two arms over the seeds
  (`stats.paired`) in points; the verdict compares its mean with the
  paper's tolerance, and the 95% interval is reported next to it.
- Precondition: a claim about a category is "not testable here" when no arm
  of the regime beats max(its blind score, the prior) on that category by
  `stats.LEARNED` (5 points): ranking arms that all guess is noise.
- Reasons are chosen by the first rule of `REASON_RULES` that applies, and
  point at the cheap ablations the same run holds (the other regime, the
  compute-matched insertion arm, CA: CASA without its text keys computes
  exactly what CA computes, so `ca` is that ablation) when one explains the
  result.
- Claims about memory, speed and streaming read the study's benchmarks
  (per variant, not per arm: they do not depend on the training regime).
"""

from __future__ import annotations

import math

from casa.study.stats import (
    LEARNED,
    arm_table,
    category_tasks,
    find_arm,
    learned,
    pair_label,
    regimes,
)

__all__ = ["CURVE_RISE", "FINE", "REASON_RULES", "TOL_INSERTION", "TOL_MATCH", "VISION_READS", "calibration",
           "claims", "points", "points_interval"]

# tolerances in percentage points of the task score (0..100)
TOL_INSERTION = 5.0  # paper: CASA 2.1-4.7 points under insertion on ChartQA/DocVQA/InfoVQA
TOL_MATCH = 1.0  # paper: CASA and CA within ~0.7 points of each other; also CASA vs compute-matched insertion
CALIBRATION = 30.0  # the ladder is calibrated when insertion beats blind by >= 30 points on >= 2 fine-grained tasks
CURVE_RISE = 2.0  # a curve still rising by this much over its last interval has not converged
VISION_READS = 0.9  # a stage-0 encoder reading fewer characters than this caps the fine-grained tasks
FINE, COARSE = "fine-grained", "coarse"

REASON_RULES = (
    "not learned, and another regime learns the category: the regime is the reason (see that row)",
    f"not learned, fine-grained, and the stage-0 vision encoder reads < {100 * VISION_READS:.0f}% of characters: "
    "the encoder caps the task",
    f"not learned, and the best arm's curve still rose >= {CURVE_RISE:g} points over its last interval: "
    "too few steps",
    "does not hold, and the 95% interval of the difference contains the threshold: seed noise",
    "does not hold, and the same comparison holds in the other regime: the regime separates the arms",
    "does not hold against insertion, and it holds against the compute-matched insertion arm: insertion's "
    "extra FLOPs",
    "does not hold for casa, and casa - ca (CASA without its text keys) contains 0: CASA's text keys change "
    "nothing here",
    "does not hold for casa, and casa - ca lies below 0: CASA's text keys cost accuracy here",
    "otherwise: which part of the rule failed, with its numbers (one seed: no interval, so it may be noise)",
)


# --------------------------------------------------------------- formatting
def points(x: float | None, signed: bool = True) -> str:
    """A 0..1 value as points, e.g. -0.063 -> "-6.3"."""
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def points_interval(ci: dict | None, signed: bool = True) -> str:
    """An `interval` in points: "-6.3 [-12.1, -0.5]", or "-6.3 (n=1, no interval)"."""
    if not ci or ci["mean"] is None:
        return "n/a"
    if ci["half"] is None:
        return f"{points(ci['mean'], signed)} (n={ci['n']}, no interval)"
    return f"{points(ci['mean'], signed)} [{points(ci['lo'], signed)}, {points(ci['hi'], signed)}]"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _x(r):
    return "n/a" if r is None else f"{r:.2f}x"


# ------------------------------------------------------------------ lookups
def _pair(results: dict, a: str | None, b: str | None, category: str) -> dict | None:
    """The paired difference a - b on `category` (0..1 interval), from "a - b" or a negated "b - a"."""
    if a is None or b is None:
        return None
    p = results["paired"].get(pair_label(a, b))
    if p is not None:
        ci = p["categories"].get(category)
        return ci if ci and ci["mean"] is not None else None
    p = results["paired"].get(pair_label(b, a))
    ci = p["categories"].get(category) if p else None
    if not ci or ci["mean"] is None:
        return None
    neg = lambda v: None if v is None else -v  # noqa: E731
    return {**ci, "mean": -ci["mean"], "lo": neg(ci["hi"]), "hi": neg(ci["lo"]), "min": neg(ci["max"]),
            "max": neg(ci["min"])}


def _holds(ci: dict, threshold: float) -> bool:
    return 100 * ci["mean"] >= threshold - 1e-9


def _straddles(ci: dict, threshold: float) -> bool:
    return ci["half"] is not None and 100 * ci["lo"] <= threshold <= 100 * ci["hi"]


def _contains_zero(ci: dict) -> bool:
    if ci["half"] is None:
        return abs(100 * ci["mean"]) < TOL_MATCH
    return ci["lo"] <= 0 <= ci["hi"]


def _gain(lrn: dict) -> str:
    return "no arm scored" if lrn["arm"] is None else f"best gain {points(lrn['gain'])} points ({lrn['arm']})"


def _flops_ratio(results: dict, heavy: str | None, light: str | None) -> float | None:
    acc = results["accuracy"]
    if heavy not in acc or light not in acc:
        return None
    return _ratio(acc[heavy]["cost"]["flops_per_step"]["mean"], acc[light]["cost"]["flops_per_step"]["mean"])


# ------------------------------------------------------------------ reasons
def _why_not_learned(results: dict, category: str, regime: str) -> str:
    lrn = learned(results, category, regime)
    base = (f"no {regime} arm beats max(blind, prior) on {category} by {100 * LEARNED:.0f} points "
            f"({_gain(lrn)})")
    for other in regimes(results):
        o = learned(results, category, other)
        if other != regime and o["learned"]:
            return f"{base}; the {other} regime learns it ({_gain(o)}): compare the {other} rows"
    chars = [s.get("vision", {}).get("char_accuracy") for s in results.get("stage0", {}).values()]
    chars = [c for c in chars if c is not None]
    if category == FINE and chars and sum(chars) / len(chars) < VISION_READS:
        return (f"{base}; the stage-0 vision encoder reads {100 * sum(chars) / len(chars):.0f}% of characters "
                f"(< {100 * VISION_READS:.0f}%): the encoder caps the fine-grained tasks")
    if lrn["arm"] is not None:
        curve = results["accuracy"][lrn["arm"]]["curves"].get(category, [])
        if len(curve) >= 2 and 100 * (curve[-1]["mean"] - curve[-2]["mean"]) >= CURVE_RISE:
            return (f"{base}; {lrn['arm']} still rose {points(curve[-1]['mean'] - curve[-2]['mean'])} points "
                    f"between steps {curve[-2]['step']} and {curve[-1]['step']}: more steps")
    return f"{base}; no regime in this run learns it"


def _seeds_to_settle(ci: dict, threshold: float) -> str:
    """How many seeds would put the threshold outside the interval, if the mean and the spread stayed as
    measured (the half-width falls as 1/sqrt(seeds))."""
    gap = abs(100 * ci["mean"] - threshold)
    if gap < 0.5:
        return "the mean sits on the threshold: no number of seeds would settle it"
    return f"about {math.ceil(ci['n'] * (100 * ci['half'] / gap) ** 2)} seeds would settle it at this mean and spread"


def _why_comparison_fails(results: dict, a_var: str, b_var: str, b_matching: str, category: str, regime: str,
                          threshold: float, ci: dict) -> str:
    """The first `REASON_RULES` entry that explains why mean(a - b) < threshold on `category` in `regime`."""
    if _straddles(ci, threshold):
        return (f"seed noise: the 95% interval [{points(ci['lo'])}, {points(ci['hi'])}] contains the "
                f"threshold {threshold:+g}; {_seeds_to_settle(ci, threshold)}")
    tried = []
    for other in regimes(results):
        if other == regime:
            continue
        a2, b2 = find_arm(results, a_var, other), find_arm(results, b_var, other, b_matching)
        d2 = _pair(results, a2, b2, category)
        if d2 is not None:
            tried.append(f"{other} regime {points_interval(d2)}")
            if _holds(d2, threshold) and learned(results, category, other)["learned"]:
                return (f"it holds in the {other} regime ({a2} - {b2} = {points_interval(d2)}): "
                        f"the {regime} regime is what separates them here")
    a = find_arm(results, a_var, regime)
    if b_var == "insertion" and b_matching == "samples":
        fl = find_arm(results, "insertion", regime, "flops")
        d3 = _pair(results, a, fl, category)
        if d3 is not None:
            tried.append(f"{fl} {points_interval(d3)}")
            if _holds(d3, threshold):
                r = _flops_ratio(results, find_arm(results, "insertion", regime), a)
                return (f"at equal training FLOPs it holds ({a} - {fl} = {points_interval(d3)}): insertion's lead "
                        f"is bought with {_x(r)} the FLOPs per step")
    if a_var == "casa" and b_var != "ca":  # against ca, the text keys are the whole difference already
        nk = find_arm(results, "ca", regime)
        d4 = _pair(results, a, nk, category)
        if d4 is not None:
            tried.append(f"{nk} {points_interval(d4)}")
            if _contains_zero(d4):
                return (f"CASA's text keys change nothing measurable here ({a} - {nk} = {points_interval(d4)}): "
                        f"at this scale casa behaves like ca")
            if (d4["hi"] if d4["half"] is not None else d4["mean"]) < 0:
                return (f"CASA's text keys cost accuracy here: without them it scores higher ({a} - {nk} = "
                        f"{points_interval(d4)})")
    found = "; ".join(tried) if tried else "none in this run"
    if ci["half"] is None:
        return (f"one seed: the gap ({points(ci['mean'])} < {threshold:+g}) has no interval, so it may be seed "
                f"noise; no ablation explains it ({found})")
    return (f"the gap ({points(ci['mean'])} < {threshold:+g}) is outside seed noise and persists in the "
            f"ablations ({found})")


# ------------------------------------------------------------------- claims
def claims(results: dict) -> list[dict]:
    """Each claim: {"claim", "paper", "rule", "measured", "verdict", "reason", "value", "interval"}; the
    accuracy claims (a paired difference of two arms over seeds) also {"paired": True}.

    `results` needs "accuracy" and "paired" (from `casa.study.stats`), "prior", "bench", "gating".
    "value" is the deciding number (points or a ratio), "interval" its 95% interval in points or None.
    """
    out: list[dict] = []

    def add(claim, paper, rule, measured, ok, not_testable=None, reason=None, value=None, ci=None, extra=None):
        verdict = "not testable here" if not_testable else "holds" if ok else "does not hold"
        out.append({"claim": claim, "paper": paper, "rule": rule, "measured": measured, "verdict": verdict,
                    "reason": not_testable or (None if ok else reason), "value": value,
                    "interval": None if not ci or ci["half"] is None else [100 * ci["lo"], 100 * ci["hi"]],
                    **(extra or {})})

    def comparison(claim, paper, a_var, b_var, b_matching, category, regime, threshold, rule):
        a, b = find_arm(results, a_var, regime), find_arm(results, b_var, regime, b_matching)
        if a is None or b is None:
            missing = f"{a_var if a is None else b_var} ({regime}, {b_matching if a else 'samples'}-matched)"
            add(claim, paper, rule, "-", False, f"no {missing} arm in this run")
            return None
        ci = _pair(results, a, b, category)
        if ci is None:
            add(claim, paper, rule, "-", False, f"{category} not evaluated for both {a} and {b}")
            return None
        measured = f"{a} - {b} = {points_interval(ci)} points" + (f" (n={ci['n']})" if ci["half"] is not None else "")
        ok = _holds(ci, threshold)
        nt = None if learned(results, category, regime)["learned"] else _why_not_learned(results, category, regime)
        nt = nt or (_not_calibrated(results, regime) if category == FINE else None)
        why = None if ok or nt else _why_comparison_fails(results, a_var, b_var, b_matching, category, regime,
                                                          threshold, ci)
        add(claim, paper, rule, measured, ok, nt, why, value=100 * ci["mean"], ci=ci, extra={"paired": True})
        return out[-1]

    cats = category_tasks(results)
    arms = arm_table(results)
    regs = regimes(results) or [results.get("config", {}).get("primary_regime", "frozen")]
    primary = regs[0]

    def present(regime, *variants):  # other regimes: only the claims whose arms all run there
        return regime == primary or all(any(a["regime"] == regime and a["variant"] == v for a in arms.values())
                                        for v in variants)

    for regime in regs:
        if FINE in cats and present(regime, "casa", "insertion"):
            comparison(f"CASA nearly matches insertion on {FINE} tasks ({regime} LM)",
                       "ChartQA/DocVQA/InfoVQA: insertion 80.0/87.2/55.3, CASA 75.3/85.1/52.1 (2.1-4.7 points)",
                       "casa", "insertion", "samples", FINE, regime, -TOL_INSERTION,
                       f"paired mean of casa - insertion on {FINE} >= -{TOL_INSERTION:g} points")
        for cat in (FINE, COARSE):
            if cat in cats and present(regime, "casa", "ca"):
                c = comparison(f"CASA at least matches CA ({cat}, {regime} LM)",
                               "CA 75.9/85.8/51.8 vs CASA 75.3/85.1/52.1 (within ~0.7 points); CASA without "
                               "its text keys falls to CA's level (here it is CA: the same computation)",
                               "casa", "ca", "samples", cat, regime, -TOL_MATCH,
                               f"paired mean of casa - ca on {cat} >= -{TOL_MATCH:g} point; 'clearly beats' "
                               "(CASA's text keys add accuracy) when the 95% interval lies above 0")
                if c and c["interval"] is not None:
                    c["clearly_beats"] = c["interval"][0] > 0
                    c["measured"] += "; clearly beats ca" if c["clearly_beats"] else "; not clearly above ca"
        if FINE in cats and (regime == primary or find_arm(results, "insertion", regime, "flops")):
            comparison(f"CASA at least matches compute-matched insertion on {FINE} tasks ({regime} LM)",
                       "protocol row: insertion trained on CASA's FLOPs (insertion's steps hold every image "
                       "token, so each costs more)",
                       "casa", "insertion", "flops", FINE, regime, -TOL_MATCH,
                       f"paired mean of casa - insertion@flops on {FINE} >= -{TOL_MATCH:g} point")
    _ca_ffn(results, add, primary, cats)
    _bench_claims(results, add)
    _gate(results, add, primary)
    return out


def _learned_categories(results: dict, regime: str, cats: dict) -> list[str]:
    return [c for c in cats if learned(results, c, regime)["learned"]
            and not (c == FINE and _not_calibrated(results, regime))]


def _not_calibrated(results: dict, regime: str) -> str | None:
    """Why the fine-grained ladder cannot rank arms in `regime` (insertion does not clear the calibration
    bar on two of its tasks: a few points above blind on one task is too little to tell arms apart), or None."""
    c = calibration(results)["regimes"].get(regime)
    if c is None or c["met"]:
        return None
    gains = ", ".join(f"{t} {points_interval(ci)}" for t, ci in c["tasks"].items())
    return (f"the {FINE} ladder is not calibrated in the {regime} regime: {c['arm']} beats its blind score by "
            f">= {CALIBRATION:g} points on {len(c['passed'])} of {len(c['tasks'])} tasks ({gains}), so the "
            f"arms' {FINE} scores are too close to guessing to rank")


def _nothing_learned(results: dict, regime: str, cats: dict) -> str:
    gains = "; ".join(f"{c}: {_gain(learned(results, c, regime))}" for c in cats)
    return f"no category learned in the {regime} regime ({gains})"


def _ca_ffn(results, add, regime, cats):
    claim = "Image-token FFN updates buy accuracy for training memory (ca_ffn vs ca)"
    paper = "about +2 points for about 1.75x the training memory"
    rule = ("mean over the learned categories of paired ca_ffn - ca > 0 points, and ca_ffn / ca training "
            "peak memory > 1.2")
    ffn, ca = find_arm(results, "ca_ffn", regime), find_arm(results, "ca", regime)
    train = results.get("bench", {}).get("train", {})
    if not (ffn and ca):
        return add(claim, paper, rule, "-", False, f"no {'ca_ffn' if not ffn else 'ca'} arm in the {regime} regime")
    done = _learned_categories(results, regime, cats)
    diffs = [d for d in (_pair(results, ffn, ca, c) for c in done) if d is not None]
    mem = _ratio(train.get("ca_ffn", {}).get("peak_mem_bytes"), train.get("ca", {}).get("peak_mem_bytes"))
    if not diffs:
        return add(claim, paper, rule, f"memory ratio {_x(mem)}", False, _nothing_learned(results, regime, cats))
    mean_d = 100 * sum(d["mean"] for d in diffs) / len(diffs)
    measured = (f"{ffn} - {ca} = {mean_d:+.1f} points (mean over {', '.join(done)}; "
                + "; ".join(f"{c} {points_interval(d)}" for c, d in zip(done, diffs)) + f"); memory {_x(mem)}")
    if mem is None:
        return add(claim, paper, rule, measured, False, "training peak memory not measured on this device")
    reason = None
    if mean_d <= 0:
        noisy = any(d["half"] is not None and d["lo"] <= 0 <= d["hi"] for d in diffs)
        reason = (f"no accuracy gain ({mean_d:+.1f} points)" + (": within seed noise (an interval contains 0)"
                                                                  if noisy else ""))
    elif mem <= 1.2:
        reason = f"the FFN over image tokens costs only {_x(mem)} memory at this bench size (image tokens per step)"
    add(claim, paper, rule, measured, mean_d > 0 and mem > 1.2, None, reason, value=mean_d)


def _bench_claims(results, add):
    bench = results.get("bench", {})
    train, stream = bench.get("train", {}), bench.get("stream", {})
    need = [v for v in ("insertion", "ca", "casa") if v not in train]
    claim, paper = "Training memory: CASA ~ CA, insertion ~1.9x", "CA 32.9 GB, CASA 33.1 GB, insertion 62.8 GB"
    rule = "casa / ca training peak memory <= 1.15 and insertion / casa >= 1.5"
    if need:
        add(claim, paper, rule, "-", False, f"no training benchmark of {', '.join(need)}")
    else:
        m_ins, m_ca, m_casa = (train[v]["peak_mem_bytes"] for v in ("insertion", "ca", "casa"))
        r1, r2 = _ratio(m_casa, m_ca), _ratio(m_ins, m_casa)
        bad = [] if r1 is None or r2 is None else (
            ([f"casa / ca = {_x(r1)} > 1.15"] if r1 > 1.15 else []) + ([f"insertion / casa = {_x(r2)} < 1.5"]
                                                                      if r2 < 1.5 else []))
        add(claim, paper, rule, f"casa / ca = {_x(r1)}, insertion / casa = {_x(r2)}", not bad,
            None if r1 is not None and r2 is not None else "training peak memory not measured on this device",
            "; ".join(bad) + _bench_size(bench), value=r2)
    claim, paper = "Training speed: CA > CASA >= insertion (text tokens/s)", "1817 / 1560 / 1501 text tokens/s"
    rule = "ca tok/s >= casa tok/s >= 0.95 x insertion tok/s"
    if need:
        add(claim, paper, rule, "-", False, f"no training benchmark of {', '.join(need)}")
    else:
        t_ins, t_ca, t_casa = (train[v]["text_tok_s"] for v in ("insertion", "ca", "casa"))
        bad = ([f"ca < casa by {100 * (1 - t_ca / t_casa):.0f}%"] if t_ca < t_casa else []) + (
            [f"casa < 0.95 x insertion ({t_casa / t_ins:.2f}x)"] if t_casa < 0.95 * t_ins else [])
        reps = bench.get("train_config", {}).get("repeats")
        add(claim, paper, rule, f"ca {t_ca:,.0f}, casa {t_casa:,.0f}, insertion {t_ins:,.0f} text tok/s "
            f"(casa / insertion = {t_casa / t_ins:.2f}x)", not bad, None,
            "; ".join(bad) + (f" (median of {reps} step(s) on a shared CPU)" if reps else ""),
            value=t_casa / t_ins)
    claim = "Streaming: CASA's time to first token stays flat, insertion's grows"
    paper = "CASA 63 -> 66 ms, insertion 111 -> 917 ms (first vs last 10% of 512 turns)"
    rule = "casa last/first TTFT <= 1.3 and insertion last/first TTFT > casa's"
    if "casa" not in stream or "insertion" not in stream:
        add(claim, paper, rule, "-", False, "no streaming benchmark of casa and insertion")
        add("Streaming: CASA's KV cache stays small, insertion's holds every image token",
            "KV cache 9,237 tokens (CASA) vs 533,525 (insertion)", "insertion / casa KV tokens at the last turn >= 5",
            "-", False, "no streaming benchmark of casa and insertion")
        return
    s_c, s_i = stream["casa"]["summary"], stream["insertion"]["summary"]
    rc, ri = s_c["ttft_ratio_last_first"], s_i["ttft_ratio_last_first"]
    kv_c, kv_i = stream["casa"].get("kv_tokens") or [0], stream["insertion"].get("kv_tokens") or [0]
    bad = [] if rc is None or ri is None else (([f"casa grows {_x(rc)} > 1.3"] if rc > 1.3 else [])
                                               + ([f"insertion {_x(ri)} <= casa {_x(rc)}"] if ri <= rc else []))
    if bad and kv_c and kv_c[-1] > kv_c[0]:
        bad.append(f"casa's text cache grows {kv_c[0]:,} -> {kv_c[-1]:,} tokens over {s_c['turns']} turns, "
                   "and at this size TTFT follows it")
    add(claim, paper, rule, f"casa {s_c['first_10pct']['ttft_ms']:.1f} -> {s_c['last_10pct']['ttft_ms']:.1f} ms "
        f"({_x(rc)}); insertion {s_i['first_10pct']['ttft_ms']:.1f} -> {s_i['last_10pct']['ttft_ms']:.1f} ms "
        f"({_x(ri)}) over {s_c['turns']} turns", not bad,
        None if rc is not None and ri is not None else "no TTFT ratio (too few turns)", "; ".join(bad), value=rc)
    kc, ki = kv_c[-1], kv_i[-1]
    ratio = ki / max(kc, 1)
    add("Streaming: CASA's KV cache stays small, insertion's holds every image token",
        "KV cache 9,237 tokens (CASA) vs 533,525 (insertion)", "insertion / casa KV tokens at the last turn >= 5",
        f"casa {kc:,} vs insertion {ki:,} tokens ({ratio:.1f}x)", ratio >= 5,
        None if stream["casa"].get("kv_tokens") and stream["insertion"].get("kv_tokens") else "no KV cache counts",
        f"only {ratio:.1f}x: few image tokens per frame ({bench.get('stream_config', {}).get('image_tokens', '?')}) "
        "against the text each turn adds", value=ratio)


def _bench_size(bench: dict) -> str:
    c = bench.get("train_config", {})
    if "text_tokens" in c and "image_tokens" in c:
        return (f" (bench step of {c['text_tokens']} text + {c['image_tokens']} image tokens; the ratios grow "
                "with the image tokens per step)")
    return ""


def _gate(results, add, regime):
    claim = "CASA's softmax acts as an implicit, input-dependent gate"
    paper = "the shared softmax gates image vs text (no gate parameter)"
    rule = "answer tokens' share of mass on image keys differs between tasks by >= 0.05 and stays in (0.02, 0.98)"
    casa = find_arm(results, "casa", regime)
    per = results.get("gating", {}).get("shares", {}).get(casa) if casa else None
    shares = {}
    for t, layers in (per or {}).items():
        vals = [v["answer_image"]["mean"] for v in layers.values() if v["answer_image"]["mean"] is not None]
        if vals:
            shares[t] = sum(vals) / len(vals)
    if not shares:
        return add(claim, paper, rule, "-", False, f"no gating measurement of the {regime} casa arm")
    lo, hi = min(shares.values()), max(shares.values())
    bad = ([f"range {hi - lo:.2f} < 0.05: the share does not depend on the task"] if hi - lo < 0.05 else []) + (
        [f"share pinned at an end ({lo:.2f} .. {hi:.2f})"] if lo <= 0.02 or hi >= 0.98 else [])
    add(claim, paper, rule, f"{casa}: share on image keys per task {lo:.2f} .. {hi:.2f} (range {hi - lo:.2f})",
        not bad, None, "; ".join(bad), value=hi - lo)


def calibration(results: dict) -> dict:
    """Whether the fine-grained ladder is calibrated (its comparison means something), per regime:
    insertion (sample-matched) beats its blind score by >= CALIBRATION points on >= 2 fine-grained tasks.

    Returns: {"rule", "met" (every regime), "regimes": {regime: {"arm", "met", "tasks": {task: interval}}}}.
    """
    fine = category_tasks(results).get(FINE, [])
    rule = f"insertion beats its blind score by >= {CALIBRATION:g} points on >= 2 {FINE} tasks (paired mean)"
    per = {}
    for regime in regimes(results):
        arm = find_arm(results, "insertion", regime)
        p = results["paired"].get(pair_label(arm, None)) if arm else None
        if p is None:
            continue
        tasks = {t: p["tasks"][t] for t in fine if t in p["tasks"] and p["tasks"][t]["mean"] is not None}
        passed = [t for t, ci in tasks.items() if 100 * ci["mean"] >= CALIBRATION]
        per[regime] = {"arm": arm, "met": len(passed) >= 2, "passed": passed, "tasks": tasks}
    return {"rule": rule, "met": bool(per) and all(v["met"] for v in per.values()), "regimes": per}
