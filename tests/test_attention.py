"""Every attention backend equals the dense reference (fp32, 1e-5) on random
layouts (images with one token count or each its own), forward and, where it
has one, backward; and the reference equals a per-query loop written straight
from docs/design.md §4."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layout import brute_force_mask, layouts, n_tokens

from casa.core.attention import causal_attend, flash_available, fusion_attend
from casa.core.layout import build_layout

H, D = 4, 8


def random_inputs(B, T, n_img_tokens, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, kv_heads, D), (B, T, kv_heads, D), (n_img_tokens, kv_heads, D),
              (n_img_tokens, kv_heads, D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).float() for s in shapes]


def loop_attention(q, k_txt, v_txt, k_img_row, v_img_row, mask):
    """Softmax over the allowed keys, one query and head at a time; zero where
    no key is allowed. Keys per row: `[k_img_row[b] ; k_txt[b]]`."""
    B, T = q.shape[:2]
    K = k_img_row.shape[1]
    group = H // k_txt.shape[2]
    k_all, v_all = torch.cat([k_img_row, k_txt], 1), torch.cat([v_img_row, v_txt], 1)
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            allowed = mask[b, 0, t].nonzero().flatten()
            if len(allowed) == 0:
                continue
            assert int(allowed.max()) < K + T
            for h in range(H):
                k, v = k_all[b, allowed, h // group], v_all[b, allowed, h // group]
                out[b, t, h] = torch.softmax(k @ q[b, t, h] / D**0.5, 0) @ v
    return out


@settings(max_examples=25, deadline=None)
@given(layouts(max_len=10, max_images=3), st.booleans())
def test_reference_equals_per_query_loop(spec, text_keys):
    T, doc_lens, rows, points, n = spec
    B = len(doc_lens)
    lay = build_layout(T, doc_lens, rows, points, n)
    q, kt, vt, ki, vi = random_inputs(B, T, n_tokens(points, n), 2)
    mask = brute_force_mask(T, doc_lens, rows, points, n, text_keys)
    index = lay.dense_keys()[0]  # the row's image tokens, padding masked out
    if not text_keys:
        mask = torch.cat([mask, torch.zeros(B, 1, T, T, dtype=torch.bool)], -1)
    expected = loop_attention(q, kt, vt, ki[index], vi[index], mask)
    got = fusion_attend(q, kt, vt, ki, vi, lay, text_keys=text_keys, backend="reference")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans(), st.sampled_from([1, 2, 4]))
def test_windowed_equals_reference_forward_and_backward(spec, text_keys, kv_heads):
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    inputs = random_inputs(len(doc_lens), T, n_tokens(points, n), kv_heads)
    grads = {}
    for backend in ("reference", "windowed"):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = fusion_attend(*leaves, lay, text_keys=text_keys, backend=backend)
        assert torch.isfinite(out).all()
        g = [torch.zeros_like(x) for x in leaves]
        if out.requires_grad:  # no key anywhere: a constant zero update
            g = torch.autograd.grad(out, leaves, torch.ones_like(out) + out.detach(), allow_unused=True,
                                    materialize_grads=True)
        grads[backend] = (out.detach(), g)
    (ref, ref_g), (got, got_g) = grads["reference"], grads["windowed"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_windowed_uniform_fast_path_equals_reference():
    W, L, N = 4, 6, 5
    lay = build_layout(W * L, [[L] * W], torch.zeros(W, dtype=torch.long), torch.arange(W) * L, N)
    assert lay.folded().uniform
    inputs = random_inputs(1, W * L, W * N, 2)
    for text_keys in (True, False):
        ref = fusion_attend(*inputs, lay, text_keys=text_keys, backend="reference")
        got = fusion_attend(*inputs, lay, text_keys=text_keys, backend="windowed")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_text_without_image_gets_zero_update_in_ca():
    lay = build_layout(8, [[8]], torch.tensor([0]), torch.tensor([4]), 2)
    inputs = random_inputs(1, 8, 2, 2)
    for backend in ("reference", "windowed"):
        out = fusion_attend(*inputs, lay, text_keys=False, backend=backend)
        assert out[0, :4].abs().max() == 0 and out[0, 4:].abs().min() > 0


@settings(max_examples=30, deadline=None)
@given(layouts(), st.sampled_from([1, 2, 4]))
def test_causal_attend_masks_documents(spec, kv_heads):
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    q, k, v, _, _ = random_inputs(len(doc_lens), T, 0, kv_heads)
    out = causal_attend(q, k, v, lay, backend="windowed")
    for b, lens in enumerate(doc_lens):  # each document alone gives the same result
        start = 0
        for length in lens:
            alone = build_layout(length, [[length]], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1)
            sl = slice(start, start + length)
            ref = causal_attend(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], alone, backend="reference")
            torch.testing.assert_close(out[b:b + 1, sl], ref, atol=1e-5, rtol=1e-5)
            start += length


# FlexAttention compiles per shape (seconds each on CPU): few examples, fixed row length.
@settings(max_examples=6, deadline=None)
@given(layouts(max_rows=2, min_len=24, max_len=24, max_images=4), st.booleans())
def test_flex_equals_reference_forward(spec, text_keys):
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    inputs = random_inputs(len(doc_lens), T, n_tokens(points, n), 2)
    with torch.no_grad():
        ref = fusion_attend(*inputs, lay, text_keys=text_keys, backend="reference")
        got = fusion_attend(*inputs, lay, text_keys=text_keys, backend="flex")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        ref = causal_attend(*inputs[:3], lay, backend="reference")
        got = causal_attend(*inputs[:3], lay, backend="flex")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_named():
    lay = build_layout(4, [[4]], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="'dense'"):
        fusion_attend(*random_inputs(1, 4, 0, 2), lay, text_keys=True, backend="dense")
    if not flash_available():  # a user error (the CLI prints one line), not an internal one
        with pytest.raises(ValueError, match="flash-attn"):
            fusion_attend(*random_inputs(1, 4, 0, 2), lay, text_keys=True, backend="flash")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash"])
@settings(max_examples=20, deadline=None)
@given(spec=layouts(max_len=64), text_keys=st.booleans())
def test_gpu_backends_equal_reference(backend, spec, text_keys):
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn not installed")
    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n, device="cuda")
    inputs = [x.cuda() for x in random_inputs(len(doc_lens), T, n_tokens(points, n), 2)]
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    outs = {}
    for name in ("reference", backend):
        leaves = [x.to(dtype).clone().requires_grad_(True) for x in inputs]
        out = fusion_attend(*leaves, lay, text_keys=text_keys, backend=name)
        out.float().sum().backward()
        outs[name] = (out.float(), [x.grad.float() for x in leaves])
    torch.testing.assert_close(outs[backend][0], outs["reference"][0], atol=tol, rtol=tol)
    for a, b in zip(outs[backend][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def varlen_emulation(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """flash-attn's documented varlen semantics in plain torch (causal is
    bottom-right aligned), to check the offsets we hand it; the kernel itself
    is checked by the GPU test above."""
    from torch.nn.attention.bias import causal_lower_right

    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        assert 0 < cu_k[i + 1] - cu_k[i] <= max_k and 0 < cu_q[i + 1] - cu_q[i] <= max_q
        mask = causal_lower_right(qs.stop - qs.start, ks.stop - ks.start) if causal else None
        o = torch.nn.functional.scaled_dot_product_attention(
            q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1), attn_mask=mask, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@settings(max_examples=40, deadline=None)
@given(layouts(), st.booleans())
def test_flash_offsets_equal_reference_under_emulation(spec, text_keys):
    import sys
    import types

    from casa.core import attention

    T, doc_lens, rows, points, n = spec
    lay = build_layout(T, doc_lens, rows, points, n)
    inputs = random_inputs(len(doc_lens), T, n_tokens(points, n), 2)
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = varlen_emulation
    saved = sys.modules.get("flash_attn")
    sys.modules["flash_attn"] = fake
    try:
        got = attention._fusion_flash(*inputs, lay, text_keys)
        got_causal = attention._causal_flash(*inputs[:3], lay)
    finally:
        sys.modules.pop("flash_attn")
        if saved is not None:
            sys.modules["flash_attn"] = saved
    ref = fusion_attend(*inputs, lay, text_keys=text_keys, backend="reference")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ref = causal_attend(*inputs[:3], lay, backend="reference")
    torch.testing.assert_close(got_causal, ref, atol=1e-5, rtol=1e-5)
