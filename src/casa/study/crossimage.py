"""Cross-image reasoning across non-adjacent frames (`casa study`, issue 30, experiment 2).

A CASA window sees only its own image; what carries an earlier frame to a
later question is text, above all the gist token each frame leaves in the
stream (docs/design.md §2). Insertion keeps every frame's image tokens in the
stream, CA keeps none and has no text keys. Two questions:

- where does the gist token break, against insertion and CA? On `match` (is
  the shape in frame 1 the same colour as the shape in the last frame? two
  frames never next to each other) and `recall` (which frame showed the red
  shape? never the last frame), whose answers cannot be read off the
  question's own (the last) frame (`casa.data.tasks`), and on `motion`
  beside them;
- which memory of a frame carries it best: the one gist token, or k
  average-pooled image tokens per frame kept in the text stream
  (`FusionConfig.frame_memory = k`, k = 1, 4, 16), and at what KV-cache cost
  per frame, measured on a real `Session`.

The arms (`ARMS`): insertion, ca, casa, and casa with frame memory k. Each is
trained like the study's arms: from the seed's stage-0 parts by
`stage1.train_arm` (LM frozen, fusion layers, projector and the encoder's
last block training) when a stage-0 directory is given, else from scratch
with everything training (`train_scratch`, a quick look). Then each is
evaluated on the tasks with its images and blind (`stage1.evaluate_tasks`),
and its cache bytes per frame measured (`frame_cache_bytes`). With stage 0,
the stage-0 text LM given every frame's caption in text (`caption_oracle`)
says what a perfect memory of each frame would let that LM answer: where it
fails, the arms fail for want of reasoning, not of memory. `section`
states the rule before the numbers; `plot_crossimage` draws accuracy against
cache bytes per frame; `run_crossimage` is the entry point `casa study` can
call.

Design decisions:
- Clips of 4 frames (`FRAMES`, the study's difficulty otherwise): `match`'s
  frame 1 and the question's frame 4 have two frames between them, and
  `recall`'s answer (frames 1..3) is never the last frame.
- Cache bytes per frame: what one more frame (its image, then its gist
  token) adds to `Session.cache_bytes()` in a stream, taken between the last
  two of `frames` frames so that the first window's set-up is not counted.
  CASA's fusion-window state is the same size for every frame (it is reset
  when the next frame opens its window), so the growth is the language
  model's cache: the gist token for casa and ca, k memory tokens more with
  frame memory, every image token for insertion. The fusion state held while
  a window is open is reported beside it (`window_bytes`).
- The rule is judged only when insertion learnt the cross-frame tasks (beat
  the better of its blind score and the prior by the margin and by two
  binomial standard errors; a blind model may answer off the task and score
  0): with nothing learnt there is no gap to close, and the finding says so
  instead of comparing noise. `motion` is reported beside the rule: half of
  its answer (the axis) can be read off the last frame.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from casa.config import ModelConfig
from casa.inference.session import Session
from casa.study.stats import binomial_se

__all__ = ["ARMS", "CROSS_TASKS", "FRAMES", "MEMORIES", "RULE", "TASKS", "arms", "caption_oracle", "collect",
           "finding", "frame_cache_bytes", "plot_crossimage", "prepare", "run_crossimage", "section", "summarise",
           "train_one", "train_scratch", "verdict"]

CROSS_TASKS = ("match", "recall")  # answers in frames that are not the question's own
TASKS = (*CROSS_TASKS, "motion")
FRAMES = 4
MEMORIES = (1, 4, 16)
RULE = {"tasks": CROSS_TASKS, "margin": 0.05}  # the verdict's rule (`verdict`, `section`)


def arms(memories=MEMORIES) -> dict[str, dict]:
    """Arm name -> FusionConfig fields: insertion, ca, casa (the study's variants of those names: casa's
    placement is the default, parallel), and `casa+m{k}`, casa with `frame_memory = k` for each k of
    `memories`."""
    out = {name: {"variant": name} for name in ("insertion", "ca", "casa")}
    out.update({f"casa+m{k}": {"variant": "casa", "frame_memory": k} for k in memories})
    return out


ARMS = arms()


# --------------------------------------------------------------- measures
@torch.no_grad()
def frame_cache_bytes(model, *, frames: int = FRAMES, gist_id: int = 0) -> dict:
    """KV-cache bytes of a stream of frames, measured on a fresh `Session`.

    The stream is one text token, then `frames` times: one image of random LM-width tokens and
    one gist token (`gist_id`), as the processor lays out a video part.

    Returns:
        `{cache_bytes_per_frame, window_bytes, tokens_per_frame}`: what the last frame added to
        `Session.cache_bytes()` (every layer's keys and values that stay for the rest of the
        stream), the fusion-window state it holds while its window is open (0 without fusion
        layers), and the self-attention cache entries per layer it added.
    """
    if frames < 2:
        raise ValueError(f"frame_cache_bytes: frames={frames}: need 2 to take a difference")
    session = Session(model)
    w = model.embed.weight
    g = torch.Generator().manual_seed(0)
    session.forward_text([gist_id])
    sizes, tokens = [], []
    for _ in range(frames):
        image = torch.randn(model.tokens_per_image, w.shape[1], generator=g).to(w.device, w.dtype)
        session.add_image_embeds(image[None])
        session.forward_text([gist_id])
        sizes.append(session.cache_bytes())
        tokens.append(max((c.tokens for c in session.sa), default=0))
    window = sum(c.nbytes for c in session.windows if c is not None)
    return {"cache_bytes_per_frame": int(sizes[-1] - sizes[-2]), "window_bytes": int(window),
            "tokens_per_frame": int(tokens[-1] - tokens[-2])}


@torch.no_grad()
def caption_oracle(stage0_dir, spec: dict, tasks, n: int, *, seed: int = 0) -> dict:
    """Scores of the seed's stage-0 text LM on the arms' held-out questions with every frame given as its
    caption in text (`stage0.DescribedSource`): what a perfect memory of each frame lets this LM answer,
    the ceiling of every arm whose LM starts from it.

    Returns:
        `{task: score}`.
    """
    from safetensors.torch import load_file

    from casa.core.model import CasaModel
    from casa.data import Processor
    from casa.data.tasks import difficulty as make_difficulty
    from casa.eval.synthetic import EVAL_SEED_OFFSET, evaluate
    from casa.pretrained.tokenizer import ByteTokenizer
    from casa.study.stage0 import DescribedSource

    cfg = ModelConfig.from_dict({**spec["model"], "fusion": {"variant": "insertion"}})
    model = CasaModel(cfg).eval()
    model.load_state_dict(load_file(str(Path(stage0_dir) / "lm.safetensors")), strict=False)
    processor = Processor(ByteTokenizer(), cfg.vision)
    d = make_difficulty(spec["difficulty"])
    out = {}
    for t in tasks:
        source = DescribedSource([t], seed=seed + EVAL_SEED_OFFSET, difficulty=d)
        out[t] = evaluate(model, processor, [source[i] for i in range(n)], max_new_tokens=8)["tasks"][t]["score"]
    return out


# --------------------------------------------------------------- training
def train_scratch(name: str, fusion: dict, spec: dict, seed: int, tasks, work_dir, *, steps: int | None = None,
                  eval_n: int | None = None) -> dict:
    """Train arm `name` (FusionConfig fields `fusion`) from random weights, everything trainable, on
    `tasks` with the spec's model, packs and learning rates, then evaluate it (`stage1.evaluate_tasks`).

    Returns:
        `{arm, fusion, seed, steps, train_seconds, final_loss, tasks: {task: {metric, score, blind, n}},
        model, processor}`.
    """
    from casa.study.stage1 import evaluate_tasks
    from casa.training.trainer import Trainer, load_config

    steps = steps or spec["train"]["steps"]
    work = Path(work_dir) / f"{name}_s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    train = {**spec["train"], "steps": steps, "data": ",".join(tasks), "difficulty": spec["difficulty"],
             "seed": seed, "out_dir": str(work / "train"), "log_every": 10**9, "save_every": 0,
             "precision": "fp32", "insertion_counts_images": False, "freeze_lm": False,
             "vision_trainable_blocks": -1}
    model_cfg, cfg = load_config(base={"model": {**spec["model"], "fusion": fusion}, "train": train})
    torch.manual_seed(seed)
    trainer = Trainer(model_cfg, cfg, quiet=True)
    packs = trainer.packer.packs(0)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(trainer.train_step([next(packs)]))
    seconds = time.perf_counter() - t0
    model, processor = trainer.raw, trainer.processor
    result = evaluate_tasks(model, processor, tasks, eval_n or spec["eval_n"], seed=seed,
                            difficulty=spec["difficulty"])
    shutil.rmtree(work, ignore_errors=True)
    k = max(1, len(losses) // 10)
    return {"arm": name, "fusion": fusion, "seed": seed, "steps": steps, "train_seconds": seconds,
            "final_loss": sum(losses[-k:]) / k, "tasks": result, "model": model, "processor": processor}


def _train(name: str, fusion: dict, spec: dict, seed: int, tasks, stage0_dir, work_dir, steps, eval_n) -> dict:
    """One arm trained and evaluated: from stage 0 by the study's own `train_arm`, or from scratch."""
    if stage0_dir is None:
        return train_scratch(name, fusion, spec, seed, tasks, work_dir, steps=steps, eval_n=eval_n)
    from casa.study.stage1 import Arm, train_arm

    spec = {**spec, "eval_n": eval_n or spec["eval_n"]}
    r = train_arm(Arm(name, name), seed, spec, list(tasks), fusion, stage0_dir, work_dir, steps=steps)
    return {k: r[k] for k in ("fusion", "seed", "steps", "train_seconds", "final_loss", "tasks", "model",
                              "processor")} | {"arm": name}


