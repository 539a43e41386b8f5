"""The CUDA paths, proven against the plain ones (run with `make test-gpu`).

Skipped without a CUDA device. Tolerances, stated once:
- fp32: 1e-4 (TF32 is switched off for these tests, so fp32 is fp32);
- bf16: 3e-2 absolute and relative on attention outputs and gradients of
  unit-scale inputs (bf16 keeps 8 bits of mantissa: ~4e-3 per rounding, a
  few roundings per softmax-weighted sum); model losses within 2% relative.

What is covered: every backend (windowed, flex, flash where installed)
equals the reference forward and backward in fp32 and bf16 on fixed
layouts that exercise text-only windows, shared windows and packed
documents; a bf16 autocast training step of every variant agrees with its
fp32 loss and learns; cached decode equals the uncached forward on CUDA for
every variant.
"""

import pytest
import torch
from test_attention import random_inputs
from test_cache import POINTS, VARIANTS, inputs, model_for, run_session

from casa.core.attention import flash_available, fusion_attend
from casa.core.batch import Batch
from casa.core.layout import build_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# (T, doc_lens per row, image rows, insertion points, tokens per image)
LAYOUTS = [
    (32, [[32]], [0, 0], [0, 16], 8),  # two windows, no text-only window
    (48, [[20, 28]], [0, 0, 0], [5, 5, 30], 16),  # text-only window, a shared window, two documents
    (64, [[64], [40, 24]], [0, 1, 1], [10, 0, 50], 8),  # two rows, windows per row and per document
]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["windowed", "flex", "flash"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("text_keys", [True, False], ids=["casa", "ca"])
def test_backend_equals_reference_forward_and_backward(backend, dtype, layout, text_keys):
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed (make test-gpu installs it only where a wheel exists)")
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn computes in fp16/bf16 only")
    T, doc_lens, rows, points, n = LAYOUTS[layout]
    lay = build_layout(T, doc_lens, torch.tensor(rows), torch.tensor(points), n, device="cuda")
    base = [x.cuda().to(dtype) for x in random_inputs(len(doc_lens), T, len(points) * n, 2)]
    results = {}
    for name in ("reference", backend):
        # the reference runs in fp32 on the same (rounded) inputs: the ground truth
        leaves = [x.float().clone().requires_grad_(True) if name == "reference" else x.clone().requires_grad_(True)
                  for x in base]
        out = fusion_attend(*leaves, lay, text_keys=text_keys, backend=name)
        weights = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
        (out.float() * weights).sum().backward()
        results[name] = [out.float(), *(x.grad.float() for x in leaves)]
    tol = TOL[dtype]
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _step_losses(variant, *, precision: str, steps: int = 4) -> list[float]:
    from conftest import make_batch, tiny_config

    from casa.core.loss import lm_loss
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    model = CasaModel(tiny_config(variant)).cuda()
    batch = make_batch(torch.arange(24) % 61, [0, 12], doc_lens=[[24]]).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = lm_loss(model(batch, backend="auto"), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("variant", sorted({v for v, _ in VARIANTS}))
def test_bf16_training_step_of_every_variant(variant):
    fp32 = _step_losses(variant, precision="fp32")
    bf16 = _step_losses(variant, precision="bf16")
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # same weights, same batch
    assert bf16[-1] < bf16[0]  # and it learns


@pytest.mark.parametrize("variant,placement", VARIANTS)
def test_cached_decode_equals_uncached_forward_on_cuda(variant, placement):
    model = model_for(variant, placement).cuda()
    ids, embeds = inputs()
    ids, embeds = ids.cuda(), embeds.cuda()
    batch = Batch(ids[None], image_embeds=embeds, insertion_points=torch.tensor(POINTS)).to("cuda")
    with torch.no_grad():
        want = model(batch, backend="reference")[0]
    for schedule in ([len(ids)], [1] * len(ids)):
        got, _ = run_session(model, ids, embeds, schedule)
        torch.testing.assert_close(got, want, atol=TOL[torch.float32], rtol=TOL[torch.float32])
