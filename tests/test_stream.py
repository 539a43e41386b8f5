"""Streaming captioner on real video files (encoded here with PyAV): sampling,
damaged videos, the `casa caption` command, its outputs, and a smoke run of
`casa bench stream`. Bad command lines are in test_bad_input_caption.py."""

import json

import av
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from casa.bench.stream import StreamBench
from casa.bench.stream import run as bench_run
from casa.cli import main
from casa.core.model import CasaModel
from casa.inference.captioner import Captioner
from casa.inference.generate import Sampling
from casa.inference.sources import StreamError, folder_frames, open_frames, video_frames
from casa.inference.writers import JsonlWriter, SrtWriter, parse_srt, srt_time
from casa.pretrained.directory import from_pretrained, save_pretrained
from casa.pretrained.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
pytestmark = pytest.mark.usefixtures("one_thread")


def shapes_frame(i, h=48, w=64):
    """A red square moving right over a blue disc moving down."""
    img = np.full((h, w, 3), 30, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 4 - 2 * i) ** 2 + (xx - 20) ** 2 < 64] = (40, 60, 220)
    x = (3 * i) % (w - 10)
    img[10:20, x : x + 10] = (230, 30, 30)
    return img


def encode_video(path, n, fps=10, size=(48, 64), faststart=False):
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("mpeg4", rate=fps)
    s.height, s.width = size
    s.pix_fmt = "yuv420p"
    s.bit_rate = 4_000_000
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(shapes_frame(i, *size), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    if n == 0:
        c.start_encoding()
    c.close()
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config("casa")
    cfg.lm.vocab_size = TOK.vocab_size
    model = CasaModel(cfg)
    with torch.no_grad():  # an untrained model that speaks in lowercase letters, so that captions show
        model.embed.weight[ord("a") : ord("z") + 1] *= 20
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(model, path, tokenizer=TOK)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode_video(tmp_path_factory.mktemp("video") / "clip.mp4", 20)  # 2 s at 10 fps


def read_outputs(srt, jsonl, summary=False):
    """SRT cues and JSONL caption lines (and the summary line, checked to be last and only)."""
    cues = parse_srt(srt.read_text(encoding="utf-8"))
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    summaries = [i for i, line in enumerate(lines) if line.get("summary")]
    assert summaries == ([len(lines) - 1] if lines and summary else [])
    return (cues, lines[:-1], lines[-1]) if summary else (cues, lines)


def test_srt_time():
    assert srt_time(0) == "00:00:00,000"
    assert srt_time(3661.5) == "01:01:01,500"
    assert srt_time(59.9996) == "00:01:00,000"
    assert srt_time(1.0 / 3) == "00:00:00,333"


def test_video_frames_at_requested_rate(video):
    all_frames = list(video_frames(video))
    assert len(all_frames) == 20 and all_frames[0].image.shape == (48, 64, 3)
    assert [round(f.time, 3) for f in all_frames[:3]] == [0.0, 0.1, 0.2]
    assert [round(f.duration, 3) for f in all_frames] == [0.1] * 20  # the last one until the video's end
    two = list(video_frames(video, fps=2))
    assert [round(f.time, 3) for f in two] == [0.0, 0.5, 1.0, 1.5]
    assert [round(f.duration, 3) for f in two] == [0.5] * 4
    # the decoded frames are the encoded ones (lossy codec: the closest synthetic frame is the right one)
    for f, k in zip(two, (0, 5, 10, 15)):
        errors = [float(np.abs(f.image.astype(int) - shapes_frame(j).astype(int)).mean()) for j in range(20)]
        assert int(np.argmin(errors)) == k


@pytest.mark.parametrize("fps,times", [
    (3, [0.0, 0.3, 0.7, 1.0, 1.3, 1.7]),  # grid 0, .333, .667, ...: the nearest frame of a 10 fps video
    (4, [0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7]),  # grid .25, .75, ...: a tie goes to the earlier frame
    (7, [0.0, 0.1, 0.3, 0.4, 0.6, 0.7, 0.9, 1.0, 1.1, 1.3, 1.4, 1.6, 1.7, 1.9]),  # 1.857 < 2.0, the end
])
def test_sampling_is_even_by_timestamp_and_cues_have_no_gaps(video, fps, times):
    frames = list(video_frames(video, fps=fps))
    got = [round(f.time, 3) for f in frames]
    assert got == times
    grid = [i / fps for i in range(len(got))]
    assert max(abs(t - g) for t, g in zip(got, grid)) <= 0.05 + 1e-9  # within half a source frame
    ends = [f.time + f.duration for f in frames]
    assert all(abs(end - nxt.time) < 1e-9 for end, nxt in zip(ends, frames[1:]))  # each cue ends at the next
    assert abs(ends[-1] - 2.0) < 1e-9  # the last one at the end of the video


def test_caption_cli_on_a_video(video, checkpoint, tmp_path, capsys):
    srt, jsonl = tmp_path / "out.srt", tmp_path / "out.jsonl"
    rc = main(["caption", str(video), "--checkpoint", str(checkpoint), "--fps", "2", "--srt", str(srt),
               "--jsonl", str(jsonl), "--max-new-tokens", "5", "--min-new-tokens", "5", "--threads", "1"])
    assert rc == 0
    cues, lines, summary = read_outputs(srt, jsonl, summary=True)
    assert summary == {"summary": True, "source": str(video), "frames": 4, "undecodable_frames": 0,
                       "interrupted": False}
    assert [line["timestamp"] for line in lines] == ["00:00:00,000", "00:00:00,500", "00:00:01,000",
                                                      "00:00:01,500"]
    for line in lines:
        assert {"time", "text", "ttft_ms", "decode_ms", "cache_bytes", "kv_tokens", "tokens"} <= set(line)
        assert line["ttft_ms"] > 0 and line["decode_ms"] > 0 and line["tokens"] == 5  # 4 decoded tokens take time
    assert len(cues) == sum(bool(line["text"]) for line in lines) >= 1
    assert cues[0][1:3] == ("00:00:00,000", "00:00:00,500")
    # casa state: one frame's images + the window's text; the SA cache grows by the text of a turn only
    sizes = [line["cache_bytes"] for line in lines]
    assert len({b - a for a, b in zip(sizes[1:], sizes[2:])}) == 1
    assert not (tmp_path / "out.srt.partial").exists() and not (tmp_path / "out.jsonl.partial").exists()
    out = capsys.readouterr()
    assert "captioned 4 frames" in out.err and "[   0.000s]" in out.out


def test_caption_cli_with_an_int8_cache(video, checkpoint, tmp_path):
    """`--cache-dtype int8`: the same frames captioned from caches of a byte per element plus a
    4-byte scale per row and head (head width 8 here: 12 / 32 of fp32's bytes)."""
    out = {}
    for dtype in ("model", "int8"):
        srt, jsonl = tmp_path / f"{dtype}.srt", tmp_path / f"{dtype}.jsonl"
        assert main(["caption", str(video), "--checkpoint", str(checkpoint), "--fps", "2", "--srt", str(srt),
                     "--jsonl", str(jsonl), "--max-new-tokens", "4", "--min-new-tokens", "4", "--threads", "1",
                     "--quiet", "--cache-dtype", dtype]) == 0
        out[dtype] = read_outputs(srt, jsonl, summary=True)[1]
    assert len(out["int8"]) == len(out["model"]) == 4
    for a, b in zip(out["model"], out["int8"]):
        assert b["cache_bytes"] * 32 == a["cache_bytes"] * 12 and b["kv_tokens"] == a["kv_tokens"]
    assert [a["text"] for a in out["model"]] == [b["text"] for b in out["int8"]]  # greedy: the same captions here


def test_captioner_api_any_iterator_and_bounded_history(checkpoint):
    model, tok = from_pretrained(checkpoint), load_tokenizer(checkpoint)
    from casa.inference.cache import History

    cap = Captioner(model, tok, sampling=Sampling(max_new_tokens=3), interval=0.25,
                    history=History(sink=2, window=8))
    frames = (shapes_frame(i) for i in range(12))  # a plain generator of arrays
    got = list(cap(frames))
    assert [c.time for c in got] == [0.25 * i for i in range(12)]
    assert got[-1].end == pytest.approx(3.0)
    assert got[-1].kv_tokens <= 2 + 8 + 4 + 8  # SA: sink + window; fusion: 4 image tokens + window text
    assert got[-1].cache_bytes == got[-2].cache_bytes  # flat
    # (seconds, image) pairs keep their time
    cap2 = Captioner(model, tok, sampling=Sampling(max_new_tokens=2))
    assert [c.time for c in cap2([(1.5, shapes_frame(0)), (7.0, shapes_frame(1))])] == [1.5, 7.0]


# ---------------------------------------------------------------------- damage
def run_cli(src, checkpoint, tmp_path, *extra):
    srt, jsonl = tmp_path / "o.srt", tmp_path / "o.jsonl"
    rc = main(["caption", str(src), "--checkpoint", str(checkpoint), "--srt", str(srt), "--jsonl", str(jsonl),
               "--max-new-tokens", "3", "--quiet", "--threads", "1", *extra])
    return rc, srt, jsonl


def test_unreadable_videos_are_named(tmp_path, video):
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"  # the index (at the end) is cut off
    data = video.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = encode_video(tmp_path / "empty.mp4", 0)
    blank = tmp_path / "blank.mp4"
    blank.write_bytes(b"")
    for path, why in [(bad, "cannot read video"), (truncated, "cannot read video|no video"), (empty, "no video"),
                      (blank, "cannot read video"), (tmp_path / "missing.mp4", "no such file")]:
        with pytest.raises(StreamError, match=why) as e:
            list(open_frames(path))
        assert str(path) in str(e.value)


def png_movie(path, n=20, corrupt=()):
    """A 10 fps PNG-in-MOV video (every frame its own packet); the packets of the
    frames in `corrupt` overwritten with noise, as a damaged file would be."""
    c = av.open(str(path), "w")
    s = c.add_stream("png", rate=10)
    s.height, s.width, s.pix_fmt = 48, 64, "rgb24"
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(shapes_frame(i), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    for i in corrupt:
        pos, size = packets[i]
        data[pos : pos + size] = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_corrupt_middle_is_skipped_counted_and_reported_once(tmp_path, checkpoint, capsys):
    movie = png_movie(tmp_path / "damaged.mov", corrupt=(8, 9, 10))
    warnings = []
    frames = video_frames(movie, warn=warnings.append)
    times = [round(f.time, 3) for f in frames]
    assert times == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
    assert frames.undecodable == 3
    assert len(warnings) == 1 and str(movie) in warnings[0] and "undecodable" in warnings[0]
    # the command: a warning naming the file, the count in the JSONL summary and the closing message
    rc, srt, jsonl = run_cli(movie, checkpoint, tmp_path, "--fps", "5")
    err = capsys.readouterr().err
    assert rc == 0 and err.count("casa: warning") == 1 and str(movie) in err
    assert "3 undecodable frames skipped" in err
    cues, lines, summary = read_outputs(srt, jsonl, summary=True)
    assert summary["undecodable_frames"] == 3 and summary["frames"] == len(lines) == 10
    # the frames nearest to the 5 fps grid among those that exist (grid 0.8 -> 0.7, 1.0 -> 1.1), no gap
    assert [round(line["time"], 3) for line in lines] == [0.0, 0.2, 0.4, 0.6, 0.7, 1.1, 1.2, 1.4, 1.6, 1.8]
    assert all(a["end"] == b["time"] for a, b in zip(lines, lines[1:]))


def test_truncated_video_is_captioned_as_far_as_it_goes(tmp_path, checkpoint, capsys):
    """Index first (faststart), data cut at 60%: the frames that are there are
    captioned, the missing ones counted, and the warning says why."""
    full = encode_video(tmp_path / "full.mp4", 20, faststart=True)
    cut = tmp_path / "cut.mp4"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    rc, srt, jsonl = run_cli(cut, checkpoint, tmp_path, "--fps", "2", "--min-new-tokens", "3")
    err = capsys.readouterr().err
    assert rc == 0 and str(cut) in err and "truncated or corrupt" in err and "of its 20 frames" in err
    cues, lines, summary = read_outputs(srt, jsonl, summary=True)
    assert 1 <= len(lines) < 4 and [line["frame"] for line in lines] == list(range(len(lines)))
    assert summary["undecodable_frames"] >= 2 and f"{summary['undecodable_frames']} undecodable" in err
    assert len(cues) == sum(bool(line["text"]) for line in lines)


def image_folder(path, sizes, bad_at=None):
    path.mkdir()
    for i, (h, w) in enumerate(sizes):
        file = path / f"{i:03d}.png"
        if i == bad_at:
            file.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        else:
            Image.fromarray(shapes_frame(i, h, w)).save(file)
    (path / "notes.txt").write_text("not a frame")
    return path


@pytest.mark.parametrize("case", ["size_change", "corrupt_image"])
def test_errors_mid_stream_keep_the_old_outputs_and_the_partial_ones(tmp_path, checkpoint, capsys, case):
    sizes = [(48, 64)] * 5
    if case == "size_change":
        sizes[3] = (40, 40)
    folder = image_folder(tmp_path / "frames", sizes, bad_at=3 if case == "corrupt_image" else None)
    (tmp_path / "o.srt").write_text("an earlier run's file\n")
    rc, srt, jsonl = run_cli(folder, checkpoint, tmp_path, "--fps", "4", "--min-new-tokens", "3")
    err = capsys.readouterr().err
    assert rc == 2 and "003.png" in err and "o.srt.partial" in err and "o.jsonl.partial" in err
    assert ("differs from the stream's 64x48" if case == "size_change" else "cannot read image") in err
    assert srt.read_text() == "an earlier run's file\n" and not jsonl.exists()  # destinations untouched
    cues, lines = read_outputs(tmp_path / "o.srt.partial", tmp_path / "o.jsonl.partial")  # valid, frames 0-2
    assert [line["frame"] for line in lines] == [0, 1, 2]
    assert [line["timestamp"] for line in lines] == ["00:00:00,000", "00:00:00,250", "00:00:00,500"]
    assert len(cues) == sum(bool(line["text"]) for line in lines)
    if case == "size_change":  # the option accepts it
        rc, srt, jsonl = run_cli(folder, checkpoint, tmp_path, "--fps", "4", "--allow-size-change",
                                 "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty",
                                 "1.3", "--end-slope", "0.1", "--sink", "2", "--window", "6")
        assert rc == 0 and len(read_outputs(srt, jsonl, summary=True)[1]) == 5


def test_writers_are_valid_after_every_entry(tmp_path, checkpoint):
    """Read the partial files back after each frame, while the stream is still
    open; the destinations appear, complete, on commit."""
    model, tok = from_pretrained(checkpoint), load_tokenizer(checkpoint)
    cap = Captioner(model, tok, sampling=Sampling(max_new_tokens=3))
    srt, jsonl = tmp_path / "live.srt", tmp_path / "live.jsonl"
    with SrtWriter(srt) as sw, JsonlWriter(jsonl) as jw:
        assert read_outputs(sw.partial, jw.partial) == ([], [])
        for i, c in enumerate(cap(shapes_frame(k) for k in range(3))):
            c.text = f"caption {i}\n\nwith a blank line" if i != 1 else "   "  # an empty caption: no cue
            sw.write(c)
            jw.write(c)
            cues, lines = read_outputs(sw.partial, jw.partial)
            assert len(lines) == i + 1 and len(cues) == (1 if i < 2 else 2)
            assert not srt.exists() and not jsonl.exists()
    assert read_outputs(srt, jsonl) == (cues, lines) and not sw.partial.exists()
    assert cues[-1][3] == "caption 2\nwith a blank line"
    with pytest.raises(ValueError, match="invalid SRT"):
        parse_srt("1\n00:00:00,000 --> 00:00:01,000\n")  # a cue without text
    # an error inside the block: the destination keeps its content, the partial file its entries
    with pytest.raises(RuntimeError), SrtWriter(srt) as sw:
        c.text = "a new caption"
        sw.write(c)
        raise RuntimeError("boom")
    assert parse_srt(srt.read_text()) == cues and parse_srt(sw.partial.read_text())[0][3] == "a new caption"


def test_folder_frames_checks(tmp_path, video):
    with pytest.raises(StreamError, match="above the video's frame rate 10"):
        video_frames(video, fps=25)
    with pytest.raises(StreamError, match="no image files"):
        folder_frames(tmp_path)
    with pytest.raises(StreamError, match="must be > 0"):
        video_frames(tmp_path / "x.mp4", fps=-1)


# --------------------------------------------------------------------------- bench
def test_bench_stream_smoke(tmp_path):
    cfg = StreamBench(variants=["casa", "insertion"], turns=6, image_tokens=16, new_tokens=3, d_model=32,
                      layers=2, heads=4, kv_heads=2, d_ff=64, max_cache_bytes=15_000)
    out = bench_run(cfg, json_path=tmp_path / "s.json", plot_path=tmp_path / "s.png", isolate=False, log=None)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["config"]["turns"] == 6 and (tmp_path / "s.png").stat().st_size > 1000
    casa, ins = data["runs"]
    assert casa["variant"] == "casa" and len(casa["turns"]) == 6 and casa["summary"]["limit_hit"] is None
    for t in casa["turns"]:
        assert set(t) >= {"turn", "ttft_ms", "decode_tok_s", "kv_tokens", "cache_bytes", "peak_mem_bytes",
                          "session_mem_bytes"}
        assert t["peak_mem_bytes"] > 50 * 2**20 > t["session_mem_bytes"]  # the process vs the session
    # insertion's cache grows by the image tokens of each turn, until the byte limit stops it
    assert ins["summary"]["limit_hit"] == "memory" and 1 <= len(ins["turns"]) < 6
    assert [t["kv_tokens"] for t in ins["turns"]] == [20 * (i + 1) for i in range(len(ins["turns"]))]
    growth = casa["summary"]["cache_growth_bytes_per_turn"]
    assert growth == casa["summary"]["text_kv_bytes_per_turn"]  # casa's cache grows by its text only
    assert out["compare"] and out["compare"][0]["variant"] == "casa"
    assert {"first_10pct", "last_10pct", "oom", "limit_hit"} <= set(casa["summary"])


def test_bench_stream_bound_columns_and_bfloat16():
    """Bytes per decoded token = the weights it reads + the cache; the bound is those
    bytes at the bandwidth measured in the run; bfloat16 halves both."""
    kw = dict(variants=["casa", "ca"], turns=2, image_tokens=16, new_tokens=2, d_model=32, layers=2, heads=4,
              kv_heads=2, d_ff=64, bandwidth_mib=8)
    runs = {dtype: {r["variant"]: r for r in bench_run(StreamBench(**kw, dtype=dtype), isolate=False,
                                                       log=None)["runs"]}
            for dtype in ("float32", "bfloat16")}
    # per block: norms 2 x 32, SA q/k/v/o 1024 + 512 + 512 + 1024, SwiGLU 3 x 32 x 64,
    # fusion norm 32 + q/k/v/o; then the final norm, lm_head 264 x 32 and one embedding row
    block = 64 + 3072 + 6144 + 32 + 3072
    casa_params = 2 * block + 32 + 264 * 32 + 32
    ca_params = casa_params - 2 * 1024  # ca's fusion k/v projections run only when images arrive
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        casa, ca = runs[dtype]["casa"], runs[dtype]["ca"]
        assert casa["summary"]["decode_weight_bytes"] == casa_params * size
        assert ca["summary"]["decode_weight_bytes"] == ca_params * size
        assert casa["summary"]["bandwidth_bytes_s_start"] == casa["turns"][0]["bandwidth_bytes_s"] > 0
        for t in casa["turns"]:
            assert t["bytes_per_token"] == casa_params * size + t["cache_bytes"]
            assert t["bound_ms"] == pytest.approx(t["bytes_per_token"] / t["bandwidth_bytes_s"] * 1e3, rel=1e-3)
            assert t["bound_ratio"] == pytest.approx(t["decode_ms_per_token"] / t["bound_ms"], rel=1e-2)
    f32, b16 = runs["float32"]["casa"]["turns"], runs["bfloat16"]["casa"]["turns"]
    assert [t["cache_bytes"] for t in f32] == [2 * t["cache_bytes"] for t in b16]


def test_bench_stream_int8_cache():
    """`--cache-dtype int8`: the caches hold a byte per element and a 4-byte scale per row and head,
    which the bytes per token (and so the bound) count; casa's cache still grows by its text only."""
    kw = dict(variants=["casa"], turns=3, image_tokens=16, new_tokens=2, d_model=32, layers=2, heads=4,
              kv_heads=2, d_ff=64, bandwidth_mib=8)
    runs = {c: bench_run(StreamBench(**kw, cache_dtype=c), isolate=False, log=None)["runs"][0]
            for c in ("model", "int8")}
    D = 32 // 4
    weights = runs["int8"]["summary"]["decode_weight_bytes"]
    for f32, i8 in zip(runs["model"]["turns"], runs["int8"]["turns"], strict=True):
        assert i8["cache_bytes"] * 4 * D == f32["cache_bytes"] * (D + 4) and i8["kv_tokens"] == f32["kv_tokens"]
        assert i8["bytes_per_token"] == weights + i8["cache_bytes"]
    summary = runs["int8"]["summary"]
    assert summary["cache_growth_bytes_per_turn"] == summary["text_kv_bytes_per_turn"] == 3 * 2 * 2 * 2 * (D + 4)
    with pytest.raises(ValueError, match="--cache-dtype 'fp8'"):
        StreamBench(cache_dtype="fp8")


def test_bench_stream_isolated_and_cli(tmp_path):
    rc = main(["bench", "stream", "--variants", "ca", "--turns", "3", "--image-tokens", "16", "--new-tokens", "2",
               "--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--d-ff", "64",
               "--json", str(tmp_path / "b.json")])
    assert rc == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["isolate"] and len(data["runs"][0]["turns"]) == 3
    assert main(["bench", "stream", "--variants", "nope", "--json", str(tmp_path / "c.json")]) == 2
    assert main(["bench", "stream", "--dtype", "float16", "--json", str(tmp_path / "c.json")]) == 2


def test_several_sources_at_once_give_each_its_solo_captions(checkpoint, tmp_path, capsys):
    """`casa caption A B C --out-dir DIR`: one loaded model, a thread per source, their decoded tokens
    batched; every source's SRT and JSONL captions are those `casa caption` writes for it alone."""
    from casa.core import cpu_kernels

    sources = [encode_video(tmp_path / f"clip{i}.mp4", 10 + 5 * i) for i in range(3)]
    flags = ["--checkpoint", str(checkpoint), "--fps", "4", "--max-new-tokens", "6", "--min-new-tokens", "3",
             "--threads", "1", "--quiet"]
    alone = []
    for i, src in enumerate(sources):
        srt = tmp_path / f"alone{i}.srt"
        assert main(["caption", str(src), "--srt", str(srt), *flags]) == 0
        alone.append(parse_srt(srt.read_text()))
    capsys.readouterr()
    out = tmp_path / "many"
    assert main(["caption", *map(str, sources), "--out-dir", str(out), *flags]) == 0
    for i, src in enumerate(sources):
        cues, lines, summary = read_outputs(out / f"{i}_clip{i}.srt", out / f"{i}_clip{i}.jsonl", summary=True)
        assert cues == alone[i] and summary["source"] == str(src) and summary["frames"] == len(lines) >= 3
    err = capsys.readouterr().err
    assert all(f"[{i}] captioned" in err for i in range(3))
    if cpu_kernels.available():  # one thread per source: the kernel path, so the tokens went through the batcher
        assert "3 sources" in err and "batched steps" in err
    assert main(["caption", *map(str, sources[:2]), "--srt", str(tmp_path / "x.srt"), *flags]) == 2
    assert "several sources: give --out-dir DIR" in capsys.readouterr().err
    assert main(["caption", str(sources[0]), "--out-dir", str(out), *flags]) == 2
    assert "--out-dir is for several sources" in capsys.readouterr().err
