"""casa's CPU decode kernels (`core.cpu_kernels`) against PyTorch's reference ops: the
matrix-vector product and few-query attention, fp32 and bf16, odd sizes, strided caches,
masks; and the kernel decode path (`decode="kernels"`) against the torch path, the plain
reference of `core/lm.py` and `core/model.py`."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from casa.core import cpu_kernels
from casa.core.attention import cached_attend

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")
# fp32: summation order only; bf16 operands are widened exactly, so the same tolerance holds
TOL = dict(atol=2e-5, rtol=1e-5)


def test_the_kernels_build_where_a_compiler_exists():
    """CI has a compiler: a silent fallback would leave the kernels untested."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert cpu_kernels.available()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("O,I", [(1, 1), (7, 13), (64, 512), (1037, 515)])
def test_gemv_equals_matmul(dtype, O, I):
    g = torch.Generator().manual_seed(O + I)
    w = torch.randn(O, I, generator=g).to(dtype)
    x, b = torch.randn(I, generator=g), torch.randn(O, generator=g)
    torch.testing.assert_close(cpu_kernels.gemv(w, x, b), w.double() @ x.double() + b.double(),
                               check_dtype=False, **TOL)
    torch.testing.assert_close(cpu_kernels.gemv(w, x), (w.double() @ x.double()).float(), **TOL)


@needs_kernels
def test_gemv_rejects_a_strided_weight():
    with pytest.raises(ValueError, match="row-contiguous"):
        cpu_kernels.gemv(torch.randn(8, 16).t(), torch.randn(8))


def _reference(q, k, v, mask, scale):
    """SDPA in float64 with query row r reading mask row r % T; rows with no key -> 0."""
    Hkv, N, D = q.shape
    m = None if mask is None else mask.repeat(N // mask.shape[0], 1)
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, scale=scale)
    return out.nan_to_num(0.0).float()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 40, 64, 128])
@pytest.mark.parametrize("S", [1, 31, 100])
def test_attend_equals_sdpa(dtype, D, S):
    g = torch.Generator().manual_seed(D * S)
    Hkv, groups, T = 2, 3, 2
    # keys/values as a slice of a larger buffer (KVCache keeps spare capacity): rows D apart,
    # heads further apart than S * D
    k = torch.randn(Hkv, S + 5, D, generator=g).to(dtype)[:, :S]
    v = torch.randn(Hkv, S + 5, D, generator=g).to(dtype)[:, :S]
    q = torch.randn(Hkv, groups * T, D, generator=g) * 2
    mask = torch.rand(T, S, generator=g) > 0.4
    mask[0, 0] = True
    for m in (None, mask):
        got = cpu_kernels.attend(q, k, v, m, scale=D ** -0.5)
        assert got.shape == (Hkv, groups * T, D) and got.dtype == torch.float32
        torch.testing.assert_close(got, _reference(q, k, v, m, D ** -0.5), **TOL)


@needs_kernels
@pytest.mark.parametrize("D", [8, 40, 64])
@pytest.mark.parametrize("S", [1, 31, 100])
def test_attend_reads_an_int8_cache_as_its_dequantized_values(D, S):
    """int8 keys/values with a scale per row and head, read in place (the scales folded into
    the sums), attend like SDPA over the dequantized values; a missing scale is refused."""
    from casa.inference.cache import dequantize, quantize

    g = torch.Generator().manual_seed(D * S + 1)
    Hkv, groups, T = 2, 3, 2
    (k, ks), (v, vs) = (quantize(torch.randn(Hkv, S + 5, D, generator=g) * 3) for _ in range(2))
    k, v, ks, vs = k[:, :S], v[:, :S], ks[:, :S], vs[:, :S]  # slices of a larger buffer, as a cache holds them
    q = torch.randn(Hkv, groups * T, D, generator=g) * 2
    mask = torch.rand(T, S, generator=g) > 0.4
    mask[0, 0] = True
    kf, vf = dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32)
    for m in (None, mask):
        got = cpu_kernels.attend(q, k, v, m, scale=D ** -0.5, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(got, _reference(q, kf, vf, m, D ** -0.5), **TOL)
    with pytest.raises(ValueError, match="k_scale/v_scale"):
        cpu_kernels.attend(q, k, v, scale=D ** -0.5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 70, 5])  # vector lanes only, lanes and a scalar tail, the tail only
