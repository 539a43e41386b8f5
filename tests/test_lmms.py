import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_model_dir
from PIL import Image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_model_dir(tmp_path_factory.mktemp("lmms") / "m")


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "casa"]
    assert [ep.value for ep in eps] == ["casa.eval.lmms:manifest"], "reinstall casa (pip install -e .) to register it"


def test_lmms_eval_resolves_the_plugin():
    pytest.importorskip("lmms_eval.models", exc_type=ImportError)
    from lmms_eval.api.model import lmms
    from lmms_eval.models import MODEL_REGISTRY_V2

    import casa.eval.lmms

    MODEL_REGISTRY_V2.load_entrypoint_manifests()
    cls = MODEL_REGISTRY_V2.get_model_class("casa")
    assert cls is casa.eval.lmms.Casa and issubclass(cls, lmms)


def request(*args):
    return SimpleNamespace(args=args)


def test_plugin_generates_and_scores(model_dir):
    """The plugin's request handling, with lmms-eval's request tuples (works without lmms-eval)."""
    from casa.eval.lmms import Casa

    plugin = Casa(pretrained=str(model_dir), max_new_tokens=4)
    doc = {"image": Image.new("RGB", (20, 20), (255, 0, 0))}
    plugin.task_dict = {"chartqa": {"test": {0: doc}}}

    def to_visual(d):
        return [d["image"]]

    [text] = plugin.generate_until([request("What colour?", {"max_new_tokens": 3, "until": []}, to_visual, 0,
                                            "chartqa", "test")])
    from casa.eval.decode import greedy_decode

    enc = plugin.processor.encode({"messages": [
        {"role": "user", "content": [{"type": "image", "image": doc["image"]},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "-"}]})
    prompt = enc.prefix(enc.turns[0][0])
    ids = greedy_decode(plugin.model, [prompt], plugin.processor, max_new_tokens=3)[0]
    assert text == plugin.tokenizer.decode(ids).strip()

    [(ll, greedy)] = plugin.loglikelihood([request("What colour?", "red", to_visual, 0, "chartqa", "test")])
    from casa.data import stack_rows

    full = stack_rows([prompt], 0)
    target = plugin.tokenizer.encode("red")
    x = SimpleNamespace(**vars(full))
    x.input_ids = torch.tensor([prompt.ids + target])
    x.doc_lens = [[len(prompt.ids) + len(target)]]
    x.loss_mask = None
    from casa.core.batch import Batch

    with torch.no_grad():
        logits = plugin.model(Batch(**vars(x)))[0]
    logp = torch.log_softmax(logits.float(), -1)
    n = len(prompt.ids)
    want = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(target))
    assert ll == pytest.approx(want, abs=1e-4) and ll < 0
    assert greedy == all(int(logp[n - 1 + i].argmax()) == t for i, t in enumerate(target))
    with pytest.raises(NotImplementedError):
        plugin.generate_until_multi_round([])


def test_plugin_batches_its_prompts_and_takes_a_run_folder(model_dir, tmp_path, monkeypatch):
    """`batch_size` prompts decode together (one greedy_decode call per batch of equal max_new_tokens),
    each answer equal to its one-at-a-time answer, in the requests' order; `pretrained=` may name a run."""
    import casa.eval.decode as decode_mod
    from casa.eval.lmms import Casa
    from casa.pretrained.directory import load
    from casa.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    model, tok, processor = load(model_dir)
    save_checkpoint(run, 2, model, {"step": 2}, tokenizer=tok, processor=processor)
    docs = {i: {"image": Image.new("RGB", (20, 20), (40 * i, 255 - 40 * i, 0))} for i in range(5)}
    reqs = [request(f"Colour {i}?", {"max_new_tokens": 3 if i != 2 else 2, "until": ["zz"]},
                    lambda d: [d["image"]], i, "t", "s") for i in range(5)]
    one = Casa(pretrained=str(model_dir), max_new_tokens=4)
    one.task_dict = {"t": {"s": docs}}
    alone = one.generate_until(reqs)
    sizes, real = [], decode_mod.greedy_decode
    monkeypatch.setattr(decode_mod, "greedy_decode", lambda m, prompts, *a, **kw: sizes.append(len(prompts))
                        or real(m, prompts, *a, **kw))
    batched = Casa(pretrained=str(run), max_new_tokens=4, batch_size=3)
    batched.task_dict = {"t": {"s": docs}}
    assert batched.generate_until(reqs) == alone
    assert sizes == [3, 1, 1]  # requests 0, 1, 3 (3 tokens); then 2 (2 tokens); then 4
    with pytest.raises(ValueError, match="batch_size=0: must be >= 1"):
        Casa(pretrained=str(model_dir), batch_size=0)
