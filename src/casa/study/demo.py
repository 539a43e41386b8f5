"""`casa demo`: train a small CASA model on the synthetic suite on CPU, then
show that it sees.

Steps: train (or reuse the run's checkpoint), evaluate on held-out samples of
each task next to two blind baselines, answer a few questions about freshly
rendered images, caption a sample video, and leave a run directory:
`checkpoints/step_*/` (a model directory), `metrics.json`, `loss.png`,
`examples/*.png`, `sample.mp4` and its captions `sample.srt`.

Design decisions:
- The baselines: "blind" is the same trained model with the images withheld;
  "prior" is the best any blind answerer can do on this data, the most
  frequent training answer to the same question. The gain from seeing is
  CASA's score minus the better of the two.
- Sizes are tuned for ~5 minutes on 2 CPU cores: a 4-block LM of width 128
  with a CASA layer in every block, a 2-block ViT on 32x32 images (16 image
  tokens each) whose position embeddings start at 2-D sin-cos values, packs
  of 384 text tokens, 1500 steps, one learning rate for everything (trained
  from scratch, nothing is "pretrained").
- Tasks: colour, count (1-3 shapes), position (one shape, left/right or
  top/bottom) and video captioning (a shape stepping across a 3 x 3 grid, one
  caption per frame after "Caption each frame."), so that the model's first
  `casa caption` makes sense: the demo ends by captioning a sample video
  (`casa.data.video`, what `casa data video` writes) into an SRT file.
  Relative position and the two-image comparison need far longer from
  scratch and stay out of the demo (`casa train` on the full suite).
- Threads: 2 (or the machine's cores, if fewer), not the free cores other
  commands take: float sums depend on how a reduction is split, and training
  amplifies such differences, so a demo at a fixed thread count prints the
  same table on every run on the same kind of machine (the README's).
- `metrics.json` is written atomically: a rerun never finds half of one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from casa.files import atomic_file
from casa.threads import free_cores, set_threads

__all__ = ["DEMO_MODEL", "DEMO_TRAIN", "caption_sample", "plot_loss", "run", "summary_table"]

DEMO_MODEL = {
    "lm": {"vocab_size": 264, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 352},
    "vision": {"image_size": 32, "patch_size": 8, "d_model": 96, "n_layers": 2, "n_heads": 4, "d_ff": 192},
    "fusion": {"variant": "casa", "placement": "parallel", "every": 1},
}
DEMO_TRAIN = {
    # a task named twice is drawn twice as often: a video sample holds four captions, so one in seven
    # samples gives captioning about as many answer tokens as the three questions together
    "data": "color,count,position,color,count,position,video",
    "difficulty": {"image_size": 48, "colors": 4, "max_shapes": 3, "relative": False},
    "steps": 1500, "text_tokens": 384, "image_tokens": 4096, "lr_new": 5e-4, "lr_pretrained": 5e-4,
    "warmup_steps": 100, "min_lr_ratio": 0.05, "weight_decay": 0.01, "grad_clip": 1.0,
    "log_every": 50, "save_every": 500, "keep_last": 1,
}


def _say(text: str = "") -> None:
    print(text, flush=True)


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """The loss curve (per step and a running mean) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("(matplotlib is not installed: no loss plot; pip install 'casa[plot]')")
        return None
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1, alpha=0.4, label="loss per step")
    k = max(1, len(loss) // 30)
    smooth = [sum(loss[max(0, i - k): i + 1]) / len(loss[max(0, i - k): i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, lw=2, label=f"running mean ({k + 1} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title("casa demo: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(rows: dict) -> str:
    """The demo's table: per task, CASA vs blind vs prior, and the gain from seeing."""
    head = f"{'task':<10} {'metric':<7} {'CASA':>6} {'blind':>6} {'prior':>6} {'gain':>6}"
    lines = [head, "-" * len(head)]
    for task, r in rows.items():
        lines.append(f"{task:<10} {r['metric']:<7} {r['casa']:>6.2f} {r['blind']:>6.2f} {r['prior']:>6.2f} "
                     f"{r['gain']:>+6.2f}")
    return "\n".join(lines)


def caption_sample(checkpoint, out: Path, *, seed: int = 0) -> dict:
    """Write a sample video to `out/sample.mp4`, caption it with the model in `checkpoint` into
    `out/sample.srt` (`casa caption`'s path), print each caption beside the reference; returns
    {"video", "srt", "frames": [{"time", "caption", "reference"}], "correct"}."""
    from casa.data.video import write_sample_video
    from casa.inference.captioner import caption_file

    video, srt, fps = out / "sample.mp4", out / "sample.srt", 2.0
    references = write_sample_video(video, frames=8, fps=fps, seed=seed)
    captions = []
    caption_file(video, checkpoint=checkpoint, fps=None, srt=srt, on_caption=captions.append)  # `casa caption`'s defaults
    _say(f"\ncaptioning a sample video ({video}, {len(references)} frames at {fps:g} fps; "
         f"`casa caption {video} --checkpoint {checkpoint} --srt {srt}` does the same):")
    frames = []
    for cap, ref in zip(captions, references):
        mark = "ok" if cap.text.strip().lower() == ref.lower() else "wrong"
        _say(f"  {cap.time:4.1f} s  {cap.text.strip()!r:<24} (truth: {ref!r}, {mark})")
        frames.append({"time": cap.time, "caption": cap.text.strip(), "reference": ref})
    correct = sum(f["caption"].lower() == f["reference"].lower() for f in frames)
    return {"video": str(video), "srt": str(srt), "frames": frames, "correct": correct}


def run(out="runs/demo", *, retrain: bool = False, steps: int | None = None, eval_n: int | None = None,
        seed: int = 0, model: dict | None = None, train: dict | None = None, threads: int | None = None) -> dict:
    """Train (or reuse) the demo model in `out`, evaluate it, show answers; returns metrics.json's content
    (or `{"interrupted": True}` when training was interrupted)."""
    from casa.core.model import CasaModel
    from casa.data import SyntheticSource, make_sample
    from casa.data.tasks import difficulty as make_difficulty
    from casa.eval.decode import greedy_decode
    from casa.eval.synthetic import eval_samples, evaluate, prior_answers
    from casa.pretrained.directory import load
    from casa.pretrained.runs import latest_checkpoint
    from casa.training.checkpoint import load_state
    from casa.training.trainer import Trainer, load_config
    from casa.training.trainer import train as run_training

    t0 = time.perf_counter()
    out = Path(out)
    n = set_threads(threads or min(2, os.cpu_count() or 1))
    if threads is None and free_cores() < n:
        _say(f"(the machine is busy: {free_cores()} of {os.cpu_count()} cores free. The demo trains at {n} threads "
             "so that its table repeats, which is slow on busy cores; --threads 1 is faster, with slightly "
             "different figures)")
    overrides = {**DEMO_TRAIN, **(train or {}), "out_dir": str(out), "seed": seed}
    if steps is not None:
        overrides["steps"] = steps
    model_cfg, cfg = load_config(base={"model": {**DEMO_MODEL, **(model or {})}, "train": overrides})
    tasks = list(dict.fromkeys(cfg.data.split(",")))  # each task once (the mix names some twice)
    eval_n = eval_n or 60

    train_seconds = None
    ckpt = None if retrain else latest_checkpoint(out)
    if ckpt is not None and load_state(ckpt)["step"] < cfg.steps:
        _say(f"found an unfinished run in {out}: continuing it")
        run_training(model_cfg, cfg, resume=True)
        ckpt = latest_checkpoint(out)
    elif ckpt is not None:
        _say(f"reusing the trained model in {ckpt} (pass --retrain to train again)")
    else:
        if retrain and out.exists():
            import shutil

            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        n_params = sum(p.numel() for p in CasaModel(model_cfg).parameters())
        _say(f"training a {n_params / 1e6:.2f}M-parameter CASA model on {', '.join(tasks)} "
             f"for {cfg.steps} steps (CPU, a few minutes)...")
        trainer = Trainer(model_cfg, cfg)
        summary = trainer.fit()
        train_seconds = summary["seconds"]
        if summary.get("interrupted"):
            _say("interrupted: run `casa demo` again to continue")
            return {"interrupted": True}
        ckpt = latest_checkpoint(out)
    state = load_state(ckpt)
    model, _, processor = load(ckpt)

    _say(f"\nevaluating on {eval_n} held-out samples per task...")
    samples = eval_samples(tasks, eval_n, seed=seed, difficulty=cfg.difficulty)
    seen = evaluate(model, processor, samples)
    blind = evaluate(model, processor, samples, blind=True)
    src = SyntheticSource(tasks, seed=seed, difficulty=make_difficulty(cfg.difficulty))
    prior = evaluate(model, processor, samples, prior=prior_answers(src[i] for i in range(400 * len(tasks))))
    rows = {}
    for t in tasks:
        s, b, p = seen["tasks"][t]["score"], blind["tasks"][t]["score"], prior["tasks"][t]["score"]
        rows[t] = {"metric": seen["tasks"][t]["metric"], "casa": s, "blind": b, "prior": p, "gain": s - max(b, p)}

    _say("\nfresh images, never seen in training:")
    examples = out / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    shown = []
    for k, t in [(k, t) for t in tasks if t != "video" for k in range(2)]:
        sample = make_sample(t, seed + 7777, k, make_difficulty(cfg.difficulty))
        enc = processor.encode(sample)
        prompt = enc.prefix(enc.turns[0][0])
        pred = processor.tok.decode(greedy_decode(model, [prompt], processor)[0]).strip()
        question = sample.messages[0]["content"][-1]["text"]
        gold = sample.messages[1]["content"][0]["text"]
        files = []
        for j, part in enumerate(p for p in sample.messages[0]["content"] if p["type"] == "image"):
            f = examples / f"{t}_{k}{'abcd'[j] if j else ''}.png"
            part["image"].resize((128, 128)).save(f)
            files.append(str(f))
        mark = "ok" if pred.lower() == gold.lower() else "wrong"
        _say(f"  [{', '.join(Path(f).name for f in files)}] {question}  ->  {pred!r} "
             f"(truth: {gold!r}, {mark})")
        shown.append({"task": t, "images": files, "question": question, "answer": gold, "prediction": pred})

    captioned = caption_sample(ckpt, out, seed=seed) if "video" in tasks else None

    history = state["history"]
    loss_png = plot_loss(history, out / "loss.png")
    wall = time.perf_counter() - t0
    metrics = {"checkpoint": str(ckpt), "steps": state["step"], "final_loss": history[-1]["loss"],
               "tasks": rows, "casa": seen["tasks"], "blind": blind["tasks"], "prior": prior["tasks"],
               "examples": shown, "captioned": captioned, "wall_seconds": wall, "train_seconds": train_seconds,
               "threads": torch.get_num_threads(), "model": model.config.to_dict(),
               "train": state["train_config"]}
    with atomic_file(out / "metrics.json") as f:
        f.write(json.dumps(metrics, indent=2))
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("casa", "blind", "prior", "gain")}
    _say("\n" + summary_table(rows))
    _say(f"{'mean':<10} {'':<7} {mean['casa']:>6.2f} {mean['blind']:>6.2f} {mean['prior']:>6.2f} "
         f"{mean['gain']:>+6.2f}")
    _say("\nCASA: the trained model; blind: same model, images withheld; prior: most frequent training "
         "answer to the question.")
    _say(f"run directory: {out}  (checkpoint {ckpt.name}, metrics.json"
         f"{', loss.png' if loss_png else ''}, examples/{', sample.mp4, sample.srt' if captioned else ''})  "
         f"wall time {wall:.0f} s")
    sys.stdout.flush()
    return metrics
