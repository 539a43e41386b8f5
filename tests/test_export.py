"""casa export --format transformers: the directory loads with transformers' Auto classes
(trust_remote_code, casa's own self-contained modeling file), with its tokenizer and processor,
and transformers' generate gives casa's greedy tokens on images and text: casa, ca and insertion,
built on a Llama-shaped LM (byte tokenizer) and a Qwen2-shaped one (qkv biases, an HF tokenizer
with image markers). Tiny checkpoints made here; nothing is downloaded."""

import numpy as np
import pytest
import torch
from conftest import run_casa
from PIL import Image

transformers = pytest.importorskip("transformers")

import casa  # noqa: E402
from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig  # noqa: E402
from casa.data import Processor  # noqa: E402
from casa.hub.export import check_exportable, export_transformers  # noqa: E402
from casa.hub.model import CasaForConditionalGeneration  # noqa: E402
from casa.pretrained.hf_lm import from_hf_lm  # noqa: E402
from casa.pretrained.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

VISION = VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def image(seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8))


def build(tmp_path, kind, variant):
    """A casa model directory built on a tiny HF LM (`kind`), its new parts random."""
    from test_hf import make_hf
    from test_pretrained import hf_tokenizer_dir

    if kind == "llama":
        tok, markers = ByteTokenizer(), {}
    else:
        tok = HFTokenizer(hf_tokenizer_dir(tmp_path / "tok"))
        markers = dict(gist_token="<|/img|>", image_prefix="<|img|>")
    _, lm_dir = make_hf(tmp_path, kind, name=f"lm-{kind}", vocab_size=tok.vocab_size)
    model = from_hf_lm(lm_dir, vision=VISION, fusion=FusionConfig(variant=variant, every=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name or "fusion" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 2 else 0.1))
    return casa.save_pretrained(model, tmp_path / f"casa-{kind}-{variant}", tokenizer=tok,
                                processor=Processor(tok, VISION, **markers))


def conversation(video=False):
    first = {"type": "video", "video": [image(3), image(4)]} if video else {"type": "image", "image": image(0)}
    return [{"role": "user", "content": [first, {"type": "text", "text": "what colour is the square?"},
                                         {"type": "image", "image": image(1)}, {"type": "image", "image": image(2)},
                                         {"type": "text", "text": "red"}]}]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", ["casa", "ca", "insertion"])
