"""What CASA's implicit gate does per token (`casa study`, issue 30, experiment 4).

`gating.py` measures the gate averaged over a task; this module follows
single tokens:

- `token_attention(model, batch, queries)`: chosen queries' image / text /
  own mass per fusion layer and head, and their mass on each image token of
  their window;
- `sample_gates` applies it to the answer query and a few question tokens
  of samples, `summarise` aggregates per task, `verdict` judges the rule,
  `section` writes the markdown and `plot_gate_heatmaps` draws heatmaps.

Design decisions:
- The *answer query* of a sample is the token whose next-token prediction is
  the answer's first token (the last prompt token, `<|assistant|>` in the
  built-in template): the one place where the image must reach the answer.
  `attention_shares`' `answer_*` counts the answer's own tokens instead, which
  predict its later characters. *Question tokens* are a few evenly spaced
  tokens of the window's text between the gist token and the user turn's
  closing marker: the contrast, tokens whose prediction needs no image.
- Per sample, the question tokens are averaged first, so that a sample is the
  unit of the spread across samples for both roles.
- Heatmaps and localisation average over heads and fusion layers: each
  layer adds what its heads read to the residual stream, so the mean is what
  the token took from each patch, weighted by how much image each layer read
  (a layer that reads 3% image adds 3%, not a full map of noise), and no
  layer is picked by looking at the maps. Per-layer numbers sit beside it.
- "Shape patches" come from the pixels, not the caption (whose 3 x 3 cell
  says where a shape may lie, not where it is): a patch counts when a pixel
  of its region differs from the image's most frequent colour by more than
  `threshold` in some channel (shapes, digits, bars and labels; not the light
  chart gridlines). The baseline is their share of the patches, what uniform
  attention over the patches puts there.
- The image share follows the key counts too: equal weight on N image and M
  text keys gives N / (N + M), which falls as the window's text grows, in
  any model, untrained included. So every share comes with this *uniform*
  share, and the input-dependence rule reads the *excess*, share - uniform.
- The queries' attention is recomputed by `gating.forward_recording` and
  `gating.attention_probs` (one dense definition of a fusion layer's
  probabilities for every backend).
- Rules and thresholds are module constants (`RULE`) stated in `section`
  before any number, and the verdicts are computed from the numbers.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from casa.study.gating import attention_probs, forward_recording

__all__ = ["RULE", "SHAPE_TASKS", "TokenAttention", "localisation", "plot_gate_heatmaps", "sample_gates", "section",
           "shape_patches", "summarise", "token_attention", "verdict"]

SHAPE_TASKS = ("color", "count", "position")  # tasks where the localisation rule applies
RULE = {
    "min_spread": 0.05,  # input-dependent: answer queries' image share differs between two tasks by this much
    "se_factor": 2.0,  # ... and by more than this many standard errors of the difference
    "bounds": (0.02, 0.98),  # ... while every task's mean stays strictly inside (neither shut nor always open)
    "factor": 2.0,  # localises: mass on shape patches >= factor x their area, on every shape task measured
}


# ------------------------------------------------------------------ per token
@dataclass
class TokenAttention:
    """Where Q chosen text queries put their attention in each of L fusion layers (H heads).

    I = most images in one query's window, n = most tokens of one image (padding: zero mass, image -1).
    `image + text == 1` for every query and head whose window holds a key; `patches` sums over its
    last two axes to `image`.
    """

    blocks: list[int]  # block index of each fusion layer, [L]
    image: torch.Tensor  # [Q, L, H] mass on the window's image keys
    text: torch.Tensor  # [Q, L, H] mass on the window's text keys up to the query (itself included)
    own: torch.Tensor  # [Q, L, H] mass on the query's own key (zero without text keys)
    patches: torch.Tensor  # [Q, L, H, I, n] mass on each token of each image of the window
    images: torch.Tensor  # [Q, I] long: batch index of those images, -1 for padding
    uniform: torch.Tensor  # [Q] the image share equal weight on every key the query sees would give


def _per_query(q, k_txt, k_img, layout, text_keys: bool, rows, cols):
    """(image, text, own `[Q, H]`, patches `[Q, H, I, n]`, images `[Q, I]`, uniform `[Q]`) of the queries at
    (rows, cols)."""
    p, K = attention_probs(q, k_txt, k_img, layout, text_keys, where=(rows, cols))
    p = p[:, :, 0]  # [Q, H, K (+T)]
    Q, H, dev = p.shape[0], p.shape[1], p.device
    image, text = p[..., :K].sum(-1), p[..., K:].sum(-1)
    own = p[torch.arange(Q, device=dev), :, K + cols] if text_keys else torch.zeros_like(image)
    n_img = layout.n_images
    window = layout.text_window[rows, cols]  # [Q]
    in_window = layout.image_window[None, :] == window[:, None]  # [Q, N_img]
    count = in_window.sum(1)
    I, n = (int(count.max()), int(layout.image_tokens.max())) if n_img else (0, 0)
    ids = torch.arange(n_img, device=dev)
    first = torch.where(in_window, ids, n_img).amin(1) if n_img else torch.zeros(Q, dtype=torch.long, device=dev)
    patches = p.new_zeros(Q, H, I * n)
    if I and K:
        image_index, image_valid = layout.dense_keys()[:2]
        tok_image = layout.image_token_attr(ids)  # [N_tok] image of each flat image token
        tok_first = torch.cumsum(layout.image_tokens, 0) - layout.image_tokens
        tok_slot = torch.arange(tok_image.numel(), device=dev) - tok_first[tok_image]  # its index in its image
        flat = image_index[rows]  # [Q, K] the row's image key slots as flat image tokens
        img_of = tok_image[flat]
        ok = image_valid[rows] & (layout.image_window[img_of] == window[:, None])
        target = torch.where(ok, (img_of - first[:, None]) * n + tok_slot[flat], 0)
        patches.scatter_add_(2, target[:, None].expand(Q, H, K), p[..., :K] * ok[:, None])
    j = torch.arange(I, device=dev)
    images = torch.where(j[None] < count[:, None], first[:, None] + j[None], -1)
    seen = layout.dense_mask(text_keys)[:, 0][rows, cols]  # [Q, K (+T)] the keys each query sees
    uniform = seen[:, :K].sum(-1) / seen.sum(-1).clamp(min=1)
    return image, text, own, patches.view(Q, H, I, n), images, uniform


@torch.no_grad()
def token_attention(model, batch, queries, *, backend: str = "auto") -> TokenAttention:
    """Each chosen query's attention in every fusion layer, per head.

    Args:
        model: a `CasaModel` with fusion layers (with or without text keys).
        batch: its `Batch`.
        queries: `[Q, 2]` long (or pairs): (row, text index) of each query.
    Returns:
        a `TokenAttention` (CPU float tensors).
    """
    queries = torch.as_tensor(queries, dtype=torch.long).reshape(-1, 2)
    records: dict = {}

    def measure(q, k_txt, k_img, layout, text_keys):
        rows, cols = queries.to(q.device).unbind(1)
        return [x.cpu() for x in _per_query(q, k_txt, k_img, layout, text_keys, rows, cols)]

    forward_recording(model, batch, records, measure, backend)
    blocks = sorted(records)
    if not blocks:
        raise ValueError("token_attention: the model has no fusion layer")
    per = [records[i][-1] for i in blocks]
    image, text, own, patches = (torch.stack([r[k] for r in per], dim=1) for k in range(4))
    return TokenAttention(blocks, image, text, own, patches, per[0][4], per[0][5])


def _drawn(image, threshold: int = 64) -> torch.Tensor:
    """`[H, W]` bool: pixels of `image` (PIL or uint8 `[H, W, 3]`) that differ from its most frequent colour
    by more than `threshold` in some channel."""
    import numpy as np

    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.int16)
    colours, counts = np.unique(px.reshape(-1, px.shape[-1]), axis=0, return_counts=True)
    return torch.from_numpy(np.abs(px - colours[counts.argmax()]).max(-1) > threshold)


def shape_patches(image, side: int, *, threshold: int = 64) -> torch.Tensor:
    """`[side, side]` bool: the patches of a `side` x `side` grid over `image` (PIL image or uint8 `[H, W, 3]`)
    that hold a drawn pixel (`_drawn`)."""
    drawn = _drawn(image, threshold)
    H, W = drawn.shape
    out = torch.zeros(side, side, dtype=torch.bool)
    for i in range(side):  # the image is resized to the model's square: patch (i, j) covers this region
        for j in range(side):
            region = drawn[i * H // side: -(-(i + 1) * H // side), j * W // side: -(-(j + 1) * W // side)]
            out[i, j] = bool(region.any())
    return out


def localisation(patches: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Share of image attention mass on shape patches, and the area baseline.

    Args:
        patches: `[..., I, n]` mass on each token of each window image;
        shape: `[I, s, s]` bool shape patches (s * s = n).
    Returns:
        `(fraction [...], area)`: fraction NaN where a query put no mass on the images; area = the share
        of patches that are shape patches, what uniform attention over the patches puts on them.
    """
    mask = shape.reshape(-1).to(patches.dtype)  # [I * n]
    mass = patches.flatten(-2)
    total = mass.sum(-1)
    return (mass * mask).sum(-1) / total.where(total > 0, torch.nan), float(mask.mean())


