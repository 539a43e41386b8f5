"""How often fusion layers must occur (`casa study`, issue 30, experiment 3).

CASA layers sit `parallel` to a block's self-attention or `replace` it, in
every n-th block (`FusionConfig.every`: blocks 0, n, 2n, ...). The study's
arms `casa`, `casa_every2`, `casa_every4` (parallel) and `casa_replace`,
`casa_replace_every4` (replace) train on the same packs as every other arm;
this module sets their accuracy beside what the fewer layers save: training
peak memory and text tokens/s (`bench/train.py`), and the decode time per
token and time to first token of a streaming session (`bench/stream.py`).

Design decisions:
- The rules are fixed before the numbers (`RULE`) and read paired
  differences over seeds (`stats.paired`): parallel every k "costs nothing"
  when, on every learned category, casa_everyk - casa >= -TOL points; for
  replace, the paper finds every 4 best, so the claim is casa_replace_every4
  - casa_replace >= 0 on the mean over the learned categories.
- `replace` in every block is no arm: it would leave no text-only attention
  at all, which is not the paper's CASA-replace (run.py's design notes).
- Every k beyond the LM's depth places one fusion layer, in block 0, like
  every n_layers: the table names the blocks each arm has, so a 4-block LM
  shows why "every 8" is not a separate row here (the GPU size has 6 blocks).
- Costs are per variant (benchmarks do not depend on the regime or seed);
  they are ratios to `casa` (parallel, every block) measured in one run.
"""

from __future__ import annotations

import io

from casa.study.claims import points, points_interval
from casa.study.stats import category_tasks, learned, paired

__all__ = ["ARMS", "RULE", "finding", "plot_frequency", "rows", "section", "verdicts"]

# the study arms compared; their placement and `every` are read from the run's config (run.VARIANTS)
ARMS = ("casa", "casa_every2", "casa_every4", "casa_replace", "casa_replace_every4")
RULE = {"tolerance": 2.0}  # points: a sparser parallel placement "costs nothing" within this


def _blocks(results: dict, every: int) -> list[int]:
    n = results.get("config", {}).get("spec", {}).get("model", {}).get("lm", {}).get("n_layers")
    return list(range(0, n, every)) if n else []


def rows(results: dict) -> list[dict]:
    """One row per frequency arm the run has: placement, every, fusion blocks, accuracy per category
    (intervals), training memory and tokens/s, decode ms/token and TTFT (last 10% of the stream), and the
    cost ratios to `casa`."""
    acc, bench = results["accuracy"], results.get("bench", {})
    train, stream = bench.get("train", {}), bench.get("stream", {})

    def cost(name):
        t, s = train.get(name, {}), (stream.get(name) or {}).get("summary", {}).get("last_10pct", {})
        return {"peak_mem_bytes": t.get("peak_mem_bytes"), "text_tok_s": t.get("text_tok_s"),
                "decode_ms_per_token": s.get("decode_ms_per_token"), "ttft_ms": s.get("ttft_ms")}

    ref = cost("casa")
    out = []
    fusions = results.get("config", {}).get("variants_fusion", {})
    for name in ARMS:
        if name not in acc:
            continue
        placement, every = fusions[name].get("placement", "parallel"), fusions[name].get("every", 1)
        c = cost(name)
        ratio = {k: (c[k] / ref[k] if c[k] is not None and ref[k] else None) for k in c}
        out.append({"arm": name, "placement": placement, "every": every, "blocks": _blocks(results, every),
                    "categories": acc[name]["categories"], "overall": acc[name]["overall"], **c,
                    "ratio_to_casa": ratio})
    return out


def verdicts(results: dict) -> list[dict]:
    """The rules of the module docstring: `{"rule", "measured", "verdict"}` per sparser arm the run has."""
    cats = category_tasks(results)
    done = [c for c in cats if learned(results, c, "frozen")["learned"]]
    tol = RULE["tolerance"]
    out = []
    for name in ("casa_every2", "casa_every4"):
        d = paired(results["runs"], name, "casa", {c: cats[c] for c in done}) if done else None
        if d is None:
            continue
        worst = min(done, key=lambda c: d["categories"][c]["mean"])
        ok = all(100 * d["categories"][c]["mean"] >= -tol for c in done)
        out.append({"rule": f"{name} - casa >= -{tol:g} points on every learned category ({', '.join(done)})",
                    "measured": "; ".join(f"{c} {points_interval(d['categories'][c])}" for c in done),
                    "verdict": "holds" if ok else f"does not hold (worst: {worst})", "arm": name, "holds": ok,
                    "worst": (worst, d["categories"][worst]["mean"])})
    d = paired(results["runs"], "casa_replace_every4", "casa_replace", {c: cats[c] for c in done}) if done else None
    if d is not None:
        mean = sum(d["categories"][c]["mean"] for c in done) / len(done)
        out.append({"rule": "casa_replace_every4 - casa_replace >= 0 on the mean over the learned categories "
                            "(the paper: replace works best every 4 blocks)",
                    "measured": f"{points(mean)} points (" + "; ".join(
                        f"{c} {points_interval(d['categories'][c])}" for c in done) + ")",
                    "verdict": "holds" if mean >= 0 else "does not hold", "arm": "casa_replace_every4",
                    "holds": mean >= 0, "mean": mean})
    return out