def test_transformers_generate_gives_casa_greedy_tokens(tmp_path, kind, variant):
    src = build(tmp_path, kind, variant)
    out = export_transformers(src, tmp_path / f"hf-{kind}-{variant}")
    ours = CasaForConditionalGeneration.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(transformers.AutoModel.from_pretrained(out, trust_remote_code=True)) is type(model)
    assert "casa" not in type(model).__module__.split(".")[0]  # transformers' own copy of the file
    for video in ([False, True] if (kind, variant) == ("llama", "casa") else [False]):
        messages = conversation(video)
        want = ours.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == \
            ours.processor.apply_chat_template(messages, add_generation_prompt=True)
        got = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert torch.equal(got["input_ids"], want.input_ids)
        assert torch.equal(got["insertion_points"], want.insertion_points)
        assert torch.allclose(got["pixel_values"], want.pixel_values, atol=1e-6)
        casa_tokens = ours.generate(**want, max_new_tokens=10)
        hf = model.generate(**got, max_new_tokens=10, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        assert hf.sequences.tolist() == casa_tokens.tolist()
        # every step of transformers' cached decode against casa's uncached forward of the whole sequence
        T, steps = want.input_ids.shape[1], len(hf.logits)
        full = dict(want, input_ids=hf.sequences[:, : T + steps - 1], attention_mask=None)
        with torch.no_grad():
            reference = ours(**full)[0, T - 1:]
        assert (torch.cat(hf.logits) - reference).abs().max() < 1e-4
        assert reference.std() > 0.3  # logits far from zero: a wrong cache could not pass the tolerance
    # text alone, and the tokenizer: casa's ids, both ways
    text = ours.processor(text=ours.processor.apply_chat_template(
        [{"role": "user", "content": "what colour is the square?"}], add_generation_prompt=True))
    assert model.generate(**processor(text=processor.apply_chat_template(
        [{"role": "user", "content": "what colour is the square?"}], add_generation_prompt=True)),
        max_new_tokens=6).tolist() == ours.generate(**text, max_new_tokens=6).tolist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    for s in ["what colour is the square? red", "é中 <|end|>x" if kind == "llama" else "red<|end|>"]:
        ids = ours.processor.tok.encode(s, specials=True)
        assert tokenizer.encode(s, add_special_tokens=False) == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == ours.processor.tok.decode(ids)


def test_every_other_variant_placement_and_reduction(tmp_path):
    """The rest of what the modeling file implements, on random casa models: the same logits with images
    and the same greedy tokens."""
    tok = ByteTokenizer()
    cases = [("casa", "before", "pool"), ("casa", "replace", "unshuffle"), ("ca", "replace", "none"),
             ("casa_shared", "parallel", "none"), ("ca_shared", "before", "none"), ("ca_ffn", "parallel", "none"),
             ("gated_ca", "parallel", "none"), ("casa", "parallel", "none", False)]
    for variant, placement, reduction, *text_keys in cases:
        lm = LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                      qkv_bias=variant == "ca")
        vision = VisionConfig(image_size=16, patch_size=4, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                              token_reduction=reduction)
        fusion = FusionConfig(variant=variant, placement=placement, every=2, text_keys=(text_keys or [True])[0])
        torch.manual_seed(0)
        model = casa.CasaModel(ModelConfig(lm=lm, vision=vision, fusion=fusion))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)  # gates open, norms away from 1
        name = f"{variant}-{placement}-{reduction}-{bool(text_keys)}"
        src = casa.save_pretrained(model, tmp_path / name, tokenizer=tok, processor=Processor(tok, vision))
        ours = CasaForConditionalGeneration.from_pretrained(src)
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_transformers(src, tmp_path / f"hf-{name}"),
                                                               trust_remote_code=True).eval()
        inputs = ours.processor.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=True)
        hf_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "insertion_points")}
        with torch.no_grad():
            assert (hf(**hf_inputs).logits - ours(**inputs)).abs().max() < 1e-4, name
        assert hf.generate(**hf_inputs, max_new_tokens=5, do_sample=False).tolist() == \
            ours.generate(**inputs, max_new_tokens=5).tolist(), name


def test_what_cannot_be_exported_is_refused_before_writing(tmp_path):
    lm = LMConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, mrope_section=[4, 6, 6])
    with pytest.raises(ValueError, match="multimodal RoPE"):
        check_exportable(ModelConfig(lm=lm), "export")
    with pytest.raises(ValueError, match="vision.kind='hf'.*built-in ViT"):
        check_exportable(ModelConfig(vision=VisionConfig(kind="hf", path="siglip")), "export")
    torch.manual_seed(0)
    bare = casa.save_pretrained(casa.CasaModel(ModelConfig(vision=VISION)), tmp_path / "bare")
    with pytest.raises(ValueError, match="without a tokenizer"):
        export_transformers(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_casa_export_command(tmp_path, capsys):
    from casa.cli import main

    torch.manual_seed(0)
    model = casa.CasaModel(ModelConfig(lm=LMConfig(vocab_size=264), vision=VISION))
    tok = ByteTokenizer()
    src = casa.save_pretrained(model, tmp_path / "src", tokenizer=tok, processor=Processor(tok, VISION))
    done = run_casa("export", src, tmp_path / "out", "--format", "transformers")  # the real command
    assert done.returncode == 0 and "wrote" in done.stdout, done.stderr
    assert (tmp_path / "out" / "modeling_casa.py").is_file()
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "out"), "--format", "transformers"]) == 2
    assert "already holds a transformers export; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["export", str(src), str(tmp_path / "other"), "--format", "transformers"]) == 2
    assert "not a transformers export" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert main(["export", str(src), str(tmp_path / "out"), "--format", "transformers", "--overwrite"]) == 0
