import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from PIL import Image

from casa.config import VisionConfig
from casa.vision import (
    HFVisionEncoder,
    Projector,
    VisionTower,
    ViT,
    preprocess,
    reduce_tokens,
    vision_config_from_hf,
)

SMALL = dict(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=4, d_ff=64)
TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def rand_uint8(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_shapes_and_inputs(tmp_path):
    cfg = VisionConfig(**SMALL)
    path = tmp_path / "a.png"
    Image.fromarray(rand_uint8(40, 50, seed=1)).save(path)
    images = [Image.fromarray(rand_uint8(20, 30)), rand_uint8(64, 48, 4), str(path), path, rand_uint8(10, 10, 1)]
    x = preprocess(images, cfg)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    # an image already at the model's size is not resampled: mean=std=0.5 maps byte v to v/127.5 - 1
    exact = rand_uint8(32, 32, seed=3)
    want = torch.from_numpy(exact).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(preprocess([exact], cfg)[0], want, atol=1e-6, rtol=0)


def test_preprocess_normalisation():
    cfg = VisionConfig(**SMALL, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 51  # constant colours survive a resize
    x = preprocess([img], cfg)[0]
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    assert x.std(dim=(1, 2)).max() < 1e-5


def test_preprocess_matches_manual_resize():
    cfg = VisionConfig(**SMALL)
    img = rand_uint8(45, 61, seed=3)
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(preprocess([img], cfg)[0], ref)


def test_preprocess_errors(tmp_path):
    cfg = VisionConfig(**SMALL)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match="corrupt.png"):
        preprocess([rand_uint8(8, 8), str(bad)], cfg)
    good = tmp_path / "trunc.png"
    Image.fromarray(rand_uint8(64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        preprocess([truncated], cfg)
    with pytest.raises(ValueError, match="missing.png"):
        preprocess([tmp_path / "missing.png"], cfg)
    with pytest.raises(ValueError, match=r"image 1.*shape"):
        preprocess([rand_uint8(8, 8), np.zeros((8, 8, 5), dtype=np.uint8)], cfg)
    with pytest.raises(ValueError, match=r"image 0.*dtype"):
        preprocess([np.zeros((8, 8, 3), dtype=np.float32)], cfg)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], cfg)


def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path):
    """16-bit PNG (I;16), 32-bit integer TIFF (I) and float TIFF (F), written by
    Pillow, give the pixels of the same picture stored in 8 bits."""
    from casa.vision.preprocess import to_8bit

    cfg = VisionConfig(**SMALL)
    ramp = np.linspace(0, 65535, 40 * 50).reshape(40, 50).round().astype(np.uint16)
    as8 = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    ref = preprocess([np.repeat(as8[..., None], 3, axis=2)], cfg)
    files = {"I;16": tmp_path / "ramp16.png", "I": tmp_path / "ramp32.tif", "F": tmp_path / "ramp.tif"}
    Image.fromarray(ramp).save(files["I;16"])
    Image.fromarray(ramp.astype(np.int32)).save(files["I"])
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(files["F"])
    for mode, path in files.items():
        with Image.open(path) as img:
            assert img.mode == mode
        tol = 2 / 255 if mode == "F" else 0  # float32 rounding may move a value by one 8-bit level
        torch.testing.assert_close(preprocess([path], cfg), ref, atol=tol, rtol=0)
    # mid-grey 16-bit is mid-grey, not the white that Pillow's clipping conversion gives
    grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert grey.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert to_8bit(grey).getpixel((0, 0)) == 128
    # floats outside [0, 1] and integers outside 16 bits are stretched from their min to their max
    wide = np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8)
    assert to_8bit(Image.fromarray(wide)).getextrema() == (0, 255)
    big = Image.fromarray(np.linspace(-70000, 70000, 64).astype(np.int32).reshape(8, 8))
    assert to_8bit(big).getextrema() == (0, 255) and to_8bit(big).getpixel((0, 0)) == 0
    assert to_8bit(Image.new("RGB", (4, 4))).mode == "RGB"  # 8-bit modes pass through


# ----------------------------------------------------------------------------- ViT, reduction, tower


def test_vit_shape_and_pixel_checks():
    cfg = VisionConfig(**SMALL)
    vit = ViT(cfg)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    assert len(vit.blocks) == 2 and vit.out_width == 32
    with pytest.raises(ValueError, match=r"expected \[N, 3, 32, 32\]"):
        vit(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        vit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_reduce_tokens_values():
    n, g, d, r = 2, 4, 3, 2
    grid = torch.randn(n, g, g, d)
    x = grid.reshape(n, g * g, d)
    assert reduce_tokens(x, "none", r) is x

    pooled = reduce_tokens(x, "pool", r)
    assert pooled.shape == (n, 4, d)
    manual = grid.reshape(n, g // r, r, g // r, r, d).mean(dim=(2, 4)).reshape(n, 4, d)
    torch.testing.assert_close(pooled, manual)

    un = reduce_tokens(x, "unshuffle", r)
    assert un.shape == (n, 4, r * r * d)
    assert torch.equal(un.flatten().sort().values, x.flatten().sort().values)  # every value kept once
    # token (1, 0) of the reduced grid holds patches (2,0), (2,1), (3,0), (3,1) in order
    expected = torch.cat([grid[:, 2, 0], grid[:, 2, 1], grid[:, 3, 0], grid[:, 3, 1]], dim=-1)
    torch.testing.assert_close(un[:, 2], expected)

    with pytest.raises(ValueError, match="not divisible"):
        reduce_tokens(torch.randn(1, 9, d), "pool", 2)


@pytest.mark.parametrize("reduction,width", [("none", 32), ("unshuffle", 128), ("pool", 32)])
def test_vision_tower_shapes(reduction, width):
    cfg = VisionConfig(**SMALL, token_reduction=reduction, reduction_factor=2)
    tower = VisionTower(cfg, lm_d_model=48)
    out = tower(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, cfg.tokens_per_image, 48)
    assert cfg.tokens_per_image == (16 if reduction == "none" else 4)
    assert tower.reduced_width == width and tower.out_width == 32
    assert len(tower.encoder_blocks()) == 2


def test_vision_tower_indivisible_grid():
    cfg = VisionConfig(image_size=24, patch_size=8, token_reduction="pool", reduction_factor=2)
    with pytest.raises(ValueError, match="not divisible"):
        VisionTower(cfg, lm_d_model=16)


def test_gradient_flows_through_vit_and_projector():
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(**SMALL, token_reduction="unshuffle"), lm_d_model=16)
    tower(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_projector():
    proj = Projector(in_dim=8, out_dim=5)
    assert proj(torch.randn(2, 3, 8)).shape == (2, 3, 5)


# ----------------------------------------------------------------------------- transformers models


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_HF)).eval()
    model.save_pretrained(path)
    pre = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "size": {"height": 32, "width": 32}}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path, model