def finding(results: dict) -> str:
    """The one-line finding of `verdicts`, with the memory each sparser arm saves."""
    memory = {r["arm"]: r["ratio_to_casa"]["peak_mem_bytes"] for r in rows(results)}
    parts = []
    for v in verdicts(results):
        mem = f" at {_x(memory.get(v['arm']))} casa's training memory"
        if v["arm"] == "casa_replace_every4":
            parts.append(f"replace every 4 blocks{mem} scores {points(v['mean'])} points against replace every 2, "
                         + ("as the paper finds" if v["holds"] else "so the paper's 'replace works best every 4' "
                            "is not reproduced here"))
        elif v["holds"]:
            parts.append(f"{v['arm']}{mem} stays within {RULE['tolerance']:g} points of casa on every learned category")
        else:
            c, d = v["worst"]
            parts.append(f"{v['arm']}{mem} costs {points(d)} points on {c}, more than the "
                         f"{RULE['tolerance']:g} the rule allows")
    return "; ".join(parts) + "." if parts else "no sparser arm in this run."


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def section(results: dict, *, figure: str | None = None) -> str:
    """Markdown for docs/study.md: the question, the rules (before any number), the table, the verdicts."""
    table = rows(results)
    if len(table) < 2:
        return ""
    cats = list(category_tasks(results))
    L = ["## How often fusion layers occur", "",
         "CASA layers beside (`parallel`) or instead of (`replace`) the self-attention of every n-th block "
         "(blocks 0, n, 2n, ...), trained on the same packs with the LM frozen. "
         f"**Rules** (fixed before the numbers): a sparser parallel placement costs nothing when, on every "
         f"learned category, its paired difference to `casa` (every block) is >= -{RULE['tolerance']:g} points; "
         "the paper's replace finding holds when `replace` every 4 blocks scores at least `replace` every 2 on "
         "the mean over the learned categories. Costs are ratios to `casa`, measured side by side in one run.", "",
         "| arm | placement | every | fusion blocks | " + " | ".join(cats) + " | train memory | train tok/s "
         "| decode ms/token | TTFT |", "|---|---|---|---|" + "---|" * (len(cats) + 4)]
    for r in table:
        q = r["ratio_to_casa"]
        L.append(f"| {r['arm']} | {r['placement']} | {r['every']} | {', '.join(map(str, r['blocks'])) or '?'} | "
                 + " | ".join(points_interval(r["categories"][c], False) for c in cats)
                 + f" | {_x(q['peak_mem_bytes'])} | {_x(q['text_tok_s'])} | {_x(q['decode_ms_per_token'])} | "
                   f"{_x(q['ttft_ms'])} |")
    L += [""] + ([f"![how often fusion layers occur]({figure})", ""] if figure else [])
    for v in verdicts(results):
        L.append(f"- {v['rule']}: {v['measured']}: **{v['verdict']}**")
    L += ["", f"**Finding**: {finding(results)}"]
    return "\n".join(L + [""])


def plot_frequency(results: dict) -> bytes | None:
    """PNG bytes: overall accuracy (mean, 95% interval) against training memory and decode time per token,
    one marker per arm, parallel and replace in two colours; None without matplotlib or with < 2 arms."""
    table = [r for r in rows(results) if r["overall"]["mean"] is not None]
    if len(table) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colours = {"parallel": "tab:blue", "replace": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "peak_mem_bytes", "training peak memory / casa"),
                           (axes[1], "decode_ms_per_token", "decode time per token / casa")):
        for placement, colour in colours.items():
            pts = [r for r in table if r["placement"] == placement and r["ratio_to_casa"][key] is not None]
            if not pts:
                continue
            xs = [r["ratio_to_casa"][key] for r in pts]
            ys = [100 * r["overall"]["mean"] for r in pts]
            err = [100 * (r["overall"]["half"] or 0.0) for r in pts]
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=colour, capsize=3, label=placement)
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(f"every {r['every']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("overall accuracy (points)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, frameon=False)  # above the panels, off the data
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

