"""casa the transformers way: CasaForConditionalGeneration (from_pretrained of a model or run
directory, save_pretrained, generate through Session's cached path, chat, device / dtype), the
callable processor (text with placeholders, apply_chat_template, batch_decode), casa.load on run
folders and on a model saved without a tokenizer, and the errors that say what to pass."""

import numpy as np
import pytest
import torch
from PIL import Image

import casa
from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.data import Processor
from casa.hub.model import CasaForConditionalGeneration
from casa.inference.generate import Chat, Sampling, feed, generate
from casa.inference.session import Session
from casa.pretrained.tokenizer import ByteTokenizer
from casa.training.checkpoint import save_checkpoint

TOK = ByteTokenizer()
VISION = VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def tiny(variant="casa", seed=0) -> CasaForConditionalGeneration:
    """A tiny model whose random LM weights are large enough to give varied tokens."""
    torch.manual_seed(seed)
    lm = LMConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64)
    m = CasaForConditionalGeneration(ModelConfig(lm=lm, vision=VISION, fusion=FusionConfig(variant=variant)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "vision" not in name:
                p.normal_(0, 0.3)
    m.processor = Processor(TOK, VISION)
    return m.eval()


def image(seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8))


def ask(text, *images):
    return [{"role": "user", "content": [*({"type": "image", "image": x} for x in images),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run (checkpoints/step_*) of a tiny model, as `casa train` leaves one."""
    run = tmp_path_factory.mktemp("runs") / "demo"
    m = tiny()
    save_checkpoint(run, 3, m, {"step": 3}, tokenizer=TOK, processor=m.processor)
    return run


# ---------------------------------------------------------------------------------- loading
def test_from_pretrained_takes_a_model_or_a_run_directory(run_dir, tmp_path):
    m = CasaForConditionalGeneration.from_pretrained(run_dir)
    assert isinstance(m, casa.CasaModel) and not m.training
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.processor is not None and m.processor.stop_ids == {TOK.token_id("<|end|>"), TOK.eos_id}
    want = tiny()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), want.state_dict().values()))
    assert m.to(torch.bfloat16) is m and m.dtype == torch.bfloat16
    path = m.to(torch.float32).save_pretrained(tmp_path / "copy")  # with its processor's tokenizer
    again = CasaForConditionalGeneration.from_pretrained(path)
    assert again.processor.gist == "<|gist|>" and torch.equal(again.embed.weight, m.embed.weight)
    loaded = casa.load(run_dir)  # a run folder, as every command takes one
    assert loaded.processor is not None and isinstance(loaded.model, casa.CasaModel)
    assert casa.load_processor(run_dir).stop_ids == m.processor.stop_ids


def test_a_model_saved_without_a_tokenizer(tmp_path):
    m = tiny()
    casa.save_pretrained(m, tmp_path / "bare")
    with pytest.raises(ValueError, match="without a tokenizer.*casa.from_pretrained"):
        casa.load(tmp_path / "bare")
    alone = CasaForConditionalGeneration.from_pretrained(tmp_path / "bare")  # the model alone
    assert alone.processor is None and isinstance(casa.from_pretrained(tmp_path / "bare"), casa.CasaModel)
    out = alone.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.shape == (1, 6) and out[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="no processor.*load_processor"):
        alone.chat()
    with pytest.raises(ValueError, match="no processor"):
        Chat(Session(alone), None)


# --------------------------------------------------------------------------------- generate
def by_session(m, inputs, sampling, generator=None, row=0):
    """What a hand-built Session gives for one row of the processor's inputs."""
    n = int(inputs.attention_mask[row].sum())
    mine = (inputs.get("image_rows", torch.zeros(0, dtype=torch.long)) == row).nonzero().flatten().tolist()
    images = [inputs.pixel_values[i] for i in mine]
    session = Session(m)
    prompt = feed(session, inputs.input_ids[row, :n], images, inputs.insertion_points[mine].tolist())
    return generate(session, prompt, sampling=sampling, generator=generator, commit=False).tokens


@pytest.mark.parametrize("variant", ["casa", "ca", "insertion"])
def test_generate_gives_the_session_and_chat_tokens(variant):
    m = tiny(variant)
    p = m.processor
    inputs = p.apply_chat_template(ask("What colour is it?", image(0), image(1)), add_generation_prompt=True,
                                   tokenize=True)
    assert inputs.insertion_points.tolist() == [2, 2]  # two images, one window
    out = m.generate(**inputs, max_new_tokens=8)
    T = inputs.input_ids.shape[1]
    assert torch.equal(out[:, :T], inputs.input_ids)
    new = out[0, T:].tolist()
    assert new == by_session(m, inputs, Sampling(max_new_tokens=8, stop_tokens=tuple(p.stop_ids)))
    assert new == m.chat(max_new_tokens=8).ask("What colour is it?", [image(0), image(1)]).tokens
    assert len(set(new)) > 2  # varied tokens: a wrong cache could not pass
    assert torch.equal(m.generate(inputs, max_new_tokens=8), out)  # generate(inputs) too
    # sampling: the same draws as the session's, from the same seed
    drawn = m.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
                       eos_token_id=[], generator=torch.Generator().manual_seed(5))[0, T:].tolist()
    assert drawn == by_session(m, inputs, Sampling(max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.95),
                               torch.Generator().manual_seed(5))
    assert drawn != m.generate(**inputs, max_new_tokens=8, do_sample=True, eos_token_id=[],
                               generator=torch.Generator().manual_seed(6))[0, T:].tolist()


def test_generate_stops_streams_and_takes_videos_and_batches(capsys):
    m = tiny()
    p = m.processor
    inputs = p(text="<bos><|user|><image>Hi<|end|><|assistant|>", images=[image(2)])
    T = inputs.input_ids.shape[1]
    free = m.generate(**inputs, max_new_tokens=10, eos_token_id=[])[0, T:].tolist()
    stop = free[4]
    first = free.index(stop)
    assert m.generate(**inputs, max_new_tokens=10, eos_token_id=stop)[0, T:].tolist() == free[: first + 1]
    seen = []
    assert m.generate(**inputs, max_new_tokens=6, eos_token_id=[], streamer=seen.append)[0, T:].tolist() == seen
    assert seen == free[:6]

    class Protocol:  # transformers' streamer protocol: the prompt, each token, end
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, ids):
            self.puts.append(ids.reshape(-1).tolist())

        def end(self):
            self.ended += 1

    s = Protocol()
    m.generate(**inputs, max_new_tokens=3, eos_token_id=[], streamer=s)
    assert s.puts == [inputs.input_ids[0].tolist(), *([t] for t in free[:3])] and s.ended == 1
    transformers = pytest.importorskip("transformers")
    m.generate(**inputs, max_new_tokens=6, eos_token_id=[], streamer=transformers.TextStreamer(p, skip_prompt=True))
    assert capsys.readouterr().out.rstrip("\n") == p.decode(free[:6]).rstrip("\n")
    # a video: one window per frame, as Chat feeds it
    frames = [image(3), image(4), image(5)]
    video = p(text="<bos><|user|><video>What happens?<|end|><|assistant|>", videos=frames)
    assert video.insertion_points.tolist() == [2, 3, 4]
    V = video.input_ids.shape[1]
    assert m.generate(**video, max_new_tokens=6)[0, V:].tolist() == \
        m.chat(max_new_tokens=6).ask("What happens?", video=frames).tokens
    # a batch: each row as generated alone, right-padded
    texts = ["<bos><|user|><image>Hi<|end|><|assistant|>", "<bos><|user|>and a longer one?<|end|><|assistant|>"]
    both = m.generate(**p(text=texts, images=[image(2)]), max_new_tokens=5, eos_token_id=[])
    for row, text in enumerate(texts):
        alone = m.generate(**p(text=text, images=[image(2)] if row == 0 else None), max_new_tokens=5,
                           eos_token_id=[])
        assert both[row, : alone.shape[1]].tolist() == alone[0].tolist()


def test_forward_takes_the_processor_inputs():
    m = tiny()
    inputs = m.processor(text=["<image>a b", "c <image><image> d e f"], images=[image(0), image(1), image(2)])
    assert inputs.attention_mask.tolist()[0] == [1] * 4 + [0] * 5 and inputs.image_rows.tolist() == [0, 1, 1]
    with torch.no_grad():
        logits = m(**inputs)
        assert logits.shape == (2, 9, TOK.vocab_size)
        assert torch.equal(logits, m(inputs.batch()))
        one = m(**m.processor(text="<image>a b", images=[image(0)]))
    assert torch.allclose(logits[0, :4], one[0], atol=1e-5)  # padding is a document of its own


# ---------------------------------------------------------------------------------- processor
def test_apply_chat_template_renders_as_training_and_chat_do():
    p = Processor(TOK, VISION)
    messages = ask("What colour?", image(0))
    text = p.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<bos><|user|><image>What colour?<|end|><|assistant|>"
    tokenized = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    enc = p.encode_continuation([], messages)  # what Chat feeds
    assert tokenized.input_ids[0].tolist() == enc.ids and tokenized.insertion_points.tolist() == enc.points
    again = p(text=text, images=[image(0)])
    assert all(torch.equal(again[k], tokenized[k]) for k in tokenized)
    assert p.batch_decode(tokenized.input_ids) == ["What colour?"]
    assert p.batch_decode(tokenized.input_ids, skip_special_tokens=False)[0].startswith("<bos><|user|><|gist|>")
    video = [{"role": "user", "content": [{"type": "video", "video": [image(1), image(2)]}, "Go"]}]
    assert p.apply_chat_template(video) == "<bos><|user|><video>Go<|end|>"
    assert p.apply_chat_template([messages, video], add_generation_prompt=True)[1].endswith("<|assistant|>")


def test_processor_with_a_chat_template_tokenizer(tmp_path):
    from test_pretrained import hf_tokenizer_dir

    from casa.pretrained.tokenizer import HFTokenizer

    p = Processor(HFTokenizer(hf_tokenizer_dir(tmp_path / "tok")), VISION, gist_token="<|/img|>",
                  image_prefix="<|img|>")
    messages = ask("what colour is the square?", image(0))
    text = p.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "user: <image>what colour is the square?<|end|>assistant: "
    tokenized = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tokenized.input_ids[0].tolist() == p.encode_continuation([], messages).ids
    assert torch.equal(p(text=text, images=[image(0)]).input_ids, tokenized.input_ids)


def test_errors_say_what_to_pass():
    m = tiny()
    p = m.processor
    with pytest.raises(ValueError, match="give text=.*apply_chat_template"):
        p(images=[image(0)])
    with pytest.raises(ValueError, match="1 '<image>' placeholder.*no images="):
        p(text="<image>hi")
    with pytest.raises(ValueError, match="images=: 1 image.* for 0 '<image>' placeholder"):
        p(text="hi", images=[image(0)])
    with pytest.raises(ValueError, match="videos=: 2 video"):
        p(text="<video>hi", videos=[[image(0)], [image(1)]])
    with pytest.raises(ValueError, match="messages look like"):
        p.apply_chat_template([{"role": "user", "content": [{"type": "picture"}]}])
    with pytest.raises(TypeError, match="expected a casa.Session.*casa.Session\\(model\\).*model.generate"):
        casa.generate(m, [1, 2, 3])
    with pytest.raises(ValueError, match="give input_ids.*processor"):
        m.generate()
    with pytest.raises(ValueError, match="without insertion_points"):
        m.generate(torch.tensor([[1, 2]]), pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="streamer follows one row"):
        m.generate(torch.tensor([[1, 2], [3, 4]]), streamer=print)
    with pytest.raises(ValueError, match="Batch or the processor's inputs"):
        m()
