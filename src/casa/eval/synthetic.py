"""Evaluation of chat samples (synthetic tasks or JSONL) with greedy decoding:
what `casa eval`, the trainer's periodic evaluation, the study and the demo
measure.

Design decisions:
- Every assistant turn of a sample is one question (`questions`): the prompt
  is the sample up to that turn (earlier answers are the gold ones, teacher
  forcing), the answer is decoded greedily (`casa.eval.decode`) until a stop
  token, and scored against the turn's text with the sample's metric
  (`casa.data.metrics.score`). The `video` task (a frame per user turn) is thus
  one question per frame; a video part is one question about all its frames,
  each in its own window (`data.Processor`, docs/design.md §2).
- Questions are built (samples encoded, images preprocessed) before the
  model runs, so that a bad sample or a prompt over the model's limit is
  reported before any compute (`casa.eval.run` checks lengths in between).
- `blind=True` withholds the images (the same model, nothing to see): every
  image and video frame is dropped with its markers (prefix and gist tokens;
  `Processor.encode(blind=True)`), so a blind prompt is the text alone;
  `prior_answers` is the best a blind answerer can do: the most frequent
  training answer to the same question text.
- Evaluation samples of the synthetic tasks are drawn from
  `seed + EVAL_SEED_OFFSET`, so they never overlap training samples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

from casa.data import Encoded, Processor, Sample, make_sample, read_jsonl, score
from casa.data.dataset import parse_data_spec
from casa.data.sample import DataError
from casa.data.tasks import check_tasks
from casa.data.tasks import difficulty as make_difficulty
from casa.eval.decode import greedy_decode

__all__ = ["EVAL_SEED_OFFSET", "Question", "answers", "eval_samples", "eval_samples_for", "evaluate",
           "format_table", "prior_answers", "question_text", "questions", "score_questions"]

EVAL_SEED_OFFSET = 1000  # evaluation samples never overlap training ones


class Question(NamedTuple):
    """One assistant turn to answer: its prompt, the gold answer, and how to score it."""

    prompt: Encoded  # the sample up to the turn (images included unless blind)
    answer: str  # the turn's gold text
    task: str  # the sample's "task" ("data" when it names none)
    metric: str  # one of casa.data.metrics.METRICS
    question: str  # the last user text before the turn (the prior's key)


def eval_samples(tasks, n: int, *, seed: int = 0, difficulty: dict | None = None) -> list[Sample]:
    """`n` held-out samples of each synthetic task (seed + EVAL_SEED_OFFSET)."""
    d = make_difficulty(difficulty)
    return [make_sample(t, seed + EVAL_SEED_OFFSET, i, d) for t in check_tasks(tasks) for i in range(n)]


def eval_samples_for(cfg, n: int) -> list[Sample]:
    """Evaluation samples of a TrainConfig: `eval_data` (a JSONL file or tasks) or the training tasks."""
    spec = parse_data_spec(cfg.eval_data or cfg.data)
    if isinstance(spec, list):
        return eval_samples(spec, n, seed=cfg.seed, difficulty=cfg.difficulty)
    return read_jsonl(spec, skip_bad=cfg.skip_bad_samples)[0]


def answers(sample: Sample) -> list[str]:
    """The text of each assistant turn of `sample`, in order."""
    return ["".join(p["text"] for p in m["content"]) for m in sample.messages if m["role"] == "assistant"]


def question_text(sample: Sample, turn: int) -> str:
    """Text of the last user message with text before assistant turn `turn`."""
    seen, last = -1, ""
    for m in sample.messages:
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                return last
        else:
            last = "".join(p.get("text", "") for p in m["content"] if p["type"] == "text") or last
    return last


def questions(samples, processor: Processor, *, blind: bool = False,
              skip_bad: bool = False) -> tuple[list[Question], int]:
    """(one `Question` per assistant turn, number of samples skipped).

    A sample the processor cannot encode (an unreadable image, ...) is a
    `DataError` naming it, or a counted skip with `skip_bad`.
    """
    items, skipped = [], 0
    for s in samples:
        try:
            enc = processor.encode(s)  # even when blind: a sample with a bad image is skipped either way
            if blind:
                enc = processor.encode(s, blind=True)
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        golds = answers(s)
        for k, (start, _) in enumerate(enc.turns[: len(golds)]):
            prompt = enc.prefix(start)
            items.append(Question(prompt, golds[k], s.meta.get("task", "data"), s.meta.get("metric", "exact"),
                                  question_text(s, k)))
    return items, skipped


def score_questions(model, processor: Processor, items: list[Question], *, batch_size: int = 64,
                    max_new_tokens: int = 24, backend: str = "auto", prior: dict | None = None) -> dict:
    """Per task: metric, mean score, exact match, n; plus every prediction.

    `prior` (question text -> answer, see `prior_answers`) scores the blind
    prior instead of the model (which may then be None).
    """
    preds = []
    if prior is not None:
        preds = [prior.get(q.question, "") for q in items]
    else:
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(items), batch_size):
                chunk = [q.prompt for q in items[i: i + batch_size]]
                for ids in greedy_decode(model, chunk, processor, max_new_tokens=max_new_tokens, backend=backend):
                    preds.append(processor.tok.decode(ids).strip())
        finally:
            model.train(was_training)
    per_task = defaultdict(list)
    records = []
    for q, pred in zip(items, preds):
        s, e = score(q.metric, pred, q.answer), score("exact", pred, q.answer)
        per_task[q.task].append((q.metric, s, e))
        records.append({"task": q.task, "question": q.question, "answer": q.answer, "prediction": pred, "score": s})
    tasks = {}
    for task, rows in per_task.items():
        tasks[task] = {"metric": rows[0][0], "score": sum(r[1] for r in rows) / len(rows),
                       "exact": sum(r[2] for r in rows) / len(rows), "n": len(rows)}
    return {"tasks": tasks, "predictions": records}


def evaluate(model, processor: Processor, samples, *, blind: bool = False, batch_size: int = 64,
             max_new_tokens: int = 24, backend: str = "auto", prior: dict | None = None) -> dict:
    """`questions` then `score_questions`: per task metric, score, exact, n; plus every prediction."""
    items, _ = questions(samples, processor, blind=blind)
    return score_questions(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           backend=backend, prior=prior)


def prior_answers(train_samples) -> dict[str, str]:
    """Most frequent answer to each question text among training samples."""
    counts = defaultdict(Counter)
    for s in train_samples:
        for k, gold in enumerate(answers(s)):
            counts[question_text(s, k)][gold] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def format_table(result: dict, title: str = "") -> str:
    """The per-task table `casa eval` prints."""
    lines = [title] if title else []
    lines.append(f"{'task':<10} {'metric':<8} {'score':>7} {'exact':>7} {'n':>5}")
    for task, r in result["tasks"].items():
        lines.append(f"{task:<10} {r['metric']:<8} {r['score']:>7.3f} {r['exact']:>7.3f} {r['n']:>5}")
    return "\n".join(lines)
