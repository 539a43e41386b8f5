"""Local copies of the paper's benchmarks, in their usual layouts, as `Item`s.

Two layouts per benchmark, found automatically under the root directory:
- the parquet files of the lmms-lab Hugging Face datasets (what lmms-eval and
  the CASA release evaluate on): `lmms-lab/ChartQA` (test), `lmms-lab/DocVQA`
  configs `DocVQA` and `InfographicVQA` (validation), `lmms-lab/textvqa`
  (validation), `lmms-lab/ai2d` (test), `lmms-lab/GQA` configs
  `testdev_balanced_instructions` + `testdev_balanced_images` (testdev, joined
  on the image id); images are the `{bytes, path}` structs of `datasets`;
- the original releases: ChartQA `test/test_{human,augmented}.json` +
  `test/png/`, DocVQA `val_v1.0.json` (+ `documents/`), InfographicVQA
  `infographicsVQA_val_v1.0*.json` + `infographicsvqa_images/`, TextVQA
  `TextVQA_0.5.1_val.json` + `train_images/`, AI2D `questions/*.json` +
  `images/` (+ `ai2d_test_ids.csv` for the test split), GQA
  `testdev_balanced_questions.json` + `images/`.

Design decisions:
- Parquet files are read batch by batch and images decoded only when used,
  so a benchmark never sits in memory whole. Parquet needs `pyarrow` (extra
  `casa[bench]`).
- A layout is recognised by its file names, parquet first; nothing is
  configured. A root with no question of the split is a FileNotFoundError
  that lists what was looked for.
- Damaged inputs are named, never a library's traceback: a parquet or JSON
  file that cannot be read is a `casa.files.DamagedFileError` naming the
  file, a record without an expected field a `DataError` naming the
  benchmark and root, an undecodable image a `DataError` naming the question.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from casa.data.sample import DataError
from casa.files import DamagedFileError, read_json

__all__ = ["DEFAULT_SPLITS", "LOADERS", "Item", "load_items"]


@dataclass
class Item:
    """One benchmark question: its id, text, gold answers, image and (AI2D) options."""

    qid: str
    question: str
    answers: list[str]
    image: object  # PIL image, bytes or a path
    options: list[str] | None = None
    group: str | None = None  # ChartQA: human / augmented
    meta: dict = field(default_factory=dict)

    def pil(self) -> Image.Image:
        """The question's image as RGB."""
        img = self.image
        where = "its embedded image"
        try:
            if isinstance(img, (bytes, bytearray)):
                img = Image.open(io.BytesIO(img))
            elif not isinstance(img, Image.Image):
                path = Path(img)
                where = f"image {str(path)!r}"
                if not path.is_file():
                    raise FileNotFoundError(f"question {self.qid}: image {str(path)!r} does not exist")
                img = Image.open(path)
            img.load()
        except (OSError, Image.DecompressionBombError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise DataError(f"question {self.qid}: cannot read {where} ({e})") from None
        return img.convert("RGB")


DEFAULT_SPLITS = {"chartqa": "test", "docvqa": "validation", "infovqa": "validation", "textvqa": "validation",
                  "ai2d": "test", "gqa": "testdev"}


# ----------------------------------------------------------------------------- parquet
def _parquet_files(root: Path, split: str, subdir: str | None = None) -> list[Path]:
    base = root / subdir if subdir and (root / subdir).is_dir() else root
    pat = re.compile(rf"^{re.escape(split)}[-_.]")
    return sorted(p for p in base.rglob("*.parquet") if pat.match(p.name) or p.parent.name == split)


def _rows(files, columns=None):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading benchmark parquet files needs pyarrow (pip install 'casa[bench]')") from e
    for f in files:
        try:  # pyarrow's errors (ArrowInvalid, ArrowIOError) do not name the file
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            batches = pf.iter_batches(batch_size=32, columns=cols)
            while True:
                try:
                    rows = next(batches).to_pylist()
                except StopIteration:
                    break
                yield from rows
        except (OSError, ValueError) as e:
            raise DamagedFileError(f, f"not a readable parquet file: {e}") from None


def _image(value, base: Path):
    """A datasets image struct / bytes / relative path -> bytes or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return value
    if not value:
        raise ValueError(f"{base}: a row has no image")
    return base / value


def _answers(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, int, float)) else [str(a) for a in value]


# ----------------------------------------------------------------------------- JSON layouts
def _find(root: Path, patterns) -> list[Path]:
    for pattern in patterns:
        found = sorted(root.rglob(pattern))
        if found:
            return found
    return []


def _records(file: Path):
    data = read_json(file)
    return data["data"] if isinstance(data, dict) and "data" in data else data


def _first_existing(*candidates: Path) -> Path:
    return next((c for c in candidates if c.exists()), candidates[0])


def _chartqa(root, split):
    files = _parquet_files(root, split)
    if files:
        for i, r in enumerate(_rows(files, ["question", "answer", "type", "image"])):
            yield Item(str(i), r["question"], _answers(r["answer"]), _image(r["image"], files[0].parent),
                       group=r.get("type"))
        return
    files = sorted(set(_find(root, [f"{split}_human.json"]) + _find(root, [f"{split}_augmented.json"])))
    for file in files:
        group = "human" if file.stem.endswith("human") else "augmented"
        for i, r in enumerate(_records(file)):
            image = _first_existing(file.parent / "png" / r["imgname"], file.parent / r["imgname"])
            yield Item(f"{group}-{i}", r["query"], _answers(r["label"]), image, group=group)


def _docvqa_like(root, split, subdir, json_patterns, image_key, image_dirs):
    files = _parquet_files(root, split, subdir)
    if files:
        for r in _rows(files, ["questionId", "question", "answers", "image"]):
            yield Item(str(r["questionId"]), r["question"], _answers(r["answers"]), _image(r["image"], files[0].parent))
        return
    for file in _find(root, json_patterns):
        for r in _records(file):
            name = r[image_key]
            image = _first_existing(*(file.parent / d / name for d in image_dirs))
            yield Item(str(r["questionId"]), r["question"], _answers(r.get("answers")), image)


def _docvqa(root, split):
    short = {"validation": "val"}.get(split, split)
    yield from _docvqa_like(root, split, "DocVQA", [f"{short}_v1.0*.json", f"{split}_v1.0*.json"], "image",
                            ["", ".."])


def _infovqa(root, split):
    short = {"validation": "val"}.get(split, split)
    yield from _docvqa_like(root, split, "InfographicVQA", [f"infographicsVQA_{short}_v1.0*.json",
                                                            f"infographicVQA_{short}_v1.0*.json"],
                            "image_local_name", ["infographicsvqa_images", "images", ""])


def _textvqa(root, split):
    files = _parquet_files(root, split)
    if files:
        for r in _rows(files, ["question_id", "question", "answers", "image"]):
            yield Item(str(r["question_id"]), r["question"], _answers(r["answers"]),
                       _image(r["image"], files[0].parent))
        return
    short = {"validation": "val"}.get(split, split)
    for file in _find(root, [f"TextVQA_0.5.1_{short}.json", f"TextVQA_*_{short}.json"]):
        for r in _records(file):
            image = _first_existing(*(file.parent / d / f"{r['image_id']}.jpg" for d in ("train_images", "images")))
            yield Item(str(r["question_id"]), r["question"], _answers(r["answers"]), image)


def _ai2d(root, split):
    files = _parquet_files(root, split)
    if files:
        for i, r in enumerate(_rows(files, ["question", "options", "answer", "image"])):
            yield Item(str(i), r["question"], [chr(65 + int(r["answer"]))], _image(r["image"], files[0].parent),
                       options=list(r["options"]))
        return
    qdir = _first_existing(root / "questions", root / "ai2d" / "questions")
    ids_file = _find(root, [f"ai2d_{split}_ids.csv"])
    keep = {line.strip() for line in ids_file[0].read_text().split() if line.strip()} if ids_file else None
    for file in sorted(qdir.glob("*.json")):
        data = read_json(file)
        name = data.get("imageName", file.name.removesuffix(".json"))
        if keep is not None and name.split(".")[0] not in keep:
            continue
        image = qdir.parent / "images" / name
        for question, q in data.get("questions", {}).items():
            yield Item(str(q.get("questionId", f"{name}-{question}")), question, [chr(65 + int(q["correctAnswer"]))],
                       image, options=list(q["answerTexts"]))


def _gqa(root, split):
    questions = _parquet_files(root, split, f"{split}_balanced_instructions")
    questions = [f for f in questions if "instruction" in str(f)] or questions
    if questions:
        images = [f for f in _parquet_files(root, split, f"{split}_balanced_images") if "image" in str(f.parent)]
        if not images:
            raise FileNotFoundError(f"{str(root)!r}: GQA questions found but no {split}_balanced_images parquet")
        by_id = {r["id"]: r["image"] for r in _rows(images, ["id", "image"])}  # encoded bytes, ~400 images
        for r in _rows(questions, ["id", "imageId", "question", "answer"]):
            yield Item(str(r["id"]), r["question"], _answers(r["answer"]),
                       _image(by_id[r["imageId"]], images[0].parent))
        return
    for file in _find(root, [f"{split}_balanced_questions.json"]):
        for qid, r in read_json(file).items():
            image = _first_existing(file.parent / "images" / f"{r['imageId']}.jpg", file.parent / f"{r['imageId']}.jpg")
            yield Item(str(qid), r["question"], _answers(r["answer"]), image)


LOADERS = {"chartqa": _chartqa, "docvqa": _docvqa, "infovqa": _infovqa, "textvqa": _textvqa, "ai2d": _ai2d,
           "gqa": _gqa}


def load_items(name: str, root, *, split: str | None = None):
    """Iterate over the questions (`Item`s) of benchmark `name` stored under `root`."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(LOADERS)}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{name}: benchmark root {str(root)!r} is a file, not a directory")
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: benchmark directory {str(root)!r} does not exist")
    split = split or DEFAULT_SPLITS[name]
    found = False
    items = LOADERS[name](root, split)
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except (KeyError, TypeError, IndexError, AttributeError) as e:  # a record without an expected field
            raise DataError(f"{name}: a record under {str(root)!r} does not have the expected layout "
                            f"({type(e).__name__}: {e}); expected the lmms-lab parquet files or the original "
                            "JSON layout (see casa.eval.stdbench.datasets)") from None
        found = True
        yield item
    if not found:
        raise FileNotFoundError(f"{name}: no {split} questions under {str(root)!r} (expected the lmms-lab parquet "
                                "files or the original JSON layout; see casa.eval.stdbench.datasets)")
