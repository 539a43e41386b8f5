"""Decode weight layouts (core/decode.py): the packed projections equal the
module's own, stay fresh after in-place updates, and cached decode in bf16
matches the uncached (plain `F.linear`) forward within bf16's tolerance."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_config

from casa.config import FUSION_VARIANTS
from casa.core.batch import Batch
from casa.core.decode import decoding, packed_linear, use_packed
from casa.core.lm import MLP, Attention
from casa.core.model import CasaModel
from casa.inference.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

# stated tolerances per dtype: fp32 differs by summation order only; bf16 by its 8-bit mantissa
# (measured: at most 0.047 on logits up to 4.8, a few bf16 ulps)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.08, rtol=0.02)}
BF16_PATHS = dict(atol=0.15, rtol=0.02)  # a whole bf16 decode against the fp32 logits or another bf16 path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_the_modules(dtype):
    torch.manual_seed(0)
    owner = nn.Module()
    a, b = nn.Linear(24, 16, bias=True).to(dtype), nn.Linear(24, 8, bias=False).to(dtype)
    x = torch.randn(3, 1, 24, dtype=dtype)
    with torch.no_grad():
        want = torch.cat([a(x), b(x)], dim=-1)
        got = packed_linear(x, owner, "ab", (a, b))
        assert got.shape == (3, 1, 24) and got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype])
        a.weight.mul_(2)  # an in-place update (an optimizer step) invalidates the packed copy
        torch.testing.assert_close(packed_linear(x, owner, "ab", (a, b)), torch.cat([a(x), b(x)], -1), **TOL[dtype])
        one = x[:1]  # one row: the matrix-vector path in fp32
        got = packed_linear(one, owner, "ab", (a, b))
        assert got.shape == (1, 1, 24)
        torch.testing.assert_close(got, torch.cat([a(one), b(one)], -1), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_on_the_kernel_path_takes_the_kernel(dtype, monkeypatch):
    from casa.core import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C compiler: CPU kernels not built")
    torch.manual_seed(0)
    owner = nn.Module()
    a, b = nn.Linear(40, 24, bias=True).to(dtype), nn.Linear(40, 16, bias=False).to(dtype)
    x = torch.randn(1, 1, 40, dtype=dtype)
    calls, real = [], cpu_kernels.gemv
    monkeypatch.setattr(cpu_kernels, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        want = torch.cat([a(x), b(x)], dim=-1)
        for path, kernel_calls in (("kernels", [1]), ("torch", [1]), ("kernels", [1, 1])):
            with decoding(path):  # the layout follows the path; each path keeps its own packed copy
                got = packed_linear(x, owner, "ab", (a, b))
            assert calls == kernel_calls and got.shape == (1, 1, 40) and got.dtype == dtype
            torch.testing.assert_close(got, want, **TOL[dtype])


def test_rotary_equals_the_rotate_half_form():
    from casa.core.lm import Rotary

    torch.manual_seed(0)
    rot = Rotary.at(torch.arange(5)[None], head_dim=16, theta=10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 5, 3, 16, dtype=dtype)
        cos, sin = rot.cos[..., None, :].to(dtype), rot.sin[..., None, :].to(dtype)
        x1, x2 = x.chunk(2, dim=-1)
        want = x * cos + torch.cat([-x2, x1], dim=-1) * sin  # HF's apply_rotary_pos_emb
        assert torch.equal(rot.apply(x), want)  # the same products and sums, bit for bit


def test_packed_path_only_when_decoding_without_grad():
    x = torch.randn(1, 4, 32)
    assert not use_packed(x)  # the full forward keeps F.linear
    with decoding("torch"):
        assert not use_packed(x)  # grad enabled: autograd needs F.linear
        with torch.no_grad():
            assert use_packed(x) and not use_packed(torch.randn(65, 32))
    torch.manual_seed(0)
    attn, mlp = Attention(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, qkv_bias=True), MLP(d_model=32, d_ff=64)
    y = torch.randn(1, 1, 32)
    with torch.no_grad(), decoding("torch"):
        q, k, v = attn.qkv(y)
        out, o = mlp(y), attn.out(q)
    with torch.no_grad():
        torch.testing.assert_close(q, attn.q(y), **TOL[torch.float32])
        torch.testing.assert_close(torch.stack([k, v]), torch.stack(attn.kv(y)), **TOL[torch.float32])
        torch.testing.assert_close(out, mlp.down_proj(F.silu(mlp.gate_proj(y)) * mlp.up_proj(y)), **TOL[torch.float32])
        torch.testing.assert_close(o, attn.o_proj(q.flatten(-2)), **TOL[torch.float32])


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_bfloat16_decode_equals_uncached_forward(variant, threads):
    torch.manual_seed(0)
    m = CasaModel(tiny_config(variant)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "vision" not in name:
                p.normal_(0, 0.2)
    m32 = CasaModel(tiny_config(variant)).eval()
    m = m.to(torch.bfloat16)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})  # the same (bf16) weights in fp32
    g = torch.Generator().manual_seed(0)
    ids, embeds, points = torch.randint(0, 61, (12,), generator=g), torch.randn(2, 4, 32, generator=g), [2, 7]
    with torch.no_grad():
        batch = Batch(ids[None], image_embeds=embeds.bfloat16(), insertion_points=torch.tensor(points))
        ref = m(batch, backend="reference")[0].float()
        exact = m32(Batch(ids[None], image_embeds=embeds.bfloat16().float(), insertion_points=torch.tensor(points)),
                    backend="reference")[0]
    s, out = Session(m), []
    for t in range(len(ids)):
        if t in points:
            s.add_image_embeds(embeds[points.index(t)])
        out.append(s.forward_text(ids[t: t + 1]))
    got = torch.cat(out).float()
    assert ref.abs().max() > 1  # logits of a size where bf16's relative error shows
    # each bf16 path rounds at its own places (casa's kernels once per product, PyTorch's per op):
    # measured, both lie within 0.11 of the fp32 logits, and within 0.11 of each other
    torch.testing.assert_close(got, exact, **BF16_PATHS)
    torch.testing.assert_close(got, ref, **BF16_PATHS)
