"""Stage 1 of `casa study`: one arm (variant x regime x matching) of one seed, trained and evaluated.

An *arm* is a variant trained one way: `regime` "frozen" (the LM is frozen
except its fusion layers; the projector and the encoder's last block train)
or "full" (everything trains), and `matching` "samples" (the same packs of
samples as every other arm, for the same number of steps) or "flops" (fewer
steps, as many as the reference arm's training FLOPs buy: the compute-matched
view of insertion).

Design decisions:
- The model is built from the seed's stage-0 checkpoints (`stage0.init_stage1`)
  and trained by the library's own `Trainer` (`casa train`'s step, freeze
  policy, optimizer groups and schedule), one step at a time, so the study
  measures the code users run.
- Packs are sample-matched (`insertion_counts_images=False`): step k of every
  arm of a seed trains on the same samples; insertion's rows are longer, and
  the arm records what that costs (sequence tokens, measured FLOPs per step).
- FLOPs per step are counted by `torch.utils.flop_counter` on step 1, whose
  pack is the same for every arm of a seed (forward + backward; the optimizer
  is not counted), so the ratio between two arms compares like with like.
- Fine-grained tasks are scored per difficulty level (`Difficulty.level`
  1..3, the same number of questions each); the task's score is their mean.
- Learning curves: a small evaluation (seen images only) at a few steps.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from casa.config import ModelConfig
from casa.data.packing import sequence_tokens
from casa.data.tasks import FINE_GRAINED, LEVELS
from casa.eval.synthetic import answers, eval_samples, evaluate
from casa.pretrained.directory import save_pretrained
from casa.pretrained.tokenizer import ByteTokenizer
from casa.study.stage0 import init_stage1, training_mix

__all__ = ["Arm", "REGIMES", "evaluate_tasks", "prior_scores", "train_arm"]

REGIMES = {"frozen": {"freeze_lm": True, "vision_trainable_blocks": 1},
           "full": {"freeze_lm": False, "vision_trainable_blocks": -1}}


@dataclass(frozen=True)
class Arm:
    name: str  # "casa", "casa@full", "insertion@flops"
    variant: str  # study variant name (`casa.study.run.VARIANTS`)
    regime: str = "frozen"
    matching: str = "samples"

    @staticmethod
    def of(name: str, primary_regime: str = "frozen") -> "Arm":
        variant, _, tag = name.partition("@")
        regime = tag if tag in REGIMES else primary_regime
        return Arm(name, variant, regime, "flops" if tag == "flops" else "samples")


def _max_answer_tokens(processor, samples) -> int:
    return max(len(processor.tok.encode(a)) for s in samples for a in answers(s)) + 2


def evaluate_tasks(model, processor, tasks, n: int, *, seed: int, difficulty: dict, blind: bool = True) -> dict:
    """Per task `{metric, score, blind, n}`; fine-grained tasks also `levels: {L: {score, blind, n}}`,
    with `n // len(LEVELS)` questions per level (at least 4) and the task's score the mean over levels."""
    out = {}
    for t in tasks:
        levels = LEVELS if t in FINE_GRAINED else (None,)
        per = {}
        for level in levels:
            d = difficulty if level is None else {**difficulty, "level": level}
            k = n if level is None else max(4, n // len(LEVELS))
            samples = eval_samples([t], k, seed=seed, difficulty=d)
            longest = _max_answer_tokens(processor, samples)
            seen = evaluate(model, processor, samples, max_new_tokens=longest)["tasks"][t]
            row = {"metric": seen["metric"], "score": seen["score"], "n": seen["n"]}
            if blind:
                row["blind"] = evaluate(model, processor, samples, blind=True, max_new_tokens=longest)["tasks"][t]["score"]
            per[level] = row
        if levels == (None,):
            out[t] = per[None]
        else:
            mean = {k: sum(r[k] for r in per.values()) / len(per) for k in ("score", "blind") if k in per[1]}
            out[t] = {"metric": per[1]["metric"], **mean, "n": sum(r["n"] for r in per.values()),
                      "levels": {str(level): {k: v for k, v in r.items() if k != "metric"} for level, r in per.items()}}
    return out


def prior_scores(tasks: list[str], spec: dict, seed: int = 0) -> tuple[dict, dict]:
    """Scores of the most-frequent-answer baseline ("prior": the commonest training answer to each question),
    on the questions `evaluate_tasks` asks: per task, and per level of the fine-grained tasks."""
    from casa.config import VisionConfig
    from casa.data import Processor, SyntheticSource
    from casa.data.tasks import difficulty as make_difficulty
    from casa.eval.synthetic import prior_answers

    processor = Processor(ByteTokenizer(), VisionConfig(**spec["model"]["vision"]))
    src = SyntheticSource(tasks, seed=seed, difficulty=make_difficulty(spec["difficulty"]))
    prior = prior_answers(src[i] for i in range(spec.get("prior_n", 150) * len(tasks)))

    def score(task, difficulty, n):
        samples = eval_samples([task], n, seed=seed, difficulty=difficulty)
        return evaluate(None, processor, samples, prior=prior)["tasks"][task]["score"]

    levels = {t: {str(L): score(t, {**spec["difficulty"], "level": L}, max(4, spec["eval_n"] // len(LEVELS)))
                  for L in LEVELS} for t in tasks if t in FINE_GRAINED}
    per_task = {t: (sum(levels[t].values()) / len(LEVELS) if t in levels else score(t, spec["difficulty"],
                                                                                        spec["eval_n"]))
                for t in tasks}
    return per_task, levels


def train_arm(arm: Arm, seed: int, spec: dict, tasks: list[str], fusion: dict, stage0_dir, work_dir: Path, *,
              steps: int | None = None) -> dict:
    """Train `arm` for `steps` (default: the spec's) from stage 0 and evaluate it.

    Returns the run record of `casa.study.report` (scores, levels, curve, cost); the model is
    returned too under `"model"` / `"processor"` for the caller's gating measurement.
    """
    from casa.training.trainer import Trainer, load_config

    steps = steps or spec["train"]["steps"]
    work = Path(work_dir) / f"{arm.name}_s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    model_cfg = ModelConfig.from_dict({**spec["model"], "fusion": fusion})
    save_pretrained(init_stage1(model_cfg, stage0_dir), work / "init", tokenizer=ByteTokenizer())
    train = {**spec["train"], "steps": steps,
             "data": ",".join(training_mix(tasks, spec.get("mix"))), "difficulty": spec["difficulty"],
             "seed": seed, "init": str(work / "init"), "out_dir": str(work / "train"), "log_every": 10**9,
             "save_every": 0, "precision": "fp32", "insertion_counts_images": False, **REGIMES[arm.regime]}
    model_cfg, cfg = load_config(base={"model": model_cfg.to_dict(), "train": train})
    torch.manual_seed(seed)
    trainer = Trainer(model_cfg, cfg, quiet=True)
    model, processor = trainer.raw, trainer.processor
    splice = model_cfg.fusion.variant == "insertion"
    curve_at = sorted({max(1, round(steps * f)) for f in spec["curve"]} | {steps})
    packs = trainer.packer.packs(0)
    samples = seq_tokens = 0
    flops, losses, curve = None, [], []
    t0 = time.perf_counter()
    train_seconds = 0.0
    for step in range(1, steps + 1):
        pack = next(packs)
        samples += len(pack.docs)
        seq_tokens += sum(sequence_tokens(d, processor.tokens_per_image, splice_images=splice,
                                          memory_tokens=model_cfg.fusion.frame_memory) for d in pack.docs)
        if step == 1:
            with FlopCounterMode(display=False) as counter:
                losses.append(trainer.train_step([pack]))
            flops = counter.get_total_flops()
        else:
            losses.append(trainer.train_step([pack]))
        if step in curve_at and step != steps:
            train_seconds += time.perf_counter() - t0
            scores = evaluate_tasks(model, processor, tasks, spec["curve_n"], seed=seed,
                                    difficulty=spec["difficulty"], blind=False)
            curve.append({"step": step, "tasks": {t: r["score"] for t, r in scores.items()}})
            t0 = time.perf_counter()
    train_seconds += time.perf_counter() - t0
    result = evaluate_tasks(model, processor, tasks, spec["eval_n"], seed=seed, difficulty=spec["difficulty"])
    curve.append({"step": steps, "tasks": {t: r["score"] for t, r in result.items()}})
    shutil.rmtree(work, ignore_errors=True)  # the study keeps numbers, not checkpoints
    k = max(1, len(losses) // 10)
    return {"arm": arm.name, "variant": arm.variant, "regime": arm.regime, "matching": arm.matching, "seed": seed,
            "fusion": fusion, "steps": steps, "lr": {k: train[k] for k in ("lr_new", "lr_pretrained")},
            "samples": samples, "sequence_tokens": seq_tokens,
            "flops_per_step": flops, "train_seconds": train_seconds, "final_loss": sum(losses[-k:]) / k,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "tasks": {t: {k: v for k, v in r.items() if k != "levels"} for t, r in result.items()},
            "levels": {t: r["levels"] for t, r in result.items() if "levels" in r},
            "curve": curve, "model": model, "processor": processor}