def test_quantize_equals_the_reference(dtype, D):
    """The C quantizer (a frame's image keys/values, a decoded token's row) gives the bits of
    `inference.cache.quantize_reference`, ties and all-zero rows included."""
    from casa.inference.cache import quantize_reference

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 2, max(D, 9), generator=g) * torch.logspace(-3, 3, 40)[None, :, None, None]
    x[0, 0] = 0  # all-zero rows
    x[1, 1, :, 8:] = 0
    x[1, 1, :, 8] = 127 * 2.0 ** -3  # amax: the scale is 1/8 exactly
    x[1, 1, :, :8] = (torch.arange(-4, 4) + 0.5) / 8  # ties: x / scale = -3.5 ... 3.5
    x = x.to(dtype)
    if D < 9:
        x = x[..., :D].contiguous()
    q, s = cpu_kernels.quantize(x)
    rq, rs = quantize_reference(x)
    assert q.dtype == torch.int8 and torch.equal(q, rq) and torch.equal(s, rs)
    assert s[0, 0].eq(0).all() and q[0, 0].eq(0).all()
    if D >= 9:
        assert q[1, 1, 0, :9].tolist() == [-4, -2, -2, -0, 0, 2, 2, 4, 127]  # half to even


@needs_kernels
def test_attend_gives_zeros_to_a_query_that_sees_nothing():
    q, k, v = torch.randn(1, 2, 64), torch.randn(1, 9, 64), torch.randn(1, 9, 64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    got = cpu_kernels.attend(q, k, v, mask, scale=0.125)
    assert torch.equal(got[0, 1], torch.zeros(64)) and got[0, 0].abs().sum() > 0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
def test_cached_attend_takes_the_kernel_on_the_kernel_path(one_thread, dtype, t, monkeypatch):
    """`cached_attend` on the kernel path equals its SDPA path (the torch path)."""
    from casa.core.decode import decoding

    g = torch.Generator().manual_seed(t)
    q = torch.randn(1, t, 4, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 70, 64, generator=g).to(dtype)[:, :, :50] for _ in range(2))
    mask = None if t == 1 else torch.ones(t, 50, dtype=torch.bool).tril(50 - t)
    calls = []
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        with decoding("kernels"):
            got = cached_attend(q, k, v, mask=mask)
        with decoding("torch"):
            want = cached_attend(q, k, v, mask=mask)
    assert calls == [1] and got.shape == want.shape == (1, t, 4, 64) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **(TOL if dtype == torch.float32 else
                                                            dict(atol=0.02, rtol=0.02)))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_rope_equal_the_modules(dtype, one_thread):
    """The kernels' norm and rotation (the row helpers of the fused steps) give the modules'
    values, roundings included (bf16 to one ulp at most: the norm's 1/sqrt may differ from rsqrt in
    its last bit)."""
    from casa.core.lm import RMSNorm, Rotary

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(dim=96)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    norm = norm.to(dtype)
    x = torch.randn(1, 1, 96, generator=g).to(dtype) * 3
    rot = Rotary.at(torch.tensor([[37]]), head_dim=16, theta=10000.0)
    heads = torch.randn(1, 1, 5 * 16 + 8, generator=g).to(dtype)[..., :80].unflatten(-1, (5, 16))  # a strided view
    with torch.no_grad():
        want_norm, want_rope = norm(x), rot.apply(heads)
        got_norm, got_rope = cpu_kernels.rmsnorm(x, norm.weight, norm.eps), cpu_kernels.rope(heads, *rot.tables(dtype))
    assert got_norm.dtype == got_rope.dtype == dtype
    assert torch.equal(got_rope, want_rope)
    ulp = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=2 ** -7)
    torch.testing.assert_close(got_norm, want_norm, **ulp)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_the_mlp(dtype, one_thread):
    """One decoded row through the one-call feed-forward gives `MLP`'s output (fp32: summation
    order; bf16: rounded where PyTorch rounds, so within an ulp of the output's scale)."""
    from casa.core.decode import decoding
    from casa.core.lm import MLP

    torch.manual_seed(0)
    mlp = MLP(d_model=72, d_ff=100).to(dtype)
    x = torch.randn(1, 1, 72).to(dtype) * 2
    calls, real = [], cpu_kernels.swiglu
    with torch.no_grad():
        want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        try:
            cpu_kernels.swiglu = lambda *a: calls.append(1) or real(*a)
            with decoding("kernels"):
                got = mlp(x)
        finally:
            cpu_kernels.swiglu = real
    assert calls == [1] and got.shape == want.shape and got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -7 * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(got, want, **tol)


