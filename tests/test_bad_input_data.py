"""Bad data inputs: `casa data export` refusals through the real command, and the
training data spec (`data=...`), whose rule lives in `casa.data.dataset.parse_data_spec`."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_user_error, run_casa, snapshot

from casa.data import JsonlSource, SyntheticSource, make_source, parse_data_spec
from casa.data.sample import DataError
from casa.eval.synthetic import eval_samples_for

CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]})


def refused_export(tmp_path, *args, names=()):
    before = snapshot(tmp_path)
    result = run_casa("data", "export", *args)
    assert_user_error(result, *names, before=before, after=snapshot(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("casa: error: ") and result.stderr.count("\n") == 1
    return result


def test_export_refuses_counts_a_file_and_bad_items(tmp_path):
    (tmp_path / "color.jsonl").write_text("an earlier export")
    refused_export(tmp_path, "--task", "color", "--n", "-3", tmp_path, names=("--n", "'-3'", "> 0"))
    refused_export(tmp_path, "--task", "color", "--n", "0", tmp_path, names=("--n", "'0'"))
    refused_export(tmp_path, "--task", "color", tmp_path / "color.jsonl",
                   names=("output directory", "color.jsonl", "is a file"))
    refused_export(tmp_path, "--task", "color", tmp_path / "color.jsonl" / "sub",
                   names=("color.jsonl", "is a file, not a directory"))
    refused_export(tmp_path, "--task", "color", "--difficulty", "bars", tmp_path, names=("'bars'", "key=value"))


def test_export_refuses_unknown_tasks_and_knobs(tmp_path):
    r = refused_export(tmp_path, "--task", "nope", tmp_path, names=("'nope'", "chartqa", "video"))
    assert "unknown task" in r.stderr
    refused_export(tmp_path, "--task", "color", "--difficulty", "noise=2", tmp_path,
                   names=("difficulty.noise=2", "must be <= 1.0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written by a refused export


def test_training_data_that_is_a_json_file_is_not_taken_for_a_task(tmp_path):
    (tmp_path / "foo.json").write_text(CHAT)
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    tiny = ["model.lm.vocab_size=264", "model.lm.d_model=32", "model.lm.n_layers=1", "model.vision.d_model=16",
            "model.vision.n_layers=1", "model.vision.image_size=16", f"data={tmp_path / 'foo.json'}",
            f"out_dir={out}", "steps=1"]
    r = run_casa("train", *[a for item in tiny for a in ("--set", item)], "--quiet")
    assert_user_error(r, "foo.json", "JSONL", ".jsonl", before=before, after=snapshot(tmp_path))


# ----------------------------------------------------------------------------- the data-spec rule, in-process
def test_task_names_and_jsonl_files(tmp_path):
    assert parse_data_spec("color") == ["color"]
    assert parse_data_spec("color, count") == ["color", "count"]
    (tmp_path / "d.jsonl").write_text(CHAT + "\n")
    assert parse_data_spec(str(tmp_path / "d.jsonl")) == tmp_path / "d.jsonl"
    src = make_source(str(tmp_path / "d.jsonl"))
    assert isinstance(src, JsonlSource) and src[0].messages[1]["content"][0]["text"] == "yes"
    src = make_source("count,color", seed=3)
    assert isinstance(src, SyntheticSource) and src.tasks == ["count", "color"]
    assert src[1].meta["task"] == "color"


@pytest.mark.parametrize("spec", ["foo.json", "data/train", "foo.jsonl.gz", "./color"])
def test_a_path_that_is_not_jsonl_is_refused(spec):
    with pytest.raises(DataError, match=rf"data {spec!r}: expected a JSONL file \(suffix .jsonl"):
        parse_data_spec(spec)


def test_an_existing_file_without_suffix_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mydata").write_text(CHAT + "\n")
    with pytest.raises(DataError, match="'mydata': expected a JSONL file"):
        make_source("mydata")
    with pytest.raises(DataError, match=r"unknown task\(s\) \['nothing'\]; expected comma-separated names from "
                                        r"\['bars', 'chartqa', 'color', .*\], or a .jsonl file"):
        make_source("color,nothing")
    with pytest.raises(FileNotFoundError, match="'absent.jsonl': no such data file"):
        make_source("absent.jsonl")


def test_eval_data_follows_the_same_rule(tmp_path):
    cfg = SimpleNamespace(eval_data="foo.json", data="color", seed=0, difficulty={}, skip_bad_samples=False)
    with pytest.raises(DataError, match="'foo.json': expected a JSONL file"):
        eval_samples_for(cfg, 2)
    cfg.eval_data = None
    assert [s.meta["task"] for s in eval_samples_for(cfg, 2)] == ["color", "color"]
    (tmp_path / "e.jsonl").write_text(CHAT + "\n" + CHAT + "\n")
    cfg.eval_data = str(tmp_path / "e.jsonl")
    assert [s.source for s in eval_samples_for(cfg, 2)] == [f"{tmp_path / 'e.jsonl'}:1", f"{tmp_path / 'e.jsonl'}:2"]


def test_data_video_writes_a_sample_video_and_its_reference_captions(tmp_path, capsys):
    import av

    from casa.cli import main

    out = tmp_path / "sample.mp4"
    assert main(["data", "video", str(out), "--frames", "3", "--fps", "2", "--size", "64"]) == 0
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 3 and (frames[0].width, frames[0].height) == (64, 64)
    assert [float(f.time) for f in frames] == [0.0, 0.5, 1.0]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out}: 3 frames") and len(printed) == 4
    assert main(["data", "video", str(tmp_path / "v.gif")]) == 2
    assert main(["data", "video", str(tmp_path / "v.mp4"), "--size", "63"]) == 2
    assert not (tmp_path / "v.mp4").exists() and "expected an even number" in capsys.readouterr().err
