"""`casa caption` on bad input, run as a user runs it (a subprocess): a clear
one-line error naming the input, exit code 2, no traceback, and every file
that existed before left as it was. Also Ctrl-C: exit 130, no traceback, the
outputs saved and valid."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_casa, snapshot, tiny_config
from PIL import Image
from test_stream import encode_video, shapes_frame

from casa.core.model import CasaModel
from casa.inference.writers import parse_srt
from casa.pretrained.directory import save_pretrained
from casa.pretrained.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GOOD_SRT = "1\n00:00:00,000 --> 00:00:01,000\nan earlier run\n\n"
GOOD_JSONL = '{"frame": 0, "text": "an earlier run"}\n'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config("casa")
    cfg.lm.vocab_size = TOK.vocab_size
    return save_pretrained(CasaModel(cfg), tmp_path_factory.mktemp("ckpt") / "model", tokenizer=TOK)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode_video(tmp_path_factory.mktemp("video") / "clip.mp4", 10)


@pytest.fixture
def earlier(tmp_path):
    """Good outputs of an earlier run at the destination paths, and their snapshot."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.srt").write_text(GOOD_SRT)
    (out / "a.jsonl").write_text(GOOD_JSONL)
    return out, snapshot(out)


def caption(src, checkpoint, out, *extra):
    return run_casa("caption", src, "--checkpoint", checkpoint, "--srt", out / "a.srt", "--jsonl", out / "a.jsonl",
                    "--max-new-tokens", "3", "--threads", "1", "--quiet", *extra)


def test_unreadable_sources(tmp_path, checkpoint, earlier):
    out, before = earlier
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    empty_folder = tmp_path / "frames"
    empty_folder.mkdir()
    for src, why in [(zero, "cannot read video"), (text, "cannot read video"), (noise, "cannot read video"),
                     (tmp_path / "missing.mp4", "no such file"), (empty_folder, "no image files")]:
        result = caption(src, checkpoint, out)
        assert_user_error(result, src, why, before=before, after=snapshot(out))
        assert result.returncode == 2 and result.stderr.count("\n") == 1  # one line


def test_bad_flags_and_output_paths(tmp_path, video, checkpoint, earlier):
    out, before = earlier
    for fps in ("0", "-2", "nan"):
        result = caption(video, checkpoint, out, "--fps", fps)
        assert_user_error(result, "--fps", repr(fps), before=before, after=snapshot(out))
    same = run_casa("caption", video, "--checkpoint", checkpoint, "--srt", out / "a.srt", "--jsonl", out / "a.srt")
    assert_user_error(same, "--srt and --jsonl", out / "a.srt", before=before, after=snapshot(out))
    onto_video = run_casa("caption", video, "--checkpoint", checkpoint, "--srt", video)
    assert_user_error(onto_video, "--srt", video)
    assert video.stat().st_size > 1000  # not replaced
    parent_file = out / "a.srt" / "b.srt"
    assert_user_error(run_casa("caption", video, "--checkpoint", checkpoint, "--srt", parent_file),
                      parent_file, "is a file", before=before, after=snapshot(out))
    assert_user_error(run_casa("caption", video, "--checkpoint", checkpoint, "--jsonl", out),
                      out, "is a directory", before=before, after=snapshot(out))


def test_not_a_model(tmp_path, video, earlier):
    out, before = earlier
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    for ckpt in (llama, tmp_path / "nothing"):
        result = caption(video, ckpt, out)
        assert_user_error(result, ckpt, "not a casa model", before=before, after=snapshot(out))
        assert not list(out.glob("*.partial"))


def test_failure_mid_stream_keeps_the_earlier_outputs(tmp_path, checkpoint, earlier):
    out, before = earlier
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(shapes_frame(i)).save(folder / f"{i:03d}.png")
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = caption(folder, checkpoint, out)
    assert_user_error(result, folder / "002.png", "cannot read image", out / "a.jsonl.partial", before=before,
                      after={k: v for k, v in snapshot(out).items() if not k.endswith(".partial")})
    lines = [json.loads(x) for x in (out / "a.jsonl.partial").read_text().splitlines()]
    assert [x["frame"] for x in lines] == [0, 1]  # the captions made before it, valid
    srt_partial = out / "a.srt.partial"  # kept only if it holds a cue (an untrained model may say nothing)
    assert (str(srt_partial) in result.stderr) == srt_partial.exists()
    if srt_partial.exists():
        assert len(parse_srt(srt_partial.read_text())) == sum(bool(x["text"].strip()) for x in lines)


def test_ctrl_c_saves_valid_outputs(tmp_path, checkpoint, earlier):
    """SIGINT while captioning: exit 130, no traceback, a message saying what was
    written, the destinations replaced by valid files ending with a summary."""
    import os

    out, before = earlier
    long_video = encode_video(tmp_path / "long.mp4", 600, fps=30)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CASA_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "casa.cli", "caption", str(long_video), "--checkpoint",
                             str(checkpoint), "--srt", str(out / "a.srt"), "--jsonl", str(out / "a.jsonl"),
                             "--max-new-tokens", "6", "--min-new-tokens", "6", "--threads", "1", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    partial, deadline = out / "a.jsonl.partial", time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still captioning
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted after" in err and str(out / "a.srt") in err
    lines = [json.loads(x) for x in (out / "a.jsonl").read_text().splitlines()]
    captions, summary = lines[:-1], lines[-1]
    assert summary["summary"] and summary["interrupted"] and summary["frames"] == len(captions) >= 3
    assert [c["frame"] for c in captions] == list(range(len(captions))) and len(captions) < 600
    assert f"interrupted after {len(captions)} frames" in err
    assert len(parse_srt((out / "a.srt").read_text())) == sum(bool(c["text"]) for c in captions)
    assert not list(out.glob("*.partial"))
