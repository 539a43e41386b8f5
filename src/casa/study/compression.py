"""Image-token compression with CASA and insertion, training-free (`casa study`, issue 30, experiment 1).

Does CASA combine with image-token compression? Already-trained models are
evaluated with each window's image tokens compressed by a factor `f`:

- `pool`: neighbouring tokens of the image's patch grid averaged in blocks of
  `f` tokens (`pool_shape`: f = 2 -> 1x2, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4);
- `topk`: the `n // f` tokens that the window's text attends to most in the
  first fusion layer (for `insertion`, the first block's self-attention from
  the window's text tokens to the image tokens): the training-free pruning
  reported for Llama 3.2 Vision's cross-attention.

`evaluate_compression` measures, per method and factor, the accuracy (the
`evaluate` metric), image tokens per window, the KV-cache bytes one frame's
image tokens add (`insertion`: they join every layer's cache for the rest of
the stream; CASA: none) and the image K/V held at once while the window is
open, and the time to first token of a window as a ratio to the uncompressed
one. `section` turns the numbers into a markdown section whose rule is stated
before them; `run_compression` is the entry point `casa study` can call.

Design decisions:
- 2-D pooling, not groups of consecutive tokens: the tokens of a fixed-size
  image are a row-major g x g grid (`vision.tower.reduce_tokens`), so
  consecutive tokens at 4x would average a whole row of a 4 x 4 grid and lose
  all vertical position, which the `position` task asks about. Blocks are as
  square as the factor allows (wider than tall when not square); 4x and 16x
  equal the tower's own `reduce_tokens(x, "pool", r)`. Token counts that are
  not a square grid fall back to consecutive groups.
- Top-k keeps the kept tokens in their original order (it matters for
  insertion's positions; CASA's image keys are a set) and ranks by attention
  summed over the window's text queries and averaged over heads, from one
  forward stopped right after the first attention layer that reads the image
  (`_Ranked`): the ranking costs that layer, not a full forward. Every fusion
  layer, the first included, then reads the kept tokens only, so a compressed
  forward is exactly a forward given the compressed tokens (tested); the
  pruning of the Llama 3.2 Vision report keeps the first layer whole.
- The model is not changed: `compressed_images` shadows the instance's
  `encode_images` for the duration of a `with` block. The forward,
  `greedy_decode` (hence `evaluate`) and the session all take their image
  tokens from there, so one interception serves accuracy and equality tests.
  Compressed tokens travel as a list of `[m, d]` per image, the form that
  carries a token count of its own (images of their own sizes).
- Latency: time to first token of a single-image window (compression,
  top-k's ranking pass, the image K/V or image prefill, the window's text,
  the argmax), the vision tower excluded as in `bench/stream.py`; every
  configuration of a prompt is timed back to back in a rotating order at one
  thread, repeats interleaved; the ratio to the uncompressed time is taken
  within each such pass and its median reported, so that load coming and
  going on a shared machine hits both sides of every ratio alike.
- KV bytes are measured on a fresh `Session` fed one frame, not computed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from einops import reduce

from casa.core.model import CasaModel
from casa.data import stack_rows
from casa.eval.synthetic import answers, eval_samples, evaluate, questions
from casa.inference.session import Session
from casa.study.gating import attention_probs
from casa.study.stats import binomial_se

__all__ = ["FACTORS", "METHODS", "compress", "compressed_images", "evaluate_compression", "frame_kv_bytes",
           "image_scores", "mean_over_seeds", "plot_compression", "pool_shape", "run_compression", "section",
           "verdict"]

METHODS = ("pool", "topk")
FACTORS = (1, 2, 4, 8)
RULE = {"method": "pool", "factor": 4, "keep": 0.9, "margin": 0.05}  # the verdict's rule (`verdict`, `section`)


# ------------------------------------------------------------ compression
def pool_shape(n: int, factor: int) -> tuple[int, int] | None:
    """`(fh, fw)` blocks that pool a g x g grid of `n` tokens by `factor`: the most square
    with `fh <= fw`, both dividing g; None when `n` is not a square or no block fits."""
    g = math.isqrt(n)
    if g * g != n:
        return None
    for fh in range(math.isqrt(factor), 0, -1):
        fw = factor // fh
        if fh * fw == factor and g % fh == 0 and g % fw == 0:
            return fh, fw
    return None


def kept_tokens(n: int, method: str, factor: int) -> int:
    """Tokens left of `n` per image after `compress` (ValueError for a factor the method cannot apply)."""
    if method not in METHODS and not (method == "none" and factor == 1):
        raise ValueError(f"compression method {method!r}: expected one of {list(METHODS)}")
    if factor < 1 or factor > n:
        raise ValueError(f"compression factor {factor}: expected 1 .. {n} (tokens per image)")
    if method == "pool" and factor > 1 and pool_shape(n, factor) is None and n % factor:
        raise ValueError(f"pool: {n} tokens per image cannot be pooled {factor}x (neither a grid block nor groups)")
    return n // factor


def compress(image_tokens: torch.Tensor, method: str, factor: int, *,
             scores: torch.Tensor | None = None) -> torch.Tensor:
    """Compress each image's tokens by `factor`.

    Args:
        image_tokens: `[N, n, d]` LM-width tokens of N images (or `[n, d]`, one image), row-major
            patch order.
        method: "pool" (averages of `pool_shape` blocks, or of `factor` consecutive tokens when
            `n` is not a square grid) or "topk" (the `n // factor` highest `scores`, original order kept).
        factor: 1 returns `image_tokens` itself.
        scores: `[N, n]` (or `[n]`) float, how much attention each token gets (topk; `image_scores`).
    Returns:
        `[N, m, d]` (or `[m, d]`) with `m = n // factor`, the input's dtype.
    """
    single = image_tokens.dim() == 2
    x = image_tokens[None] if single else image_tokens
    m = kept_tokens(x.shape[1], method, factor)
    if factor == 1:
        return image_tokens
    if method == "pool":
        shape = pool_shape(x.shape[1], factor)
        if shape is None:  # not a grid: consecutive groups
            out = reduce(x, "b (m f) d -> b m d", "mean", f=factor)
        else:
            g = math.isqrt(x.shape[1])
            fh, fw = shape
            out = reduce(x, "b (h fh w fw) d -> b (h w) d", "mean", h=g // fh, w=g // fw, fh=fh, fw=fw)
    else:
        if scores is None:
            raise ValueError("compress(method='topk') needs scores (image_scores)")
        s = scores[None] if single else scores
        if s.shape != x.shape[:2]:
            raise ValueError(f"compress: scores of shape {tuple(scores.shape)} for tokens {tuple(x.shape)}")
        keep = s.topk(m, dim=1).indices.sort(dim=1).values  # [N, m]
        out = x.gather(1, keep[..., None].expand(-1, -1, x.shape[2]))
    return out[0] if single else out


# ----------------------------------------------------------- top-k ranking
class _Ranked(Exception):
    """Raised once the first attention layer that reads the image is measured: the rest of the forward is moot."""


def _fusion_scores(q, k_txt, k_img, layout, text_keys: bool) -> torch.Tensor:
    """`[N_tok]`: attention mass on each image token in a fusion layer, head mean, summed over text queries.

    Args:
        q: `[B, T, H, D]` queries; k_txt: `[B, T, Hkv, D]` (None without text keys); k_img: `[N_tok, Hkv, D]`.
    """
    image_index, image_valid, _, _ = layout.dense_keys()  # [B, K] slots of each row's image tokens
    scores = torch.zeros(k_img.shape[0], dtype=torch.float32, device=k_img.device)
    if image_index.shape[1] == 0:
        return scores
    p, K = attention_probs(q, k_txt, k_img, layout, text_keys)  # [B, H, T, K (+T)], gating's one definition
    per_slot = p[..., :K].mean(1).sum(1)  # [B, K]
    return scores.index_put_((image_index[image_valid],), per_slot[image_valid])


def _insertion_scores(q, k, splice, layout) -> torch.Tensor:
    """`[N_tok]`: attention mass on each spliced image token in the first self-attention, head mean,
    summed over the text tokens of the image's window (later windows, which also see it, left out).

    Args:
        q: `[B, S, H, D]`, k: `[B, S, Hkv, D]` over the spliced rows; `splice` and the text `layout`
            of the same batch.
    """
    S = q.shape[1]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bshd,bkhd->bhsk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    doc = splice.layout.text_doc.to(q.device)
    pos = torch.arange(S, device=q.device)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (pos[:, None] >= pos[None, :])  # causal, per document
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), dim=-1).mean(1)  # [B, S, S]
    rows, cols = splice.image_row.to(q.device), splice.image_index.to(q.device)  # [N_tok]
    queries = splice.text_index.to(q.device)[rows]  # [N_tok, T] spliced index of the row's text tokens
    mass = p[rows[:, None], queries, cols[:, None]]  # [N_tok, T]
    window = layout.image_token_attr(layout.image_window)
    return (mass * (layout.text_window[rows] == window[:, None])).sum(1)


@torch.no_grad()
def image_scores(model: CasaModel, batch, *, backend: str = "auto") -> torch.Tensor:
    """How much the window's text attends to each image token in the first layer that reads it.

    Args:
        model: a `CasaModel`; its first fusion layer (`insertion`: block 0's self-attention) is measured.
        batch: a `Batch` with images or image tokens (`image_embeds`).
    Returns:
        `[N_tok]` float32, flat image-major (as `encode_batch_images`): per token, the attention
        probability it gets, averaged over heads and summed over the text queries of its window.
    """
    tokens, counts, _ = model.encode_batch_images(batch)
    batch = replace(batch, images=None, image_embeds=list(tokens.split(counts.tolist())))
    found = {}
    was_training = model.training
    model.eval()
    if model.config.fusion.variant == "insertion":
        splice, layout = batch.splice(counts), batch.layout(counts)

        def hook(attn, args, kwargs):
            rotary = kwargs["rotary"]
            x = args[0]  # the block's normed input over the spliced rows
            found["scores"] = _insertion_scores(rotary.apply(attn.q(x)), rotary.apply(attn.kv(x)[0]), splice, layout)
            raise _Ranked

        handle = model.blocks[0].attn.register_forward_pre_hook(hook, with_kwargs=True)
        undo = handle.remove
    else:
        layer = next(b.fusion for b in model.blocks if b.fusion is not None)
        before = layer.probe

        def probe(q, k_txt, k_img, layout, text_keys):
            found["scores"] = _fusion_scores(q, k_txt, k_img, layout, text_keys)
            raise _Ranked

        def undo():
            layer.probe = before

        layer.probe = probe
    try:
        model(batch, backend=backend)
    except _Ranked:
        pass
    finally:
        undo()
        model.train(was_training)
    return found["scores"]


@contextlib.contextmanager
def compressed_images(model: CasaModel, method: str, factor: int, *, backend: str = "auto"):
    """Within the block, every image `model` encodes comes out compressed (a list of `[m, d]` per image).

    Covers the forward, `greedy_decode` and so `evaluate` (see the module docstring). Factor 1
    changes nothing. Image tokens given as a list (`image_embeds`, each with its own count) pass
    unchanged: they are what an earlier call returned (`greedy_decode_uncached` encodes once, then
    forwards the tokens). Images of their own sizes (dynamic resolution) are refused.
    """
    kept_tokens(model.tokens_per_image, method, factor)
    if factor == 1:
        yield model
        return
    ranking = False

    def encode_images(batch):
        nonlocal ranking
        tokens = type(model).encode_images(model, batch)  # [N, n, d]
        if ranking or isinstance(batch.image_embeds, (list, tuple)):
            return tokens  # the ranking pass reads the uncompressed tokens; a list has its own counts already
        if isinstance(tokens, list):
            raise ValueError("compressed_images: images of their own sizes (dynamic resolution) are not supported")
        scores = None
        if method == "topk" and tokens.shape[0]:
            ranking = True
            try:
                scores = image_scores(model, replace(batch, images=None, image_embeds=tokens), backend=backend)
            finally:
                ranking = False
            scores = scores.view(tokens.shape[:2])
        return list(compress(tokens, method, factor, scores=scores))

    model.encode_images = encode_images  # shadows the class's method on this instance only
    try:
        yield model
    finally:
        del model.encode_images


# --------------------------------------------------------------- measures
@torch.no_grad()
def frame_kv_bytes(model: CasaModel, n_tokens: int) -> dict:
    """KV memory of one frame of `n_tokens` image tokens, measured on a fresh `Session`.

    Returns:
        `{kv_bytes_per_frame, image_kv_peak_bytes}`: what the frame adds to the LM's KV cache
        for the rest of the stream (`insertion`: every layer's self-attention cache; CASA: 0),
        and the image K/V held at once while its window is open (CASA: the fusion windows).
    """
    session = Session(model)
    w = model.embed.weight
    session.add_image_embeds([torch.randn(n_tokens, w.shape[1], dtype=w.dtype, device=w.device)])
    kv = sum(c.nbytes for c in session.sa)
    window = sum(c.nbytes for c in session.windows if c is not None)
    return {"kv_bytes_per_frame": int(kv), "image_kv_peak_bytes": int(kv + window)}


@torch.no_grad()
def _window_ttft(model, prompt, tokens, method: str, factor: int, backend: str) -> float:
    """Seconds from a single-image window's image tokens `[1, n, d]` to its first token (see the module
    docstring); the text before the image is fed first, untimed."""
    session = Session(model, backend=backend)
    point = prompt.points[0]
    if point:
        session.forward_text(prompt.ids[:point])
    batch = stack_rows([prompt], 0)
    t0 = time.perf_counter()
    scores = None
    if method == "topk":
        scores = image_scores(model, replace(batch, images=None, image_embeds=tokens), backend=backend).view(1, -1)
    session.add_image_embeds(list(compress(tokens, method, factor, scores=scores)))
    int(session.forward_text(prompt.ids[point:])[-1].argmax())
    return time.perf_counter() - t0


def _latency(model, prompts, configs, *, repeats: int, backend: str) -> dict:
    """Per configuration `(method, factor)`: `(median time to first token in ms, median ratio to configs[0])`,
    the ratio taken pass by pass (one prompt, one repeat: every configuration back to back), so that load
    that comes and goes on a shared machine cancels out (see the module docstring)."""
    prompts = [p for p in prompts if p.n_images == 1]
    if not prompts:
        return {c: (None, None) for c in configs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            tokens = [type(model).encode_images(model, stack_rows([p], 0)) for p in prompts]  # untimed: the tower
        times: dict = {c: [] for c in configs}  # aligned: entry j of every list is from the same pass
        for rep in range(repeats + 1):  # rep 0 warms up every path and is dropped
            for i, (p, x) in enumerate(zip(prompts, tokens)):
                shift = (rep + i) % len(configs)
                for c in configs[shift:] + configs[:shift]:
                    t = _window_ttft(model, p, x, *c, backend)
                    if rep:
                        times[c].append(t)
    finally:
        torch.set_num_threads(threads)
    base = times[configs[0]]
    return {c: (1000 * statistics.median(v), statistics.median(t / b for t, b in zip(v, base)))
            for c, v in times.items()}


def evaluate_compression(model: CasaModel, processor, samples, *, methods=METHODS, factors=FACTORS,
                         latency_prompts: int = 8, repeats: int = 5, backend: str = "auto") -> dict:
    """Accuracy, memory and latency of `model` with its image tokens compressed, per method and factor.

    Args:
        model: a trained `CasaModel` with fixed-size images (`tokens_per_image` tokens each).
        processor: its `Processor`; samples: evaluation samples (`eval.synthetic.eval_samples`).
        methods: from `METHODS`; factors: compression factors (1: the uncompressed baseline, always run).
        latency_prompts: single-image questions timed; repeats: timed passes over them (after one warm-up).
    Returns:
        `{variant, tokens_per_image, questions, latency: {...}, rows: [...]}`, one row per
        configuration, the uncompressed one first (method "none"): `method, factor,
        tokens_per_window` (image tokens per single-image window), `accuracy` (mean over tasks of
        `evaluate`'s score), `tasks` (score per task), `kv_bytes_per_frame`, `image_kv_peak_bytes`
        (`frame_kv_bytes`), `ttft_ms` and `ttft_ratio` (to factor 1; None without a single-image prompt).
    """
    samples = list(samples)
    n = model.tokens_per_image
    configs = [("none", 1)] + [(m, f) for m in methods for f in factors if f != 1]
    for m, f in configs:
        kept_tokens(n, m, f)  # refuse a factor before any compute
    longest = max(len(processor.tok.encode(a)) for s in samples for a in answers(s)) + 2
    rows = []
    for method, factor in configs:
        with compressed_images(model, method, factor, backend=backend):
            result = evaluate(model, processor, samples, max_new_tokens=longest, backend=backend)
        tasks = {t: r["score"] for t, r in result["tasks"].items()}
        m = kept_tokens(n, method, factor)
        rows.append({"method": method, "factor": factor, "tokens_per_window": m,
                     "accuracy": sum(tasks.values()) / len(tasks), "tasks": tasks, **frame_kv_bytes(model, m)})
    items, _ = questions(samples, processor)
    ttft = _latency(model, [q.prompt for q in items][: max(0, latency_prompts)], configs, repeats=repeats,
                    backend=backend)
    for row, c in zip(rows, configs):
        row["ttft_ms"], row["ttft_ratio"] = ttft[c]
    return {"variant": model.config.fusion.variant, "tokens_per_image": n, "questions": len(items),
            "latency": {"prompts": sum(q.prompt.n_images == 1 for q in items[:latency_prompts]),
                        "repeats": repeats, "threads": 1, "statistic": "median; ratio: median of paired ratios"},
            "rows": rows}


def mean_over_seeds(results: list[dict]) -> dict:
    """One `evaluate_compression` result from several seeds' of the same variant: accuracy, task scores and
    latency ratio averaged (`accuracy_seeds` keeps each), bytes from the first (they do not depend on the seed)."""
    first = results[0]
    rows = []
    for i, row in enumerate(first["rows"]):
        same = [r["rows"][i] for r in results]
        mean = {k: sum(s[k] for s in same) / len(same) if all(s[k] is not None for s in same) else None
                for k in ("accuracy", "ttft_ms", "ttft_ratio")}
        tasks = {t: sum(s["tasks"][t] for s in same) / len(same) for t in row["tasks"]}
        rows.append({**row, **mean, "tasks": tasks, "accuracy_seeds": [s["accuracy"] for s in same]})
    return {**first, "seeds": len(results), "questions": sum(r["questions"] for r in results), "rows": rows}


# ----------------------------------------------------------------- report
def _row(result: dict, method: str, factor: int) -> dict | None:
    return next((r for r in result["rows"] if r["factor"] == factor and r["method"] in (method, "none")), None)


def verdict(results: dict, *, casa: str = "casa", insertion: str = "insertion", method: str = RULE["method"],
            factor: int = RULE["factor"], keep: float = RULE["keep"], margin: float = RULE["margin"]) -> dict:
    """The rule of `section`: CASA combines with compression if at `factor`x `method` it keeps at least
    `keep` of its uncompressed accuracy and its drop is at most insertion's drop + `margin`.

    Returns:
        `{combines: bool or None (not judged), kept, drop_casa, drop_insertion, reason}`; drops in accuracy
        units (0.05 = 5 points).
    """
    v = results.get("variants", {})
    if casa not in v or insertion not in v:
        return {"combines": None, "reason": f"needs both {casa!r} and {insertion!r}"}
    rows = {name: (_row(v[name], "none", 1), _row(v[name], method, factor)) for name in (casa, insertion)}
    if any(r is None for pair in rows.values() for r in pair):
        return {"combines": None, "reason": f"no {method} {factor}x row"}
    (c0, cf), (i0, i_f) = rows[casa], rows[insertion]
    if c0["accuracy"] <= 0:
        return {"combines": None, "reason": f"{casa} has zero uncompressed accuracy"}
    kept = cf["accuracy"] / c0["accuracy"]
    drop_c, drop_i = c0["accuracy"] - cf["accuracy"], i0["accuracy"] - i_f["accuracy"]
    fails = []
    if kept < keep:
        fails.append(f"keeps {kept:.0%} < {keep:.0%}")
    if drop_c > drop_i + margin + 1e-12:
        fails.append(f"drop {100 * drop_c:.1f} pts > insertion's {100 * drop_i:.1f} + {100 * margin:.0f}")
    return {"combines": not fails, "kept": kept, "drop_casa": drop_c, "drop_insertion": drop_i,
            "accuracy": {casa: [c0["accuracy"], cf["accuracy"]], insertion: [i0["accuracy"], i_f["accuracy"]]},
            "reason": "; ".join(fails)}


def _bytes(n) -> str:
    return "0" if not n else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _finding(results: dict, method: str, factor: int) -> str:
    r = verdict(results, method=method, factor=factor)
    if r["combines"] is None:
        return f"at {factor}x {method}: not judged ({r['reason']})."
    c0, cf = r["accuracy"]["casa"]
    said = "combines with compression" if r["combines"] else f"does not combine with compression ({r['reason']})"
    return (f"at {factor}x {method}, CASA {said}: it keeps {r['kept']:.0%} of its accuracy "
            f"({c0:.3f} -> {cf:.3f}, {-100 * r['drop_casa']:+.1f} pts) against insertion's "
            f"{-100 * r['drop_insertion']:+.1f} pts.")


def _memory(results: dict, method: str, factor: int) -> str:
    v = results.get("variants", {})
    if "casa" not in v or "insertion" not in v:
        return ""
    (c0, cf), (i0, i_f) = [(_row(v[n], "none", 1), _row(v[n], method, factor)) for n in ("casa", "insertion")]
    if cf is None or i_f is None:
        return ""
    return (f"Memory at {factor}x {method}: a frame adds {_bytes(i_f['kv_bytes_per_frame'])} to insertion's KV cache "
            f"instead of {_bytes(i0['kv_bytes_per_frame'])}, and {_bytes(cf['kv_bytes_per_frame'])} to CASA's, "
            f"whose image K/V held while the window is open fall from {_bytes(c0['image_kv_peak_bytes'])} to "
            f"{_bytes(cf['image_kv_peak_bytes'])}.")


def section(results: dict) -> str:
    """Markdown for docs/study.md: the question, the rule (before any number), a table, the findings."""
    v = results.get("variants", {})
    rule = RULE
    lines = [
        "## Image-token compression (training-free)", "",
        "Does CASA combine with image-token compression? The trained models are evaluated with each window's "
        "image tokens compressed, without retraining: **pool** averages neighbouring tokens of the image grid "
        "(blocks as square as the factor allows: 2x: 1x2, 4x: 2x2, 8x: 2x4, 9x: 3x3), **topk** keeps the n/f tokens the window's text attends to most in "
        "the first fusion layer (insertion: its first self-attention layer), the training-free pruning reported "
        "for Llama 3.2 Vision's cross-attention.", "",
        f"**Rule** (fixed before the numbers): CASA combines with compression if at {rule['factor']}x "
        f"{rule['method']} it keeps at least {rule['keep']:.0%} of its uncompressed accuracy and its drop is no "
        f"larger than insertion's drop + {100 * rule['margin']:.0f} points.", "",
        "| variant | method | factor | image tokens / window | accuracy | change (pts) | KV cache / frame "
        "| image K/V peak | TTFT ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in v.items():
        base = res["rows"][0]["accuracy"]
        for r in res["rows"]:
            ratio = "n/a" if r["ttft_ratio"] is None else f"{r['ttft_ratio']:.2f}"
            lines.append(f"| {name} | {r['method']} | {r['factor']}x | {r['tokens_per_window']} | "
                         f"{r['accuracy']:.3f} | {100 * (r['accuracy'] - base):+.1f} | "
                         f"{_bytes(r['kv_bytes_per_frame'])} | {_bytes(r['image_kv_peak_bytes'])} | {ratio} |")
    n = {name: res.get("questions") for name, res in v.items()}
    seeds = {res.get("seeds", 1) for res in v.values()}
    noise = ""
    if "casa" in v and v["casa"].get("questions"):
        p, q = v["casa"]["rows"][0]["accuracy"], v["casa"]["questions"]
        noise = (f" With {q} questions a score moves by about {100 * binomial_se(p, q):.1f} pts "
                 "from sampling alone (binomial standard error at CASA's uncompressed accuracy).")
    lines += ["", f"Questions per configuration: {', '.join(f'{k} {q}' for k, q in n.items())}"
              f"{'' if seeds == {1} else f', over {max(seeds)} seeds'}.{noise} Accuracy: mean over tasks of the "
              "evaluation score. KV cache / frame: bytes one frame's image tokens add to the language model's "
              "cache for the rest of a stream; image K/V peak: the image keys/values held at once while the "
              "frame's window is open. TTFT ratio: time to first token of a window (image tokens to first "
              "token, vision tower excluded, top-k's ranking pass included) over the uncompressed time, "
              "median of ratios taken pass by pass, one thread.", "",
              "**Finding**: " + _finding(results, rule["method"], rule["factor"]), "",
              "The same rule for top-k (reported, not the verdict): " + _finding(results, "topk", rule["factor"]),
              "", _memory(results, rule["method"], rule["factor"]), ""]
    return "\n".join(lines)


def plot_compression(results: dict, path) -> Path | None:
    """Accuracy vs image tokens per window (one line per variant and method) and the latency ratio, as a
    PNG at `path`; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    styles = {"pool": ("-", "o"), "topk": ("--", "^")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (acc, lat) = plt.subplots(1, 2, figsize=(10, 4))
    ticks = set()
    for i, (name, res) in enumerate(results["variants"].items()):
        base = res["rows"][0]
        for method in [m for m in styles if any(r["method"] == m for r in res["rows"])]:
            rows = [base] + sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["factor"])
            x = [r["tokens_per_window"] for r in rows]
            ticks.update(x)
            style = dict(color=colors[i % len(colors)], linestyle=styles[method][0], marker=styles[method][1],
                         label=f"{name} {method}")
            acc.plot(x, [r["accuracy"] for r in rows], **style)
            if all(r["ttft_ratio"] is not None for r in rows):
                lat.plot(x, [r["ttft_ratio"] for r in rows], **style)
    for ax in (acc, lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel("image tokens per window")
        ax.grid(alpha=0.3)
    acc.set_ylim(0, 1.05)
    acc.set_ylabel("accuracy")
    acc.set_title("accuracy")
    lat.axhline(1.0, color="gray", lw=0.8, ls=":")
    lat.set_ylabel("time to first token / uncompressed")
    lat.set_title("latency ratio (1 thread)")
    handles, labels = acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)  # below the axes
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------ entry point
def _models(runs):
    """`(name, model, processor)` of each entry of `run_compression`'s `runs`."""
    from casa.pretrained.directory import load
    from casa.pretrained.model_dir import is_model_dir

    if isinstance(runs, (str, Path)):
        root = Path(runs)
        runs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()
                and (is_model_dir(p) or (p / "checkpoints").is_dir())}
        if not runs:
            raise ValueError(f"run_compression: no model or run directory under {str(root)!r}")
    for name, item in runs.items():
        if isinstance(item, (tuple, list)):
            yield name, item[0], item[1]
        else:
            loaded = load(item)
            yield name, loaded.model, loaded.processor


def run_compression(runs, *, tasks=("color", "count", "position"), n: int = 30, seed: int = 0,
                    difficulty: dict | None = None, methods=METHODS, factors=FACTORS, latency_prompts: int = 8,
                    repeats: int = 5, out=None, backend: str = "auto") -> dict:
    """`evaluate_compression` for several trained models on the same held-out samples.

    Args:
        runs: `{name: (model, processor)}`, `{name: model directory or training run directory}`, or one
            directory whose sub-directories are such directories (named after them). Name the CASA model
            "casa" and the insertion one "insertion" for the verdict.
        tasks, n, seed, difficulty: the samples (`eval_samples(tasks, n, seed=seed, difficulty=difficulty)`;
            the difficulty the models were trained at).
        out: a directory for `compression.json` (with provenance), `compression.png` and `compression.md`.
    Returns:
        `{config, variants: {name: evaluate_compression(...)}, verdict}`.
    """
    samples = eval_samples(list(tasks), n, seed=seed, difficulty=difficulty)
    results = {"config": {"tasks": list(tasks), "n": n, "seed": seed, "difficulty": difficulty,
                          "methods": list(methods), "factors": list(factors), "rule": RULE},
               "variants": {}}
    for name, model, processor in _models(runs):
        results["variants"][name] = evaluate_compression(model, processor, samples, methods=methods,
                                                         factors=factors, latency_prompts=latency_prompts,
                                                         repeats=repeats, backend=backend)
    results["verdict"] = verdict(results)
    if out is not None:
        from casa.bench.report import write_experiment

        write_experiment(results, out, "compression", plot=plot_compression, section=section)
    return results
