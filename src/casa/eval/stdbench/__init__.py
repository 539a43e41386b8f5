"""Standard benchmarks of the paper: ChartQA, DocVQA, InfographicVQA, TextVQA, AI2D, GQA.

`run_standard_benchmark(model, tokenizer, name, root)` evaluates a casa model
on a local copy (`datasets` reads the usual layouts) with the paper's
prompts and each benchmark's standard metric (ANLS and relaxed correctness
from `casa.data.metrics`, the others from `metrics`). `casa eval --bench`
is `casa.eval.run.run_benchmark`.

Design decisions:
- Prompts are the CASA release's (`format_question`): the image first, then
  the question and "Answer the question using a single word or phrase."; AI2D
  lists lettered choices and asks "Answer with the letter.". They go through
  the model's own processor, so a Qwen model gets its chat template with
  `<|vision_start|>` [image] `<|vision_end|>` around the image.
- Answers are decoded greedily (`casa.eval.decode.greedy_decode`, batched,
  exact for every fusion variant) up to `max_new_tokens` (the release uses
  128). With `max_tokens`, each batch's prompts are checked against the
  model's token limit before it is decoded.
- Scoring follows the release: a trailing full stop is removed before relaxed
  accuracy and ANLS; "Answer: " before an AI2D letter.
- The score is a fraction in [0, 1] (the paper prints it x100); ChartQA also
  reports its human / augmented splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice

from casa.data.metrics import anls, relaxed_correctness
from casa.eval.stdbench import metrics
from casa.eval.stdbench.datasets import DEFAULT_SPLITS, Item, load_items

__all__ = ["BENCHMARKS", "SHORT_ANSWER", "Benchmark", "Item", "format_question", "format_result", "load_items",
           "metrics", "run_standard_benchmark"]

SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's name and the metric it is scored with."""

    name: str
    metric: str

    def score(self, prediction: str, item: Item) -> float:
        """The score in [0, 1] of one decoded prediction against `item`'s gold answers."""
        pred = prediction.strip()
        if self.metric == "relaxed_accuracy":
            return relaxed_correctness(pred.rstrip("."), item.answers[0])
        if self.metric == "anls":
            return anls(pred.rstrip(".").strip(), item.answers)
        if self.metric == "vqa_accuracy":
            return metrics.vqa_accuracy(pred, item.answers)
        if self.metric == "multiple_choice":
            return metrics.multiple_choice(re.sub(r"^Answer: ", "", pred), item.options, item.answers[0])
        return metrics.exact_match(pred, item.answers[0])


BENCHMARKS = {
    "chartqa": Benchmark("chartqa", "relaxed_accuracy"),
    "docvqa": Benchmark("docvqa", "anls"),
    "infovqa": Benchmark("infovqa", "anls"),
    "textvqa": Benchmark("textvqa", "vqa_accuracy"),
    "ai2d": Benchmark("ai2d", "multiple_choice"),
    "gqa": Benchmark("gqa", "exact_match"),
}


def format_question(name: str, question: str, options=None) -> str:
    """The CASA release's prompt for one question."""
    if name == "ai2d":
        if question.strip()[-1:] not in ("?", "."):
            question += "?"
        choices = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options or []))
        return f"Question: {question}\nChoices:\n{choices}\nAnswer with the letter."
    return f"{question}\n{SHORT_ANSWER}"


def _sample(name: str, item: Item, system_prompt: str | None) -> dict:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [
        {"role": "user", "content": [{"type": "image", "image": item.pil()},
                                     {"type": "text", "text": format_question(name, item.question, item.options)}]},
        {"role": "assistant", "content": item.answers[0] if item.answers and item.answers[0] else "-"},
    ]
    return {"messages": messages}


def run_standard_benchmark(model, tokenizer, name: str, root, *, processor=None, split: str | None = None,
                           limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 32,
                           backend: str = "auto", system_prompt: str | None = None, max_tokens: int | None = None,
                           max_tokens_source: str = "max_tokens", items=None) -> dict:
    """Evaluate `model` on benchmark `name` stored under `root`; returns score, n and predictions.

    `items` (default: `load_items(name, root, split=split)`) are the
    questions; `max_tokens`, when given, is the model's token limit that
    every prompt plus `max_new_tokens` must fit (`decode.check_lengths`).
    """
    from casa.data import Processor
    from casa.eval import decode
    from casa.pretrained.directory import PROCESSOR_DEFAULTS

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if processor is None:
        processor = Processor(tokenizer, model.config.vision, gist=PROCESSOR_DEFAULTS["gist"],
                              gist_token=PROCESSOR_DEFAULTS["gist_token"])
    items = iter(items) if items is not None else load_items(name, root, split=split)
    splice = model.config.fusion.variant == "insertion"
    if limit is not None:
        items = islice(items, limit)
    was_training = model.training
    model.eval()
    records = []
    try:
        while True:
            chunk = list(islice(items, batch_size))
            if not chunk:
                break
            prompts = []
            for item in chunk:
                enc = processor.encode(_sample(name, item, system_prompt))
                prompts.append(enc.prefix(enc.turns[0][0]))
            if max_tokens is not None:
                decode.check_lengths(prompts, processor, max_new_tokens=max_new_tokens, limit=max_tokens,
                                     splice_images=splice, memory_tokens=model.config.fusion.frame_memory,
                                     limit_source=max_tokens_source)
            outs = decode.greedy_decode(model, prompts, processor, max_new_tokens=max_new_tokens, backend=backend)
            for item, ids in zip(chunk, outs):
                pred = processor.tok.decode(ids).strip()
                records.append({"id": item.qid, "question": item.question, "answers": item.answers,
                                "prediction": pred, "score": bench.score(pred, item), "group": item.group})
    finally:
        model.train(was_training)
    if not records:
        raise ValueError(f"{name}: no questions to evaluate (limit={limit})")
    result = {"benchmark": name, "split": split or DEFAULT_SPLITS[name], "metric": bench.metric,
              "score": sum(r["score"] for r in records) / len(records), "n": len(records)}
    groups = sorted({r["group"] for r in records if r["group"]})
    if groups:
        result["groups"] = {g: sum(r["score"] for r in records if r["group"] == g) /
                            sum(1 for r in records if r["group"] == g) for g in groups}
    result["predictions"] = records
    return result


def format_result(result: dict) -> str:
    """One line: benchmark, metric, score x 100, n (and ChartQA's groups)."""
    line = f"{result['benchmark']:<8} {result['metric']:<17} {100 * result['score']:6.2f}  n={result['n']}"
    for g, s in result.get("groups", {}).items():
        line += f"  {g} {100 * s:.2f}"
    return line
