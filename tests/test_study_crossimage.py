"""Cross-image reasoning across non-adjacent frames (`casa.study.crossimage`, the `match` / `recall`
tasks and `FusionConfig.frame_memory`): exact values on tiny models, offline, seconds."""

import copy
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_cache import N_TOK, POINTS, T, inputs, model_for, uncached  # the cached-decode tests' tiny model

from casa.config import ConfigError, FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.model import CasaModel, memory_tokens
from casa.data import Processor
from casa.data.tasks import COLORS, difficulty, make_sample
from casa.eval.decode import greedy_decode, greedy_decode_uncached
from casa.eval.synthetic import eval_samples, questions
from casa.inference.session import Session
from casa.pretrained.tokenizer import ByteTokenizer
from casa.study.crossimage import (
    ARMS,
    finding,
    frame_cache_bytes,
    plot_crossimage,
    run_crossimage,
    section,
    summarise,
    verdict,
)

D4 = difficulty({"frames": 4, "image_size": 24})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------ the tasks
def _question(s):
    return s.messages[0]["content"][1]["text"], s.messages[1]["content"][0]["text"]


def _frame_colors(s) -> list[str]:
    """Each frame's colour read back from its pixels: the palette colour nearest the mean non-white pixel."""
    [video] = [p for p in s.messages[0]["content"] if p["type"] == "video"]
    out = []
    for frame in video["frames"]:
        px = np.asarray(frame, dtype=np.float32).reshape(-1, 3)
        ink = px[(px < 250).any(1)].mean(0)
        out.append(min(COLORS, key=lambda c: float(((np.array(COLORS[c]) - ink) ** 2).sum())))
    return out


@pytest.mark.parametrize("task", ["match", "recall"])
def test_answers_are_right_by_construction(task):
    """Regenerated frames show the colours the sample's metadata lists, and the answer follows from them."""
    for i in range(12):
        s = make_sample(task, 5, i, D4)
        colors = s.meta["colors"]
        assert _frame_colors(make_sample(task, 5, i, D4)) == colors and len(colors) == 4
        question, answer = _question(s)
        if task == "match":
            assert answer == ("yes" if colors[0] == colors[-1] else "no")
            assert colors[-1] not in colors[1:-1]  # no middle frame shares the last one's colour
        else:
            asked = question.split("the ")[1].split(" shape")[0]
            assert [f + 1 for f, c in enumerate(colors) if c == asked] == [int(answer)] and answer != "4"
    enc = Processor(ByteTokenizer(), VisionConfig(image_size=16, patch_size=8)).encode(s)
    assert len(enc.points) == len(set(enc.points)) == 4  # one window per frame, each closed by its gist


@pytest.mark.parametrize("task,prior", [("match", 0.5), ("recall", 1 / 3)])
def test_answer_is_not_in_the_last_frame(task, prior):
    """Answers are balanced (the stated blind prior), and the best rule from the last frame alone (its
    caption: colour, kind, cell), fitted on some samples, does no better than the prior on others."""
    d = difficulty({"frames": 4, "image_size": 8})
    samples = [make_sample(task, 0, i, d) for i in range(900)]
    answers = Counter(_question(s)[1] for s in samples)
    assert max(answers.values()) / len(samples) < prior + 0.06
    fit = defaultdict(Counter)
    for s in samples[:600]:
        fit[(_question(s)[0], s.meta["captions"][-1])][_question(s)[1]] += 1
    rule = {k: c.most_common(1)[0][0] for k, c in fit.items()}
    hits = sum(rule.get((_question(s)[0], s.meta["captions"][-1])) == _question(s)[1] for s in samples[600:])
    assert hits / 300 < prior + 0.08


