"""`casa study` statistics: means over seeds with 95% intervals, paired
differences between arms, learning curves, the gating summary.

A *run* is one (arm, seed) result of `casa study` (`results["runs"]`); an
*arm* is a variant trained in one regime ("frozen" LM or "full"
fine-tuning) on packs matched by "samples" or by "flops". Scores are
fractions in 0..1 here; the report turns them into points.

Design decisions:
- Pure Python (no scipy): the 95% interval of a mean over n seeds is
  `mean ± t(0.975, n-1) * std / sqrt(n)`, with the two-sided Student t
  quantiles in a table (`T_975`); a df between table rows takes the row
  below it, which is the wider interval (conservative). n = 1 gives a mean
  and no interval (`half` is None), never a fake zero-width one.
- A category score of one run is the mean of its tasks' scores; the
  interval is then taken over seeds, so a seed is the unit of replication.
- Arms are compared *paired by seed*: each seed has its own stage-0 models
  and data stream, shared by every arm, so the per-seed difference removes
  what the seed does to both. Only seeds both arms ran count.
- An arm's description (variant, regime, matching) comes from
  `config["arms"]`, completed from the runs; a run without these fields (the
  first edition's) is its variant in the primary regime, sample-matched.
- Missing optional parts (levels, curves, gating) give empty sections, not
  errors: a quick study may skip them.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["COLLAPSE", "LEARNED", "PAIR_SPECS", "T_975", "aggregate", "arm_table", "binomial_se", "category_tasks",
           "collapses", "curves", "find_arm", "gating_summary", "interval", "learned", "pair_label", "paired",
           "paired_differences", "prior_categories", "prior_levels", "regimes", "t_quantile"]

# two-sided 95% quantiles of Student's t by degrees of freedom; None = infinity (normal)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}

LEARNED = 0.05  # an arm has learned a category when it beats max(its blind score, the prior) by 5 points

# (variant a, matching a, variant b, matching b): the paired differences computed in every regime
PAIR_SPECS = (
    ("casa", "samples", "insertion", "samples"),
    ("casa", "samples", "ca", "samples"),
    ("casa", "samples", "insertion", "flops"),
    ("ca_ffn", "samples", "ca", "samples"),
)
REGIME_VARIANTS = ("casa", "insertion")  # their other-regime arm minus their primary-regime arm


def t_quantile(df: int) -> float:
    """t(0.975, df): the table row at or below `df` (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[max(k for k in T_975 if k <= df)]


def interval(xs) -> dict:
    """Mean over the values of `xs` (None skipped) with its 95% Student-t interval.

    Returns: {"mean", "half" (half-width), "lo", "hi", "std" (sample, n-1), "n", "min", "max"};
    n = 1: half/lo/hi/std None; n = 0: everything None but n.
    """
    xs = [float(x) for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return {"mean": None, "half": None, "lo": None, "hi": None, "std": None, "n": 0, "min": None, "max": None}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "half": None, "lo": None, "hi": None, "std": None, "n": 1, "min": mean, "max": mean}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "std": std, "n": n,
            "min": min(xs), "max": max(xs)}


# ------------------------------------------------------------ arms and tasks
def arm_table(results: dict) -> dict[str, dict]:
    """{arm: {"variant", "regime", "matching"}} in the order of config["arms"], then of the runs."""
    primary = results.get("config", {}).get("primary_regime", "frozen")
    arms = {name: dict(a) for name, a in results.get("config", {}).get("arms", {}).items()}
    for r in results["runs"]:
        name = r.get("arm", r["variant"])
        a = arms.setdefault(name, {})
        a.setdefault("variant", r["variant"])
        a.setdefault("regime", r.get("regime", primary))
        a.setdefault("matching", r.get("matching", "samples"))
    return {n: a for n, a in arms.items() if any(r.get("arm", r["variant"]) == n for r in results["runs"])}


def regimes(results: dict) -> list[str]:
    """The regimes that have arms, the primary one first."""
    primary = results.get("config", {}).get("primary_regime", "frozen")
    found = list(dict.fromkeys(a["regime"] for a in arm_table(results).values()))
    return sorted(found, key=lambda r: r != primary)


def find_arm(results: dict, variant: str, regime: str, matching: str = "samples") -> str | None:
    """The arm that trains `variant` in `regime` on `matching`-matched packs, or None."""
    for name, a in arm_table(results).items():
        if (a["variant"], a["regime"], a["matching"]) == (variant, regime, matching):
            return name
    return None