def test_siglip_vision_model(siglip_dir):
    path, model = siglip_dir
    cfg = vision_config_from_hf(path, token_reduction="pool")
    assert (cfg.kind, cfg.path, cfg.image_size, cfg.patch_size, cfg.d_model) == ("hf", str(path), 32, 8, 32)
    assert cfg.image_mean == (0.4, 0.5, 0.6) and cfg.image_std == (0.2, 0.3, 0.4)

    pixels = torch.randn(2, 3, 32, 32)
    enc = HFVisionEncoder(cfg).eval()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
        out = enc(pixels)
    assert out.shape == (2, 16, 32)
    assert (out - ref).abs().max() <= 1e-5

    tower = VisionTower(cfg, lm_d_model=24)
    assert tower(pixels).shape == (2, 4, 24)
    assert len(tower.encoder_blocks()) == 2 and tower.out_width == 32


def test_full_siglip_and_clip_models(tmp_path):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    pixels = torch.randn(2, 3, 32, 32)
    for name, cls, config_cls in [("siglip", SiglipModel, SiglipConfig), ("clip", CLIPModel, CLIPConfig)]:
        torch.manual_seed(0)
        model = cls(config_cls(vision_config=TINY_HF, text_config=text)).eval()
        model.save_pretrained(tmp_path / name)
        enc = HFVisionEncoder(vision_config_from_hf(tmp_path / name)).eval()
        with torch.no_grad():
            ref = model.vision_model(pixel_values=pixels).last_hidden_state
            out = enc(pixels)
        if name == "clip":
            ref = ref[:, 1:]  # CLS token dropped
        assert out.shape == (2, 16, 32)
        assert (out - ref).abs().max() <= 1e-5, name


def test_hf_errors(tmp_path, siglip_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama") as e:
        vision_config_from_hf(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match="model_type='llama'"):
        HFVisionEncoder(VisionConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(ValueError, match="cannot read"):
        vision_config_from_hf(tmp_path / "nowhere")
    path, _ = siglip_dir
    with pytest.raises(ValueError, match="disagrees"):
        HFVisionEncoder(VisionConfig(kind="hf", path=str(path), d_model=64, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="unknown keys"):
        vision_config_from_hf(path, colour=True)


# ----------------------------------------------------------------------------- checkpoints and freezing


def test_hub_style_names_and_missing_weights(tmp_path, siglip_dir):
    """Hub files name the tensors `vision_model.*` (transformers 4); both namings load, gaps are named."""
    from safetensors.torch import load_file, save_file

    from casa.vision.hf import load_vision_weights

    path, model = siglip_dir
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (hub / f).write_text((path / f).read_text())
    sd = load_file(path / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in sd.items()}, hub / "model.safetensors")
    enc = HFVisionEncoder(vision_config_from_hf(hub)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (enc(pixels) - model(pixel_values=pixels).last_hidden_state).abs().max() <= 1e-5

    save_file({k: v for k, v in sd.items() if "layers.0.mlp" not in k}, hub / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['encoder\.layers\.0\.mlp\.fc1\.bias'"):
        HFVisionEncoder(vision_config_from_hf(hub))
    save_file({k: v for k, v in sd.items() if "patch_embedding" not in k}, hub / "model.safetensors")
    with pytest.raises(ValueError, match="no siglip vision tensors"):
        load_vision_weights(enc, hub)


def test_structure_only_and_freezing(siglip_dir):
    from casa.vision.hf import structure_only

    path, _ = siglip_dir
    torch.manual_seed(123)  # not the checkpoint's seed: random init differs from its weights
    with structure_only():
        tower = VisionTower(vision_config_from_hf(path), lm_d_model=24)
    assert not torch.equal(tower.encoder.model.embeddings.patch_embedding.weight,
                           HFVisionEncoder(vision_config_from_hf(path)).model.embeddings.patch_embedding.weight)
    tower.freeze_encoder(1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.model.encoder.layers.1.") for n in trainable)
    assert any(n.startswith("encoder.model.post_layernorm.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    assert not any(n.startswith(("encoder.model.encoder.layers.0.", "encoder.model.embeddings.")) for n in trainable)
    tower.freeze_encoder(0)
    assert all(n.startswith("projector.") for n, p in tower.named_parameters() if p.requires_grad)
    tower.freeze_encoder(-1)
    assert all(p.requires_grad for p in tower.parameters())
    vit = VisionTower(VisionConfig(**SMALL), lm_d_model=8)
    assert vit.trainable_tail(1) == [vit.encoder.blocks[1], vit.encoder.ln_f] and vit.trainable_tail(0) == []
