"""Evaluation with greedy decoding: `casa eval` and the trainer's periodic eval.

Design decisions:
- Every assistant turn of a sample is one question: the prompt is the sample
  up to that turn (earlier answers are the gold ones, teacher forcing), the
  answer is decoded greedily until an end token, and scored against the
  turn's text with the sample's metric (`data.metrics`). A video sample is
  thus one question per frame.
- Decoding is batched and uncached: prompts are right-padded rows (padding
  is its own document), images are encoded once, and each step runs one
  forward over the rows and appends the argmax at each row's end. Simple and
  exact for every variant; the cached path of `generate.py` serves streaming.
- `blind=True` withholds the images (the same model, nothing to see);
  `prior_answers` is the best a blind answerer can do: the most frequent
  training answer to the same question text.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from casa.data import (
    Encoded,
    Processor,
    Sample,
    make_sample,
    read_jsonl,
    score,
    stack_rows,
)
from casa.data.tasks import TASKS, check_tasks
from casa.data.tasks import difficulty as make_difficulty

EVAL_SEED_OFFSET = 1000  # evaluation samples never overlap training ones


def eval_samples(tasks, n: int, *, seed: int = 0, difficulty: dict | None = None) -> list[Sample]:
    """`n` held-out samples of each synthetic task (seed + EVAL_SEED_OFFSET)."""
    d = make_difficulty(difficulty)
    return [make_sample(t, seed + EVAL_SEED_OFFSET, i, d) for t in check_tasks(tasks) for i in range(n)]


def eval_samples_for(cfg, n: int) -> list[Sample]:
    """Evaluation samples of a TrainConfig: `eval_data` (JSONL or tasks) or the training tasks."""
    spec = cfg.eval_data or cfg.data
    if spec.endswith(".jsonl"):
        return read_jsonl(spec, skip_bad=cfg.skip_bad_samples)[0]
    return eval_samples(spec.split(","), n, seed=cfg.seed, difficulty=cfg.difficulty)


def _answers(sample: Sample) -> list[str]:
    return ["".join(p["text"] for p in m["content"]) for m in sample.messages if m["role"] == "assistant"]


def _question(sample: Sample, turn: int) -> str:
    """Text of the last user message before assistant turn `turn`."""
    seen, last = -1, ""
    for m in sample.messages:
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                return last
        else:
            last = "".join(p.get("text", "") for p in m["content"] if p["type"] == "text") or last
    return last


@torch.no_grad()
def greedy_decode(model, prompts: list[Encoded], processor: Processor, *, max_new_tokens: int = 24,
                  backend: str = "auto") -> list[list[int]]:
    """Greedy continuation of each prompt, stop token excluded."""
    device = next(model.parameters()).device
    batch = stack_rows(prompts, processor.tok.pad_id, extra=max_new_tokens).to(device)
    embeds = model.encode_images(batch) if batch.images is not None else None
    batch = replace(batch, images=None, image_embeds=embeds, loss_mask=None)
    ids, T = batch.input_ids, batch.input_ids.shape[1]
    lengths = [len(p.ids) for p in prompts]
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        doc_lens = [[n] + ([T - n] if T > n else []) for n in lengths]
        logits = model(replace(batch, input_ids=ids, doc_lens=doc_lens), backend=backend)
        nxt = logits[torch.arange(len(prompts)), torch.tensor(lengths) - 1].argmax(-1).tolist()
        for b, tok in enumerate(nxt):
            if done[b]:
                continue
            if tok in processor.stop_ids or lengths[b] >= T:
                done[b] = True
                continue
            out[b].append(tok)
            ids[b, lengths[b]] = tok
            lengths[b] += 1
        if all(done):
            break
    return out


def _questions(samples, processor: Processor, blind: bool):
    """(prompt, gold answer, task, metric, question) for every assistant turn."""
    items = []
    for s in samples:
        enc = processor.encode(s)
        golds = _answers(s)
        for k, (start, _) in enumerate(enc.turns[: len(golds)]):
            prompt = enc.prefix(start)
            if blind:
                prompt = Encoded(prompt.ids, prompt.targets, source=prompt.source)
            items.append((prompt, golds[k], s.meta.get("task", "data"), s.meta.get("metric", "exact"),
                          _question(s, k)))
    return items


def evaluate(model, processor: Processor, samples, *, blind: bool = False, batch_size: int = 64,
             max_new_tokens: int = 24, backend: str = "auto", prior: dict | None = None) -> dict:
    """Per task: metric, score, exact match, n; plus every prediction.

    `prior` (question -> answer, see `prior_answers`) scores the blind prior
    instead of the model.
    """
    items = _questions(samples, processor, blind)
    preds = []
    if prior is not None:
        preds = [prior.get(q, "") for *_, q in items]
    else:
        was_training = model.training
        model.eval()
        for i in range(0, len(items), batch_size):
            chunk = [it[0] for it in items[i: i + batch_size]]
            for ids in greedy_decode(model, chunk, processor, max_new_tokens=max_new_tokens, backend=backend):
                preds.append(processor.tok.decode(ids).strip())
        model.train(was_training)
    per_task = defaultdict(list)
    records = []
    for (prompt, gold, task, metric, question), pred in zip(items, preds):
        s, e = score(metric, pred, gold), score("exact", pred, gold)
        per_task[task].append((metric, s, e))
        records.append({"task": task, "question": question, "answer": gold, "prediction": pred, "score": s})
    tasks = {}
    for task, rows in per_task.items():
        tasks[task] = {"metric": rows[0][0], "score": sum(r[1] for r in rows) / len(rows),
                       "exact": sum(r[2] for r in rows) / len(rows), "n": len(rows)}
    return {"tasks": tasks, "predictions": records}


def prior_answers(train_samples) -> dict[str, str]:
    """Most frequent answer to each question text among training samples."""
    counts = defaultdict(Counter)
    for s in train_samples:
        for k, gold in enumerate(_answers(s)):
            counts[_question(s, k)][gold] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def format_table(result: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'task':<10} {'metric':<8} {'score':>7} {'exact':>7} {'n':>5}")
    for task, r in result["tasks"].items():
        lines.append(f"{task:<10} {r['metric']:<8} {r['score']:>7.3f} {r['exact']:>7.3f} {r['n']:>5}")
    return "\n".join(lines)


def run(checkpoint, *, tasks=None, data=None, n: int = 64, seed: int | None = None, difficulty: dict | None = None,
        blind: bool = False, json_path=None, backend: str = "auto", skip_bad: bool = False,
        max_new_tokens: int = 24) -> dict:
    """`casa eval`: load a model directory (or a run's latest checkpoint), evaluate, print, write JSON."""
    from casa.pretrained.directory import load, read_config
    from casa.pretrained.runs import resolve_model_dir

    model_dir = resolve_model_dir(checkpoint)
    train_cfg = read_config(model_dir).get("train", {})
    model, _, processor = load(model_dir)
    if data:
        samples = read_jsonl(data, skip_bad=skip_bad)[0]
    else:
        names = tasks or [t for t in train_cfg.get("data", "").split(",") if t in TASKS] or list(TASKS)
        seed = train_cfg.get("seed", 0) if seed is None else seed
        diff = {**train_cfg.get("difficulty", {}), **(difficulty or {})}
        samples = eval_samples(names, n, seed=seed, difficulty=diff)
    result = evaluate(model, processor, samples, blind=blind, backend=backend, max_new_tokens=max_new_tokens)
    result["checkpoint"], result["blind"] = str(model_dir), blind
    print(format_table(result, f"{model_dir}{' (blind)' if blind else ''}"))
    path = Path(json_path) if json_path else model_dir / ("eval_blind.json" if blind else "eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result
