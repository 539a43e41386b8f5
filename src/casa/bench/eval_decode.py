"""`casa bench eval-decode`: cached batched greedy decoding vs the uncached loop.

Evaluation (`casa eval`, the study, the standard benchmarks, the lmms-eval
plugin) decodes through `eval.decode.greedy_decode`. This benchmark times it
against `greedy_decode_uncached` (one full forward over every row per new
token) on the same prompts and checks that the answers are identical.

Design decisions:
- The prompts are those `casa eval` builds for synthetic tasks (one per
  assistant turn), on a random-init model of the given size: the decoding
  cost depends on shapes, not on what the model learned.
- Stop tokens are disabled, so that every answer has exactly `new_tokens`
  tokens (a random model would otherwise stop at arbitrary points and the
  two timings would decode different amounts).
- One thread by default: the figures are ratios within one run on a
  possibly shared machine; the load average is recorded beside them. Each
  decoder is timed `repeats` times, alternating with the other, and the
  best time of each is kept, so a burst of load from other processes
  does not land on one side only.
- The JSON report is written atomically (`casa.files.atomic_file`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from casa.bench.report import write_report
from casa.config import FUSION_VARIANTS, ModelConfig
from casa.core.model import CasaModel
from casa.data import Processor
from casa.eval.decode import greedy_decode, greedy_decode_uncached
from casa.eval.synthetic import eval_samples, questions
from casa.pretrained.tokenizer import ByteTokenizer

__all__ = ["EvalDecodeBench", "plot", "run"]


@dataclass
class EvalDecodeBench:
    variants: list[str] = field(default_factory=lambda: ["casa", "insertion"])
    samples: int = 64  # prompts decoded (one batch)
    new_tokens: int = 24
    tasks: str = "color,count,position,compare"
    d_model: int = 128  # configs/synthetic_cpu.toml's model
    layers: int = 4
    seed: int = 0
    threads: int | None = 1
    repeats: int = 3

    def __post_init__(self):
        bad = [v for v in self.variants if v not in FUSION_VARIANTS]
        if bad:
            raise ValueError(f"--variants: unknown {bad}; choose from {list(FUSION_VARIANTS)}")

    def model_config(self, variant: str) -> ModelConfig:
        return ModelConfig.from_dict({
            "lm": {"vocab_size": 264, "d_model": self.d_model, "n_layers": self.layers, "n_heads": 4,
                   "n_kv_heads": 2, "d_ff": self.d_model * 11 // 4},
            "vision": {"image_size": 32, "patch_size": 8, "d_model": 96, "n_layers": 2, "n_heads": 4, "d_ff": 192},
            "fusion": {"variant": variant},
        })


def _variant(cfg: EvalDecodeBench, variant: str) -> dict:
    torch.manual_seed(cfg.seed)
    model = CasaModel(cfg.model_config(variant)).eval()
    processor = Processor(ByteTokenizer(), model.config.vision)
    processor.stop_ids = set()  # every answer decodes `new_tokens` tokens (see the module docstring)
    items, _ = questions(eval_samples(cfg.tasks.split(","), cfg.samples, seed=cfg.seed), processor)
    prompts = [q.prompt for q in items[: cfg.samples]]
    greedy_decode(model, prompts[:2], processor, max_new_tokens=2)  # first-call costs out of the timing
    best = {"cached": float("inf"), "uncached": float("inf")}
    for _ in range(cfg.repeats):
        for name, decode in (("cached", greedy_decode), ("uncached", greedy_decode_uncached)):
            t0 = time.perf_counter()
            answers = decode(model, prompts, processor, max_new_tokens=cfg.new_tokens)
            best[name] = min(best[name], time.perf_counter() - t0)
            if name == "cached":
                cached = answers
            else:
                plain = answers
    return {"variant": variant, "prompts": len(prompts),
            "prompt_tokens_mean": sum(len(p.ids) for p in prompts) / len(prompts),
            "images_mean": sum(p.n_images for p in prompts) / len(prompts),
            "cached_s": round(best["cached"], 4), "uncached_s": round(best["uncached"], 4),
            "speedup": round(best["uncached"] / best["cached"], 3), "same_answers": cached == plain,
            "answer_tokens": sum(map(len, cached))}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], [r["uncached_s"] for r in runs], 0.4, label="uncached loop (before)")
    ax.bar([x + 0.2 for x in xs], [r["cached_s"] for r in runs], 0.4, label="cached, batched")
    for x, r in zip(xs, runs):
        ax.annotate(f"{r['speedup']:.1f}x", (x + 0.2, r["cached_s"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [r["variant"] for r in runs])
    ax.set_ylabel("seconds")
    c = result["config"]
    ax.set_title(f"greedy eval decode: {c['samples']} prompts x {c['new_tokens']} tokens, {c['threads']} thread")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: EvalDecodeBench, *, json_path=None, plot_path=None, log=print) -> dict:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        load_start = os.getloadavg()
        runs = []
        for variant in cfg.variants:
            runs.append(_variant(cfg, variant))
            if log:
                r = runs[-1]
                log(f"{variant}: cached {r['cached_s']:.2f} s, uncached {r['uncached_s']:.2f} s, "
                    f"{r['speedup']:.1f}x, same answers: {r['same_answers']}")
    finally:
        torch.set_num_threads(threads)
    result = {"config": {**asdict(cfg), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()}, "runs": runs}
    write_report(result, json_path, plot=plot, plot_path=plot_path, indent=1, quiet=True)
    return result
