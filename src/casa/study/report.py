"""`casa study` report: the derived sections of the results (accuracy with
intervals, paired differences, gating, claims, summary), report.md and the
plots, written atomically.

Design decisions:
- The report leads with a one-screen summary: the protocol in four lines,
  then one row per claim (verdict, the measured number with its interval,
  the most likely reason when it does not hold or is not testable), then the
  calibration line. Details, rules and tables follow.
- Everything shown is computed here from `results["runs"]` and the
  benchmarks (`casa.study.stats`, `casa.study.claims`); run.py hands over
  raw numbers only, so a rerun of the report never disagrees with the runs.
- Scores are shown in points; "±" is the half-width of the 95% Student-t
  interval over seeds; a single seed shows "(n=1)" and no interval.
- Every file (results.json, report.md, each study_*.png; docs/study.md and
  its PNGs when asked) is written with `casa.files.atomic_file`; the PNGs
  sit beside the markdown, so the same relative links work in both places.
- Without matplotlib the plots are skipped and the report says so.
- The third edition's experiments have their own modules, each with its
  rule, table and finding (`compression`, `crossimage`, `frequency`,
  `gate_tokens`); the report gathers them: compression averaged over seeds,
  the cross-image experiment from its own arms, the gate per token
  of the first seed's casa arm (the records behind it hold images, so
  run.py draws its heatmaps, `study_gate_heatmaps.png`, while it has them).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from casa.files import atomic_file
from casa.study.claims import (
    FINE,
    REASON_RULES,
    TOL_INSERTION,
    calibration,
    claims,
    points,
    points_interval,
)
from casa.study.plots import NAMES, render
from casa.study.stats import (
    COLLAPSE,
    LEARNED,
    aggregate,
    arm_table,
    category_tasks,
    collapses,
    gating_summary,
    learned,
    paired_differences,
    prior_categories,
    prior_levels,
    regimes,
)

__all__ = ["claims", "derive", "markdown", "protocol", "summary", "write_report"]

REGIME_WORDS = {"frozen": "LM frozen", "full": "full fine-tuning"}


# ------------------------------------------------------------------ derive
def derive(results: dict) -> dict:
    """Add "accuracy", "paired", "gating", "claims" and "summary" to `results` (in place) and return it."""
    cats = category_tasks(results)
    results["accuracy"] = aggregate(results["runs"], cats)
    results["paired"] = paired_differences(results)
    results["gating"] = gating_summary(results["runs"], [t for ts in cats.values() for t in ts])
    results["compression"] = _compression(results["runs"])
    results["collapses"] = collapses(results["runs"], [t for ts in cats.values() for t in ts])
    if results.get("crossimage"):  # its summary and verdict from its own runs, like everything else here
        from casa.study.crossimage import summarise, verdict

        x = results["crossimage"]
        x["arms"] = summarise(x["runs"])
        x["verdict"] = verdict(x)
    results["claims"] = claims(results)
    results["summary"] = summary(results)
    return results


def summary(results: dict) -> dict:
    """The protocol lines, the verdict counts, the calibration check, the learned categories per regime."""
    counts = {v: sum(c["verdict"] == v for c in results["claims"]) for v in
              ("holds", "does not hold", "not testable here")}
    return {"protocol": protocol(results), "verdicts": counts, "calibration": calibration(results),
            "power": power(results["claims"]),
            "learned": {r: {c: learned(results, c, r) for c in category_tasks(results)} for r in regimes(results)}}


POWER = 0.10  # the third edition's target: every accuracy claim's 95% interval within +-10 points


def power(claims_: list[dict], target: float = POWER) -> dict:
    """Whether the accuracy claims (paired differences of two arms over seeds) are decided to within
    `target` (a fraction: 0.10 = 10 points): `{target, half: {claim: half-width or None (one seed)}, met}`;
    `met` is None without such claims."""
    half = {c["claim"]: None if c["interval"] is None else (c["interval"][1] - c["interval"][0]) / 200
            for c in claims_ if c.get("paired")}
    met = None if not half else all(h is not None and h <= target + 1e-12 for h in half.values())
    return {"target": target, "half": half, "met": met}


def _spread(values, fmt):
    values = sorted({v for v in values if v is not None})
    if not values:
        return "?"
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}-{fmt(values[-1])}"


def protocol(results: dict) -> list[str]:
    """Four lines: stage 0, stage 1 (regimes, matched packs), seeds and tasks, command and machine."""
    cfg, arms, runs = results.get("config", {}), arm_table(results), results["runs"]
    stage0 = results.get("stage0", {})
    if stage0:
        lm = [s.get("lm", {}) for s in stage0.values()]
        vis = [s.get("vision", {}) for s in stage0.values()]
        chars = [v.get("char_accuracy") for v in vis]
        seeds = len({r["seed"] for r in results["runs"]})
        who = ("per seed" if len(stage0) == seeds else "once, for every seed" if len(stage0) == 1
               else f"{len(stage0)} times, seed s starting from stage-0 seed s mod {len(stage0)}")
        line0 = (f"**Stage 0**: {who}, a text LM ({_spread([x.get('steps') for x in lm], str)} steps, final loss "
                 f"{_spread([x.get('final_loss') for x in lm], lambda v: f'{v:.2f}')}) and a vision encoder "
                 f"({_spread([x.get('steps') for x in vis], str)} steps, "
                 f"{_spread(chars, lambda v: f'{100 * v:.0f}%')} of characters read) are pretrained and shared "
                 "by every arm" + (": the intervals over seeds are stage 1's variation, given that stage 0."
                                   if len(stage0) == 1 < seeds else "."))
    else:
        line0 = "**Stage 0**: not recorded in these results."
    sample_runs = [r for r in runs if arms[r.get("arm", r["variant"])]["matching"] == "samples"]
    flops_arms = [n for n, a in arms.items() if a["matching"] == "flops"]
    flops_runs = [r for r in runs if r.get("arm", r["variant"]) in flops_arms]
    regs = ", ".join(f"{r} ({REGIME_WORDS.get(r, r)})" for r in regimes(results))
    line1 = (f"**Stage 1**: {len(arms)} arms train on identical packs of samples "
             f"({_spread([r.get('samples') for r in sample_runs], lambda v: f'{v:,}')} samples, "
             f"{_spread([r.get('steps') for r in sample_runs], str)} steps per run) in the regimes {regs}")
    train = cfg.get("spec", {}).get("train", {})
    if "lr_new" in train:
        line1 += f", learning rate {train['lr_new']:g} (new parameters) / {train['lr_pretrained']:g} (pretrained)"
    line1 += (f"; {', '.join(flops_arms)} {'trains' if len(flops_arms) == 1 else 'train'} on CASA's FLOPs instead "
              f"({_spread([r.get('samples') for r in flops_runs], lambda v: f'{v:,}')} samples)." if flops_arms
              else ".")
    seeds = sorted({r["seed"] for r in runs})
    cats = category_tasks(results)
    levels = cfg.get("levels")
    per_arm = {}
    for r in runs:
        per_arm.setdefault(r.get("arm", r["variant"]), set()).add(r["seed"])
    counts = sorted({len(s) for s in per_arm.values()})
    fewer = "" if len(counts) < 2 else (
        f" (the arms the headline claims compare; the others {counts[0]})")
    line2 = (f"**Seeds** {len(seeds)} ({', '.join(map(str, seeds))}){fewer}; tasks: "
             + "; ".join(f"{c}: {', '.join(ts)}" for c, ts in cats.items())
             + (f"; {FINE} tasks at difficulty levels {', '.join(map(str, levels))}" if levels else "")
             + ". ± is the half-width of the 95% Student-t interval over seeds; differences are paired by seed.")
    wall = results.get("wall_seconds")
    line3 = (f"Command `{results.get('command', '?')}` (size {cfg.get('size', '?')}), {cfg.get('threads', '?')} "
             f"thread(s) of {cfg.get('cpu_count', '?')} CPUs, torch {cfg.get('torch', '?')}"
             + (f", wall time {wall / 60:.1f} min" if wall is not None else ""))
    reused = results.get("reused") or {}
    taken = [f"stage 0 of seed(s) {', '.join(map(str, reused['stage0_seeds']))}"] if reused.get("stage0_seeds") else []
    taken += [f"{len(reused['arm_runs'])} arm run(s)"] if reused.get("arm_runs") else []  # named in results.json
    line3 += (f" (not counting what it reused from an earlier run in the same folder: {' and '.join(taken)})."
              if taken else ".")
    return [line0, line1, line2, line3]


# -------------------------------------------------------------- formatting
def _cell(ci: dict | None) -> str:
    if not ci or ci["mean"] is None:
        return "-"
    return f"{points(ci['mean'], False)}" + (f" ± {100 * ci['half']:.1f}" if ci["half"] is not None
                                               else f" (n={ci['n']})")


def _with_blind(ci, blind) -> str:
    return _cell(ci) + (f" · {points(blind['mean'], False)}" if blind and blind["mean"] is not None else "")


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def _num(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def _image(images: dict | None, name: str) -> list[str]:
    return [f"![{NAMES[name]}]({name})", ""] if images and name in images else []


# ----------------------------------------------------------------- sections
def _summary_table(results: dict, images) -> list[str]:
    L = ["| claim | verdict | measured (scores in points, [95% interval]) | most likely reason |", "|---|---|---|---|"]
    for c in results["claims"]:
        L.append(f"| {c['claim']} | **{c['verdict']}** | {c['measured']} | {c['reason'] or ''} |")
    s = results["summary"]
    cal = s["calibration"]
    L += ["", "Verdicts: " + ", ".join(f"{n} {v}" for v, n in s["verdicts"].items()) + ".", ""]
    pw = s["power"]
    if pw["met"] is not None:
        widths = ", ".join(f"{name} +-{'n/a' if h is None else points(h, False)}" for name, h in pw["half"].items())
        L += [f"**Power** (every accuracy claim's 95% interval half-width <= {100 * pw['target']:.0f} points): "
              f"**{'met' if pw['met'] else 'not met'}** ({widths}).", ""]
    if cal["regimes"]:
        per = "; ".join(
            f"{r}: {v['arm']} " + (", ".join(f"{t} {points_interval(ci)}" for t, ci in v["tasks"].items()) or "-")
            + f" -> {'met' if v['met'] else 'not met'}" for r, v in cal["regimes"].items())
        L.append(f"**Calibration** ({cal['rule']}): **{'met' if cal['met'] else 'not met'}** ({per}).")
    else:
        L.append(f"**Calibration** ({cal['rule']}): not checked, no sample-matched insertion arm.")
    L.append("")
    if images is None:
        L += ["Plots skipped: matplotlib is not installed (`pip install 'casa[plot]'`).", ""]
    return L


def _claims_section(results: dict) -> list[str]:
    L = ["## Claims, their rules, the numbers (docs/design.md §7)", "",
         f"Precondition: a claim about a category is *not testable here* when no arm of its regime beats "
         f"max(its blind score, the prior) on that category by {100 * LEARNED:.0f} points (guessing arms cannot "
         "be ranked). Each rule is stated before the number it judges.", "",
         "| claim | paper | rule | measured | verdict |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        L.append(f"| {c['claim']} | {c['paper']} | {c['rule']} | {c['measured']} | **{c['verdict']}** |")
    L += ["", "A reason is the first of these rules that applies:", ""]
    L += [f"{i}. {rule}" for i, rule in enumerate(REASON_RULES, 1)]
    L += ["", "Categories learned (best arm's gain over max(blind, prior), points):", "",
          "| regime | " + " | ".join(category_tasks(results)) + " |", "|---|" + "---|" * len(category_tasks(results))]
    for regime, per in results["summary"]["learned"].items():
        L.append(f"| {regime} | " + " | ".join(
            ("-" if v["arm"] is None else f"{'yes' if v['learned'] else 'no'}, {points(v['gain'])} ({v['arm']})")
            for v in per.values()) + " |")
    return L + [""]


def _accuracy_section(results: dict, images) -> list[str]:
    acc, arms, cats = results["accuracy"], arm_table(results), category_tasks(results)
    prior, tasks = prior_categories(results), [t for ts in cats.values() for t in ts]
    task_prior = results.get("prior", {})
    L = ["## Accuracy per arm and category", "",
         "Score in points, mean ± 95% half-width over seeds · blind score (the same model, images withheld).", "",
         "| arm | variant | regime | matching | seeds | " + " | ".join(cats) + " | overall |",
         "|---|---|---|---|---|" + "---|" * (len(cats) + 1)]
    for n, r in acc.items():
        a = arms[n]
        L.append(f"| {n} | {a['variant']} | {a['regime']} | {a['matching']} | {len(r['seeds'])} | "
                 + " | ".join(_with_blind(r["categories"][c], r["blind_categories"][c]) for c in cats)
                 + f" | {_with_blind(r['overall'], r['blind_overall'])} |")
    L.append("| *prior (most frequent answer)* | | | | | " + " | ".join(
        "-" if prior[c] is None else points(prior[c], False) for c in cats) + " | |")
    L += [""] + _image(images, "study_accuracy.png")
    L += ["### Per task", "", "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for n, r in acc.items():
        L.append(f"| {n} | " + " | ".join(_with_blind(r["tasks"][t], r["blind_tasks"][t]) for t in tasks) + " |")
    L.append("| *prior* | " + " | ".join(points(task_prior[t], False) if t in task_prior else "-" for t in tasks)
             + " |")
    cols = list(dict.fromkeys((t, lv) for r in acc.values() for t, lvs in r["levels"].items() for lv in lvs))
    if cols:
        pl = prior_levels(results)
        L += ["", "### Per difficulty level", "", "| arm | " + " | ".join(f"{t} L{lv}" for t, lv in cols) + " |",
              "|---|" + "---|" * len(cols)]
        for n, r in acc.items():
            L.append(f"| {n} | " + " | ".join(_with_blind(r["levels"].get(t, {}).get(lv),
                                                           r["blind_levels"].get(t, {}).get(lv)) for t, lv in cols)
                     + " |")
        L.append("| *prior* | " + " | ".join(points(pl[t][lv], False) if lv in pl.get(t, {}) else "-"
                                             for t, lv in cols) + " |")
        L += [""] + _image(images, "study_levels.png")
    curves = [(n, r["curves"]) for n, r in acc.items() if any(r["curves"].values())]
    if curves:
        L += ["", "### Learning curves", "", "First and last evaluated step, mean over seeds (points).", "",
              "| arm | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for n, cv in curves:
            L.append(f"| {n} | " + " | ".join(
                f"{points(cv[c][0]['mean'], False)} (step {cv[c][0]['step']}) → {points(cv[c][-1]['mean'], False)} "
                f"(step {cv[c][-1]['step']})" if cv.get(c) else "-" for c in cats) + " |")
        L += [""] + _image(images, "study_curves.png")
    return L + [""]


def _paired_section(results: dict, images) -> list[str]:
    cats = list(category_tasks(results))
    L = ["## Paired differences", "",
         "Per seed, arm a's score minus arm b's (or minus a's own blind score), then the mean and its 95% "
         "Student-t interval over the seeds both ran, in points.", "",
         "| a - b | seeds | overall | " + " | ".join(cats) + " |", "|---|---|---|" + "---|" * len(cats)]
    for label, p in results["paired"].items():
        L.append(f"| {label} | {len(p['seeds'])} | {points_interval(p['overall'])} | "
                 + " | ".join(points_interval(p["categories"][c]) for c in cats) + " |")
    return L + [""] + _image(images, "study_paired.png")


def _stage0_section(results: dict) -> list[str]:
    stage0 = results.get("stage0", {})
    if not stage0:
        return []
    L = ["## Stage 0 (pretrained, shared by every arm of a seed)", "",
         "| seed | LM steps | LM s | LM final loss | vision steps | vision s | vision final loss | characters read |",
         "|---|---|---|---|---|---|---|---|"]
    for seed, s in stage0.items():
        lm, v = s.get("lm", {}), s.get("vision", {})
        L.append(f"| {seed} | {_num(lm.get('steps'))} | {_num(lm.get('seconds'), '{:.1f}')} | "
                 f"{_num(lm.get('final_loss'), '{:.3f}')} | {_num(v.get('steps'))} | {_num(v.get('seconds'), '{:.1f}')}"
                 f" | {_num(v.get('final_loss'), '{:.3f}')} | "
                 f"{_num(None if v.get('char_accuracy') is None else 100 * v['char_accuracy'], '{:.1f}%')} |")
    return L + [""]


def _cost_section(results: dict) -> list[str]:
    acc, arms = results["accuracy"], arm_table(results)
    ref = {a["regime"]: acc[n]["cost"]["flops"]["mean"] for n, a in arms.items()
           if a["variant"] == "casa" and a["matching"] == "samples" and n in acc}
    L = ["## Training cost per arm (stage 1, mean over seeds)", "",
         "| arm | steps | samples | sequence tokens | FLOPs / step | FLOPs | vs casa FLOPs | train s | trainable "
         "params | final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in acc.items():
        c = {k: v["mean"] for k, v in r["cost"].items()}
        base = ref.get(arms[n]["regime"])
        L.append(f"| {n} | {_num(c['steps'])} | {_num(c['samples'])} | {_num(c['sequence_tokens'])} | "
                 f"{_num(c['flops_per_step'], '{:.3g}')} | {_num(c['flops'], '{:.3g}')} | "
                 f"{_num(c['flops'] / base if c['flops'] is not None and base else None, '{:.2f}x')} | "
                 f"{_num(c['train_seconds'], '{:.0f}')} | {_num(c['trainable'])} | {_num(c['final_loss'], '{:.3f}')} |")
    return L + [""]


def _bench_section(results: dict, images) -> list[str]:
    bench = results.get("bench", {})
    train, stream = bench.get("train", {}), bench.get("stream", {})
    if not train and not stream:
        return []
    L = ["## Training cost and streaming, per variant (benchmarks)", ""]
    c, s = bench.get("train_config", {}), bench.get("stream_config", {})
    if c:
        L.append(f"Training step (`bench/train.py`): {c.get('text_tokens', '?')} text + {c.get('image_tokens', '?')} "
                 f"image tokens ({c.get('tokens_per_image', '?')} per image), d_model {c.get('d_model', '?')}, "
                 f"{c.get('n_layers', '?')} blocks, {c.get('threads', '?')} thread(s), images as precomputed "
                 f"embeddings, median of {c.get('repeats', '?')} step(s).")
    if s:
        L.append(f"Streaming (`bench/stream.py`): {s.get('turns', '?')} turns of one frame "
                 f"({s.get('image_tokens', '?')} image tokens) + {s.get('prompt_tokens', '?')} prompt + "
                 f"{s.get('new_tokens', '?')} generated tokens.")
    L += ["", "| variant | train text tok/s | train peak MiB | vs casa mem | stream TTFT first→last 10% (ms) "
          "| KV tokens at end |", "|---|---|---|---|---|---|"]
    ref = train.get("casa", {}).get("peak_mem_bytes")
    for name in dict.fromkeys([*train, *stream]):
        t, st = train.get(name, {}), stream.get(name)
        mem = t.get("peak_mem_bytes")
        ttft = (f"{st['summary']['first_10pct']['ttft_ms']:.1f} → {st['summary']['last_10pct']['ttft_ms']:.1f}"
                if st else "-")
        L.append(f"| {name} | {_num(t.get('text_tok_s'))} | {_mib(mem)} | "
                 f"{_num(mem / ref if mem is not None and ref else None, '{:.2f}x')} | {ttft} | "
                 f"{_num(st['kv_tokens'][-1] if st and st.get('kv_tokens') else None)} |")
    return L + [""] + _image(images, "study_bench.png")


def _gating_section(results: dict, images) -> list[str]:
    shares, gates = results["gating"]["shares"], results["gating"]["gates"]
    if not shares and not gates:
        return []
    L = ["## Implicit gating", "",
         "Share of attention mass that answer tokens in a window with an image put on image keys / text keys / "
         "their own key, in the fusion layers of the arms with text keys (all text queries of the window in "
         "brackets: image / text). Mean over seeds.", ""]
    for name, per in shares.items():
        layers = sorted({lay for t in per.values() for lay in t}, key=int)
        L += [f"**{name}**", "", "| task | " + " | ".join(f"block {lay}" for lay in layers) + " |",
              "|---|" + "---|" * len(layers)]
        for t, lay_map in per.items():
            cells = []
            for lay in layers:
                v = lay_map.get(lay)
                if v is None or v["answer_image"]["mean"] is None:
                    cells.append("-")
                    continue
                cells.append(f"{v['answer_image']['mean']:.2f} / {v['answer_text']['mean']:.2f} / "
                             f"{v['answer_self']['mean']:.2f} ({v['image']['mean']:.2f} / {v['text']['mean']:.2f})")
            L.append(f"| {t} | " + " | ".join(cells) + " |")
        L.append("")
    for name, per in gates.items():
        L += [f"**{name}** gates, tanh(alpha) per block (attention / FFN): " + ", ".join(
            f"block {lay}: {v['attn']['mean']:+.3f} / {v['ffn']['mean']:+.3f}" for lay, v in per.items())
            + ". One constant per layer whatever the input; CASA's share above varies with the task.", ""]
    return L + _image(images, "study_gating.png")


def markdown(results: dict, images: dict | None) -> str:
    """report.md of derived `results`; `images` = the rendered PNGs by name (None: matplotlib missing)."""
    cfg = results.get("config", {})
    L = [f"# casa study ({cfg.get('size', '?')}): summary", ""]
    L += [line + "  " for line in results["summary"]["protocol"]] + [""]
    L += _summary_table(results, images)
    L += _claims_section(results)
    L += _accuracy_section(results, images)
    L += _paired_section(results, images)
    L += _stage0_section(results)
    L += _cost_section(results)
    L += _bench_section(results, images)
    L += _gating_section(results, images)
    L += _experiment_sections(results, images)
    L += _per_seed_section(results)
    L += _collapse_section(results)
    return "\n".join(L) + "\n"


def _compression(runs: list[dict]) -> dict | None:
    """compression.py's results for the report: per variant (casa, insertion), averaged over seeds."""
    from casa.study.compression import mean_over_seeds, verdict

    per = {}
    for r in runs:
        if r.get("compression"):
            per.setdefault(r["arm"], []).append(r["compression"])
    if not per:
        return None
    res = {"variants": {arm: mean_over_seeds(rs) for arm, rs in per.items()}}
    res["verdict"] = verdict(res) if {"casa", "insertion"} <= set(per) else None
    return res