# ------------------------------------------------------------ the config knob
def test_frame_memory_rules():
    assert FusionConfig().frame_memory == 0
    for bad, words in (({"frame_memory": 3}, "expected a square"), ({"frame_memory": -1}, "must be >= 0"),
                       ({"variant": "insertion", "frame_memory": 4}, "already keeps every image token")):
        with pytest.raises(ConfigError, match=words):
            ModelConfig.from_dict({"fusion": {"variant": "casa", **bad}})
    with pytest.raises(ConfigError, match="more than the 4 tokens"):
        tiny_config("casa", frame_memory=9)
    with pytest.raises(ConfigError, match="their own sizes"):
        ModelConfig(vision=VisionConfig(min_pixels=64, max_pixels=256), fusion=FusionConfig(frame_memory=1))
    with pytest.raises(ConfigError, match="multimodal RoPE"):
        ModelConfig(lm=LMConfig(d_model=32, n_heads=2, n_kv_heads=1, mrope_section=[2, 3, 3]),
                    fusion=FusionConfig(frame_memory=1))
    cfg = tiny_config("casa")
    cfg.fusion = FusionConfig(frame_memory=16)  # replaced after the config was built: the model checks again
    with pytest.raises(ConfigError, match="more than the 4 tokens"):
        CasaModel(cfg)


def test_memory_tokens_pool_the_grid():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(32, 3)  # two 4 x 4 images, width 3
    four = memory_tokens(x, torch.tensor([16, 16]), 4)
    grid = x[:16].reshape(4, 4, 3)
    assert four.shape == (8, 3)
    torch.testing.assert_close(four[0], grid[:2, :2].mean((0, 1)))
    torch.testing.assert_close(four[3], grid[2:, 2:].mean((0, 1)))
    torch.testing.assert_close(memory_tokens(x, torch.tensor([16, 16]), 1), x.reshape(2, 16, 3).mean(1))
    assert torch.equal(memory_tokens(x, [16, 16], 16), x)
    with pytest.raises(ValueError, match="square grid"):
        memory_tokens(x[:12], [12], 1)


# --------------------------------------------------------------- the model
def _session(m, ids, embeds, schedule, *, split_images=False):
    """Feed `ids` in chunks of the sizes in `schedule`, each image right before its insertion point
    (images sharing a point in one call, or with `split_images` one call each)."""
    s, out, t, img, sizes = Session(m), [], 0, 0, iter(schedule)
    while t < len(ids):
        here = [j for j in range(img, len(POINTS)) if POINTS[j] == t]
        if here:
            for group in ([[j] for j in here] if split_images else [here]):
                s.add_image_embeds(embeds[group])
            img = here[-1] + 1
        nxt = [p for p in POINTS[img:] if p > t]
        stop = min(nxt[0] if nxt else len(ids), t + next(sizes, 1))
        out.append(s.forward_text(ids[t:stop]))
        t = stop
    return torch.cat(out), s


def test_frame_memory_zero_is_todays_model():
    """`frame_memory=0` (the default) is the model without the knob: a config saved before it existed
    loads to the same model, same parameters, bit-identical logits; k > 0 adds no parameter and changes
    the logits after the first image only."""
    ids, embeds = inputs()
    today = model_for("casa")
    old_dict = tiny_config("casa").to_dict()
    old_dict["fusion"].pop("frame_memory")  # as a config.json written before the knob
    again = CasaModel(ModelConfig.from_dict(old_dict)).eval()
    again.load_state_dict(today.state_dict())
    assert torch.equal(uncached(today, ids, embeds), uncached(again, ids, embeds))
    assert torch.equal(_session(today, ids, embeds, [1] * T)[0], _session(again, ids, embeds, [1] * T)[0])
    memory = CasaModel(tiny_config("casa", frame_memory=1)).eval()
    assert memory.state_dict().keys() == today.state_dict().keys()
    memory.load_state_dict(today.state_dict())
    a, b = uncached(today, ids, embeds), uncached(memory, ids, embeds)
    assert torch.equal(a[:POINTS[0]], b[:POINTS[0]]) and not torch.allclose(a[POINTS[0]:], b[POINTS[0]:])


@pytest.mark.parametrize("variant,placement", [("casa", "parallel"), ("casa", "before"), ("casa", "replace"),
                                               ("ca", "parallel"), ("gated_ca", "parallel"), ("ca_ffn", "parallel")])
