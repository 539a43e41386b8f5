"""`casa eval`: a checkpoint evaluated on synthetic tasks, a JSONL file or a
local standard benchmark; a table printed and a JSON result written.

Design decisions:
- Every input is checked before any compute, cheapest first: the result
  path (`casa.files.check_output_file`), the checkpoint (a model directory,
  or a run directory's latest checkpoint), the task names / data file /
  benchmark directory, then the samples are encoded and every prompt's
  length is checked against the model's token limit. Only then are the
  weights loaded and the answers decoded.
- The token limit (`token_limit`) is the sequence budget the checkpoint was
  trained with (`train.text_tokens` in its config.json): a sample the trainer
  would have refused, evaluation refuses too. A directory that records no
  training (built from a Hugging Face LM) gets `DEFAULT_TOKEN_LIMIT`.
  `--max-tokens` raises or lowers it. There is no truncation: a question cut
  short is another question, and its score would be meaningless.
- The result is written atomically (`casa.files.atomic_file`): an earlier
  result file is replaced only by the complete result of a successful run.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

from casa.data import read_jsonl
from casa.data.sample import DataError
from casa.data.tasks import TASKS, check_tasks
from casa.eval.decode import check_lengths
from casa.eval.synthetic import eval_samples, format_table, questions, score_questions
from casa.files import atomic_file, check_output_file

__all__ = ["DEFAULT_TOKEN_LIMIT", "check_backend", "run", "run_benchmark", "token_limit",
           "write_result"]

# Sequence positions allowed for a directory that records no training budget:
# twice the trainer's default pack (2048 text tokens), well inside the context
# of the LMs casa builds on, and small enough that uncached batched decoding
# stays within a few GB.
DEFAULT_TOKEN_LIMIT = 4096


def token_limit(config: dict, override: int | None = None) -> tuple[int, str]:
    """(most sequence positions a prompt plus its answer may take, where that number comes from).

    Args:
        config: a model directory's config.json (`casa.pretrained.directory.read_config`).
        override: `--max-tokens`, when given.
    """
    if override is not None:
        return override, "--max-tokens"
    trained = config.get("train", {}).get("text_tokens")
    if isinstance(trained, int) and trained > 0:
        return trained, "the sequence budget it was trained with, train.text_tokens"
    return DEFAULT_TOKEN_LIMIT, "casa's default for a model with no recorded training budget"


def write_result(result: dict, path: Path) -> None:
    """`result` as indented JSON at `path`, atomically; prints where."""
    with atomic_file(path) as f:
        f.write(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


def check_backend(backend: str) -> str:
    """`backend` if it names an attention backend (or `auto`), else a ValueError naming `--backend`."""
    from casa.core.attention import BACKENDS

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"--backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    return backend


def _model_dir(checkpoint) -> tuple[Path, dict]:
    """(model directory, its config.json), without importing the model stack."""
    from casa.pretrained.model_dir import read_config
    from casa.pretrained.runs import resolve_model_dir

    model_dir = resolve_model_dir(checkpoint)
    return model_dir, read_config(model_dir)


def run(checkpoint, *, tasks=None, data=None, n: int = 64, seed: int | None = None, difficulty: dict | None = None,
        blind: bool = False, json_path=None, backend: str = "auto", skip_bad: bool = False,
        max_new_tokens: int = 24, max_tokens: int | None = None) -> dict:
    """Evaluate a checkpoint on synthetic tasks (default: those it was trained on) or a JSONL file.

    Prints the per-task table and writes the result (default:
    `CHECKPOINT/eval.json`, or `eval_blind.json` with `blind`).
    """
    from casa.pretrained.directory import from_pretrained

    check_output_file(json_path, "--json")
    if data:  # the data file first: reading it needs no model
        samples, skipped = read_jsonl(data, skip_bad=skip_bad)
    elif tasks:
        check_tasks(tasks)
    model_dir, config = _model_dir(checkpoint)
    path = Path(json_path) if json_path else model_dir / ("eval_blind.json" if blind else "eval.json")
    check_output_file(path, "result file")
    if not data:
        train_cfg = config.get("train", {})
        names = tasks or [t for t in train_cfg.get("data", "").split(",") if t in TASKS] or list(TASKS)
        seed = train_cfg.get("seed", 0) if seed is None else seed
        samples, skipped = eval_samples(names, n, seed=seed, difficulty={**train_cfg.get("difficulty", {}),
                                                                          **(difficulty or {})}), 0
    from casa.pretrained.directory import load_processor

    processor = load_processor(model_dir)
    items, bad = questions(samples, processor, blind=blind, skip_bad=skip_bad)
    if not items:
        raise DataError(f"{data or ', '.join(names)}: no sample could be evaluated ({bad} skipped)")
    limit, source = token_limit(config, max_tokens)
    splice = config["model"].get("fusion", {}).get("variant") == "insertion"
    check_lengths([q.prompt for q in items], processor, max_new_tokens=max_new_tokens, limit=limit,
                  splice_images=splice, memory_tokens=config["model"].get("fusion", {}).get("frame_memory", 0),
                  limit_source=source)
    check_backend(backend)

    model = from_pretrained(model_dir)
    result = score_questions(model, processor, items, backend=backend, max_new_tokens=max_new_tokens)
    result["checkpoint"], result["blind"] = str(model_dir), blind
    if skipped + bad:
        result["skipped"] = skipped + bad
    print(format_table(result, f"{model_dir}{' (blind)' if blind else ''}"))
    write_result(result, path)
    return result


def run_benchmark(checkpoint, name: str, root, *, split: str | None = None, limit: int | None = None,
                  json_path=None, batch_size: int = 8, max_new_tokens: int = 32, backend: str = "auto",
                  dtype=None, device=None, max_tokens: int | None = None) -> dict:
    """`casa eval --bench NAME --root DIR`: a local standard benchmark; prints the score, writes the
    result (default: `CHECKPOINT/eval_NAME.json`)."""
    from casa.eval.stdbench import (
        BENCHMARKS,
        format_result,
        load_items,
        run_standard_benchmark,
    )
    from casa.pretrained.directory import load

    check_output_file(json_path, "--json")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    model_dir, config = _model_dir(checkpoint)
    path = Path(json_path) if json_path else model_dir / f"eval_{name}.json"
    check_output_file(path, "result file")
    items = load_items(name, root, split=split)
    items = chain([next(items)], items)  # the benchmark has questions: found before loading the model
    tokens, source = token_limit(config, max_tokens)
    check_backend(backend)
    loaded = load(model_dir, dtype=dtype, device=device)
    result = run_standard_benchmark(loaded.model, loaded.tokenizer, name, root, processor=loaded.processor,
                                    split=split, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    backend=backend, max_tokens=tokens, max_tokens_source=source, items=items)
    result["checkpoint"] = str(model_dir)
    print(format_result(result))
    write_result(result, path)
    return result