def _per_seed_section(results: dict) -> list[str]:
    """Each arm's category score per seed, and the largest sampling error of one seed's category mean: a seed
    far from the others is visible here, not only as a wide interval."""
    acc, cats = results["accuracy"], list(category_tasks(results))
    L = ["## Per-seed results", "",
         "Category score of each seed (points, seeds in order) · the largest binomial standard error of one "
         "seed's category mean from its questions alone (the evaluation's own noise, before any seed variance). "
         "Every (arm, seed) run is in `results.json` under `runs`.", "",
         "| arm | seeds | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    for n, r in acc.items():
        cells = []
        for c in cats:
            values = ", ".join(points(v, False) for v in r["per_seed"][c])
            se = r["sampling_se"][c]
            cells.append(f"{values} · se {points(se, False)}" if se is not None else values)
        L.append(f"| {n} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
    return L + [""]


def _collapse_section(results: dict) -> list[str]:
    """The seeds that collapsed on a task (`stats.collapses`), each with the evidence for what happened."""
    found = results.get("collapses") or []
    L = ["## Collapsed seeds", "",
         f"**Rule** (fixed before the numbers): a seed has collapsed on a task when it scores {100 * COLLAPSE:.0f} "
         "points or more under the median of the same arm's other seeds (arms with 3 seeds or more). For each, "
         "its learning curve (small evaluations during training) says whether it learnt the task and lost it "
         f"(a curve peak {100 * COLLAPSE:.0f} points or more over the final score), never learnt it (no curve "
         f"point {100 * COLLAPSE / 2:.0f} points over the first) or learnt it late (the rest); its "
         "blind score says whether it answers without the image; its answer tokens' attention share on image "
         "keys (mean over fusion layers, arms with text keys) against the other seeds' says whether the "
         "implicit gate shut the image out.", ""]
    if not found:
        return L + ["No seed collapsed on any task.", ""]
    L += ["| arm | seed | task | score | other seeds (median) | blind | curve (step: score) | what happened | "
          "image share (this seed / others) | final loss (this / others) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in found:
        curve = ", ".join(f"{step}: {points(v, False)}" for step, v in c["curve"])
        share = ("-" if c["image_share"] is None else
                 f"{c['image_share']:.2f} / {'-' if c['others_image_share'] is None else format(c['others_image_share'], '.2f')}")
        loss = "-" if c["loss"] is None else f"{c['loss']:.3f} / {'-' if c['others_loss'] is None else format(c['others_loss'], '.3f')}"
        L.append(f"| {c['arm']} | {c['seed']} | {c['task']} | {points(c['score'], False)} | "
                 f"{points(c['others'], False)} | {points(c['blind'], False)} | {curve} | {c['kind']} | {share} | {loss} |")
    runs = len(results["runs"])
    by_kind = {k: sum(c["kind"] == k for c in found)
               for k in ("learnt, then lost", "never learnt (flat curve)", "learnt late")}
    by_arm = {}
    for c in found:
        by_arm[c["arm"]] = by_arm.get(c["arm"], 0) + 1
    L += ["", f"{len(found)} collapse(s) over {runs} (arm, seed) runs: "
          + ", ".join(f"{n} {k}" for k, n in by_kind.items() if n)
          + "; by arm: " + ", ".join(f"{a} {n}" for a, n in sorted(by_arm.items(), key=lambda kv: -kv[1])) + ".", ""]
    return L


def _experiment_sections(results: dict, images) -> list[str]:
    from casa.study.compression import section as compression_section
    from casa.study.crossimage import section as crossimage_section
    from casa.study.frequency import section as frequency_section
    from casa.study.gate_tokens import section as gate_section

    L = []
    frequency = frequency_section(results, figure="study_frequency.png" if images and "study_frequency.png" in
                                  images else None)
    L += [frequency] if frequency else []
    if results.get("compression"):
        L += [compression_section(results["compression"])] + _image(images, "study_compression.png")
    if results.get("crossimage"):
        L += [crossimage_section(results["crossimage"])] + _image(images, "study_crossimage.png")
    gates = sorted((r for r in results["runs"] if r.get("gate_tokens")), key=lambda r: r["seed"])
    if gates:
        figure = "study_gate_heatmaps.png" if images and "study_gate_heatmaps.png" in images else None
        heading, _, body = gate_section(gates[0]["gate_tokens"], figure=figure).partition("\n\n")
        L += [heading, "", f"Measured on the {gates[0]['arm']} arm of seed {gates[0]['seed']} (the other seeds' "
              "summaries are in results.json).", "", body, ""]
    return L


def _experiment_images(results: dict, out: Path) -> dict[str, bytes]:
    """The experiments' PNGs: compression's and cross-image's plots, and the gate heatmaps run.py drew into `out`."""
    from casa.study.compression import plot_compression
    from casa.study.crossimage import plot_crossimage
    from casa.study.frequency import plot_frequency

    images = {}
    frequency = plot_frequency(results)
    if frequency is not None:
        images["study_frequency.png"] = frequency
    for key, plot in (("compression", plot_compression), ("crossimage", plot_crossimage)):
        if results.get(key):  # these plots write a file: render into a scratch one, keep the bytes
            with tempfile.TemporaryDirectory() as d:
                path = plot(results[key], Path(d) / f"study_{key}.png")
                if path is not None:
                    images[f"study_{key}.png"] = Path(path).read_bytes()
    heat = out / "study_gate_heatmaps.png"
    if heat.is_file():
        images["study_gate_heatmaps.png"] = heat.read_bytes()
    return images


# ------------------------------------------------------------------- write
def write_report(results: dict, out: Path, docs: Path | None = None) -> dict:
    """Derive the sections; write results.json, report.md and study_*.png in `out`, and with `docs`
    also docs/study.md and docs/study_*.png (links relative to docs/). Returns `results`."""
    out = Path(out)
    derive(results)
    images = render(results, TOL_INSERTION)
    if images is not None:
        images.update(_experiment_images(results, out))
    _write(out / "results.json", json.dumps(results, indent=1))
    for name, data in (images or {}).items():
        _write(out / name, data)
    text = markdown(results, images)
    _write(out / "report.md", text)
    if docs is not None:
        docs = Path(docs)
        for name, data in (images or {}).items():
            _write(docs / name, data)
        _write(docs / "study.md", text)
    return results


def _write(path: Path, content: str | bytes) -> None:
    with atomic_file(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