@pytest.mark.parametrize("k", [1, 4])
def test_cached_decode_equals_uncached_forward_with_frame_memory(variant, placement, k):
    m = model_for(variant, placement, frame_memory=k)  # gated_ca's gates open part-way (model_for)
    ids, embeds = inputs()
    ref = uncached(m, ids, embeds)
    for schedule, split in (([T], False), ([1] * T, False), ([2, 5, 1, 3, 1, 1, 4], True)):
        got, s = _session(m, ids, embeds, schedule, split_images=split)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (s.text_tokens, s.memory_tokens, s.position) == (T, k * len(POINTS), T + k * len(POINTS))


def test_batched_greedy_decode_with_frame_memory(threads):
    """Evaluation's cached, batched decoding (a session's prefill, then rows) equals the uncached one;
    one thread takes the CPU kernels where they are built."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                        "n_kv_heads": 2, "d_ff": 64},
                                 "vision": {"image_size": 16, "patch_size": 4, "d_model": 16, "n_layers": 1,
                                            "n_heads": 2, "d_ff": 32},
                                 "fusion": {"variant": "casa", "frame_memory": 4}})
    model = CasaModel(cfg).eval()
    proc = Processor(ByteTokenizer(), cfg.vision)
    prompts = [q.prompt for q in questions(eval_samples(["match", "recall"], 2, difficulty={"frames": 4}), proc)[0]]
    assert greedy_decode(model, prompts, proc, max_new_tokens=5) == \
        greedy_decode_uncached(model, prompts, proc, max_new_tokens=5)


def test_cache_bytes_per_frame_grow_by_k_tokens():
    """A frame adds its gist token to the cache, k memory tokens more with frame memory; insertion adds
    every image token: measured on a real `Session`."""
    lm = tiny_config().lm
    token = lm.n_layers * 2 * lm.n_kv_heads * lm.head_dim * 4  # fp32 keys and values, every layer
    base = frame_cache_bytes(model_for("casa"))
    assert base["cache_bytes_per_frame"] == token and base["tokens_per_frame"] == 1 and base["window_bytes"] > 0
    for k in (1, 4):
        got = frame_cache_bytes(model_for("casa", frame_memory=k))
        assert got["cache_bytes_per_frame"] - base["cache_bytes_per_frame"] == k * token
        assert got["tokens_per_frame"] == 1 + k
    ins = frame_cache_bytes(model_for("insertion"))
    assert ins["cache_bytes_per_frame"] == (N_TOK + 1) * token and ins["window_bytes"] == 0


# ---------------------------------------------------------------- the report
def _results(insertion, casa, memories, ins_blind=0.5):
    """Synthetic `run_crossimage` results: cross-frame means per arm (every task the same score)."""
    def arm(score, frame_memory, per_frame, blind=0.5):
        tasks = {t: {"score": score, "blind": blind, "n": 30} for t in ("match", "recall", "motion")}
        return {"fusion": {"frame_memory": frame_memory}, "tasks": tasks, "cross": score, "cross_blind": blind,
                "cache_bytes_per_frame": per_frame, "tokens_per_frame": per_frame // 512, "window_bytes": 4096}
    arms = {"insertion": arm(insertion, 0, 512 * 37, ins_blind), "ca": arm(0.5, 0, 512), "casa": arm(casa, 0, 512)}
    arms.update({f"casa+m{k}": arm(s, k, 512 * (k + 1)) for k, s in memories.items()})
    return {"arms": arms, "prior": {"match": 0.5, "recall": 0.34, "motion": 0.25}}


def test_verdict_flips_across_the_rule():
    near = _results(0.90, 0.86, {1: 0.87, 4: 0.9})
    assert verdict(near)["gist_enough"] is True and verdict(near)["recovers"] == "casa"
    behind = _results(0.90, 0.70, {1: 0.80, 4: 0.88, 16: 0.9})
    v = verdict(behind)
    assert v["gist_enough"] is False and v["recovers"] == "casa+m4"  # m16 too, but m4 costs fewer bytes
    assert "casa+m4 does" in finding(behind) and "2.5 KiB per frame" in finding(behind)
    none = _results(0.90, 0.70, {1: 0.72, 4: 0.80})
    assert verdict(none)["recovers"] is None and "neither" in finding(none)
    unlearnt = _results(0.52, 0.50, {4: 0.5})
    assert verdict(unlearnt)["judged"] is False and finding(unlearnt).startswith("not judged: insertion did not")
    off_task = _results(0.45, 0.40, {4: 0.4}, ins_blind=0.0)  # a blind model answering off the task: the prior
    assert verdict(off_task)["judged"] is False and "the prior" in finding(off_task)
    text = section(behind)
    assert text.index("**Rule**") < text.index("| insertion |") < text.index("**Finding**")
    assert "casa+m4 does" in text.split("**Finding**")[1]
    assert "Beside the rule: motion: insertion 0.900, ca 0.500, casa 0.700" in text
    with_oracle = section({**behind, "oracle": {"match": 1.0, "recall": 0.8, "motion": 1.0}})
    assert "| caption oracle | - | 1.000 | 0.800 | 1.000 | 0.900 |" in with_oracle
    # just across the margin: 5.0 pts behind carries, 5.1 does not
    assert verdict(_results(0.90, 0.85, {}))["gist_enough"] is True
    assert verdict(_results(0.90, 0.849, {}))["gist_enough"] is False


def test_summarise_and_plot(tmp_path):
    runs = []
    for seed, score in ((0, 0.6), (1, 0.8)):
        tasks = {t: {"metric": "exact", "score": score, "blind": 0.5, "n": 10} for t in ("match", "recall")}
        runs.append({"arm": "casa", "fusion": ARMS["casa"], "seed": seed, "tasks": tasks,
                     "cache_bytes_per_frame": 512, "window_bytes": 100, "tokens_per_frame": 1})
    s = summarise(runs)["casa"]
    assert s["seeds"] == [0, 1] and s["cross"] == pytest.approx(0.7) and s["tasks"]["match"]["n"] == 20
    pytest.importorskip("matplotlib")
    path = plot_crossimage(_results(0.9, 0.7, {4: 0.88}), tmp_path / "x.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_run_crossimage_end_to_end(tmp_path):
    """Two arms from scratch for two steps on a tiny spec: records, summary, report files, reuse."""
    from casa.study.run import SIZES

    spec = copy.deepcopy(SIZES["quick"])
    spec["model"] = {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                            "d_ff": 64},
                     "vision": {"image_size": 16, "patch_size": 8, "d_model": 16, "n_layers": 1, "n_heads": 2,
                                "d_ff": 32}}
    spec["difficulty"] = {**spec["difficulty"], "image_size": 16}
    spec["train"] = {**spec["train"], "text_tokens": 160, "image_tokens": 256}
    spec["prior_n"] = 10
    said = []
    r = run_crossimage(tmp_path, spec=spec, arm_names=["casa", "casa+m4"], tasks=("match",), steps=2, eval_n=2,
                       say=said.append)
    assert set(r["arms"]) == {"casa", "casa+m4"} and r["arms"]["casa+m4"]["tokens_per_frame"] == 5
    assert {"crossimage.json", "crossimage.md", "runs"} <= {p.name for p in tmp_path.iterdir()}
    assert "**Finding**: not judged" in (tmp_path / "crossimage.md").read_text()
    again = run_crossimage(tmp_path, spec=spec, arm_names=["casa", "casa+m4"], tasks=("match",), steps=2, eval_n=2,
                           say=said.append)
    assert sum("reuse" in line for line in said) == 2 and again["arms"] == r["arms"]


def test_caption_oracle_reads_a_stage0_lm(tmp_path):
    """The oracle loads the stage-0 text LM and answers the arms' questions from captions in text."""
    from safetensors.torch import save_file

    from casa.study.crossimage import caption_oracle

    spec = {"model": {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                             "d_ff": 64},
                      "vision": {"image_size": 16, "patch_size": 8, "d_model": 16, "n_layers": 1, "n_heads": 2,
                                 "d_ff": 32}},
            "difficulty": {"frames": 4, "image_size": 16}}
    lm = CasaModel(ModelConfig.from_dict({**spec["model"], "fusion": {"variant": "insertion"}}))
    save_file({k: v.contiguous() for k, v in lm.state_dict().items() if not k.startswith("vision.")
               and k != "lm_head.weight"}, str(tmp_path / "lm.safetensors"))
    got = caption_oracle(tmp_path, spec, ("match", "recall"), 3)
    assert set(got) == {"match", "recall"} and all(0.0 <= v <= 1.0 for v in got.values())