def category_tasks(results: dict) -> dict[str, list[str]]:
    """{category: its tasks that the runs evaluated}; tasks in no category go to "other"."""
    seen = list(dict.fromkeys(t for r in results["runs"] for t in r["tasks"]))
    cats = {c: [t for t in ts if t in seen] for c, ts in results.get("config", {}).get("categories", {}).items()}
    cats = {c: ts for c, ts in cats.items() if ts}
    rest = [t for t in seen if not any(t in ts for ts in cats.values())]
    return {**cats, "other": rest} if rest else cats


def prior_categories(results: dict) -> dict[str, float | None]:
    """The most-frequent-answer baseline of each category: the mean of its tasks' priors."""
    prior = results.get("prior", {})
    out = {}
    for c, ts in category_tasks(results).items():
        vals = [prior[t] for t in ts if t in prior]
        out[c] = sum(vals) / len(vals) if vals else None
    return out


def _runs_of(runs: list[dict], arm: str) -> list[dict]:
    return [r for r in runs if r.get("arm", r["variant"]) == arm]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _category_score(run: dict, tasks: list[str], key: str = "score") -> float | None:
    """Mean of the run's task scores (key "score" or "blind") over `tasks`."""
    return _mean([run["tasks"][t][key] for t in tasks if t in run["tasks"]])


