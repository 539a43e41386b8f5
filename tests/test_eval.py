import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from casa.cli import main
from casa.config import ModelConfig
from casa.core.model import CasaModel
from casa.data import Processor, Sample, make_sample
from casa.eval.decode import greedy_decode
from casa.eval.synthetic import (
    answers,
    eval_samples,
    evaluate,
    prior_answers,
    question_text,
)
from casa.pretrained.tokenizer import ByteTokenizer
from casa.training.trainer import Trainer, load_config

MODEL = {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
         "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_batched_greedy_decode_equals_one_by_one(variant):
    torch.manual_seed(0)
    model = CasaModel(ModelConfig.from_dict({**MODEL, "fusion": {"variant": variant}})).eval()
    proc = Processor(ByteTokenizer(), model.config.vision)
    prompts = []
    for i, task in enumerate(["color", "compare", "video", "count"]):
        enc = proc.encode(make_sample(task, 0, i))
        prompts.append(enc.prefix(enc.turns[-1][0]))
    together = greedy_decode(model, prompts, proc, max_new_tokens=6)
    alone = [greedy_decode(model, [p], proc, max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all(len(x) <= 6 for x in together)


def test_evaluate_scores_every_turn_and_prior():
    proc = Processor(ByteTokenizer(), CasaModel(ModelConfig.from_dict(MODEL)).config.vision)
    samples = eval_samples(["color", "video"], 3, difficulty={"frames": 2})
    train = [make_sample(t, 0, i) for t in ("color", "video") for i in range(50)]
    result = evaluate(None, proc, samples, prior=prior_answers(train))
    assert result["tasks"]["color"]["n"] == 3 and result["tasks"]["video"]["n"] == 6  # one per frame
    assert result["tasks"]["color"]["metric"] == "exact"
    perfect = {r["question"]: r["answer"] for r in result["predictions"] if r["task"] == "color"}
    assert len(perfect) == 1  # the colour question is always the same text
    prior = prior_answers(train)
    for task in ("color", "video"):
        turns = [(question_text(s, k), gold) for s in samples if s.meta["task"] == task
                 for k, gold in enumerate(answers(s))]
        assert [r["prediction"] for r in result["predictions"] if r["task"] == task] == [prior[q] for q, _ in turns]
        want = sum(prior[q] == gold for q, gold in turns) / len(turns)
        assert result["tasks"][task]["score"] == result["tasks"][task]["exact"] == pytest.approx(want)


def _qa(question: str, answer: str) -> Sample:
    return Sample([{"role": "user", "content": [{"type": "text", "text": question}]},
                   {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                  meta={"task": "t", "metric": "exact"})


def test_prior_and_scores_by_hand():
    train = [_qa("Q?", "red")] * 3 + [_qa("Q?", "blue"), _qa("R?", "left")]
    assert prior_answers(train) == {"Q?": "red", "R?": "left"}
    proc = Processor(ByteTokenizer(), CasaModel(ModelConfig.from_dict(MODEL)).config.vision)
    samples = [_qa("Q?", "red"), _qa("Q?", "Blue."), _qa("R?", "right"), _qa("S?", "x")]
    result = evaluate(None, proc, samples, prior={"Q?": "blue", "R?": "right"})
    assert [r["prediction"] for r in result["predictions"]] == ["blue", "blue", "right", ""]
    assert [r["score"] for r in result["predictions"]] == [0.0, 1.0, 1.0, 0.0]  # case and full stop ignored
    assert result["tasks"] == {"t": {"metric": "exact", "score": 0.5, "exact": 0.5, "n": 4}}


def test_cli_eval_writes_json(tmp_path, capsys):
    model_cfg, cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", "steps=2", "text_tokens=256",
                                        "image_tokens=1024", "data=color,chartqa", "warmup_steps=1"],
                                 base={"model": MODEL})
    Trainer(model_cfg, cfg, quiet=True).fit()
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--n", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"color", "chartqa"}  # the training tasks by default
    assert result["tasks"]["chartqa"]["metric"] == "relaxed" and result["tasks"]["color"]["n"] == 3
    assert "chartqa" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--task", "docvqa", "--n", "2", "--blind"]) == 0
    blind = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/eval_blind.json")).read_text())
    assert blind["blind"] and blind["tasks"]["docvqa"]["metric"] == "anls"
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--task", "color"]) == 2