def _texts(sample) -> tuple[str, str]:
    """(the user's last text part, the assistant's first text part) of a question-answer sample."""
    def text(role):
        parts = [p["text"] for m in sample.messages if m["role"] == role for p in m["content"] if p["type"] == "text"]
        return parts[-1 if role == "user" else 0] if parts else ""
    return text("user"), text("assistant")


def _positions(enc, k: int) -> tuple[int, list[int]]:
    """(answer query, k question tokens) of an encoded sample (module docstring)."""
    a = enc.turns[0][0] - 1
    points = [p for p in enc.points if p <= a]
    start = points[-1] if points else 0
    lo, hi = start + 1, a - 1  # after the gist token, before the user turn's closing marker
    if hi <= lo:
        lo, hi = start, a
    picks = torch.linspace(lo, hi - 1, k).round().long().tolist() if k else []
    return a, sorted(set(picks))


@torch.no_grad()
def sample_gates(model, processor, samples, *, question_tokens: int = 3, per_batch: int = 8,
                 backend: str = "auto") -> list[dict]:
    """Per sample: where its answer query and `question_tokens` question tokens put their attention.

    Args:
        samples: question-answer `Sample`s (e.g. of `casa.data.make_sample`), packed `per_batch` to a row.
    Returns:
        one record per sample: `task`, `source`, `question`, `answer` (texts), `blocks` `[L]`, `images` (the
        images of the answer query's window, as given), `shape` `[I, s, s]` bool (`shape_patches` of each;
        None without a square fixed-size patch grid), `gate` `{"answer": {"image", "text", "own": [L, H],
        "patches": [L, H, I, n], "uniform": []}, "question": {"image", "text", "own": [k, L, H], "uniform": [k]}}`
        (`uniform`: the image share of equal weight on every key, `TokenAttention`).
    """
    from casa.data import pack_row

    samples = list(samples)
    vision = model.config.vision
    n = vision.tokens_per_image
    side = math.isqrt(n) if not vision.dynamic and math.isqrt(n) ** 2 == n else None
    out = []
    for c in range(0, len(samples), per_batch):
        chunk = samples[c: c + per_batch]
        encs = [processor.encode(s) for s in chunk]
        batch = pack_row(encs)
        queries, spans, offset, n_images = [], [], 0, 0
        for enc in encs:  # one row: each document's positions and images shifted by the documents before it
            a, qs = _positions(enc, question_tokens)
            spans.append((len(queries), len(qs), n_images))
            queries += [(0, offset + a)] + [(0, offset + t) for t in qs]
            offset, n_images = offset + len(enc.ids), n_images + enc.n_images
        ta = token_attention(model, batch, queries, backend=backend)
        for s, enc, (i, k, f) in zip(chunk, encs, spans):
            window = [int(b) - f for b in ta.images[i] if b >= 0]
            images = [enc.images[w] for w in window]
            question, answer = _texts(s)
            shape = (torch.stack([shape_patches(im, side) for im in images])
                     if side and images and all(hasattr(im, "convert") for im in images) else None)
            qsel = slice(i + 1, i + 1 + k)
            out.append({
                "task": s.meta.get("task", "?"), "source": s.source, "question": question, "answer": answer,
                "blocks": ta.blocks, "images": images, "shape": shape,
                "gate": {"answer": {"image": ta.image[i], "text": ta.text[i], "own": ta.own[i],
                                    "patches": ta.patches[i, ..., : len(window), :], "uniform": ta.uniform[i]},
                         "question": {"image": ta.image[qsel], "text": ta.text[qsel], "own": ta.own[qsel],
                                      "uniform": ta.uniform[qsel]}},
            })
    return out