def _fused_attention(attn, norm, x, rotary, cache):
    """One token through `attn` after `norm` in one `cpu_kernels.attn_step` call, its key/value
    written into `cache` in place (as `core.decode.BlockSteps` calls it)."""
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias,
                                                           attn.v_proj.bias]).float()
    row, held = cache.next_row(x, heads=attn.n_kv_heads, width=attn.head_dim)
    y = cpu_kernels.attn_step(x, norm.weight, norm.eps, qkv, bias, attn.o_proj.weight,
                              None if rotary is None else rotary.tables(x.dtype), cache.k, cache.v, row=row,
                              held=held, heads=attn.n_heads, k_scale=cache.k_scale, v_scale=cache.v_scale)
    cache.commit_row()
    return y.to(x.dtype).view(x.shape)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope,bias,bounded,prefix", [(True, False, False, 0), (True, True, True, 0),
                                                      (False, False, False, 5), (True, False, True, 3)])
def test_fused_attention_step_equals_the_torch_step(dtype, rope, bias, bounded, prefix, one_thread):
    """`cpu_kernels.attn_step` runs norm, q/k/v, RoPE, cache write, attention and output of one
    token in one call; token after token it gives `Attention.step`'s output on the torch path, and
    leaves the same cache (grouped heads, a bias, a ring-buffer history that wraps, an image
    prefix), up to summation order (fp32) or bf16's roundings, which fall in other places."""
    import casa.core.lm as lm
    from casa.core.decode import decoding
    from casa.core.layout import History
    from casa.inference.cache import KVCache

    torch.manual_seed(1)
    attn = lm.Attention(d_model=72, n_heads=6, n_kv_heads=2, head_dim=16, qkv_bias=bias).to(dtype)
    norm = lm.RMSNorm(dim=72)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    history = History(sink=2, window=4) if bounded else None
    caches = [KVCache(history=history), KVCache(history=history)]
    if prefix:
        k_img, v_img = torch.randn(2, 1, prefix, 2, 16).to(dtype)
        for c in caches:
            c.add_prefix(k_img, v_img)
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    with torch.no_grad(), decoding("torch"):
        for i in range(12):
            x = torch.randn(1, 1, 72).to(dtype)
            rotary = lm.Rotary.at(torch.tensor([[i]]), head_dim=16, theta=10000.0) if rope else None
            got = _fused_attention(attn, norm, x, rotary, caches[0])
            want = attn.step(x, norm=norm, rotary=rotary, cache=caches[1])
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), **tol, msg=f"token {i}")
    fused, ref = caches
    assert (fused.tokens, fused.seen, fused.n_slots) == (ref.tokens, ref.seen, ref.n_slots)
    for a, b in zip(fused.held(), ref.held()):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if bounded:
        assert torch.equal(fused.slot_abs, ref.slot_abs)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounded", [False, True])
