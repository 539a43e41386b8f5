"""`casa eval` on bad inputs, through the real command: a non-zero exit, one line
naming the input, no traceback, and every file that existed before unchanged
(the model directory's earlier eval.json included)."""

import json

import pytest
from conftest import assert_user_error, byte_model_dir, run_casa, snapshot

TEXT_TOKENS = 512  # the training budget recorded in the model directory: the eval token limit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = byte_model_dir(tmp_path_factory.mktemp("bad_eval") / "m",
                          extra={"train": {"text_tokens": TEXT_TOKENS, "data": "color"}})
    (path / "eval.json").write_text('{"earlier": "result"}')  # a good earlier result, never to be lost
    return path


def chat(question: str, answer: str = "red", **meta) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], **meta})


def refused(model_dir, tmp_path, *args, names=(), env=None):
    """Run `casa eval --checkpoint MODEL ARGS` and check it was refused cleanly."""
    before = snapshot(model_dir, tmp_path)
    result = run_casa("eval", "--checkpoint", model_dir, *args, env=env)
    assert_user_error(result, *names, before=before, after=snapshot(model_dir, tmp_path))
    assert result.stderr.startswith("casa: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result


def test_flags_refused_by_argparse(model_dir, tmp_path):
    for flag in ("--n", "--limit", "--max-tokens", "--threads"):
        r = refused(model_dir, tmp_path, flag, "0", names=(flag, "'0'"))
        assert r.returncode == 2
    refused(model_dir, tmp_path, "--n", "-3", names=("--n", "'-3'"))


def test_flag_combinations_and_outputs(model_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    refused(model_dir, tmp_path, "--data", tmp_path / "x.jsonl", "--task", "color", names=("--data", "--task"))
    refused(model_dir, tmp_path, "--root", tmp_path, names=("--root", "--bench"))
    refused(model_dir, tmp_path, "--bench", "chartqa", names=("--bench", "--root"))
    refused(model_dir, tmp_path, "--json", tmp_path, names=("--json", str(tmp_path), "is a directory"))
    refused(model_dir, tmp_path, "--json", tmp_path / "file" / "r.json", names=("--json", "is a file"))


def test_checkpoints_that_are_not_models(model_dir, tmp_path):
    for bad in (tmp_path / "missing", model_dir / "config.json"):
        before = snapshot(model_dir, tmp_path)
        r = run_casa("eval", "--checkpoint", bad)
        assert_user_error(r, str(bad), "not a casa model directory", before=before, after=snapshot(model_dir, tmp_path))


def test_tasks_and_difficulty(model_dir, tmp_path):
    r = refused(model_dir, tmp_path, "--task", "color,nope", names=("'nope'", "color", "docvqa"))
    assert "unknown task" in r.stderr
    refused(model_dir, tmp_path, "--difficulty", "bars=0", names=("difficulty.bars=0", "must be >= 1"))
    refused(model_dir, tmp_path, "--difficulty", "bars", names=("'bars'", "key=value"))


def test_bad_data_files(model_dir, tmp_path):
    """One CLI run per kind of failure; the per-line checks are unit-tested in test_data.py."""
    out = tmp_path / "r.json"
    out.write_text("earlier")  # an explicit --json that exists: kept when the run fails
    image = {"type": "image", "path": "missing.png"}
    files = {
        "malformed.jsonl": ([chat("What colour?"), "{not json"], ("malformed.jsonl:2", "malformed JSON")),
        "image.jsonl": ([json.dumps({"messages": [{"role": "user", "content": [image, "What colour?"]},
                                                  {"role": "assistant", "content": "red"}]})],
                        ("image.jsonl:1", "missing.png")),
        "empty.jsonl": ([], ("empty.jsonl", "no sample")),
    }
    for name, (lines, names) in files.items():
        (tmp_path / name).write_text("".join(line + "\n" for line in lines))
        refused(model_dir, tmp_path, "--data", tmp_path / name, "--json", out, names=names)
    refused(model_dir, tmp_path, "--data", tmp_path / "absent.jsonl", names=("absent.jsonl", "no such data file"))
    # with --skip-bad-samples, a file with nothing usable left is still refused
    (tmp_path / "all_bad.jsonl").write_text("{not json\n[1]\n")
    refused(model_dir, tmp_path, "--data", tmp_path / "all_bad.jsonl", "--skip-bad-samples",
            names=("all_bad.jsonl", "no usable sample", "2 bad line"))
    assert out.read_text() == "earlier"


def test_a_prompt_over_the_token_limit_is_refused_before_any_compute(model_dir, tmp_path):
    question = "What colour? " + "x" * 100_000
    data = tmp_path / "long.jsonl"
    data.write_text(chat(question) + "\n")
    r = refused(model_dir, tmp_path, "--data", data,
                names=(f"{data}:1", f"limit of {TEXT_TOKENS}", "train.text_tokens", "--max-tokens"))
    # byte tokenizer: one token per character, plus <bos> <|user|> <|end|> <|assistant|>
    prompt = len(question) + 4
    assert f"needs {prompt + 24:,} tokens ({prompt:,} prompt tokens, 24 answer tokens)" in r.stderr


def test_a_good_run_replaces_the_earlier_result(model_dir, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("earlier")
    data = tmp_path / "d.jsonl"
    data.write_text(chat("What colour?") + "\n")
    r = run_casa("eval", "--checkpoint", model_dir, "--data", data, "--json", out, "--threads", "1")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["tasks"]["data"]["n"] == 1 and result["predictions"][0]["answer"] == "red"
    assert result["checkpoint"] == str(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "r.json"]  # no temporary file left
    assert (model_dir / "eval.json").read_text() == '{"earlier": "result"}'  # --json went elsewhere


def test_limits_and_backend_are_checked_before_the_model_loads(model_dir, tmp_path):
    """In-process: `casa.eval.run` refuses before `from_pretrained` (the cheap part of the CLI runs above)."""
    from casa.eval.decode import PromptTooLong
    from casa.eval.run import DEFAULT_TOKEN_LIMIT, check_backend, run, token_limit

    data = tmp_path / "d.jsonl"
    data.write_text(chat("What colour is it?") + "\n")
    with pytest.raises(PromptTooLong, match=r"needs 46 tokens \(22 prompt tokens, 24 answer tokens\), over the "
                                            r"model's limit of 20 \(--max-tokens\)"):
        run(model_dir, data=str(data), max_tokens=20)
    assert token_limit({"train": {"text_tokens": 300}}) == (300, "the sequence budget it was trained with, "
                                                                  "train.text_tokens")
    assert token_limit({"model": {}})[0] == DEFAULT_TOKEN_LIMIT and token_limit({}, 7) == (7, "--max-tokens")
    assert check_backend("windowed") == "windowed"
    with pytest.raises(ValueError, match="--backend 'dense': expected auto or one of reference"):
        check_backend("dense")


def test_a_video_part_for_a_model_without_gist_token_is_refused(tmp_path, capsys):
    """A model whose processor puts no gist token after images cannot give each video frame its own
    window: `casa eval` names the sample and says why, before the model loads (in-process: the
    command's own error path, without a subprocess)."""
    from PIL import Image

    from casa.cli import main

    no_gist = byte_model_dir(tmp_path / "m", extra={"processor": {"gist": False}})
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"f{i}.png")
    data = tmp_path / "clips.jsonl"
    data.write_text(chat("What colour?") + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "video", "frames": ["f0.png", "f1.png"]}, "Colour?"]},
                      {"role": "assistant", "content": "red"}]}) + "\n")
    before = snapshot(tmp_path)
    for blind in ([], ["--blind"]):
        assert main(["eval", "--checkpoint", str(no_gist), "--data", str(data), *blind]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"casa: error: {data}:2: message 0: a video part needs a gist token") and \
            "gist=False" in err and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before  # no eval.json written