# ------------------------------------------------------------------ aggregate
def _spread(x: torch.Tensor) -> dict:
    """`x [N, L, H]` (one per sample) -> mean and sample std across samples: per layer and head `[L][H]`,
    per layer (heads averaged) `[L]`, and over all layers and heads (with its standard error)."""
    N = x.shape[0]

    def stats(v):  # v [N, ...]
        return v.mean(0).tolist(), v.std(0, correction=1).tolist() if N > 1 else None

    m, s = stats(x.mean((1, 2)))
    return {**dict(zip(("mean", "std"), stats(x))), "layers": dict(zip(("mean", "std"), stats(x.mean(-1)))),
            "all": {"mean": m, "std": s, "se": None if s is None else s / math.sqrt(N)}}


def _role(shares: torch.Tensor, uniform: torch.Tensor) -> dict:
    """`shares [N, L, H]`, `uniform [N]` -> `_spread` of the shares, the mean uniform share, and `excess`:
    `_spread` of the shares minus each sample's uniform share."""
    return {**_spread(shares), "uniform": float(uniform.mean()), "excess": _spread(shares - uniform[:, None, None])}


def _nanmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def summarise(records: list[dict]) -> dict:
    """Per task, what the answer query and the question tokens do (JSON-ready).

    Args:
        records: of `sample_gates`.
    Returns:
        `{"blocks": [L], "heads": H, "tasks": {task: {"n", "answer": R, "question": R, "localisation":
        {"layers": [L] share of image mass on shape patches per fusion layer, "pooled": over layers (module
        docstring), "area": the uniform baseline, "peak": share of samples whose pooled map is largest on a
        shape patch (chance: the area), "n": samples with a shape mask}}}}` where R is the image
        share across samples: `{"mean", "std": [L][H], "layers": {"mean", "std": [L]}, "all": {"mean", "std",
        "se"}, "uniform": float, "excess": {the same keys, of the share minus the uniform share}}` (heads
        averaged in "layers" and "all"; std and se None for one sample).
    """
    if not records:
        raise ValueError("summarise: no records")
    tasks: dict[str, list] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    out = {"blocks": list(records[0]["blocks"]), "heads": int(records[0]["gate"]["answer"]["image"].shape[-1]),
           "tasks": {}}
    for t, rs in tasks.items():
        a = [r["gate"]["answer"] for r in rs]
        q = [r["gate"]["question"] for r in rs]
        row = {"n": len(rs),
               "answer": _role(torch.stack([g["image"] for g in a]), torch.stack([g["uniform"] for g in a])),
               "question": _role(torch.stack([g["image"].mean(0) for g in q]),
                                 torch.stack([g["uniform"].mean() for g in q]))}
        shaped = [(r["gate"]["answer"]["patches"], r["shape"]) for r in rs if r["shape"] is not None]
        layers = [localisation(p.mean(1), s)[0].tolist() for p, s in shaped]
        pooled = [float(localisation(p.mean((0, 1)), s)[0]) for p, s in shaped]
        area = [localisation(p, s)[1] for p, s in shaped]
        peak = [bool(s.reshape(-1)[p.mean((0, 1)).argmax()]) for p, s in shaped]
        row["localisation"] = {
            "layers": [_nanmean([v[lay] for v in layers]) for lay in range(len(out["blocks"]))] if shaped else None,
            "pooled": _nanmean(pooled), "area": sum(area) / len(area) if area else None, "n": len(shaped),
            "peak": sum(peak) / len(peak) if peak else None}
        out["tasks"][t] = row
    return out


