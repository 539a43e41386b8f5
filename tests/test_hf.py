import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from casa.config import FusionConfig, LMConfig, ModelConfig
from casa.core.batch import Batch
from casa.core.model import CasaModel
from casa.pretrained.hf_lm import (
    from_hf_lm,
    lm_config_from_hf,
    load_hf_state_dict,
    load_lm_weights,
    save_lm_as_hf,
)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5)


def randomize(model, seed=0):
    """Every weight random and large enough to matter: biases nonzero, norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def make_hf(tmp_path, kind="llama", name="hf", seed=0, **overrides):
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    save_kwargs = {k: overrides.pop(k) for k in ("max_shard_size",) if k in overrides}
    config = cfg_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = randomize(model_cls(config).float(), seed).eval()
    path = tmp_path / name
    model.save_pretrained(path, **save_kwargs)
    return model, path


def ids(vocab=97, shape=(2, 13), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_parity(hf_model, ours, x=None):
    x = ids() if x is None else x
    with torch.no_grad():
        want = hf_model(input_ids=x).logits
        got = ours.eval()(Batch(x), backend="reference", return_hidden=False)
    assert got.shape == want.shape == (*x.shape, hf_model.config.vocab_size)
    assert want.std() > 0.3  # logits far from zero: a wrong mapping could not pass the tolerance
    assert (got - want).abs().max().item() <= 1e-4


def edit_config(path, **changes):
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    file.write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity(tmp_path, tied):
    hf, path = make_hf(tmp_path, "llama", tie_word_embeddings=tied, attn_implementation="eager")
    lm = lm_config_from_hf(path)
    assert (lm.vocab_size, lm.d_model, lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.d_ff) == \
        (97, 64, 3, 4, 2, 16, 96)
    assert lm.rope_theta == 5000.0 and lm.norm_eps == 1e-5 and not lm.qkv_bias and lm.tie_embeddings == tied
    ours = from_hf_lm(path)
    assert (ours.lm_head.weight is ours.embed.weight) == tied
    assert_parity(hf, ours)


def test_qwen2_parity_with_bias(tmp_path):
    hf, path = make_hf(tmp_path, "qwen2", attn_implementation="eager")
    assert hf.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.1
    lm = lm_config_from_hf(path)
    assert lm.qkv_bias and not lm.tie_embeddings
    assert_parity(hf, from_hf_lm(path))


def test_mistral_parity(tmp_path):
    hf, path = make_hf(tmp_path, "mistral", sliding_window=None, attn_implementation="sdpa")
    assert_parity(hf, from_hf_lm(path))


def test_sharded_checkpoint(tmp_path):
    hf, path = make_hf(tmp_path, "qwen2", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    sd = load_hf_state_dict(path)
    assert set(sd) == set(hf.state_dict())  # untied: lm_head.weight is stored
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.bias"], hf.model.layers[1].self_attn.k_proj.bias)
    assert_parity(hf, from_hf_lm(path))


def test_old_style_rope_config(tmp_path):
    hf, path = make_hf(tmp_path, "llama")
    edit_config(path, rope_parameters=None, rope_theta=5000.0, rope_scaling=None)
    assert lm_config_from_hf(path).rope_theta == 5000.0
    edit_config(path, rope_scaling={"type": "default"})
    assert lm_config_from_hf(path).rope_theta == 5000.0


def test_dtype(tmp_path):
    hf, path = make_hf(tmp_path, "llama")
    ours = from_hf_lm(path, dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert torch.equal(ours.blocks[0].attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight.bfloat16())


@pytest.mark.parametrize("qkv_bias,tied", [(False, True), (True, False)])
def test_save_lm_as_hf_roundtrip(tmp_path, qkv_bias, tied):
    lm = LMConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, rope_theta=5000.0,
                  norm_eps=1e-5, qkv_bias=qkv_bias, tie_embeddings=tied)
    ours = randomize(CasaModel(ModelConfig(lm=lm, fusion=FusionConfig(variant="insertion"))), seed=3).eval()
    save_lm_as_hf(ours, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a Hugging Face checkpoint; pass --overwrite"):
        save_lm_as_hf(ours, tmp_path / "out")
    assert save_lm_as_hf(ours, tmp_path / "out", overwrite=True) == tmp_path / "out"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    assert_parity(hf, ours)
    assert lm_config_from_hf(tmp_path / "out") == lm
    back = from_hf_lm(tmp_path / "out")
    for (n, a), (_, b) in zip(ours.named_parameters(), back.named_parameters()):
        if not n.startswith("vision."):
            assert torch.equal(a, b), n


def test_casa_fusion_initialised_from_loaded_sa(tmp_path):
    hf, path = make_hf(tmp_path, "qwen2")
    ours = from_hf_lm(path, fusion=FusionConfig(variant="casa", every=2))
    fused = [i for i, b in enumerate(ours.blocks) if b.fusion is not None]
    assert fused == [0, 2]
    for i in fused:
        b, src = ours.blocks[i], hf.model.layers[i]
        for name, p in b.fusion.attn.state_dict().items():
            assert torch.equal(p, b.attn.state_dict()[name]), name
        assert torch.equal(b.fusion.attn.q_proj.bias, src.self_attn.q_proj.bias)
        assert torch.equal(b.fusion.norm.weight, src.input_layernorm.weight)
    # without images the fusion adds nothing the text could read, but the LM part must be HF's
    assert torch.equal(ours.blocks[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight)


def test_which_build_equals_the_lm_on_text(tmp_path):
    """docs/models.md's table, measured here: on text alone, which build gives its LM's logits."""
    from casa.config import VisionConfig
    from casa.pretrained.build import build
    from casa.pretrained.build_config import BuildConfig

    hf, path = make_hf(tmp_path, "llama", vocab_size=264, attn_implementation="eager")
    vision = VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    x = ids(vocab=264)
    g = torch.Generator().manual_seed(0)
    with_images = Batch(x, images=torch.randn(2, 3, 16, 16, generator=g), image_rows=torch.tensor([0, 1]),
                        insertion_points=torch.tensor([3, 5]))

    def gap(batch=None, **build_kw):
        model = from_hf_lm(path, vision=vision, **build_kw).eval()
        with torch.no_grad():
            return (model(batch or Batch(x)) - lm).abs().max().item()

    with torch.no_grad():
        lm = from_hf_lm(path).eval()(Batch(x))
        assert (lm - hf(input_ids=x).logits).abs().max() <= 1e-4  # the insertion build: transformers' logits
    copies = {p: gap(fusion=FusionConfig(variant="casa", placement=p, every=2)) for p in ("parallel", "before")}
    print(f"casa, fusion layers copies of SA: max |logit - LM| {copies}")
    assert min(copies.values()) > 0.3  # the copy adds to SA: a different model on text alone
    for placement in ("parallel", "before"):
        for variant in ("casa", "ca", "gated_ca"):
            fusion = FusionConfig(variant=variant, placement=placement, every=2)
            assert gap(fusion=fusion, zero_fusion_output=True) == 0.0, (variant, placement)
            assert gap(with_images, fusion=fusion, zero_fusion_output=True) == 0.0, (variant, placement)
    assert gap(fusion=FusionConfig(variant="casa", placement="replace", every=2)) == 0.0  # one window: SA itself
    assert gap(fusion=FusionConfig(variant="ca", every=2)) == 0.0  # no image, no update
    for fusion, match in ((FusionConfig(variant="casa", placement="replace"), "replace"),
                          (FusionConfig(variant="casa_shared"), "casa_shared")):
        with pytest.raises(ValueError, match=match):
            from_hf_lm(path, fusion=fusion, zero_fusion_output=True)
        with pytest.raises(ValueError, match=match):
            BuildConfig(lm=str(path), fusion=fusion, zero_fusion_output=True)
    built = build(BuildConfig(lm=str(path), fusion=FusionConfig(every=2), tokenizer="byte", zero_fusion_output=True))
    assert all(not b.fusion.attn.o_proj.weight.any() for b in built.model.blocks if b.fusion is not None)
    assert built.model.blocks[0].fusion.attn.q_proj.weight.any()  # the rest still starts as SA's copy


# ----------------------------------------------------------------------------- errors
def test_unknown_architecture(tmp_path):
    _, path = make_hf(tmp_path, "llama")
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        lm_config_from_hf(path)
    assert str(path) in str(e.value) and "LlamaForCausalLM" in str(e.value)


@pytest.mark.parametrize("changes,match", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(hidden_act="gelu"), "gelu"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=4096), "sliding_window"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=8), "sliding"),
])
def test_unsupported_config(tmp_path, changes, match):
    _, path = make_hf(tmp_path, "llama")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        lm_config_from_hf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    _, path = make_hf(tmp_path, "llama")
    file = path / "model.safetensors"
    full = load_file(file)
    model = CasaModel(ModelConfig(lm=lm_config_from_hf(path), fusion=FusionConfig(variant="insertion")))
    before = model.blocks[0].attn.q_proj.weight.clone()

    save_file({k: v for k, v in full.items() if k != "model.layers.1.mlp.down_proj.weight"}, file)
    with pytest.raises(ValueError, match=r"missing HF tensors: \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        load_lm_weights(model, path)
    assert torch.equal(model.blocks[0].attn.q_proj.weight, before)  # nothing copied on failure

    save_file({**full, "model.layers.0.extra.weight": torch.zeros(3)}, file)
    with pytest.raises(ValueError, match=r"unexpected HF tensors: \['model\.layers\.0\.extra\.weight'\]"):
        load_lm_weights(model, path)

    save_file({**full, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}, file)
    load_lm_weights(model, path)  # old rotary buffers are ignored


def test_shape_mismatch(tmp_path):
    _, path = make_hf(tmp_path, "llama")
    lm = lm_config_from_hf(path)
    lm.d_ff = 80
    model = CasaModel(ModelConfig(lm=LMConfig(**vars(lm)), fusion=FusionConfig(variant="insertion")))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(80, 64\)"):
        load_lm_weights(model, path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        lm_config_from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_state_dict(tmp_path)
    _, path = make_hf(tmp_path, "llama", max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_state_dict(path)


def test_qwen25vl_text_model_both_namings(tmp_path):
    """A Qwen2.5-VL directory serves as an LM: hub naming (model.layers) and model.language_model.*."""
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                      "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64))
    torch.manual_seed(0)
    hf = randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg)).eval()
    hf.save_pretrained(tmp_path / "vl")
    lm = lm_config_from_hf(tmp_path / "vl")
    assert lm.qkv_bias and lm.rope_theta == 1e6 and (lm.d_model, lm.n_layers, lm.vocab_size) == (64, 2, 97)
    x = ids()
    with torch.no_grad():
        want = hf(input_ids=x).logits
    for rename in (False, True):
        if rename:
            file = tmp_path / "vl" / "model.safetensors"
            sd = load_file(file)
            sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                   "model." + k if k.startswith("visual.") else k): v for k, v in sd.items()}
            save_file(sd, file)
        ours = from_hf_lm(tmp_path / "vl").eval()
        with torch.no_grad():
            assert (ours(Batch(x), backend="reference") - want).abs().max() <= 1e-4
    save_file({**sd, "model.language_model.extra.weight": torch.zeros(2)}, file)  # only visual.* is skipped
    with pytest.raises(ValueError, match=r"unexpected HF tensors: \['model\.language_model\.extra\.weight'\]"):
        from_hf_lm(tmp_path / "vl")
