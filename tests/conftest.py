import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.batch import Batch


def tiny_config(variant="casa", placement="parallel", **fusion) -> ModelConfig:
    return ModelConfig(
        lm=LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64),
        vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
        fusion=FusionConfig(variant=variant, placement=placement, **fusion),
    )


def make_batch(ids, points, rows=None, doc_lens=None, *, images=None, seed=0, image_size=16) -> Batch:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    points = torch.as_tensor(points, dtype=torch.long)
    rows = torch.zeros_like(points) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(len(points), 3, image_size, image_size, generator=g)
    return Batch(ids, images=images, image_rows=rows, insertion_points=points, doc_lens=doc_lens)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """One thread: decode takes casa's CPU kernels (`core.cpu_kernels`, where built); two: PyTorch's."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


# ----------------------------------------------------------------- bad-input tests
def run_casa(*args, cwd=None, timeout=120, env=None):
    """Run the real `casa` command in a subprocess (as a user would) and return
    the CompletedProcess (text stdout/stderr)."""
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CASA_DEBUG": ""}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "casa.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def snapshot(*roots) -> dict:
    """{path: bytes} of every file under `roots` (files or folders), to prove nothing was changed or lost."""
    from pathlib import Path

    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        out.update({str(p): p.read_bytes() for p in files})
    return out


def assert_user_error(result, *names, before: dict | None = None, after: dict | None = None):
    """A refused input: non-zero exit, no traceback, a message naming each of
    `names`, and (given snapshots) every file that existed before unchanged."""
    assert result.returncode != 0, f"exit 0 for a bad input; stdout: {result.stdout[-500:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for name in names:
        assert str(name) in result.stderr, f"{name!r} not named in: {result.stderr[-1000:]}"
    if before is not None:
        for path, data in before.items():
            assert (after or {}).get(path) == data, f"{path} was changed or removed"


def byte_model_dir(path, *, extra: dict | None = None):
    """A tiny random `casa` model directory with the byte tokenizer (vocab 264),
    saved at `path`: what the CLI tests open."""
    from casa.core.model import CasaModel
    from casa.pretrained.directory import save_pretrained
    from casa.pretrained.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(lm=LMConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
                      vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
                      fusion=FusionConfig(variant="casa"))
    return save_pretrained(CasaModel(cfg), path, tokenizer=ByteTokenizer(), extra=extra)