def verdict(summary: dict, rule: dict | None = None) -> dict:
    """The two verdicts of `RULE` (or `rule`) on a `summarise` result.

    Returns: `{"input_dependent": bool | None (None: fewer than two tasks), "high", "low" (tasks with the
    largest and smallest excess share), "spread" (their difference), "se" (of the difference; None for single
    samples), "inside" (every task's mean share within the bounds), "localises": bool | None (None: no shape
    task measured), "ratios": {task: pooled / area}, "contrast": {task: answer minus question excess share}}`.
    """
    rule = {**RULE, **(rule or {})}
    tasks = summary["tasks"]
    excess = {t: v["answer"]["excess"]["all"]["mean"] for t, v in tasks.items()}
    out = {"input_dependent": None, "high": None, "low": None, "spread": None, "se": None, "inside": None}
    if len(excess) >= 2:
        hi, lo = max(excess, key=excess.get), min(excess, key=excess.get)
        ses = [tasks[t]["answer"]["excess"]["all"]["se"] for t in (hi, lo)]
        se = None if None in ses else math.hypot(*ses)
        lo_b, hi_b = rule["bounds"]
        inside = all(lo_b < v["answer"]["all"]["mean"] < hi_b for v in tasks.values())
        spread = excess[hi] - excess[lo]
        out.update(high=hi, low=lo, spread=spread, se=se, inside=inside,
                   input_dependent=bool(spread >= rule["min_spread"] and se is not None
                                        and spread > rule["se_factor"] * se and inside))
    loc = {t: tasks[t]["localisation"] for t in SHAPE_TASKS if t in tasks}
    loc = {t: v for t, v in loc.items() if v["n"] and v["pooled"] is not None and v["area"]}
    out["ratios"] = {t: v["pooled"] / v["area"] for t, v in loc.items()}
    out["localises"] = all(r >= rule["factor"] for r in out["ratios"].values()) if loc else None
    out["contrast"] = {t: v["answer"]["excess"]["all"]["mean"] - v["question"]["excess"]["all"]["mean"]
                       for t, v in tasks.items()}
    return out


