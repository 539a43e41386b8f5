"""`casa study` plots: accuracy with intervals, learning curves, difficulty
levels, paired differences, the benchmarks and the implicit gate.

Design decisions:
- Figures are rendered to PNG bytes in memory (`render`); the report writes
  them with `casa.files.atomic_file`, so a crash never leaves half a PNG.
- matplotlib is optional (the `plot` extra): without it `render` returns
  None and the report says the plots were skipped.
- Scores are drawn in points (0..100); error bars are the 95% Student-t
  half-widths of `casa.study.stats.interval` (none for a single seed).
- Curves and levels show the arms of the primary regime, where the claims
  are decided; the accuracy and paired plots show every arm.
"""

from __future__ import annotations

import io

from casa.study.stats import (
    arm_table,
    category_tasks,
    prior_categories,
    prior_levels,
    regimes,
)

__all__ = ["NAMES", "render"]

# file name -> what it shows (the report's captions)
NAMES = {
    "study_accuracy.png": "accuracy per category and arm (mean over seeds, 95% interval; x = blind, dotted = prior)",
    "study_curves.png": "learning curves of the primary-regime arms (mean over seeds)",
    "study_levels.png": "accuracy per difficulty level of the fine-grained tasks",
    "study_paired.png": "paired differences between arms (mean, 95% interval)",
    "study_bench.png": "training memory and speed, streaming time to first token, per variant",
    "study_gating.png": "CASA's implicit gate: answer tokens' attention mass on image keys",
    "study_compression.png": "accuracy and time to first token against image tokens per window, compressed "
                             "without retraining",
    "study_crossimage.png": "cross-image questions: score against the KV cache a frame adds, per arm",
    "study_frequency.png": "how often fusion layers occur: accuracy against training memory and decode time",
    "study_gate_heatmaps.png": "where an answer token looks: its attention over the image patches, and its "
                               "image vs text share per fusion layer",
}


def _half(ci):
    return 0.0 if ci["half"] is None else 100 * ci["half"]


