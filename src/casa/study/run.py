"""`casa study`: the paper's comparison of fusion variants, at small scale, with its protocol.

The protocol (third edition):
- **Stage 0** (`stage0.py`, cached on disk): a text LM pretrained on the
  suite's conversations with images replaced by their captions, and a vision
  encoder pretrained to caption the suite's images: the pretrained parts the
  paper starts from. The full size trains them once and every seed starts
  from them (`stage0_seeds`), as the paper's variants all start from one
  pretrained LM: the seeds vary stage 1 (initialisation of the new layers,
  data order, evaluation questions).
- **Stage 1** (`stage1.py`): every variant is built from them (fusion layers
  copied from the block's self-attention, `init_from_sa`) and trained on the
  same packs of *samples* (insertion's rows are longer; its cost is logged).
  Two regimes: LM frozen (the primary one: fusion layers, projector and the
  encoder's last block train) for every variant, and full fine-tuning for
  `FULL_ARMS`, at the same learning rates (a larger one for the frozen
  regime was measured and dropped: see docs/study_protocol.md).
  `insertion@flops` is insertion trained for as many steps as casa's
  training FLOPs buy: the compute-matched view, labelled as such.
- Every arm is evaluated on every task, with its images and blind; the
  fine-grained ladder (`digits`, `bars`, `table`) per difficulty level.
  Learning curves come from small evaluations during training.
- The experiments: image-token compression on the frozen casa and insertion
  arms (`compression.py`), fusion frequency as arms of their own
  (`frequency.py`), the gate per token on casa (`gate_tokens.py`), and cross-image
  reasoning with its own stage 0 and arms (`crossimage.py`).
Then training speed/memory (`bench/train.py`) and streaming (`bench/stream.py`)
per variant, and CASA's implicit gate (`gating.py`). `report.py` turns the
numbers into `report.md`, plots and a verdict per claim of the paper, with
intervals over seeds and paired differences (`stats.py`).

Design decisions:
- Sizes: `quick` (tiny model, one seed, a handful of steps: CI, about 25 s
  on 2 cores, exercising both stages, both regimes and every experiment) and
  `full` (3 seeds, 5 for the `HEADLINE_ARMS`, 100 questions a task, 900
  steps per arm: about 150 core-minutes, of which 8 are stage 0, 130 the
  arms at one thread and 20 the cross-image experiment);
  `--device cuda` scales the model, the data and the steps (`SIZES["gpu"]`).
  `--seeds` / `--steps` override.
- `--jobs N`: the run is a set of units (a stage 0, an arm of a seed, a
  cross-image arm) with dependencies, run on N worker processes, each on its
  share of `--threads` (`schedule.py`: the longest ready unit first). A model
  this small gains little from a second thread: three stage-0 text LMs took
  305-355 s side by side on 2 cores against 165 s each one after another at
  2 threads. Workers end with the parent (`casa.workers`): a `kill` of
  `casa study` stops them.
- `casa_replace` puts its fusion layer in every other block: replacing
  self-attention in every block would leave no text-only attention at all,
  which is not the paper's CASA-replace (some blocks replaced).
- Baselines: "blind" is each trained model with its images withheld;
  "prior" is the most frequent training answer to the question.
- Each (arm, seed) result is written to `DIR/runs/ARM_sSEED.json` as it is
  done, atomically; a rerun reuses them and the stage-0 checkpoints (delete a
  file to redo it).
- Benchmarks run in-process for `quick` and in a fresh process per variant
  for `full`, so that one variant's memory cannot hide another's peak.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from casa.bench.stream import StreamBench
from casa.files import atomic_file
from casa.study.schedule import Unit, run_units
from casa.threads import set_threads
from casa.workers import process_pool

__all__ = ["CATEGORIES", "DIFFICULTY", "FULL_ARMS", "HEADLINE_ARMS", "MIX", "SIZES", "TASKS", "VARIANTS", "StudyConfig",
           "StudyStream", "arms_of", "benchmarks", "command_line", "run", "seed_arms"]

TASKS = ("color", "count", "position", "digits", "bars", "table", "compare", "motion")
CATEGORIES = {"coarse": ("color", "count", "position"), "fine-grained": ("digits", "bars", "table"),
              "multi-image": ("compare", "motion")}
# study name -> FusionConfig fields
VARIANTS = {
    "insertion": {"variant": "insertion"},
    "ca": {"variant": "ca"},
    "ca_shared": {"variant": "ca_shared"},
    "casa": {"variant": "casa", "placement": "parallel"},
    "casa_before": {"variant": "casa", "placement": "before"},
    "casa_replace": {"variant": "casa", "placement": "replace", "every": 2},
    # how often fusion layers occur (frequency.py): parallel every 2 / 4 blocks, replace every 4
    "casa_every2": {"variant": "casa", "placement": "parallel", "every": 2},
    "casa_every4": {"variant": "casa", "placement": "parallel", "every": 4},
    "casa_replace_every4": {"variant": "casa", "placement": "replace", "every": 4},
    "casa_shared": {"variant": "casa_shared"},
    "ca_ffn": {"variant": "ca_ffn"},
    "gated_ca": {"variant": "gated_ca"},
}
# CASA without its text keys (`text_keys=False`, the paper's ablation) computes exactly what `ca` computes
# (tests/test_model.py::test_casa_without_text_keys_is_ca), so it is no arm of its own: the text-keys
# claim is casa against ca.
FULL_ARMS = ("insertion@full", "ca@full", "casa@full")  # the full fine-tuning regime
# the arms the headline claims compare: they may run more seeds than the others (`seed_arms`)
HEADLINE_ARMS = ("insertion", "ca", "casa", *FULL_ARMS, "insertion@flops")
# training draws each fine-grained task twice as often as the others: the coarse ones are
# learnt in a fraction of stage 1, the fine-grained ones are still improving at its end
MIX = {"digits": 2, "bars": 2, "table": 2}
DIFFICULTY = {"colors": 4, "max_shapes": 3, "relative": False, "frames": 3, "font_size": 16}

_QUICK_MODEL = {"lm": {"vocab_size": 264, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176},
                "vision": {"image_size": 32, "patch_size": 8, "d_model": 48, "n_layers": 1, "n_heads": 4, "d_ff": 96}}
_QUICK_TRAIN = {"steps": 16, "text_tokens": 192, "image_tokens": 2048, "lr_new": 1e-3, "lr_pretrained": 3e-4,
                "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.01, "grad_clip": 1.0}
# The cross-image experiment (crossimage.py) trains its own arms from its own stage 0, on clips of 4 frames:
# the quick model (16 image tokens a frame, so frame memory k=16 keeps every token), a text LM pretrained
# longer (the cross-frame questions are reasoning over captions, which 2,000 steps did not teach it) and
# 2,000 steps of stage 1, as its first look measured (about 12 core-minutes a seed for the six arms); one
# stage 0 and three seeds (one seed ranked the frame memories in the opposite order of the first look's).
_CROSSIMAGE = {"model": _QUICK_MODEL, "difficulty": {**DIFFICULTY, "image_size": 32},
               "stage0": {"lm_steps": 6000, "lm_tokens": 512, "lm_lr": 2e-3, "vision_steps": 600, "vision_batch": 32,
                          "vision_lr": 3e-3},
               "train": {**_QUICK_TRAIN, "steps": 2000, "text_tokens": 768, "image_tokens": 8192, "lr_new": 2e-3,
                         "lr_pretrained": 5e-4, "warmup_steps": 20},
               "tasks": ["color", "match", "recall", "motion"], "stage0_seeds": 1, "seeds": 3, "eval_n": 150,
               "prior_n": 100,
               "curve": [], "curve_n": 3,
               "arms": ["insertion", "ca", "casa", "casa+m1", "casa+m4", "casa+m16"]}
_FULL_MODEL = {"lm": {"vocab_size": 264, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 352},
               "vision": {"image_size": 48, "patch_size": 8, "d_model": 96, "n_layers": 2, "n_heads": 4,
                          "d_ff": 192}}
SIZES = {
    "quick": {
        "model": _QUICK_MODEL,
        "stage0": {"lm_steps": 20, "lm_tokens": 256, "lm_lr": 2e-3, "vision_steps": 20, "vision_batch": 16,
                   "vision_lr": 2e-3},
        "train": _QUICK_TRAIN,
        "difficulty": {**DIFFICULTY, "image_size": 32},
        "seeds": 1, "eval_n": 6, "curve_n": 3, "curve": [0.5], "gating_n": 4,
        "variants": ["insertion", "ca", "casa", "casa_every2"], "full_arms": ["casa@full", "insertion@full"],
        "bench_train": {"text_tokens": 128, "image_ratio": 4, "tokens_per_image": 16, "repeats": 1},
        "stream": {"turns": 10, "image_tokens": 16, "new_tokens": 4, "prompt_tokens": 2},
        "compression": {"n": 4, "factors": [1, 2, 4], "latency_prompts": 2, "repeats": 1},
        "crossimage": {**_CROSSIMAGE, "stage0": {**_CROSSIMAGE["stage0"], "lm_steps": 20, "vision_steps": 20,
                                                 "vision_batch": 16},
                       "train": {**_CROSSIMAGE["train"], "steps": 8, "text_tokens": 192, "image_tokens": 2048},
                       "tasks": ["match", "recall"], "seeds": 1, "eval_n": 4, "prior_n": 20,
                       "arms": ["insertion", "casa", "casa+m4"]},
        "isolate": False, "device": "cpu",
    },
    "full": {
        "model": _FULL_MODEL,
        "stage0": {"lm_steps": 2000, "lm_tokens": 512, "lm_lr": 2e-3, "vision_steps": 1500, "vision_batch": 64,
                   "vision_lr": 3e-3},
        "mix": MIX,
        "train": {"steps": 900, "text_tokens": 384, "image_tokens": 4096, "lr_new": 2e-3, "lr_pretrained": 5e-4,
                  "warmup_steps": 20, "min_lr_ratio": 0.05, "weight_decay": 0.01, "grad_clip": 1.0},
        "difficulty": {**DIFFICULTY, "image_size": 48},
        # 100 questions a task: a seed's category mean (3 tasks) has a binomial standard error <= 2.9 points
        # one stage 0 shared by every seed: the seeds vary stage 1 (initialisation, data order, evaluation set)
        "stage0_seeds": 1, "seeds": 3, "headline_seeds": 5, "eval_n": 100, "curve_n": 9, "curve": [0.25, 0.5, 0.75], "gating_n": 12,
        "variants": list(VARIANTS), "full_arms": list(FULL_ARMS),
        "bench_train": {"text_tokens": 384, "image_ratio": 10, "tokens_per_image": 64, "repeats": 3},
        "stream": {"turns": 64, "image_tokens": 64, "new_tokens": 8, "prompt_tokens": 4},
        # 36 image tokens (a 6 x 6 grid): 9x pools 3 x 3 blocks (8x has no block shape on it)
        "compression": {"n": 20, "factors": [1, 2, 4, 9], "latency_prompts": 8, "repeats": 3},
        "crossimage": _CROSSIMAGE,
        "isolate": True, "device": "cpu",
    },
}
# a GPU scales the model, the packs and the steps (`casa study --device cuda`)
SIZES["gpu"] = {**SIZES["full"], "device": "cuda",
                "model": {"lm": {**_FULL_MODEL["lm"], "d_model": 256, "n_layers": 6, "d_ff": 704},
                          "vision": {**_FULL_MODEL["vision"], "image_size": 64, "d_model": 192, "n_layers": 4,
                                     "d_ff": 384}},
                "stage0": {**SIZES["full"]["stage0"], "lm_steps": 4000, "vision_steps": 1500},
                "train": {**SIZES["full"]["train"], "steps": 1500, "text_tokens": 1024, "image_tokens": 16384},
                "difficulty": {**DIFFICULTY, "image_size": 64},
                "compression": {"n": 60, "factors": [1, 2, 4, 8], "latency_prompts": 8, "repeats": 3}}


def arms_of(variants: list[str], full_arms: list[str]) -> list[str]:
    """The arms of a run, in training order: the primary (frozen) arm of each variant, the full
    fine-tuning arms, then `insertion@flops` (which needs casa's and insertion's FLOPs per step)."""
    arms = list(variants) + [a for a in full_arms if a.split("@")[0] in variants]
    if "insertion" in variants and "casa" in variants:
        arms.append("insertion@flops")
    return arms


@dataclass
class StudyConfig:
    """What `casa study` runs: size, seeds, steps, threads, variants, tasks, device, where to write."""

    out: str = "runs/study"
    size: str = "full"
    seeds: int | None = None
    steps: int | None = None
    threads: int | None = None
    docs: str | None = None  # also write docs/study.md + docs/study_*.png here
    variants: list[str] | None = None  # default: the size's
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    device: str = "cpu"
    jobs: int = 1  # seeds trained side by side, in that many processes sharing the threads

    def __post_init__(self):
        if self.size not in ("quick", "full"):
            raise ValueError(f"study size {self.size!r}: expected 'quick' or 'full'")
        bad = [v for v in self.variants or () if v not in VARIANTS]
        if bad:
            raise ValueError(f"--variants: unknown {bad}; expected names from {list(VARIANTS)}")
        if (self.seeds is not None and self.seeds < 1) or (self.steps is not None and self.steps < 1):
            raise ValueError("--seeds and --steps must be >= 1")
        if self.jobs < 1:
            raise ValueError(f"--jobs {self.jobs}: must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: expected cpu or cuda")

    @property
    def spec(self) -> dict:
        key = "gpu" if self.device == "cuda" and self.size == "full" else self.size
        s = json.loads(json.dumps(SIZES[key]))
        s["device"] = self.device
        if self.seeds is not None:  # every arm that many seeds
            s["seeds"] = self.seeds
            s.pop("headline_seeds", None)
        if self.steps is not None:
            s["train"]["steps"] = self.steps
        if self.variants is not None:
            s["variants"] = list(self.variants)
        return s


def _say(text: str = "") -> None:
    print(text, flush=True)


def _gating(model, processor, spec: dict, tasks: list[str], seed: int) -> tuple[dict, dict]:
    """(attention shares per task and layer for variants with text keys, gate values for gated_ca)."""
    from casa.data import SyntheticSource, pack_row
    from casa.data.tasks import difficulty as make_difficulty
    from casa.study.gating import attention_shares, gate_values

    gating = {}
    if model.config.fusion.uses_text_keys:
        src = SyntheticSource(tasks, seed=seed + 2000, difficulty=make_difficulty(spec["difficulty"]))
        for j, t in enumerate(tasks):
            docs = [processor.pixels(processor.encode(src[i * len(tasks) + j])) for i in range(spec["gating_n"])]
            shares = attention_shares(model, pack_row(docs))
            gating[t] = {str(k): v for k, v in sorted(shares.items())}
    return gating, {str(k): v for k, v in gate_values(model).items()}


def _single_image(tasks: list[str]) -> list[str]:
    return [t for t in tasks if t in CATEGORIES["coarse"] + CATEGORIES["fine-grained"]]


def _compression(model, processor, spec: dict, tasks: list[str], seed: int) -> dict:
    """Accuracy, cache bytes and latency of a trained arm with its image tokens compressed (compression.py)."""
    from casa.eval.synthetic import eval_samples
    from casa.study.compression import evaluate_compression

    c = spec["compression"]
    samples = eval_samples(_single_image(tasks), c["n"], seed=seed, difficulty=spec["difficulty"])
    return evaluate_compression(model, processor, samples, factors=c["factors"], latency_prompts=c["latency_prompts"],
                                repeats=c["repeats"])


def _gate_tokens(model, processor, spec: dict, tasks: list[str], seed: int, heatmaps: Path | None) -> dict:
    """The gate per token (gating.py's `summarise`); with `heatmaps`, the first sample of each task drawn there
    (the records hold the images, which results.json cannot)."""
    from casa.data import SyntheticSource
    from casa.data.tasks import difficulty as make_difficulty
    from casa.study.gate_tokens import plot_gate_heatmaps, sample_gates, summarise

    single = _single_image(tasks)
    src = SyntheticSource(single, seed=seed + 2000, difficulty=make_difficulty(spec["difficulty"]))
    records = sample_gates(model, processor, [src[i] for i in range(spec["gating_n"] * len(single))])
    if heatmaps is not None:
        plot_gate_heatmaps([next(r for r in records if r["task"] == t) for t in single], heatmaps)
    return summarise(records)


# -------------------------------------------------------------- benchmarks
def _bench_train_one(cfg: dict, name: str) -> dict:
    """`bench.train.measure` for a study variant (placement / text keys included)."""
    from casa.bench import train as bt

    r = bt.measure(cfg, VARIANTS[name]["variant"], device="cpu", fusion={"every": 1, **VARIANTS[name]})
    r["variant"] = name
    if VARIANTS[name]["variant"] == "insertion":
        r["sequence_tokens"] = cfg["text_tokens"] + cfg["image_tokens"]
    return r


@dataclass
class StudyStream(StreamBench):
    """StreamBench whose model carries a study variant's full fusion config."""

    fusion: dict = field(default_factory=dict)

    def model_config(self, variant: str):
        from casa.config import FusionConfig

        mc = super().model_config(variant)
        mc.fusion = FusionConfig(**{"variant": variant, **self.fusion})
        return mc


def _stream_one(cfg: dict, name: str) -> dict:
    from casa.bench.stream import run_variant, summarize

    sb = StudyStream(**{**cfg, "variants": [VARIANTS[name]["variant"]], "fusion": VARIANTS[name]})
    turns: list[dict] = []
    state = run_variant(sb, VARIANTS[name]["variant"], turns.append)
    return {"variant": name, "summary": summarize(sb, turns, state),
            "ttft_ms": [t["ttft_ms"] for t in turns], "peak_mem_bytes": [t["peak_mem_bytes"] for t in turns],
            "kv_tokens": [t["kv_tokens"] for t in turns]}


def _call(fn, args, isolate: bool):
    if not isolate:
        return fn(*args)
    with process_pool(1) as pool:
        return pool.submit(fn, *args).result()


def benchmarks(spec: dict, variants: list[str], threads: int) -> dict:
    """Training tokens/s + peak memory and streaming figures, per variant."""
    from casa.bench.train import bench_config

    m = spec["model"]["lm"]
    bcfg = bench_config(d_model=m["d_model"], n_layers=m["n_layers"], threads=threads, **spec["bench_train"])
    scfg = {**spec["stream"], "d_model": m["d_model"], "layers": m["n_layers"], "heads": m["n_heads"],
            "kv_heads": m["n_kv_heads"], "d_ff": m["d_ff"], "threads": threads, "max_seconds": 120.0}
    train, stream = {}, {}
    for name in variants:
        train[name] = _call(_bench_train_one, (bcfg, name), spec["isolate"])
        stream[name] = _call(_stream_one, (scfg, name), spec["isolate"])
        t, s = train[name], stream[name]["summary"]
        mem = t["peak_mem_bytes"] / 2**20 if t["peak_mem_bytes"] is not None else float("nan")
        _say(f"  bench {name:<18} train {t['text_tok_s']:>8,.0f} text tok/s, peak {mem:>7.1f} MiB | stream "
             f"ttft {s['first_10pct']['ttft_ms']:.1f} -> {s['last_10pct']['ttft_ms']:.1f} ms over {s['turns']} turns")
    return {"train_config": bcfg, "stream_config": scfg, "train": train, "stream": stream}


# -------------------------------------------------------------------- run
def command_line(cfg: StudyConfig) -> str:
    """The `casa study` command that reproduces `cfg`."""
    parts = ["casa study", f"--out {cfg.out}"] + (["--quick"] if cfg.size == "quick" else [])
    parts += [f"--{k} {getattr(cfg, k)}" for k in ("seeds", "steps", "threads", "docs") if getattr(cfg, k)]
    parts += [f"--jobs {cfg.jobs}"] if cfg.jobs > 1 else []
    if cfg.device != "cpu":
        parts.append(f"--device {cfg.device}")
    if cfg.variants is not None:
        parts.append(f"--variants {','.join(cfg.variants)}")
    return " ".join(parts)


def stage0_seed(spec: dict, seed: int) -> int:
    """The stage-0 seed that arm seed `seed` starts from: `spec["stage0_seeds"]` of them are trained
    (the full size: one, shared by every seed), one per seed without it."""
    n = spec.get("stage0_seeds")
    return seed % n if n else seed


def _stage0_unit(root: Path, spec: dict, tasks: list[str], seed: int) -> dict:
    """Stage 0 of one stage-0 seed on `tasks` (cached in `root/stage0/sSEED/`): the study's, or the cross-image
    experiment's on its own model and tasks."""
    from casa.config import ModelConfig
    from casa.data.tasks import difficulty as make_difficulty
    from casa.study.stage0 import pretrain, training_mix

    base = ModelConfig.from_dict({**spec["model"], "fusion": {"variant": "casa"}})
    return pretrain(root / "stage0", base, training_mix(tasks, spec.get("mix")), make_difficulty(spec["difficulty"]),
                    spec["stage0"], seed, say=_say)


def _stage0_units(key: str, root: Path, spec: dict, tasks: list[str], seeds, cost: float) -> list[Unit]:
    """The stage-0 units `seeds` need (`stage0_seed`), less those on disk; keyed `KEYsSEED`."""
    return [Unit(f"{key}s{s}", _stage0_unit, (root, spec, tasks, s), cost=cost)
            for s in sorted({stage0_seed(spec, seed) for seed in seeds})
            if not (root / "stage0" / f"s{s}" / "stats.json").is_file()]


def _arm_unit(name: str, seed: int, spec: dict, tasks: list[str], out: Path) -> dict:
    """One arm of one seed from its stage 0, with the measurements its kind of arm gets; the record is written
    to `out/runs/NAME_sSEED.json` as it is done. `insertion@flops` reads casa's and insertion's records."""
    from casa.study.stage1 import Arm, train_arm

    arm = Arm.of(name)
    steps = None
    if arm.matching == "flops":  # as many steps as casa's FLOPs buy insertion
        casa, insertion = (json.loads((out / "runs" / f"{v}_s{seed}.json").read_text()) for v in ("casa", "insertion"))
        steps = max(1, round(spec["train"]["steps"] * casa["flops_per_step"] / insertion["flops_per_step"]))
    r = train_arm(arm, seed, spec, tasks, VARIANTS[arm.variant], out / "stage0" / f"s{stage0_seed(spec, seed)}",
                  out / "work", steps=steps)
    model, processor = r.pop("model"), r.pop("processor")
    r["gating"], r["gates"] = ({}, {}) if arm.regime == "full" else _gating(model, processor, spec, tasks, seed)
    if arm.regime == "frozen" and arm.matching == "samples" and arm.variant in ("casa", "insertion"):
        r["compression"] = _compression(model, processor, spec, tasks, seed)
        if arm.variant == "casa":
            r["gate_tokens"] = _gate_tokens(model, processor, spec, tasks, seed,
                                            out / "study_gate_heatmaps.png" if seed == 0 else None)
    del model
    with atomic_file(out / "runs" / f"{name}_s{seed}.json") as f:
        f.write(json.dumps(r, indent=1))
    mean = sum(v["score"] for v in r["tasks"].values()) / len(r["tasks"])
    blind = sum(v["blind"] for v in r["tasks"].values()) / len(r["tasks"])
    fine = [r["tasks"][t]["score"] for t in CATEGORIES["fine-grained"] if t in r["tasks"]]
    _say(f"  seed {seed} {name:<18} mean {mean:.3f} (blind {blind:.3f}), fine-grained "
         f"{sum(fine) / max(1, len(fine)):.3f}, loss {r['final_loss']:.3f}, {r['steps']} steps, "
         f"{r['train_seconds']:.0f} s")
    return r


def _arm_cost(name: str) -> float:
    """Expected core-minutes of an arm at the full size (1 thread): the schedule starts the longest first."""
    arm = name.partition("@")
    return 2.9 if arm[2] == "full" else 2.2 if arm[0] == "insertion" else 1.6


def crossimage_arms(spec: dict, variants: list[str]) -> list[str]:
    """The cross-image arms a run trains: the size's, less those whose base variant the run leaves out."""
    from casa.study.crossimage import ARMS

    if "crossimage" not in spec or not {"casa", "insertion"} <= set(variants):
        return []
    return [n for n in spec["crossimage"]["arms"] if ARMS[n]["variant"] in variants]


def plan_units(spec: dict, tasks: list[str], arms: list[str], out: Path) -> list[Unit]:
    """The run's units (`schedule.Unit`): the stage-0 seeds, every (arm, seed) of `seed_arms`, and the
    cross-image experiment's stage 0 and arms; what is on disk already is left out (reused)."""
    from casa.study import crossimage

    plan = seed_arms(spec, arms)
    units = _stage0_units("stage0/", out, spec, tasks, [seed for seed, _ in plan], cost=8.0)
    planned = {u.key for u in units}
    for seed, names in plan:
        s0 = f"stage0/s{stage0_seed(spec, seed)}"
        for name in names:
            if (out / "runs" / f"{name}_s{seed}.json").is_file():
                continue
            after = (s0,) if s0 in planned else ()
            if name == "insertion@flops":
                after += tuple(f"{v}_s{seed}" for v in ("casa", "insertion")
                               if not (out / "runs" / f"{v}_s{seed}.json").is_file())
            units.append(Unit(f"{name}_s{seed}", _arm_unit, (name, seed, spec, tasks, out), after, _arm_cost(name)))
    xnames = crossimage_arms(spec, [a for a in arms if "@" not in a])
    if xnames:
        x, xout = crossimage.prepare(spec["crossimage"]), out / "crossimage"
        units += _stage0_units("crossimage/stage0/", xout, x, x["tasks"], range(x["seeds"]), cost=2.0)
        planned = {u.key for u in units}
        for seed in range(x["seeds"]):
            s0 = f"crossimage/stage0/s{stage0_seed(x, seed)}"
            units += [Unit(f"crossimage/{n}_s{seed}", _crossimage_arm_unit, (n, seed, x, xout),
                           (s0,) if s0 in planned else (), cost=3.0)
                      for n in xnames if not (xout / "runs" / f"{n}_s{seed}.json").is_file()]
    return units


def _crossimage_arm_unit(name: str, seed: int, spec: dict, out: Path) -> dict:
    """One cross-image arm of one seed, from that seed's cross-image stage 0."""
    from casa.study.crossimage import train_one

    return train_one(name, seed, spec, tuple(spec["tasks"]), out, stage0=out / "stage0" / f"s{stage0_seed(spec, seed)}",
                     steps=spec["train"]["steps"], say=_say)


def _crossimage_results(spec: dict, names: list[str], out: Path) -> dict:
    """The cross-image experiment's results (`crossimage.collect`) from its arms' records in `out/crossimage`."""
    from casa.study.crossimage import collect, prepare

    x, xout = prepare(spec["crossimage"]), out / "crossimage"
    seeds = list(range(x["seeds"]))
    runs = [json.loads((xout / "runs" / f"{n}_s{seed}.json").read_text()) for seed in seeds for n in names]
    # no files of its own: the study's report holds its section and plot
    return collect(runs, x, tuple(x["tasks"]), names=names, seeds=seeds,
                   stage0_dirs=[xout / "stage0" / f"s{stage0_seed(x, seed)}" for seed in seeds])


def seed_arms(spec: dict, arms: list[str]) -> list[tuple[int, list[str]]]:
    """`(seed, its arms)` of a run: every arm for the first `seeds` seeds, then the `HEADLINE_ARMS` alone up to
    `headline_seeds` (the claims' comparisons get the power; the other arms' seeds cost as much each)."""
    extra = spec.get("headline_seeds") or 0
    return [(s, list(arms) if s < spec["seeds"] else [a for a in arms if a in HEADLINE_ARMS])
            for s in range(max(spec["seeds"], extra))]


def _stage0_seeds(spec: dict, plan: list[tuple[int, list[str]]]) -> list[int]:
    return sorted({stage0_seed(spec, seed) for seed, _ in plan})  # the seeds whose stage 0 a plan reads


def _reused(out: Path, spec: dict, plan: list[tuple[int, list[str]]], crossimage: list[str]) -> dict:
    """What a rerun in `out` will take from disk instead of computing (reported beside the wall time)."""
    xseeds = range(spec["crossimage"]["seeds"]) if crossimage else ()
    return {"stage0_seeds": [s for s in _stage0_seeds(spec, plan) if (out / "stage0" / f"s{s}" / "stats.json").is_file()],
            "arm_runs": [f"{a}_s{s}" for s, arms in plan for a in arms
                         if (out / "runs" / f"{a}_s{s}.json").is_file()],
            "crossimage_runs": [f"{a}_s{s}" for s in xseeds for a in crossimage
                                if (out / "crossimage" / "runs" / f"{a}_s{s}.json").is_file()]}


def saved_summary(cfg: StudyConfig) -> str:
    """What an interrupted study leaves in `cfg.out` for a rerun of the same command to reuse."""
    out, spec = Path(cfg.out), cfg.spec
    plan = seed_arms(spec, arms_of(spec["variants"], spec["full_arms"]))
    xarms = crossimage_arms(spec, spec["variants"])
    done = _reused(out, spec, plan, xarms)
    parts = []
    for seed in _stage0_seeds(spec, plan):
        d = out / "stage0" / f"s{seed}"
        if seed in done["stage0_seeds"]:
            parts.append(f"seed {seed} complete")
        else:
            have = [what for name, what in (("lm", "text LM"), ("vision", "vision encoder"))
                    if (d / f"{name}_stats.json").is_file()]
            parts += [f"seed {seed}: {' and '.join(have)}"] if have else []
    total = sum(len(arms) for _, arms in plan)
    cross = (f"; cross-image arm runs: {len(done['crossimage_runs'])} of {len(xarms) * spec['crossimage']['seeds']}"
             if xarms else "")
    return (f"casa study: saved in {str(out)!r}: stage 0: {', '.join(parts) or 'nothing yet'}; arm runs: "
            f"{len(done['arm_runs'])} of {total}{' (' + ', '.join(done['arm_runs']) + ')' if done['arm_runs'] else ''}"
            f"{cross}; run the same command again to continue from there")


def run(cfg: StudyConfig) -> dict:
    """Stage 0, stage 1 for every arm and seed, baselines, benchmarks; write results.json, report.md and
    plots to `cfg.out` (and docs/ with `cfg.docs`)."""
    from casa.study.report import write_report
    from casa.study.stage0 import STAGE0_SEED_OFFSET
    from casa.study.stage1 import Arm, prior_scores

    t0 = time.perf_counter()
    spec = cfg.spec
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    threads = set_threads(cfg.threads)
    arms = arms_of(spec["variants"], spec["full_arms"])
    plan = seed_arms(spec, arms)
    more = "" if len(plan) == spec["seeds"] else f" (the headline arms x {len(plan)})"
    _say(f"casa study ({cfg.size}, {cfg.device}): {len(arms)} arms x {spec['seeds']} seed(s){more}, "
         f"{spec['train']['steps']} steps each, tasks {', '.join(cfg.tasks)}, {threads} thread(s)")
    xarms = crossimage_arms(spec, spec["variants"])
    reused = _reused(out, spec, plan, xarms)
    for what in reused["stage0_seeds"]:
        _say(f"  stage 0, seed {what}: reuse {out / 'stage0' / f's{what}'}")
    for what in reused["arm_runs"]:
        _say(f"  reuse {out / 'runs' / (what + '.json')}")
    units = plan_units(spec, cfg.tasks, arms, out)
    run_units(units, jobs=max(1, min(cfg.jobs, len(units))), threads=threads)
    runs = [json.loads((out / "runs" / f"{a}_s{seed}.json").read_text()) for seed, names in plan for a in names]
    crossimage = _crossimage_results(spec, xarms, out) if xarms else None
    prior, prior_levels = prior_scores(cfg.tasks, spec)
    _say("benchmarks (training step, streaming session):")
    bench = benchmarks(spec, spec["variants"], threads)
    stage0 = {str(s): json.loads((out / "stage0" / f"s{s}" / "stats.json").read_text())
              for s in _stage0_seeds(spec, plan)}
    results = {
        "command": command_line(cfg),
        "config": {**asdict(cfg), "spec": spec, "threads": threads, "torch": torch.__version__,
                   "cpu_count": os.cpu_count(), "categories": {c: [t for t in ts if t in cfg.tasks]
                                                              for c, ts in CATEGORIES.items()},
                   "levels": [1, 2, 3], "variants_fusion": VARIANTS, "primary_regime": "frozen",
                   "stage0_seed_offset": STAGE0_SEED_OFFSET,
                   "arms": {a: {k: v for k, v in asdict(Arm.of(a)).items() if k != "name"} for a in arms}},
        "stage0": stage0,
        "reused": reused,
        "runs": runs,
        "prior": prior,
        "prior_levels": prior_levels,
        "bench": bench,
        "crossimage": crossimage,
    }
    results["wall_seconds"] = time.perf_counter() - t0
    write_report(results, out, docs=Path(cfg.docs) if cfg.docs else None)
    _say(f"wrote {out / 'results.json'} and {out / 'report.md'} in {results['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":  # python -m casa.study OUT [quick|full]
    run(StudyConfig(out=sys.argv[1], size=sys.argv[2] if len(sys.argv) > 2 else "full"))