def _pm(mean, std=None, fmt="{:.2f}") -> str:
    return "-" if mean is None else fmt.format(mean) + ("" if std is None else f" ± {std:.2f}")


def section(results: dict, *, figure: str | None = None, rule: dict | None = None) -> str:
    """Markdown for docs/study.md: the rule, the tables per task and layer, a finding computed from them.

    Args:
        results: of `summarise`; figure: a heatmap PNG's file name to show (`plot_gate_heatmaps`).
    """
    rule = {**RULE, **(rule or {})}
    v = verdict(results, rule)
    blocks, tasks = results["blocks"], results["tasks"]
    lo_b, hi_b = rule["bounds"]
    head = " | ".join(f"block {b}" for b in blocks)
    L = ["## What the implicit gate does per token", "",
         ("The *answer query* is the token whose next-token prediction is the answer's first token; question "
         "tokens are a few tokens of the question, for contrast. The image share is the attention mass a token "
         "puts on its window's image keys (the rest goes to the window's text up to itself), averaged over "
         "heads. The *uniform* share is what equal weight on every key it sees would give (image keys / all "
         "keys): it falls as the window's text grows, whatever the model, so the rule reads the *excess* "
         "share, the share minus the uniform one."), "",
         (f"**Rule, fixed before the numbers.** The gate is *input-dependent* if the answer query's mean excess "
         f"share (over fusion layers, heads and samples) differs between two tasks by at least "
         f"{rule['min_spread']:.2f} and by more than {rule['se_factor']:g} standard errors of the difference, "
         f"with every task's mean share inside ({lo_b:g}, {hi_b:g}) (neither shut nor always open). It "
         f"*localises* if, on every shape task measured ({', '.join(SHAPE_TASKS)}), the share of the answer "
         f"query's image mass on the patches holding drawn pixels (heads and fusion layers averaged) is at "
         f"least {rule['factor']:g}x the share of the image those patches cover (what uniform attention "
         f"gives)."), "",
         "Image share, mean ± sd across samples:", "",
         f"| task | n | query | {head} | all blocks | uniform | excess |", "|---|---|---|" + "---|" * (len(blocks) + 3)]
    for t, row in tasks.items():
        for role in ("answer", "question"):
            s = row[role]
            stds = s["layers"]["std"] or [None] * len(blocks)
            cells = [_pm(m, d) for m, d in zip(s["layers"]["mean"], stds)]
            L.append(f"| {t} | {row['n']} | {role} | " + " | ".join(cells)
                     + f" | {_pm(s['all']['mean'], s['all']['std'])} | {s['uniform']:.2f} | "
                     f"{_pm(s['excess']['all']['mean'], s['excess']['all']['std'], '{:+.2f}')} |")
    L += ["", ("Localisation: share of the answer query's image mass on shape patches, per fusion layer and "
               "pooled over layers, against the shape patches' area (uniform attention); and how often the "
               "pooled map's largest patch is a shape patch (chance: the area):"), "",
          f"| task | {head} | pooled | area | pooled / area | peak on a shape patch |",
          "|---|" + "---|" * (len(blocks) + 4)]
    for t, row in tasks.items():
        loc = row["localisation"]
        if not loc["n"]:
            continue
        ratio = f"{loc['pooled'] / loc['area']:.2f}x" if loc["pooled"] is not None and loc["area"] else "-"
        L.append(f"| {t} | " + " | ".join(_pm(x) for x in loc["layers"])
                 + f" | {_pm(loc['pooled'])} | {loc['area']:.2f} | {ratio} | {loc['peak']:.0%} |")
    L += ["", "**Finding:** " + _finding(v, rule), ""]
    if figure:
        L += [f"![answer query's attention over its image, and image vs text share per fusion layer]({figure})", ""]
    return "\n".join(L)