def binomial_se(p: float, n: int) -> float:
    """Standard error of a score `p` (a fraction right, clipped to 0..1) over `n` questions: sqrt(p(1-p)/n)."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / max(1, n))


def _sampling_se(run: dict, tasks: list[str]) -> float:
    """Binomial standard error of the run's mean over `tasks` from its questions alone: sqrt(sum over the
    tasks of p(1-p)/n) / tasks (a score that is no fraction of right answers, e.g. ANLS, is treated as one)."""
    parts = [run["tasks"][t] for t in tasks if t in run["tasks"]]
    return math.sqrt(sum(binomial_se(part["score"], part.get("n") or 1) ** 2 for part in parts)) / max(1, len(parts))


# ----------------------------------------------------------------- accuracy
def aggregate(runs: list[dict], categories: dict[str, list[str]]) -> dict:
    """Per arm: mean and 95% interval over seeds of every task, category, level and the overall score,
    seen and blind; the training cost; the learning curves.

    Args:
        runs: `results["runs"]`; categories: {category: tasks} (see `category_tasks`).
    Returns: {arm: {"variant", "seeds", "tasks", "blind_tasks", "categories", "blind_categories",
        "overall", "blind_overall", "levels", "blind_levels", "cost", "curves"}}, every number an `interval`,
        and "per_seed": {category: [score of each seed, in "seeds" order]} and "sampling_se": {category: the
        largest over seeds of the binomial standard error of the seed's category mean (questions per task)}.
    """
    tasks = list(dict.fromkeys(t for ts in categories.values() for t in ts))
    out = {}
    for arm in dict.fromkeys(r.get("arm", r["variant"]) for r in runs):
        mine = _runs_of(runs, arm)
        row = {"variant": mine[0]["variant"], "seeds": [r["seed"] for r in mine]}
        for key, prefix in (("score", ""), ("blind", "blind_")):
            row[f"{prefix}tasks"] = {t: interval(r["tasks"][t][key] for r in mine if t in r["tasks"]) for t in tasks}
            row[f"{prefix}categories"] = {c: interval(_category_score(r, ts, key) for r in mine)
                                          for c, ts in categories.items()}
            row[f"{prefix}overall"] = interval(_category_score(r, tasks, key) for r in mine)
            levels = {}
            for t in tasks:
                per_run = [_str_keys(r.get("levels", {}).get(t, {})) for r in mine]
                names = sorted({lv for p in per_run for lv in p}, key=_level_key)
                if names:
                    levels[t] = {lv: interval(p[lv][key] for p in per_run if lv in p) for lv in names}
            row[f"{prefix}levels"] = levels
        row["per_seed"] = {c: [_category_score(r, ts) for r in mine] for c, ts in categories.items()}
        row["sampling_se"] = {c: max((_sampling_se(r, ts) for r in mine), default=None) for c, ts in categories.items()}
        row["cost"] = {k: interval(r.get(k) for r in mine) for k in
                       ("steps", "samples", "sequence_tokens", "flops_per_step", "train_seconds", "final_loss",
                        "params", "trainable")}
        row["cost"]["flops"] = interval(r["steps"] * r["flops_per_step"] if r.get("flops_per_step") is not None
                                        and r.get("steps") is not None else None for r in mine)
        row["curves"] = curves(mine, categories)
        out[arm] = row
    return out


def _level_key(level: str):
    return (0, int(level)) if level.isdigit() else (1, level)


def _str_keys(d: dict) -> dict:
    """Levels keyed as JSON keys them ("1"), whether a run was just trained (1) or read back from JSON."""
    return {str(k): v for k, v in d.items()}


def prior_levels(results: dict) -> dict[str, dict[str, float]]:
    """The most-frequent-answer baseline per fine-grained task and level, levels keyed "1", "2", ..."""
    return {t: _str_keys(per) for t, per in results.get("prior_levels", {}).items()}


def curves(runs: list[dict], categories: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Learning curve of each category: at each evaluated step, the mean over the runs (seeds) of the
    category score (mean of its tasks present at that step).

    Returns: {category: [{"step", "mean", "n"}, ...]} sorted by step; empty without curves.
    """
    out = {}
    for c, ts in categories.items():
        by_step: dict[int, list[float]] = {}
        for r in runs:
            for point in r.get("curve", []):
                v = _mean([point["tasks"].get(t) for t in ts])
                if v is not None:
                    by_step.setdefault(int(point["step"]), []).append(v)
        out[c] = [{"step": s, "mean": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_step.items())]
    return out


def learned(results: dict, category: str, regime: str | None = None) -> dict:
    """Whether some arm (of `regime`, or any) beats max(its blind score, the prior) on `category` by LEARNED.

    Returns: {"learned": bool, "arm": best arm or None, "gain": its mean gain (0..1) or None}.
    """
    acc, arms = results["accuracy"], arm_table(results)
    prior = prior_categories(results).get(category)
    best, best_gain = None, None
    for name, row in acc.items():
        if regime is not None and arms.get(name, {}).get("regime") != regime:
            continue
        seen, blind = row["categories"].get(category, {}).get("mean"), row["blind_categories"].get(category, {})
        if seen is None or blind.get("mean") is None:
            continue
        gain = seen - max(blind["mean"], prior if prior is not None else 0.0)
        if best_gain is None or gain > best_gain:
            best, best_gain = name, gain
    return {"learned": best_gain is not None and best_gain >= LEARNED - 1e-12, "arm": best, "gain": best_gain}


# ------------------------------------------------------ paired differences
def paired(runs: list[dict], a: str, b: str | None, categories: dict[str, list[str]]) -> dict | None:
    """Arm `a` minus arm `b` (b None: minus a's own blind score), seed by seed, over the seeds both ran.

    Returns: {"a", "b", "seeds", "overall", "categories", "tasks": intervals of the per-seed differences,
    "per_seed": {category: [difference per seed]}}, or None when no seed is shared.
    """
    ra = {r["seed"]: r for r in _runs_of(runs, a)}
    rb = ra if b is None else {r["seed"]: r for r in _runs_of(runs, b)}
    seeds = [s for s in ra if s in rb]
    if not seeds:
        return None
    key_b = "blind" if b is None else "score"
    tasks = list(dict.fromkeys(t for ts in categories.values() for t in ts))

    def diff(s, ts):
        x, y = _category_score(ra[s], ts), _category_score(rb[s], ts, key_b)
        return None if x is None or y is None else x - y

    per_seed = {c: [diff(s, ts) for s in seeds] for c, ts in categories.items()}
    return {"a": a, "b": b if b is not None else "blind", "seeds": seeds,
            "overall": interval(diff(s, tasks) for s in seeds),
            "categories": {c: interval(d) for c, d in per_seed.items()},
            "tasks": {t: interval(diff(s, [t]) for s in seeds) for t in tasks},
            "per_seed": per_seed}


def pair_label(a: str, b: str | None) -> str:
    return f"{a} - {b if b is not None else 'blind'}"


def paired_differences(results: dict) -> dict[str, dict]:
    """Every paired difference the claims and the report use, keyed "a - b":
    `PAIR_SPECS` in each regime, casa and insertion across regimes, each arm minus its blind score."""
    runs, cats = results["runs"], category_tasks(results)
    regs = regimes(results)
    pairs = []
    for regime in regs:
        for va, ma, vb, mb in PAIR_SPECS:
            a, b = find_arm(results, va, regime, ma), find_arm(results, vb, regime, mb)
            if a and b:
                pairs.append((a, b))
    for v in REGIME_VARIANTS:
        base = find_arm(results, v, regs[0]) if regs else None
        for regime in regs[1:]:
            other = find_arm(results, v, regime)
            if base and other:
                pairs.append((other, base))
    pairs += [(a, None) for a in arm_table(results)]
    out = {}
    for a, b in pairs:
        d = paired(runs, a, b, cats)
        if d is not None:
            out[pair_label(a, b)] = d
    return out


# ---------------------------------------------------------- collapsed seeds
COLLAPSE = 0.3  # a seed collapsed on a task when it scores this far under the median of the arm's other seeds


def collapses(runs: list[dict], tasks: list[str], *, drop: float = COLLAPSE) -> list[dict]:
    """Every (arm, seed, task) whose score lies `drop` or more under the median of the arm's other seeds
    (arms with 3 seeds or more), with what tells its story apart.

    Returns: [{arm, seed, task, score, others (their median), blind, curve: [(step, score)], peak (the best
    curve score before the last step), kind, image_share, others_image_share, loss, others_loss}]; `kind`
    "learnt, then lost" when the curve's peak lies `drop` over the final score, "never learnt (flat curve)"
    when no point of the curve (final score included) rose `drop / 2` over its first, else "learnt late";
    `image_share` is the answer tokens' attention share on image keys for that task, averaged over the
    fusion layers (None where the arm has no text keys: `attention_shares`).
    """
    out = []
    for arm in dict.fromkeys(r.get("arm", r["variant"]) for r in runs):
        mine = _runs_of(runs, arm)
        if len(mine) < 3:
            continue
        for t in tasks:
            for r in mine:
                others = [o for o in mine if o is not r and t in o["tasks"]]
                if t not in r["tasks"] or not others:
                    continue
                median = statistics.median(o["tasks"][t]["score"] for o in others)
                score = r["tasks"][t]["score"]
                if median - score < drop - 1e-9:
                    continue
                curve = [(c["step"], c["tasks"][t]) for c in r.get("curve", []) if t in c["tasks"]]
                peak = max((v for _, v in curve[:-1]), default=None)
                out.append({"arm": arm, "seed": r["seed"], "task": t, "score": score, "others": median,
                            "blind": r["tasks"][t].get("blind"), "curve": curve, "peak": peak,
                            "kind": _story(curve, peak, score, drop),
                            "image_share": _image_share(r, t),
                            "others_image_share": _median_of(_image_share(o, t) for o in others),
                            "loss": r.get("final_loss"),
                            "others_loss": _median_of(o.get("final_loss") for o in others)})
    return out


def _story(curve: list, peak: float | None, score: float, drop: float) -> str:
    if peak is not None and peak - score >= drop - 1e-9:
        return "learnt, then lost"
    if not curve or max(v for _, v in curve) - curve[0][1] < drop / 2 - 1e-9:
        return "never learnt (flat curve)"
    return "learnt late"


def _median_of(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _image_share(run: dict, task: str) -> float | None:
    layers = [v.get("answer_image") for v in run.get("gating", {}).get(task, {}).values()]
    layers = [x for x in layers if x is not None]
    return sum(layers) / len(layers) if layers else None


# ------------------------------------------------------------------ gating
def gating_summary(runs: list[dict], tasks: list[str]) -> dict:
    """Per arm with text keys: image/text/self shares per task and layer (mean over seeds);
    per gated_ca arm and layer: its gate values (mean over seeds).

    Returns: {"shares": {arm: {task: {layer: {key: interval}}}}, "gates": {arm: {layer: {"attn", "ffn"}}}}.
    """
    out = {"shares": {}, "gates": {}}
    keys = ("image", "text", "self", "answer_image", "answer_text", "answer_self")
    for arm in dict.fromkeys(r.get("arm", r["variant"]) for r in runs):
        mine = _runs_of(runs, arm)
        if any(r.get("gates") for r in mine):
            layers = sorted({lay for r in mine for lay in r.get("gates", {})}, key=int)
            out["gates"][arm] = {lay: {g: interval(r["gates"][lay][g] for r in mine if lay in r.get("gates", {}))
                                       for g in ("attn", "ffn")} for lay in layers}
            continue  # gated_ca's shares are not CASA's gate
        if not any(r.get("gating") for r in mine):
            continue
        per = {}
        for t in tasks:
            layers = sorted({lay for r in mine for lay in r.get("gating", {}).get(t, {})}, key=int)
            if layers:
                per[t] = {lay: {k: interval(r["gating"][t][lay].get(k) for r in mine
                                            if lay in r.get("gating", {}).get(t, {})) for k in keys}
                          for lay in layers}
        out["shares"][arm] = per
    return out