# ---------------------------------------------------------------- summary
def summarise(runs: list[dict]) -> dict:
    """Per arm, the mean over its seeds: `{fusion, seeds, tasks: {task: {score, blind, n}}, cross,
    cross_per_seed, cross_blind, cache_bytes_per_frame, window_bytes, tokens_per_frame}`; `cross` is the mean
    score over `CROSS_TASKS` (those evaluated), `cross_per_seed` the same per seed, `n` the questions over all
    seeds."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        tasks = {t: {"score": sum(r["tasks"][t]["score"] for r in mine) / len(mine),
                     "blind": sum(r["tasks"][t].get("blind", 0.0) for r in mine) / len(mine),
                     "n": sum(r["tasks"][t]["n"] for r in mine)} for t in mine[0]["tasks"]}
        cross = [t for t in CROSS_TASKS if t in tasks]
        out[name] = {"fusion": mine[0]["fusion"], "seeds": [r["seed"] for r in mine], "tasks": tasks,
                     "cross": sum(tasks[t]["score"] for t in cross) / len(cross) if cross else None,
                     "cross_per_seed": [sum(r["tasks"][t]["score"] for t in cross) / len(cross) for r in mine]
                     if cross else [],
                     "cross_blind": sum(tasks[t]["blind"] for t in cross) / len(cross) if cross else None,
                     **{k: mine[0][k] for k in ("cache_bytes_per_frame", "window_bytes", "tokens_per_frame")}}
    return out


def verdict(results: dict, *, margin: float = RULE["margin"]) -> dict:
    """The rule of `section`, on the mean score over the cross-frame tasks (`summarise`'s `cross`).

    Judged only when insertion learnt them: its score beats the better of its blind score and the
    prior (the most frequent training answer, `results["prior"]`, where given) by more than `margin`
    and by more than two binomial standard errors over its cross-frame questions.
    Then the gist token carries the frames if casa is within `margin` of insertion; otherwise the
    memory that carries them is the casa arm (frame memory or not) with the fewest cache bytes per
    frame whose score is within `margin` of insertion's, if any.

    Returns:
        `{judged: bool, gist_enough: bool or None, recovers: arm name or None, gap, reason, scores}`;
        `gap` = insertion - casa in score units (0.05 = 5 points).
    """
    arms_ = results.get("arms", {})
    if "insertion" not in arms_ or "casa" not in arms_ or arms_["casa"]["cross"] is None:
        return {"judged": False, "gist_enough": None, "recovers": None, "gap": None,
                "reason": "needs 'insertion' and 'casa' evaluated on the cross-frame tasks", "scores": {}}
    scores = {name: a["cross"] for name, a in arms_.items() if a["cross"] is not None}
    ins = arms_["insertion"]
    gap = ins["cross"] - arms_["casa"]["cross"]
    prior = results.get("prior") or {}
    cross = [t for t in CROSS_TASKS if t in ins["tasks"]]
    floor, what = ins["cross_blind"], "its blind score"
    if all(t in prior for t in cross):  # a blind model may answer off the task (0): the prior is the floor then
        chance = sum(prior[t] for t in cross) / len(cross)
        floor, what = (chance, "the prior") if chance > floor else (floor, what)
    noise = 2 * binomial_se(floor, sum(ins["tasks"][t]["n"] for t in cross))
    if ins["cross"] - floor <= max(margin, noise):
        return {"judged": False, "gist_enough": None, "recovers": None, "gap": gap, "scores": scores,
                "reason": f"insertion did not learn the cross-frame tasks ({ins['cross']:.3f} against "
                          f"{floor:.3f}, {what}; needs more than {100 * max(margin, noise):.1f} pts above it)"}
    within = margin + 1e-9  # a gap of exactly the margin is within it, whatever the float rounding
    close = [n for n in scores if (n == "casa" or n.startswith("casa+m")) and ins["cross"] - scores[n] <= within]
    recovers = min(close, key=lambda n: arms_[n]["cache_bytes_per_frame"]) if close else None
    return {"judged": True, "gist_enough": gap <= within, "recovers": recovers, "gap": gap, "scores": scores,
            "reason": ""}


def _bytes(n) -> str:
    return "0" if not n else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def finding(results: dict, *, margin: float = RULE["margin"]) -> str:
    """The one-line finding `verdict` gives, with its numbers."""
    v = verdict(results, margin=margin)
    if not v["judged"]:
        return f"not judged: {v['reason']}."
    a = results["arms"]
    ins, casa = a["insertion"], a["casa"]
    head = (f"casa {casa['cross']:.3f} against insertion {ins['cross']:.3f} on the cross-frame questions, "
            f"{-100 * v['gap']:+.1f} pts")
    if v["gist_enough"]:
        return (f"the gist token carries the earlier frames: {head}, within the {100 * margin:.0f} pts of the "
                f"rule, at {_bytes(casa['cache_bytes_per_frame'])} per frame against insertion's "
                f"{_bytes(ins['cache_bytes_per_frame'])}.")
    if v["recovers"]:
        r = a[v["recovers"]]
        # a memory as large as the image is no pooling: it holds what insertion holds
        whole = " (every image token: no pooling at this image size)" if \
            r["tokens_per_frame"] >= ins["tokens_per_frame"] else ""
        return (f"the gist token alone does not carry the earlier frames ({head}); {v['recovers']} does "
                f"({r['cross']:.3f}, at most {100 * margin:.0f} pts below insertion) at "
                f"{_bytes(r['cache_bytes_per_frame'])} per frame{whole} against casa's "
                f"{_bytes(casa['cache_bytes_per_frame'])} and insertion's {_bytes(ins['cache_bytes_per_frame'])}.")
    best = max((n for n in v["scores"] if n.startswith("casa")),  # ties: the cheaper memory
               key=lambda n: (v["scores"][n], -a[n]["cache_bytes_per_frame"]))
    return (f"neither the gist token nor frame memory carries the earlier frames ({head}); the best casa arm, "
            f"{best}, reaches {v['scores'][best]:.3f}, more than {100 * margin:.0f} pts below insertion.")


def section(results: dict) -> str:
    """Markdown for docs/study.md: the question, the rule (before any number), a table, the finding."""
    margin = results.get("config", {}).get("rule", RULE)["margin"]
    arms_ = results.get("arms", {})
    tasks = list(next(iter(arms_.values()))["tasks"]) if arms_ else []
    lines = [
        "## Cross-image reasoning across non-adjacent frames", "",
        "A CASA window sees only its own frame; earlier frames reach a later question through text, above all "
        "the gist token after each frame. Does that carry a question about two frames that are not next to "
        "each other (`match`: is the shape in frame 1 the same colour as in frame 4? `recall`: which frame "
        f"showed the red shape?; clips of {results.get('config', {}).get('frames', FRAMES)} frames, the "
        "answer never readable from the last frame), and does keeping k average-pooled image tokens of each "
        "frame in the text stream (`frame_memory = k`) carry it better, at what cache cost per frame?", "",
        f"**Rule** (fixed before the numbers): on the mean score over the cross-frame tasks evaluated "
        f"({', '.join(t for t in RULE['tasks'] if t in tasks) or 'none'}), judged only "
        f"if insertion beats the better of its blind score and the prior by more than {100 * margin:.0f} pts "
        "and two binomial standard errors: the gist token carries the "
        f"earlier frames if casa is within {100 * margin:.0f} pts of insertion; otherwise the memory that "
        "carries them is the casa arm with frame memory that comes within that margin at the fewest cache "
        "bytes per frame.", "",
        "| arm | frame memory | " + " | ".join(tasks) + " | cross-frame mean | blind | KV cache / frame "
        "| cache entries / frame | fusion window |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    for name, a in arms_.items():
        cells = " | ".join(f"{a['tasks'][t]['score']:.3f}" for t in tasks)
        cross = "n/a" if a["cross"] is None else f"{a['cross']:.3f}"
        if len(a.get("cross_per_seed", [])) > 1:
            cross += " (" + ", ".join(f"{v:.2f}" for v in a["cross_per_seed"]) + ")"
        blind = "n/a" if a["cross_blind"] is None else f"{a['cross_blind']:.3f}"
        lines.append(f"| {name} | {a['fusion'].get('frame_memory', 0)} | {cells} | {cross} | {blind} | "
                     f"{_bytes(a['cache_bytes_per_frame'])} | {a['tokens_per_frame']} | {_bytes(a['window_bytes'])} |")
    oracle = results.get("oracle")
    if oracle:
        cross = [oracle[t] for t in RULE["tasks"] if t in oracle]
        mean = f"{sum(cross) / len(cross):.3f}" if cross else "n/a"
        lines.append("| caption oracle | - | " + " | ".join(f"{oracle[t]:.3f}" for t in tasks)
                     + f" | {mean} | | | | |")
    prior = results.get("prior") or {}
    n = {a["tasks"][t]["n"] for a in arms_.values() for t in tasks}
    noise = ""
    if arms_.get("casa", {}).get("cross") is not None:
        q = sum(arms_["casa"]["tasks"][t]["n"] for t in RULE["tasks"] if t in tasks)
        noise = (f" Over its {q} cross-frame questions a mean score moves by about "
                 f"{100 * binomial_se(arms_['casa']['cross'], q):.1f} pts from sampling alone (binomial standard "
                 "error at casa's score).")
    seeds = {len(a.get("seeds", [0])) for a in arms_.values()} or {1}
    lines += ["", f"Questions per task and arm: {', '.join(map(str, sorted(n)))}"
              f"{'' if seeds == {1} else f', over {max(seeds)} seeds (the cross-frame mean of each seed in brackets)'}"
              f".{noise} Blind: the same model with its "
              "frames withheld. Prior (most frequent training answer to the question): "
              + (", ".join(f"{t} {p:.3f}" for t, p in prior.items()) or "n/a")
              + ". KV cache / frame: what one more frame and its gist token add to a session's cache for the "
              "rest of the stream (every layer's keys and values); cache entries / frame: the same in tokens "
              "per layer; fusion window: the image keys/values (and window text) held while a frame's "
              "window is open."
              + (" Caption oracle: the stage-0 text LM the arms start from, given every frame's caption in "
                 "text: what a perfect memory of each frame lets that LM answer." if oracle else ""),
              "", "**Finding**: " + finding(results, margin=margin), ""]
    others = [t for t in tasks if t not in RULE["tasks"]]
    if others and arms_:
        lines += ["Beside the rule: " + "; ".join(
            f"{t}: " + ", ".join(f"{name} {a['tasks'][t]['score']:.3f}" for name, a in arms_.items())
            for t in others) + ".", ""]
    return "\n".join(lines)


def plot_crossimage(results: dict, path) -> Path | None:
    """Score against KV-cache bytes per frame, one panel per task and one for the cross-frame mean,
    one colour per arm (the legend below the panels), blind scores as hollow markers; a PNG at
    `path`, None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    arms_ = results["arms"]
    tasks = list(next(iter(arms_.values()))["tasks"])
    panels = tasks + (["cross-frame mean"] if any(a["cross"] is not None for a in arms_.values()) else [])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: colors[i % len(colors)] for i, name in enumerate(arms_)}
    cost = {name: max(a["cache_bytes_per_frame"], 1) for name, a in arms_.items()}
    # arms of the same cost (ca and casa) side by side: each a few percent further right
    rank = {name: sum(cost[o] == cost[name] for o in list(arms_)[:i]) for i, name in enumerate(arms_)}
    ticks = sorted(set(cost.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, a in arms_.items():
            x = cost[name] * 1.12 ** rank[name]
            seen, blind = ((a["cross"], a["cross_blind"]) if panel not in a["tasks"]
                           else (a["tasks"][panel]["score"], a["tasks"][panel]["blind"]))
            if seen is None:
                continue
            ax.scatter([x], [seen], color=color[name], marker="o", s=40, zorder=3)
            ax.scatter([x], [blind], facecolors="none", edgecolors=color[name], marker="o", s=40, zorder=2)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [_bytes(t) for t in ticks], rotation=45, ha="right", fontsize=8)
        ax.minorticks_off()
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        ax.set_ylim(-0.03, 1.05)
        ax.set_title(panel)
        ax.set_xlabel("KV cache per frame")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    handles = [Line2D([], [], color=color[n], marker="o", ls="", label=n) for n in arms_]
    handles.append(Line2D([], [], color="gray", marker="o", ls="", markerfacecolor="none", label="blind (hollow)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)  # below the axes
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------ entry point
def prepare(spec: dict, eval_n: int | None = None) -> dict:
    """The spec the arms train and are evaluated with: `spec` (a study size's, or its `crossimage` part)
    with clips of `FRAMES` frames and `eval_n` questions a task."""
    spec = json.loads(json.dumps(spec))
    spec["difficulty"] = {**spec["difficulty"], "frames": FRAMES}
    spec["eval_n"] = eval_n or spec["eval_n"]  # the prior's questions too
    return spec


def train_one(name: str, seed: int, spec: dict, tasks, out, *, stage0=None, steps: int | None = None,
              say=print) -> dict:
    """Train arm `name` of `ARMS` for one seed, evaluate it, measure its cache bytes per frame; its record
    is written to `out/runs/NAME_sSEED.json` (atomically; a later call reuses it). `spec` is `prepare`'s.

    Args:
        stage0: the stage-0 directory the arm starts from (`pretrain`'s `sSEED/`); None: from scratch.
    Returns:
        the record: `{arm, fusion, seed, steps, train_seconds, final_loss, tasks, cache_bytes_per_frame,
        window_bytes, tokens_per_frame}`.
    """
    from casa.files import atomic_file

    path = Path(out) / "runs" / f"{name}_s{seed}.json"
    if path.is_file():
        say(f"  crossimage: reuse {path}")
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="casa_crossimage_") as work:  # the training run's files
        r = _train(name, ARMS[name], spec, seed, tasks, stage0, work, steps, spec["eval_n"])
    model = r.pop("model")
    r.pop("processor")
    r.update(frame_cache_bytes(model.eval()))
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(r, indent=1))
    scores = ", ".join(f"{t} {v['score']:.3f} (blind {v['blind']:.3f})" for t, v in r["tasks"].items())
    say(f"  crossimage seed {seed} {name:<10} {scores}; {_bytes(r['cache_bytes_per_frame'])} per frame; "
        f"loss {r['final_loss']:.3f}, {r['steps']} steps, {r['train_seconds']:.0f} s")
    return r


def collect(runs: list[dict], spec: dict, tasks, *, names, seeds, stage0_dirs=None, out=None) -> dict:
    """The experiment's results from its arms' records: the caption oracle of each stage 0, the prior, the
    per-arm summary and the verdict; with `out`, `crossimage.json`, `crossimage.png` and `crossimage.md`.

    Returns:
        `{config, runs, arms: summarise(runs), prior, oracle, verdict}`.
    """
    from casa.study.stage1 import prior_scores

    oracle = [caption_oracle(d, spec, tasks, spec["eval_n"], seed=s) for s, d in zip(seeds, stage0_dirs or ())]
    prior, _ = prior_scores(list(tasks), spec)
    results = {"config": {"spec": spec, "seeds": list(seeds), "tasks": list(tasks),
                          "arms": {n: ARMS[n] for n in names}, "frames": FRAMES,
                          "stage0": [str(d) for d in stage0_dirs] if stage0_dirs else None, "rule": RULE,
                          "threads": torch.get_num_threads()},
               "runs": runs, "arms": summarise(runs), "prior": prior,
               "oracle": {t: sum(o[t] for o in oracle) / len(oracle) for t in tasks} if oracle else None}
    results["verdict"] = verdict(results)
    if out is not None:
        from casa.bench.report import write_experiment

        write_experiment(results, out, "crossimage", plot=plot_crossimage, section=section)
    return results


def run_crossimage(out=None, *, spec: dict, seeds=(0,), stage0=None,
                   arm_names=None, tasks=TASKS, steps: int | None = None, eval_n: int | None = None,
                   say=print) -> dict:
    """Train and evaluate the arms on the cross-frame tasks; measure their cache bytes per frame
    (`casa study` runs the same `train_one` per arm as units of its own schedule, then `collect`).

    Args:
        out: a directory for `runs/ARM_sSEED.json` (each arm's record, reused by a rerun),
            `crossimage.json` (with provenance), `crossimage.png` and `crossimage.md`; None: nothing written.
        spec: a study size's spec (`casa.study.run.SIZES[...]`, its `crossimage` part, or `StudyConfig.spec`).
            Its difficulty gets `frames = FRAMES`.
        seeds: the seeds to train.
        stage0: the stage-0 root (holding `sSEED/`): arms start from it as the study's do; None: from
            scratch, everything trainable (`train_scratch`).
        arm_names: names from `ARMS` (default: all); tasks: trained on and evaluated.
        steps, eval_n: override the spec's training steps and questions per task.
    Returns:
        `collect`'s results.
    """
    spec = prepare(spec, eval_n)
    names = list(arm_names or ARMS)
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise ValueError(f"run_crossimage: unknown arms {bad}; expected names from {list(ARMS)}")
    for n in names:  # refuse a memory the model's images cannot give before any training
        ModelConfig.from_dict({**spec["model"], "fusion": ARMS[n]})
    with tempfile.TemporaryDirectory(prefix="casa_crossimage_") as scratch:
        base = Path(out) if out is not None else Path(scratch)
        stage0_dirs = None if stage0 is None else [Path(stage0) / f"s{seed}" for seed in seeds]
        runs = [train_one(name, seed, spec, tasks, base, stage0=None if stage0 is None else Path(stage0) / f"s{seed}",
                          steps=steps, say=say)
                for seed in seeds for name in names]
    return collect(runs, spec, tasks, names=names, seeds=seeds, stage0_dirs=stage0_dirs, out=out)