def _finding(v: dict, rule: dict) -> str:
    """One sentence from `verdict`'s numbers."""
    if v["input_dependent"] is None:
        gate = "input dependence needs two tasks"
    else:
        k = rule["se_factor"]
        se = "no SE with one sample per task" if v["se"] is None else f"{k:g} SE = {k * v['se']:.3f}"
        gate = (f"the gate {'is' if v['input_dependent'] else 'is not'} input-dependent by the rule: the answer "
                f"query's excess image share differs by {v['spread']:.3f} between {v['high']} and {v['low']} "
                f"(needed {rule['min_spread']:.2f}; {se}), task means "
                f"{'all inside' if v['inside'] else 'not all inside'} the bounds")
    if v["localises"] is None:
        where = "localisation not measured (no shape task)"
    else:
        ratios = ", ".join(f"{t} {r:.2f}x" for t, r in v["ratios"].items())
        where = (f"it {'localises' if v['localises'] else 'does not localise'} "
                 f"(mass on shape patches / area: {ratios}; needed {rule['factor']:g}x on each)")
    more = sum(c > 0 for c in v["contrast"].values())
    contrast = (f"the answer query's excess share is above the question tokens' on {more} of {len(v['contrast'])} "
                "tasks")
    return f"{gate}; {where}; {contrast}."


