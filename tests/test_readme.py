"""The README's Python examples run as written (the OpenAI-client example
needs a running server: tests/test_serve.py makes the same calls against one)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def demo_run(root: Path) -> None:
    """What the load -> generate and load -> chat examples read: a run at runs/demo (a tiny model,
    as `casa demo` leaves one, trained or not) and an image, shape.png."""
    import torch
    from PIL import Image

    from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
    from casa.core.model import CasaModel
    from casa.data import Processor
    from casa.pretrained.tokenizer import ByteTokenizer
    from casa.training.checkpoint import save_checkpoint

    tok, vision = ByteTokenizer(), VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    torch.manual_seed(0)
    model = CasaModel(ModelConfig(lm=LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                              n_kv_heads=2, d_ff=64), vision=vision, fusion=FusionConfig()))
    save_checkpoint(root / "runs" / "demo", 10, model, {"step": 10}, tokenizer=tok, processor=Processor(tok, vision))
    Image.new("RGB", (40, 30), "red").save(root / "shape.png")


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    local = [code for code in blocks if "OpenAI(" not in code]
    assert len(local) >= 3 and len(blocks) - len(local) == 1
    demo_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    for code in local:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        if "logits" in namespace:  # the quick-start example states the shape it returns
            B, T = namespace["batch"].input_ids.shape
            assert namespace["logits"].shape == (B, T, namespace["config"].lm.vocab_size)
            assert namespace["logits"].isfinite().all()
    loading = [code for code in local if "from_pretrained(" in code]
    assert len(loading) == 2 and all(len(code.strip().splitlines()) <= 10 for code in loading)  # load -> generate, chat
    assert capsys.readouterr().out.count("\n") >= 3  # a reply, then two chat answers


def test_every_casa_serve_flag_is_documented_in_its_section():
    from dataclasses import fields

    from casa.serve.limits import Limits, flag_name

    section = README.read_text().split("## Serve a model", 1)[1].split("\n## ", 1)[0]
    flags = [flag_name(f.name) for f in fields(Limits)] + ["--api-key", "--allowed-hosts"]
    assert not [f for f in flags if f"`{f}" not in section]