def test_fused_attention_step_quantizes_where_it_writes(dtype, bounded, one_thread):
    """With an int8 cache the fused step quantizes the token's key/value by `inference.cache.
    quantize`'s rule where it writes them, in C, and attends over them in place: the int8 rows
    equal the torch path's (which quantizes the same values in PyTorch) but where the two sums
    round a value onto the other side of a rounding tie (at most one step), the scales agree
    to summation order, and the outputs equal the torch path's, which attends over dequantized
    copies, up to summation order (fp32) or bf16's rounding of the copies."""
    import casa.core.lm as lm
    from casa.core.decode import decoding
    from casa.core.layout import History
    from casa.inference.cache import KVCache

    torch.manual_seed(1)
    attn = lm.Attention(d_model=72, n_heads=6, n_kv_heads=2, head_dim=16).to(dtype)
    norm = lm.RMSNorm(dim=72).to(dtype)
    history = History(sink=2, window=4) if bounded else None
    caches = [KVCache(history=history, quantized=True), KVCache(history=history, quantized=True)]
    k_img, v_img = torch.randn(2, 1, 3, 2, 16).to(dtype)
    for c in caches:
        c.add_prefix(k_img, v_img)
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    with torch.no_grad(), decoding("torch"):
        for i in range(12):
            x = torch.randn(1, 1, 72).to(dtype)
            rotary = lm.Rotary.at(torch.tensor([[i]]), head_dim=16, theta=10000.0)
            got = _fused_attention(attn, norm, x, rotary, caches[0])
            want = attn.step(x, norm=norm, rotary=rotary, cache=caches[1])
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), **tol)
    fused, ref = caches
    assert (fused.tokens, fused.seen) == (ref.tokens, ref.seen)
    n = fused.tokens
    for a, b in ((fused.k, ref.k), (fused.v, ref.v)):
        assert a.dtype == torch.int8 and (a[:, :, :n].int() - b[:, :, :n].int()).abs().max() <= 1
    for a, b in ((fused.k_scale, ref.k_scale), (fused.v_scale, ref.v_scale)):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_step_equals_norm_then_mlp(dtype, one_thread):
    """`cpu_kernels.mlp_step` (norm and feed-forward in one call) gives the norm then the
    feed-forward of the modules, up to summation order (bf16: an ulp of the output's scale)."""
    from casa.core.lm import MLP, RMSNorm

    torch.manual_seed(2)
    mlp, norm = MLP(d_model=72, d_ff=100).to(dtype), RMSNorm(dim=72)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    h = torch.randn(1, 1, 72).to(dtype) * 2
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        got = cpu_kernels.mlp_step(h, norm.weight, norm.eps, gate_up, mlp.down_proj.weight).to(dtype).view(h.shape)
        want = mlp(norm(h))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -6 * want.abs().max().item(), rtol=0)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)


@needs_kernels
def test_fused_attention_step_rejects_disagreeing_shapes():
    k = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="row 8 of 8"):
        cpu_kernels.attn_step(torch.zeros(72), torch.ones(72), 1e-6, torch.zeros(160, 72), None, torch.zeros(72, 96),
                              None, k, k.clone(), row=8, held=8, heads=6)


def _decode_on_both_paths(m, dtype, history, monkeypatch, cache_dtype=None):
    """Logits and sessions of one token stream through `Session`, on the kernel path (a kernel call
    per block) and on the torch path (`Block.step`); the number of kernel calls (one row each)."""
    from casa.inference.session import Session

    calls, real = [], cpu_kernels.block_rows
    monkeypatch.setattr(cpu_kernels, "block_rows", lambda *a: calls.append(len(a[0])) or real(*a))
    g = torch.Generator().manual_seed(3)
    ids, embeds = torch.randint(0, 61, (14,), generator=g), torch.randn(2, 4, 32, generator=g).to(dtype)
    sessions = {}
    for path in ("kernels", "torch"):
        s, out = Session(m, history=history, cache_dtype=cache_dtype, decode=path), []
        assert s.decode == path
        with torch.no_grad():
            for t in range(len(ids)):
                if t in (2, 6):  # two text tokens before the first image: windows start empty
                    s.add_image_embeds(embeds[t // 6])
                out.append(s.forward_text(ids[t: t + 1]))
        sessions[path] = (torch.cat(out), s)
    return sessions["kernels"], sessions["torch"], len(calls)


def _close(got, want, dtype, *, int8=False):
    """Kernel-path values against the torch path's, relative to the largest (these models' logits
    reach the hundreds): fp32 to summation order; bf16 rounds in other places; an int8 cache may
    round a value to the neighbouring step (1/127 of its row's largest) where the two paths' sums
    differ in their last bit. Measured over these tests: fp32 within 9e-7 of the largest value
    (int8 caches too: no value changed step), bf16 within 1.9%."""
    scale = want.float().abs().max().item()
    rel = {torch.float32: 2e-2 if int8 else 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=rel * scale, rtol=0)
    assert not torch.equal(got, torch.zeros_like(got))


def _caches_close(fused, ref, dtype):
    """The caches the two paths leave: the same entries, values to `_close`'s tolerance."""
    for a, b in zip([*fused.sa, *fused.windows], [*ref.sa, *ref.windows]):
        if a is not None:
            assert (a.tokens, a.seen) == (b.tokens, b.seen)
            for x, y in zip(a.held(), b.held()) if a.tokens else ():
                _close(x, y, dtype, int8=a.quantized)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,placement,options", [
    ("casa", "parallel", {}), ("casa", "before", {}), ("casa", "replace", {"every": 2}), ("casa_shared", "parallel", {}),
    ("insertion", "parallel", {}), ("ca", "parallel", {"every": 2}), ("ca_shared", "before", {}), ("ca_ffn", "parallel", {}),
    ("ca", "replace", {"every": 2}),
    ("gated_ca", "parallel", {"every": 2}), ("casa", "parallel", {"bias": True, "bounded": True}),
    ("ca", "parallel", {"bias": True, "bounded": True})])
