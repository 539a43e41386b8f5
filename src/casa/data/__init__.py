"""Data: the chat-messages sample format, the processor, the synthetic task
suite and its metrics, sample sources, and the packing collator."""

from casa.data.dataset import JsonlSource, SyntheticSource, make_source
from casa.data.metrics import score
from casa.data.packing import Pack, Packer, pack_row, stack_rows
from casa.data.processor import Encoded, Processor
from casa.data.sample import DataError, Sample, check_sample, read_jsonl, write_jsonl
from casa.data.tasks import COARSE, TASKS, Difficulty, difficulty, make_sample

__all__ = ["COARSE", "TASKS", "DataError", "Difficulty", "Encoded", "JsonlSource", "Pack", "Packer", "Processor",
           "Sample", "SyntheticSource", "check_sample", "difficulty", "make_sample", "make_source", "pack_row",
           "read_jsonl", "score", "stack_rows", "write_jsonl"]
