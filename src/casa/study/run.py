"""`casa study`: the paper's comparison of fusion variants, at small scale.

Every variant of docs/design.md §3 (plus the placements of `casa` and the
"casa without text keys" ablation) is trained from scratch on the synthetic
suite with the same model size, data, token budget and seeds, evaluated on
every task next to blind baselines, benchmarked for training speed/memory
(`bench/train.py`) and streaming (`bench/stream.py`), and CASA's implicit
gate is measured (`gating.py`). `report.py` turns the numbers into
`report.md`, plots and a claim-by-claim comparison with the paper (docs/design.md §7).

Design decisions:
- Two sizes: `quick` (tiny model, one seed, a few dozen steps: CI, a few
  minutes on 2 cores) and `full` (the demo's model width on every task, 3
  seeds: about an hour on 2 CPU cores). `--seeds` / `--steps` override.
- Same budget for every variant: packs of `text_tokens` text tokens and
  `image_tokens` image tokens, the same number of steps, the same data
  stream (the seed fixes it) and the same initial LM weights per seed.
- Baselines: "blind" is each trained model with its images withheld;
  "prior" is the most frequent training answer to the question.
- Each (variant, seed) result is written to `DIR/runs/NAME_sSEED.json` as it
  is done, atomically (a crash never leaves a half-written one for a rerun to
  trust); a rerun reuses them (delete the file to redo one).
- Benchmarks run in-process for `quick` and in a fresh process per variant
  for `full`, so that one variant's memory cannot hide another's peak.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from casa.bench.stream import StreamBench
from casa.files import atomic_file
from casa.threads import set_threads

__all__ = ["CATEGORIES", "DIFFICULTY", "SIZES", "TASKS", "VARIANTS", "StudyConfig", "StudyStream", "aggregate",
           "benchmarks", "command_line", "gating_summary", "prior_scores", "run", "train_and_evaluate"]

TASKS = ("color", "count", "position", "compare", "docvqa", "chartqa", "video")
CATEGORIES = {"coarse": ("color", "count", "position"), "fine-grained": ("docvqa", "chartqa"),
              "multi-image": ("compare", "video")}
# study name -> FusionConfig fields
VARIANTS = {
    "insertion": {"variant": "insertion"},
    "ca": {"variant": "ca"},
    "ca_shared": {"variant": "ca_shared"},
    "casa": {"variant": "casa", "placement": "parallel"},
    "casa_before": {"variant": "casa", "placement": "before"},
    "casa_replace": {"variant": "casa", "placement": "replace"},
    "casa_shared": {"variant": "casa_shared"},
    "ca_ffn": {"variant": "ca_ffn"},
    "gated_ca": {"variant": "gated_ca"},
    "casa_no_text_keys": {"variant": "casa", "text_keys": False},
}
DIFFICULTY = {"colors": 4, "max_shapes": 3, "relative": False, "fields": 2, "text_len": 2, "font_size": 12,
              "bars": 3, "max_value": 5, "frames": 3}

SIZES = {
    "quick": {
        "model": {"lm": {"vocab_size": 264, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 176},
                  "vision": {"image_size": 32, "patch_size": 8, "d_model": 64, "n_layers": 1, "n_heads": 4,
                             "d_ff": 128}},
        "train": {"steps": 150, "text_tokens": 256, "image_tokens": 2048, "lr_new": 1e-3, "lr_pretrained": 1e-3,
                  "warmup_steps": 5, "min_lr_ratio": 0.1, "weight_decay": 0.01, "grad_clip": 1.0},
        "difficulty": {**DIFFICULTY, "image_size": 32},
        "seeds": 1, "eval_n": 8, "gating_n": 6,
        "bench_train": {"text_tokens": 128, "image_ratio": 4, "tokens_per_image": 16, "repeats": 1},
        "stream": {"turns": 10, "image_tokens": 16, "new_tokens": 4, "prompt_tokens": 2},
        "isolate": False,
    },
    "full": {
        "model": {"lm": {"vocab_size": 264, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 352},
                  "vision": {"image_size": 48, "patch_size": 8, "d_model": 96, "n_layers": 2, "n_heads": 4,
                             "d_ff": 192}},
        "train": {"steps": 700, "text_tokens": 384, "image_tokens": 4096, "lr_new": 5e-4, "lr_pretrained": 5e-4,
                  "warmup_steps": 50, "min_lr_ratio": 0.05, "weight_decay": 0.01, "grad_clip": 1.0},
        "difficulty": {**DIFFICULTY, "image_size": 48},
        "seeds": 3, "eval_n": 40, "gating_n": 16,
        "bench_train": {"text_tokens": 384, "image_ratio": 10, "tokens_per_image": 64, "repeats": 3},
        "stream": {"turns": 64, "image_tokens": 64, "new_tokens": 8, "prompt_tokens": 4},
        "isolate": True,
    },
}


@dataclass
class StudyConfig:
    """What `casa study` runs: size, seeds, steps, threads, variants, tasks, where to write."""

    out: str = "runs/study"
    size: str = "full"
    seeds: int | None = None
    steps: int | None = None
    threads: int | None = None
    docs: str | None = None  # also write docs/study.md + docs/study_*.png here
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"study size {self.size!r}: expected one of {sorted(SIZES)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"study: unknown variants {bad}; expected names from {list(VARIANTS)}")
        if (self.seeds is not None and self.seeds < 1) or (self.steps is not None and self.steps < 1):
            raise ValueError("--seeds and --steps must be >= 1")

    @property
    def spec(self) -> dict:
        s = json.loads(json.dumps(SIZES[self.size]))
        if self.seeds is not None:
            s["seeds"] = self.seeds
        if self.steps is not None:
            s["train"]["steps"] = self.steps
        return s


def _say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- training
def train_and_evaluate(name: str, seed: int, spec: dict, tasks: list[str], run_dir: Path) -> dict:
    """Train one variant with one seed; scores (seen, blind) per task, gating, gates."""
    from casa.data.tasks import difficulty as make_difficulty
    from casa.eval.synthetic import answers, eval_samples, evaluate
    from casa.study.gating import attention_shares, gate_values
    from casa.training.trainer import Trainer, load_config

    out = run_dir / f"{name}_s{seed}"
    train = {**spec["train"], "data": ",".join(tasks), "difficulty": spec["difficulty"], "seed": seed,
             "out_dir": str(out), "log_every": 10**9, "save_every": 0, "keep_last": 1, "precision": "fp32"}
    model_cfg, cfg = load_config(base={"model": {**spec["model"], "fusion": VARIANTS[name]}, "train": train})
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    trainer = Trainer(model_cfg, cfg, quiet=True)
    summary = trainer.fit()
    train_s = time.perf_counter() - t0
    model, processor = trainer.raw, trainer.processor
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are not needed: the study keeps numbers
    seen, blind = {}, {}
    for t in tasks:  # per task, decoding no further than its longest answer allows
        samples = eval_samples([t], spec["eval_n"], seed=seed, difficulty=spec["difficulty"])
        longest = max(len(processor.tok.encode(a)) for s in samples for a in answers(s))
        seen.update(evaluate(model, processor, samples, max_new_tokens=longest + 2)["tasks"])
        blind.update(evaluate(model, processor, samples, blind=True, max_new_tokens=longest + 2)["tasks"])
    gating = {}
    if model_cfg.fusion.uses_text_keys or model_cfg.fusion.variant == "gated_ca":
        from casa.data import SyntheticSource, pack_row

        src = SyntheticSource(tasks, seed=seed + 2000, difficulty=make_difficulty(spec["difficulty"]))
        for j, t in enumerate(tasks):
            docs = [processor.pixels(processor.encode(src[i * len(tasks) + j])) for i in range(spec["gating_n"])]
            shares = attention_shares(model, pack_row(docs))
            gating[t] = {str(k): v for k, v in sorted(shares.items())}
    history = trainer.history
    k = max(1, len(history) // 10)
    return {"variant": name, "seed": seed, "fusion": VARIANTS[name], "steps": summary["step"],
            "train_seconds": train_s, "final_loss": sum(h["loss"] for h in history[-k:]) / k,
            "params": sum(p.numel() for p in model.parameters()),
            "tasks": {t: {"metric": seen[t]["metric"], "score": seen[t]["score"], "blind": blind[t]["score"],
                          "n": seen[t]["n"]} for t in seen},
            "gating": gating, "gates": {str(k): v for k, v in gate_values(model).items()}}


def prior_scores(tasks: list[str], spec: dict, seed: int = 0) -> dict:
    """Scores of the most-frequent-answer baseline per task."""
    from casa.config import VisionConfig
    from casa.data import Processor, SyntheticSource
    from casa.data.tasks import difficulty as make_difficulty
    from casa.eval.synthetic import eval_samples, evaluate, prior_answers
    from casa.pretrained.tokenizer import ByteTokenizer

    processor = Processor(ByteTokenizer(), VisionConfig(**spec["model"]["vision"]))
    src = SyntheticSource(tasks, seed=seed, difficulty=make_difficulty(spec["difficulty"]))
    prior = prior_answers(src[i] for i in range(spec.get("prior_n", 150) * len(tasks)))
    samples = eval_samples(tasks, spec["eval_n"], seed=seed, difficulty=spec["difficulty"])
    return {t: r["score"] for t, r in evaluate(None, processor, samples, prior=prior)["tasks"].items()}


# -------------------------------------------------------------- benchmarks
def _bench_train_one(cfg: dict, name: str) -> dict:
    """`bench.train.measure` for a study variant (placement / text keys included)."""
    from casa.bench import train as bt

    r = bt.measure(cfg, VARIANTS[name]["variant"], device="cpu", fusion={**VARIANTS[name], "every": 1})
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
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
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


# -------------------------------------------------------------- aggregation
def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs), "min": min(xs), "max": max(xs)}


def aggregate(runs: list[dict], tasks: list[str]) -> dict:
    """Per variant: mean/std over seeds of each task's and category's score (seen and blind)."""
    cats = {c: [t for t in ts if t in tasks] for c, ts in CATEGORIES.items()}
    cats = {c: ts for c, ts in cats.items() if ts}
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        row = {"tasks": {}, "categories": {}, "blind_tasks": {}, "blind_categories": {}}
        for t in tasks:
            row["tasks"][t] = _mean_std([r["tasks"][t]["score"] for r in mine])
            row["blind_tasks"][t] = _mean_std([r["tasks"][t]["blind"] for r in mine])
        for c, ts in cats.items():
            row["categories"][c] = _mean_std([sum(r["tasks"][t]["score"] for t in ts) / len(ts) for r in mine])
            row["blind_categories"][c] = _mean_std([sum(r["tasks"][t]["blind"] for t in ts) / len(ts)
                                                    for r in mine])
        row["overall"] = _mean_std([sum(r["tasks"][t]["score"] for t in tasks) / len(tasks) for r in mine])
        row["seeds"] = [r["seed"] for r in mine]
        row["train_seconds"] = _mean_std([r["train_seconds"] for r in mine])
        row["final_loss"] = _mean_std([r["final_loss"] for r in mine])
        out[name] = row
    return out


def gating_summary(runs: list[dict], tasks: list[str]) -> dict:
    """Per variant with text keys: image/text/self shares per task and layer (mean over seeds);
    per gated_ca layer: gate values (mean over seeds)."""
    out = {"shares": {}, "gates": {}}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        if mine[0]["gates"]:
            layers = sorted(mine[0]["gates"], key=int)
            out["gates"][name] = {l: {g: _mean_std([r["gates"][l][g] for r in mine]) for g in ("attn", "ffn")}
                                  for l in layers}
        if not any(r["gating"] for r in mine) or mine[0]["gates"]:
            continue
        per = {}
        for t in tasks:
            layers = sorted({l for r in mine for l in r["gating"].get(t, {})}, key=int)
            per[t] = {l: {k: _mean_std([r["gating"][t][l].get(k) for r in mine if l in r["gating"].get(t, {})])
                          for k in ("image", "text", "self", "answer_image", "answer_text", "answer_self")}
                      for l in layers}
        out["shares"][name] = per
    return out


# -------------------------------------------------------------------- run
def command_line(cfg: StudyConfig) -> str:
    """The `casa study` command that reproduces `cfg`."""
    parts = ["casa study", f"--out {cfg.out}"] + (["--quick"] if cfg.size == "quick" else [])
    parts += [f"--{k} {getattr(cfg, k)}" for k in ("seeds", "steps", "threads", "docs") if getattr(cfg, k)]
    if cfg.variants != list(VARIANTS):
        parts.append(f"--variants {','.join(cfg.variants)}")
    return " ".join(parts)


def run(cfg: StudyConfig) -> dict:
    """Train, evaluate, benchmark; write results.json, report.md and plots to `cfg.out`."""
    from casa.study.report import write_report

    t0 = time.perf_counter()
    spec = cfg.spec
    out = Path(cfg.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(cfg.threads)
    seeds = list(range(spec["seeds"]))
    _say(f"casa study ({cfg.size}): {len(cfg.variants)} variants x {len(seeds)} seed(s), "
         f"{spec['train']['steps']} steps each, tasks {', '.join(cfg.tasks)}, {threads} thread(s)")
    runs = []
    for seed in seeds:
        for name in cfg.variants:
            path = run_dir / f"{name}_s{seed}.json"
            if path.is_file():
                r = json.loads(path.read_text())
                _say(f"  reuse {path}")
            else:
                r = train_and_evaluate(name, seed, spec, cfg.tasks, run_dir)
                with atomic_file(path) as f:
                    f.write(json.dumps(r, indent=1))
            runs.append(r)
            mean = sum(v["score"] for v in r["tasks"].values()) / len(r["tasks"])
            blind = sum(v["blind"] for v in r["tasks"].values()) / len(r["tasks"])
            _say(f"  seed {seed} {name:<18} mean score {mean:.3f} (blind {blind:.3f}), loss "
                 f"{r['final_loss']:.3f}, {r['train_seconds']:.0f} s")
    prior = prior_scores(cfg.tasks, spec)
    _say("benchmarks (training step, streaming session):")
    bench = benchmarks(spec, cfg.variants, threads)
    results = {
        "command": command_line(cfg),
        "config": {**asdict(cfg), "spec": spec, "threads": threads, "torch": torch.__version__,
                   "cpu_count": os.cpu_count(), "categories": CATEGORIES, "variants_fusion": VARIANTS},
        "accuracy": aggregate(runs, cfg.tasks),
        "prior": prior,
        "bench": bench,
        "gating": gating_summary(runs, cfg.tasks),
        "runs": runs,
    }
    results["wall_seconds"] = time.perf_counter() - t0
    write_report(results, out, docs=Path(cfg.docs) if cfg.docs else None)
    _say(f"wrote {out / 'results.json'} and {out / 'report.md'} in {results['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":  # python -m casa.study OUT [quick|full]
    run(StudyConfig(out=sys.argv[1], size=sys.argv[2] if len(sys.argv) > 2 else "full"))
