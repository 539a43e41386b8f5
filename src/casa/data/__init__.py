"""Data: the chat-messages sample format, the processor, the synthetic task
suite, answer metrics, sample sources, and the packing collator.

- `sample`: `Sample`, JSONL reading (checked line by line) and writing.
- `processor`: a sample to token ids, targets, pixels and insertion points.
- `inputs`: the processor called as in transformers (text with `<image>`
  placeholders, or chat messages, to the model's inputs; ids back to text).
- `tasks`: the synthetic suite, rendered from a seed.
- `metrics`: answer normalisation, ANLS, number parsing, per-metric scores.
- `dataset`: data specs and endless, deterministic sample sources.
- `packing`: samples to packed rows within token budgets.

Design decisions:
- This package knows nothing of models beyond `casa.core.batch.Batch`: it
  turns samples into batches, and evaluation and training sit above it.
- The names below are the package's public surface; importing it loads torch
  (packing builds tensors), so the command line imports it lazily.
"""

from casa.data.inputs import ModelInputs
from casa.data.dataset import JsonlSource, SyntheticSource, make_source, parse_data_spec
from casa.data.metrics import score
from casa.data.packing import Pack, Packer, pack_row, sequence_tokens, stack_rows
from casa.data.processor import Encoded, Processor
from casa.data.sample import DataError, Sample, check_sample, read_jsonl, write_jsonl
from casa.data.tasks import COARSE, TASKS, Difficulty, difficulty, make_sample

__all__ = ["COARSE", "TASKS", "DataError", "Difficulty", "Encoded", "JsonlSource", "ModelInputs", "Pack", "Packer", "Processor",
           "Sample", "SyntheticSource", "check_sample", "difficulty", "make_sample", "make_source", "pack_row",
           "parse_data_spec", "read_jsonl", "score", "sequence_tokens", "stack_rows", "write_jsonl"]
