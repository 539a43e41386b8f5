import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file, save_model

from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.batch import Batch
from casa.core.model import CasaModel
from casa.pretrained.directory import (
    from_pretrained,
    load,
    processor_settings,
    read_config,
    save_pretrained,
)
from casa.pretrained.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from casa.weights import weight_files

VISION = dict(image_size=16, patch_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=32)


def tiny(variant="casa", tied=True, vision=None, vocab=264) -> CasaModel:
    lm = LMConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True,
                  tie_embeddings=tied)
    torch.manual_seed(0)
    return CasaModel(ModelConfig(lm=lm, vision=vision or VisionConfig(**VISION),
                                 fusion=FusionConfig(variant=variant, every=2))).eval()


def batch(vocab=264, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, vocab, (2, 11), generator=g), images=torch.randn(3, 3, size, size, generator=g),
                 image_rows=torch.tensor([0, 0, 1]), insertion_points=torch.tensor([1, 6, 4]))


def same(a: CasaModel, b: CasaModel, x: Batch):
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hf_tokenizer_dir(path):
    """A small tokenizers BPE with a chat template and image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True)
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["what colour is the square? red green blue"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<|end|>", "<|img|>", "<|/img|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "unk_token": "[UNK]",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}"}))
    return path


# ----------------------------------------------------------------------------- round trips
def test_roundtrip_byte_tokenizer(tmp_path):
    m = tiny("casa")
    tok = ByteTokenizer()
    path = save_pretrained(m, tmp_path / "m", tokenizer=tok, processor={"gist_token": "<|gist|>"},
                           extra={"note": 1})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert "lm_head.weight" not in load_file(path / "model.safetensors")  # tied: stored once
    back = from_pretrained(path)
    same(m, back, batch())
    assert back.lm_head.weight is back.embed.weight and not back.training
    loaded = load(path)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.processor.gist == "<|gist|>"
    assert read_config(path)["note"] == 1


def test_roundtrip_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    tok = HFTokenizer(hf_tokenizer_dir(tmp_path / "tok"))
    m = tiny("ca", tied=False, vocab=300)
    path = save_pretrained(m, tmp_path / "m", tokenizer=tok,
                           processor={"gist": True, "gist_token": "<|/img|>", "image_prefix": "<|img|>"})
    same(m, from_pretrained(path), batch(vocab=300))
    back = load_tokenizer(path)
    assert isinstance(back, HFTokenizer) and back.chat_template == tok.chat_template
    text = "what colour is the square?"
    assert back.encode(text) == tok.encode(text) and back.decode(back.encode(text)) == text
    loaded = load(path)
    assert (loaded.processor.image_prefix, loaded.processor.gist) == ("<|img|>", "<|/img|>")
    enc = loaded.processor.encode({"messages": [
        {"role": "user", "content": [{"type": "image", "image": torch.zeros(1)}, {"type": "text", "text": "red?"}]},
        {"role": "assistant", "content": "red"}]}, pixels=False)
    p = enc.points[0]
    assert enc.ids[p - 1] == tok.token_id("<|img|>") and enc.ids[p] == tok.token_id("<|/img|>")


def test_roundtrip_sharded(tmp_path):
    m = tiny("casa_shared", tied=False)
    path = save_pretrained(m, tmp_path / "m", max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert set(weight_files(path)) == set(m.state_dict())
    same(m, from_pretrained(path), batch())
    # saving again over the directory replaces it whole (no stale shards), when asked to
    save_pretrained(m, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_hf_vision_directory_is_self_contained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from casa.vision.hf import vision_config_from_hf

    src = tmp_path / "siglip"
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).save_pretrained(src)
    m = tiny("casa", vision=vision_config_from_hf(src))
    path = save_pretrained(m, tmp_path / "m")
    assert read_config(path)["model"]["vision"]["path"] == "vision"
    assert sorted(p.name for p in (path / "vision").iterdir()) == ["casa_vision.json", "config.json"]
    shutil.rmtree(src)
    moved = tmp_path / "moved"
    os.replace(path, moved)  # and relocatable
    back = from_pretrained(moved)
    assert back.config.vision.path == str(moved / "vision")
    same(m, back, batch())
    half = from_pretrained(moved, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.vision.encoder.model.embeddings.patch_embedding.weight,
                       m.vision.encoder.model.embeddings.patch_embedding.weight.bfloat16())


def test_reads_directories_of_the_first_format(tmp_path):
    """config.json + a save_model() file (tied tensor under one name), as casa wrote before sharding."""
    m = tiny("casa")
    path = tmp_path / "old"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"casa_format": "casa-v1", "model": m.config.to_dict(),
                                                  "train": {"gist_token": "<|image|>", "steps": 3}}))
    save_model(m, str(path / "model.safetensors"))
    same(m, from_pretrained(path), batch())
    assert processor_settings(path) == {"gist": True, "gist_token": "<|image|>", "image_prefix": None}


# ----------------------------------------------------------------------------- bad input
def test_bad_checkpoints(tmp_path):
    m = tiny("casa")
    path = save_pretrained(m, tmp_path / "m")
    file = path / "model.safetensors"
    full = load_file(file)

    save_file({k: v for k, v in full.items() if k != "blocks.1.mlp.up_proj.weight"}, file)
    with pytest.raises(ValueError, match=r"missing tensors \['blocks\.1\.mlp\.up_proj\.weight'\]"):
        from_pretrained(path)
    save_file({**full, "blocks.0.extra": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match=r"unexpected tensors \['blocks\.0\.extra'\]"):
        from_pretrained(path)
    save_file({**full, "blocks.0.mlp.up_proj.weight": torch.zeros(3, 3)}, file)
    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp\.up_proj\.weight' has shape \(3, 3\), the model expects"):
        from_pretrained(path)
    file.unlink()
    with pytest.raises(ValueError, match="no model weights"):
        from_pretrained(path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a casa model directory"):
        from_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match=r"unknown keys \['gist_tokn'\]"):
        save_pretrained(m, tmp_path / "y", processor={"gist_tokn": "<|gist|>"})
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(m, tmp_path / "y", max_shard_size="lots")
    assert not (tmp_path / "y").exists()


def test_save_pretrained_replaces_only_a_casa_model_and_only_when_asked(tmp_path):
    m = tiny("casa")
    path = save_pretrained(m, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a casa model directory; pass --overwrite"):
        save_pretrained(tiny("ca"), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    save_pretrained(tiny("ca"), path, overwrite=True)
    assert read_config(path)["model"]["fusion"]["variant"] == "ca"
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"is a folder that is not a casa model directory \(it holds thesis.tex\)"):
        save_pretrained(m, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(other)) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        save_pretrained(m, tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m", "other"]  # no temporary left


def test_truncated_shard_is_named(tmp_path):
    from casa.files import DamagedFileError

    path = save_pretrained(tiny("casa_shared", tied=False), tmp_path / "m", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=rf"'{shard}' is damaged or incomplete"):
        from_pretrained(path)


def test_directory_saved_with_earlier_parameter_names_still_loads(tmp_path):
    """Blocks' norms were called n1/n2 before they took HF's names: such directories load unchanged."""
    model = CasaModel(tiny_config()).eval()
    save_pretrained(model, tmp_path / "m", tokenizer=ByteTokenizer())
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(file))
    renamed = {k.replace(".input_layernorm.", ".n1.").replace(".post_attention_layernorm.", ".n2."): v
               for k, v in tensors.items()}
    assert sum(".n1." in k or ".n2." in k for k in renamed) == 2 * model.config.lm.n_layers
    save_file(renamed, str(file), metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path / "m")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