def test_block_steps_equal_the_torch_path(dtype, variant, placement, options, one_thread, monkeypatch):
    """A decoded token takes one kernel call per block (`core.decode.BlockSteps`): token after
    token the logits are those of `Block.step` on the torch path, and the caches are left the same
    (up to float summation order), for every placement, shared projections, `insertion` (no fusion
    layer), a q/k/v bias and a bounded history; `ca`-family fusion layers read their window's image
    prefix without joining it, also while it is empty; blocks whose fusion layer the kernel does
    not take (`gated_ca`) keep `Block.step`."""
    import dataclasses

    from conftest import tiny_config

    from casa.core.layout import History
    from casa.core.model import CasaModel

    config = tiny_config(variant, placement, **{k: v for k, v in options.items() if k == "every"})
    if options.get("bias"):
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, qkv_bias=True))
    torch.manual_seed(0)
    m = CasaModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m = m.to(dtype)
    history = History(sink=2, window=5) if options.get("bounded") else None
    (got, fused), (want, ref), calls = _decode_on_both_paths(m, dtype, history, monkeypatch)
    assert got.dtype == dtype
    _close(got, want, dtype)
    kernel_blocks = sum(b.fusion is None or variant != "gated_ca" for b in m.blocks)
    assert calls == 14 * kernel_blocks and kernel_blocks >= 1
    _caches_close(fused, ref, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,placement,bounded", [
    ("casa", "parallel", False), ("casa", "before", False), ("casa", "replace", False),
    ("insertion", "parallel", False), ("gated_ca", "parallel", False), ("casa", "parallel", True),
    ("ca", "parallel", False)])
def test_block_steps_with_an_int8_cache_equal_the_torch_path(dtype, variant, placement, bounded, one_thread,
                                                             monkeypatch):
    """With int8 caches a block is still one kernel call: it writes and reads the int8 rows in
    place; the torch path quantizes the same values in PyTorch and attends over dequantized
    copies. Logits and caches agree within `_close`'s int8 tolerance (a value may round to the
    neighbouring int8 step where the two paths' sums differ in their last bit)."""
    from conftest import tiny_config

    from casa.core.layout import History
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    # gated_ca: every other block, so that the blocks without a fusion layer take the kernel
    m = CasaModel(tiny_config(variant, placement, **({"every": 2} if variant == "gated_ca" else {}))).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m = m.to(dtype)
    history = History(sink=2, window=5) if bounded else None
    (got, fused), (want, ref), calls = _decode_on_both_paths(m, dtype, history, monkeypatch, cache_dtype=torch.int8)
    held = [c for c in [*fused.sa, *fused.windows] if c is not None and c.k is not None]
    assert calls > 0 and held and all(c.k.dtype == torch.int8 for c in held)
    _close(got, want, dtype, int8=True)
    _caches_close(fused, ref, dtype)


@needs_kernels
def test_block_steps_follow_changed_weights(one_thread, monkeypatch):
    """A stream's plans point into packed weights and norms: an in-place update of any of
    them (an optimizer step) rebuilds them before the next token."""
    from conftest import tiny_config

    from casa.core.decode import block_steps, decoding
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    m = CasaModel(tiny_config("casa")).eval()
    h = torch.randn(1, 1, 32)
    with torch.no_grad(), decoding("kernels"):
        first = block_steps(m, h, None)
        assert block_steps(m, h, first) is first
        m.blocks[1].post_attention_layernorm.weight.mul_(2)  # a norm, not a packed weight
        second = block_steps(m, h, first)
        assert second is not first
        m.blocks[2].fusion.attn.k_proj.weight.add_(1)
        assert block_steps(m, h, second) is not second
    with torch.no_grad(), decoding("torch"):
        assert block_steps(m, h, None) is None  # the torch path runs `Block.step`
    (got, _), (want, _), calls = _decode_on_both_paths(m, torch.float32, None, monkeypatch)
    assert calls
    _close(got, want, torch.float32)
