"""casa.files and casa.weights' reader: outputs never half-written or lost,
inputs that are damaged named as such."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from casa.files import (
    DamagedFileError,
    atomic_directory,
    atomic_file,
    check_output_dir,
    check_replaceable_dir,
    read_json,
)
from casa.weights import open_safetensors, read_safetensors, weight_files


def tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- atomic outputs
def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("one")
        (d / "stale.txt").write_text("old shard")
    assert tree(final) == {"a.txt": "one", "stale.txt": "old shard"}

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(final) as d:
            (d / "a.txt").write_text("two")
            raise RuntimeError("disk full")
    assert tree(final) == {"a.txt": "one", "stale.txt": "old shard"}  # the previous version, intact

    with atomic_directory(final) as d:
        (d / "a.txt").write_text("three")
    assert tree(final) == {"a.txt": "three"}  # replaced whole: no stale file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_ctrl_c_between_the_two_renames_restores_the_previous_version(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("one")
    real, calls = os.replace, []

    def second_rename_interrupted(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr("casa.files.os.replace", second_rename_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as d:
            (d / "a.txt").write_text("two")
    monkeypatch.undo()
    assert tree(final) == {"a.txt": "one"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("previous")
    with pytest.raises(ValueError):
        with atomic_file(path) as f:
            f.write("half")
            raise ValueError("boom")
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with atomic_file(path) as f:
        f.write("new")
    assert path.read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_users_umask_not_private_modes(tmp_path, umask):
    """Atomic files and directories (runs, models, results) are readable by whom the umask allows, as files
    made with open / mkdir are, not 0600 / 0700 like tempfile's temporaries."""
    import stat

    previous = os.umask(umask)
    try:
        with atomic_file(tmp_path / "result.json") as f:
            f.write("{}")
        with atomic_directory(tmp_path / "model") as d:
            (d / "config.json").write_text("{}")
        (tmp_path / "plain.txt").write_text("")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "result.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(tmp_path / "plain") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "config.json") == 0o666 & ~umask


# ----------------------------------------------------------------------------- output checks
def test_check_replaceable_dir(tmp_path):
    def is_ours(p):
        return (p / "ours.txt").is_file()

    def check(p, overwrite=False):
        return check_replaceable_dir(p, "--out", overwrite=overwrite, recognise=is_ours, kind="thing")

    assert check(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # a new path
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty") == tmp_path / "empty"  # an empty folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out '.*file' is a file, not a directory"):
        check(tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match=r"'.*file' is a file, not a directory"):
        check(tmp_path / "file" / "sub")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a", "b", "c", "d"):
        (other / name).write_text(name)
    with pytest.raises(ValueError, match=r"is a folder that is not a thing \(it holds a, b, c, \.\.\.\)"):
        check(other, overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "ours.txt").write_text("x")
    with pytest.raises(ValueError, match=r"already holds a thing; pass --overwrite"):
        check(ours)
    assert check(ours, overwrite=True) == ours
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file", "train.out_dir")


# ----------------------------------------------------------------------------- damaged inputs
def test_read_json_names_damaged_files(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"a": [1, 2')
    with pytest.raises(DamagedFileError, match=r"config.json' is damaged or incomplete \(not valid JSON"):
        read_json(f)
    f.write_text("")
    with pytest.raises(DamagedFileError, match=r"is damaged or incomplete \(empty file\)"):
        read_json(f)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_json(tmp_path / "nope.json")
    f.write_text(json.dumps({"a": 1}))
    assert read_json(f) == {"a": 1}


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b"", "empty file"),
    (lambda b: b[:5], "not a complete safetensors file"),
    (lambda b: b[: len(b) // 2], "not a complete safetensors file"),
    (lambda b: b[:-1], "not a complete safetensors file"),
    (lambda b: b"PK\x03\x04 a zip, say a pickle" * 4, "not a complete safetensors file"),
])
def test_safetensors_files_damaged_anyhow_are_named(tmp_path, damage, reason):
    d = tmp_path / "m"
    d.mkdir()
    file = d / "model.safetensors"
    tensors = {"a": torch.arange(64.0).reshape(8, 8), "b": torch.ones(3)}
    save_file(tensors, str(file))
    assert torch.equal(read_safetensors(file)["a"], tensors["a"])
    file.write_bytes(damage(file.read_bytes()))
    for read in (read_safetensors, lambda _: weight_files(d)):
        with pytest.raises(DamagedFileError) as e:
            read(file)
        assert str(e.value).startswith(f"{str(file)!r} is damaged or incomplete") and reason in str(e.value)


def test_a_damaged_shard_index_is_named(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of-0')
    with pytest.raises(DamagedFileError, match="index.json' is damaged or incomplete"):
        weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert weight_files(tmp_path) == {"a": tmp_path / "model-00001-of-00001.safetensors"}
    with open_safetensors(tmp_path / "model-00001-of-00001.safetensors") as f:
        assert list(f.keys()) == ["a"]