def _accuracy(plt, results):
    acc, cats = results["accuracy"], list(category_tasks(results))
    prior = prior_categories(results)
    names = list(acc)
    fig, axes = plt.subplots(1, len(cats), figsize=(max(5, 0.45 * len(names)) * len(cats), 4.5), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        xs = range(len(names))
        means = [100 * (acc[n]["categories"][cat]["mean"] or 0) for n in names]
        ax.bar(xs, means, yerr=[_half(acc[n]["categories"][cat]) for n in names], capsize=3, color="C0", alpha=0.8)
        ax.plot(xs, [100 * (acc[n]["blind_categories"][cat]["mean"] or 0) for n in names], "kx", label="blind")
        if prior.get(cat) is not None:
            ax.axhline(100 * prior[cat], ls=":", c="k", lw=1, label="prior")
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("score (points)")
        ax.set_ylim(0, 100)
        ax.set_title(cat)
        ax.grid(axis="y", alpha=0.3)
    # one legend for the figure, above the panels: inside one, it sat over the bars
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(NAMES["study_accuracy.png"], fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _primary_arms(results):
    regs = regimes(results)
    return [n for n, a in arm_table(results).items() if regs and a["regime"] == regs[0] and n in results["accuracy"]]


def _curves(plt, results):
    acc, cats = results["accuracy"], list(category_tasks(results))
    arms = [n for n in _primary_arms(results) if any(acc[n]["curves"].get(c) for c in cats)]
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(cats), figsize=(5 * len(cats), 4), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        for n in arms:
            pts = acc[n]["curves"].get(cat, [])
            ax.plot([p["step"] for p in pts], [100 * p["mean"] for p in pts], "o-", ms=3, lw=1, label=n)
        ax.set_xlabel("training step")
        ax.set_ylabel("score (points)")
        ax.set_title(cat)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(NAMES["study_curves.png"], fontsize=9)
    fig.tight_layout()
    return fig


def _levels(plt, results):
    acc, arms = results["accuracy"], _primary_arms(results)
    tasks = list(dict.fromkeys(t for n in arms for t in acc[n]["levels"]))
    if not tasks:
        return None
    prior = prior_levels(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        levels = list(dict.fromkeys(lv for n in arms for lv in acc[n]["levels"].get(t, {})))
        xs = range(len(levels))
        for n in arms:
            cis = [acc[n]["levels"].get(t, {}).get(lv) for lv in levels]
            ax.errorbar(xs, [100 * (c["mean"] or 0) if c else float("nan") for c in cis],
                        yerr=[_half(c) if c else 0 for c in cis], fmt="o-", ms=3, lw=1, capsize=2, label=n)
        blind = []
        for lv in levels:
            vals = [acc[n]["blind_levels"].get(t, {}).get(lv, {}).get("mean") for n in arms]
            vals = [v for v in vals if v is not None]
            blind.append(100 * sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(xs, blind, "--", c="grey", label="blind (mean over arms)")
        if t in prior:
            ax.plot(xs, [100 * prior[t].get(lv, float("nan")) for lv in levels], ":", c="k", label="prior")
        ax.set_xticks(list(xs), [f"level {lv}" for lv in levels])
        ax.set_ylabel("score (points)")
        ax.set_ylim(0, 100)
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(NAMES["study_levels.png"], fontsize=9)
    fig.tight_layout()
    return fig


def _paired(plt, results, tolerance: float):
    rows = [(label, cat, ci) for label, p in results["paired"].items() if p["b"] != "blind"
            for cat, ci in p["categories"].items() if ci["mean"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    colors = {cat: f"C{i % 10}" for i, cat in enumerate(dict.fromkeys(cat for _, cat, _ in rows))}
    labelled = set()
    for i, (label, cat, ci) in enumerate(rows):
        ax.errorbar(100 * ci["mean"], len(rows) - 1 - i, xerr=_half(ci), fmt="o", ms=4, capsize=2, color=colors[cat],
                    label=None if cat in labelled else cat)  # one legend entry per category
        labelled.add(cat)
    ax.set_yticks(range(len(rows)), [f"{label} ({cat})" for label, cat, _ in reversed(rows)], fontsize=7)
    ax.axvline(0, c="k", lw=1)
    ax.axvline(-tolerance, c="grey", ls=":", lw=1, label=f"-{tolerance:g} points (tolerance vs insertion)")
    ax.set_xlabel("difference (points), paired by seed")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(NAMES["study_paired.png"], fontsize=9)
    fig.tight_layout()
    return fig


def _bench(plt, results):
    train, stream = results.get("bench", {}).get("train", {}), results.get("bench", {}).get("stream", {})
    if not train and not stream:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    names = list(train)
    mem = [(train[n].get("peak_mem_bytes") or 0) / 2**20 for n in names]
    axes[0].bar(range(len(names)), mem, color="C1")
    axes[0].set_ylabel("training peak memory (MiB)")
    axes[1].bar(range(len(names)), [train[n]["text_tok_s"] for n in names], color="C2")
    axes[1].set_ylabel("training text tokens / s")
    for ax in axes[:2]:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for n, s in stream.items():
        axes[2].plot(range(len(s["ttft_ms"])), s["ttft_ms"], lw=1, label=n)
    axes[2].set_xlabel("turn")
    axes[2].set_ylabel("time to first token (ms)")
    axes[2].grid(alpha=0.3)
    if stream:
        axes[2].legend(fontsize=6)
    fig.suptitle(NAMES["study_bench.png"], fontsize=9)
    fig.tight_layout()
    return fig


def _gating(plt, results):
    shares, gates = results["gating"]["shares"], results["gating"]["gates"]
    if not shares and not gates:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    tasks = list(dict.fromkeys(t for per in shares.values() for t in per))
    width = 0.8 / max(1, len(shares))
    for i, (name, per) in enumerate(shares.items()):
        vals = []
        for t in tasks:
            v = [x["answer_image"]["mean"] for x in per.get(t, {}).values() if x["answer_image"]["mean"] is not None]
            vals.append(sum(v) / len(v) if v else 0.0)
        axes[0].bar([j + i * width for j in range(len(tasks))], vals, width, label=name)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30)
    axes[0].set_ylabel("answer tokens' mass on image keys")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("mean over layers and seeds", fontsize=9)
    if shares:
        axes[0].legend(fontsize=6)
    first = next(iter(shares), None)
    for t in tasks if first else []:
        layers = sorted(shares[first].get(t, {}), key=int)
        axes[1].plot([int(lay) for lay in layers], [shares[first][t][lay]["answer_image"]["mean"] for lay in layers],
                     "o-", label=f"{first} {t}")
    for name, per in gates.items():
        layers = sorted(per, key=int)
        axes[1].plot([int(lay) for lay in layers], [abs(per[lay]["attn"]["mean"]) for lay in layers], "k--s",
                     label=f"{name} |tanh(alpha_attn)|")
    axes[1].set_xlabel("block")
    axes[1].set_ylabel("share on image keys / gate value")
    axes[1].set_title("per layer", fontsize=9)
    axes[1].legend(fontsize=6)
    fig.suptitle(NAMES["study_gating.png"], fontsize=9)
    fig.tight_layout()
    return fig


def render(results: dict, tolerance: float) -> dict[str, bytes] | None:
    """PNG bytes of every plot that has data, by file name (see `NAMES`); None without matplotlib.

    Args:
        results: a study's results with the derived sections of `casa.study.report.derive`;
        tolerance: the points drawn as the tolerance line of the paired plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figures = {"study_accuracy.png": _accuracy(plt, results), "study_curves.png": _curves(plt, results),
               "study_levels.png": _levels(plt, results), "study_paired.png": _paired(plt, results, tolerance),
               "study_bench.png": _bench(plt, results), "study_gating.png": _gating(plt, results)}
    out = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out