# ------------------------------------------------------------------ figure
def _heat(record) -> torch.Tensor | None:
    """`[s, s]`: the answer query's mass on each patch of its window's first image, heads and fusion layers
    averaged (it sums to that image's share of the query's mass, layer mean); None without a square grid."""
    p = record["gate"]["answer"]["patches"]  # [L, H, I, n]
    if record["shape"] is None or p.shape[-2] == 0:
        return None
    s = record["shape"].shape[-1]
    return p.mean((0, 1))[0].reshape(s, s)


def plot_gate_heatmaps(items: list[dict], path) -> Path | None:
    """One PNG grid, a row per record of `sample_gates` (e.g. the first of each task).

    Columns: the input image | the answer query's attention over its patches (`_heat`, colour from 0 to the
    map's largest patch, colour bar in shares) upsampled to the image (nearest: one block per patch), the
    image's drawn pixels overlaid half-transparent, shape patches outlined | the image (blue) vs text (grey)
    share of the answer query per fusion layer, its uniform share dashed, question tokens' image share as dots.
    Returns `path`, or None without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.patches import Rectangle
    except ImportError:
        return None
    from casa.files import atomic_file

    if not items:
        raise ValueError("plot_gate_heatmaps: no items")
    fig, axes = plt.subplots(len(items), 3, figsize=(9.5, 2.7 * len(items)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, r in zip(axes, items):
        img = r["images"][0] if r["images"] else None
        W, H = img.size if hasattr(img, "size") else (1, 1)
        for a in ax[:2]:
            a.set_xticks([])
            a.set_yticks([])
        if img is not None:
            ax[0].imshow(img, extent=(0, W, H, 0))
        ax[0].set_title(textwrap.shorten(f"{r['task']}: {r['question']}", 48) + f"\nanswer: {r['answer']}", fontsize=7)
        heat = _heat(r)
        if heat is not None:
            s = heat.shape[0]
            shown = ax[1].imshow(heat.numpy(), extent=(0, W, H, 0), cmap="viridis", vmin=0,
                                 vmax=max(float(heat.max()), 1e-9), interpolation="nearest")
            fig.colorbar(shown, ax=ax[1], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            # the drawn pixels on top, the background transparent: the map's colours stay readable there
            rgba = np.dstack([np.asarray(img.convert("RGB")), _drawn(img).numpy().astype(np.uint8) * 140])
            ax[1].imshow(rgba, extent=(0, W, H, 0), interpolation="nearest")
            for i, j in r["shape"][0].nonzero().tolist():
                ax[1].add_patch(Rectangle((j * W / s, i * H / s), W / s, H / s, fill=False, ec="lime", lw=1))
            frac, area = localisation(heat.reshape(1, 1, -1), r["shape"][:1])
            ax[1].set_title(f"answer query, mean of heads and layers\non shape patches {float(frac):.0%} "
                            f"(area {area:.0%}), image share {float(heat.sum()):.2f}", fontsize=7)
        g = r["gate"]
        img_l, txt_l = g["answer"]["image"].mean(-1), g["answer"]["text"].mean(-1)  # [L]
        q_l = g["question"]["image"].mean((0, -1)) if g["question"]["image"].numel() else None
        ys = range(len(r["blocks"]))
        ax[2].barh(ys, img_l.tolist(), color="C0", label="image (answer query)")
        ax[2].barh(ys, txt_l.tolist(), left=img_l.tolist(), color="0.75", label="text (answer query)")
        if q_l is not None:
            ax[2].plot(q_l.tolist(), list(ys), "k.", label="image (question tokens)")
        ax[2].axvline(float(g["answer"]["uniform"]), color="C3", ls="--", lw=1, label="uniform (answer query)")
        ax[2].set_yticks(list(ys), [f"block {b}" for b in r["blocks"]], fontsize=7)
        ax[2].invert_yaxis()
        ax[2].set_xlim(0, 1)
        ax[2].tick_params(axis="x", labelsize=7)
        ax[2].set_title("share of attention mass per fusion layer", fontsize=7)
    fig.legend(*axes[0][2].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.5 / (2.7 * len(items)), 1, 1))
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
