"""``ptfast.attention`` on the torch backend against the float64 oracle: masks, causality, excluded rows, layouts.

fp32/fp64 results must be within float accuracy of the oracle; bf16 results pass the low-precision rule against
PyTorch's own SDPA in bf16 (given the same combined mask). Dropout, compile/opcheck and validation live in their
own ``test_attention_*`` files.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.torch import attention as torch_attention
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, peak_rss_growth_bytes
from tests.oracles import attention as oracle

B, H, LQ, LK = 2, 3, 37, 29


def make_qkv(b=B, h=H, lq=LQ, lk=LK, d=24, dtype=torch.float32, noncontig=False):
    """Random q/k/v requiring grad; ``noncontig`` builds them as transposes of ``(B, L, H, D)`` like HF does."""

    def one(length):
        if noncontig:
            return torch.randn(b, length, h, d, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, length, d, dtype=dtype, requires_grad=True)

    return one(lq), one(lk), one(lk)


def sdpa_reference(q, k, v, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, keep=None):
    """PyTorch's own attention in q's dtype with the same combined mask (the yardstick of the low-precision rule).

    Fully excluded rows are neutralized and zeroed the same way the contract demands, so the yardstick is finite.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    m = torch.zeros(1, 1, lq, lk, dtype=q.dtype)
    if attn_mask is not None:
        m = m.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else m + attn_mask.to(q.dtype)
    if key_mask is not None:
        m = m.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if is_causal:
        m = m.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), -math.inf)
    valid = (m != -math.inf).any(-1, keepdim=True)
    m = m.masked_fill(~valid, 0.0)
    if dropout_p > 0:
        keep = keep.expand(q.shape[0], q.shape[1], lq, lk)
        out = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, m, dropout_p, False, keep, scale=scale)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    return out * valid


def run_and_check(
    q, k, v, *, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, seed=7, backend="auto"
):
    """Run ptfast (forward + backward, torch backend asserted), compare output and grads with the oracle.
    ``backend="torch"`` runs the op itself where ``auto`` may take a CPU route of PyTorch's own autograd ops."""
    torch.manual_seed(seed)
    drawn = torch.randint(0, 2**31, (2,), dtype=torch.int64).tolist()  # what the wrapper will draw
    torch.manual_seed(seed)
    with record_dispatch() as events, ptfast.use_backend(backend):
        out = ptfast.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, key_mask=key_mask)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    keep = None
    if dropout_p > 0:
        keep = oracle.keep_mask(drawn, dropout_p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention(*leaves, attn_mask, key_mask, is_causal, scale, dropout_p, keep)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    if q.dtype in (torch.float32, torch.float64):
        assert_close64(out, ref, "out")
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            assert_close64(g, r, f"d{name}")
    else:
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        tout = sdpa_reference(tq, tk, tv, attn_mask, key_mask, is_causal, scale, dropout_p, keep)
        tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
        assert_rule(out, tout, ref, "out")
        for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
            assert_rule(g, t, r, f"d{name}")
    return out, grads


def key_mask_of(kind: str, b=B, lk=LK) -> torch.Tensor:
    km = torch.ones(b, lk, dtype=torch.bool)
    if kind == "right":
        km[0, 20:] = False
        km[1, 11:] = False
    elif kind == "left":
        km[0, :9] = False
        km[1, :3] = False
    elif kind == "holes":
        km = torch.rand(b, lk) > 0.35
        km[:, 5] = True  # at least one real key per sequence
    return km


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [24, 40, 64])
def test_no_mask(dtype, d):
    run_and_check(*make_qkv(d=d, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask(dtype):
    mask = torch.rand(B, H, LQ, LK) > 0.3
    mask[..., 0] = True
    run_and_check(*make_qkv(dtype=dtype), attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_mask(dtype):
    run_and_check(*make_qkv(dtype=dtype), attn_mask=torch.randn(B, 1, LQ, LK) * 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expanded_float_mask_is_read_compactly(dtype):
    base = torch.randn(B, 1, 1, LK)
    base[0, ..., 17:] = torch.finfo(torch.float32).min  # HF-style padding with finfo.min: plain arithmetic
    mask = base.expand(B, H, LQ, LK)
    assert mask.stride()[1:3] == (0, 0)
    run_and_check(*make_qkv(dtype=dtype), attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_key_mask(dtype, kind):
    run_and_check(*make_qkv(dtype=dtype), key_mask=key_mask_of(kind))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", [(19, 29), (37, 29), (29, 29), (1, 29)])
def test_causal(dtype, lq, lk):
    run_and_check(*make_qkv(lq=lq, lk=lk, dtype=dtype), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [37, 19])
def test_all_masks_combined(dtype, lq):
    bool_mask = torch.rand(B, 1, lq, LK) > 0.2
    float_mask = torch.randn(1, H, lq, LK)
    run_and_check(
        *make_qkv(lq=lq, dtype=dtype, d=40), attn_mask=bool_mask & (float_mask > -5), key_mask=key_mask_of("holes"),
        is_causal=True,
    )  # fmt: skip
    run_and_check(*make_qkv(lq=lq, dtype=dtype), attn_mask=float_mask, key_mask=key_mask_of("left"), is_causal=True)


def test_custom_scale_and_fp64():
    run_and_check(*make_qkv(dtype=torch.float64), scale=0.37, key_mask=key_mask_of("right"))
    run_and_check(*make_qkv(), scale=0.21, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    q, k, v = make_qkv(dtype=dtype, noncontig=True, d=40)
    assert not q.is_contiguous()
    run_and_check(q, k, v, key_mask=key_mask_of("right"), is_causal=True)
    run_and_check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_excluded_rows_are_exact_zeros(dtype):
    q, k, v = make_qkv(dtype=dtype)
    bool_mask = torch.rand(B, H, LQ, LK) > 0.3
    bool_mask[0, 1, 4] = False  # excluded by the bool mask
    float_mask = torch.randn(B, H, LQ, LK)
    float_mask[1, 2, 7] = -math.inf  # every additive logit -inf
    key_mask = key_mask_of("right")
    key_mask[1] = False  # batch element 1 has no real key at all
    for kwargs in ({"attn_mask": bool_mask}, {"attn_mask": float_mask}, {"key_mask": key_mask},
                   {"attn_mask": bool_mask, "key_mask": key_mask, "is_causal": True}):  # fmt: skip
        out, (dq, _, _) = run_and_check(q, k, v, **kwargs)
        assert not out.isnan().any() and not dq.isnan().any()
    out, (dq, dk, dv) = run_and_check(q, k, v, attn_mask=bool_mask, key_mask=key_mask)
    assert torch.equal(out[0, 1, 4], torch.zeros_like(out[0, 1, 4])) and (out[1] == 0).all()
    assert (dq[0, 1, 4] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    out, (dq, _, _) = run_and_check(q, k, v, attn_mask=float_mask)
    assert (out[1, 2, 7] == 0).all() and (dq[1, 2, 7] == 0).all()


@pytest.mark.parametrize(
    "shape", [(0, H, LQ, LK), (B, 0, LQ, LK), (B, H, 0, LK), (B, H, LQ, 0), (B, H, 1, LK), (1, 1, 1, 1)]
)
def test_edge_shapes(shape):
    b, h, lq, lk = shape
    q, k, v = make_qkv(b, h, lq, lk, d=24)
    out = ptfast.attention(q, k, v, key_mask=torch.ones(b, lk, dtype=torch.bool), is_causal=True)
    assert out.shape == (b, h, lq, 24)
    out.backward(torch.randn_like(out))
    if lk == 0:
        assert (out == 0).all() and (q.grad == 0).all()
    if min(shape) > 0:
        run_and_check(q, k, v, is_causal=True)
        run_and_check(q, k, v, attn_mask=torch.rand(b, 1, lq, lk) > 0.5)


def test_nan_propagates():
    q, k, v = make_qkv()
    with torch.no_grad():
        q[0, 1, 3, 2] = math.nan
    out = ptfast.attention(q, k, v, key_mask=key_mask_of("right"), is_causal=True)
    assert out[0, 1, 3].isnan().all()
    out[0, 1, 3] = 0
    assert not out.isnan().any()


def test_autocast_casts_inputs_and_mixed_dtypes_refused():
    q, k, v = make_qkv()
    mask = torch.randn(B, 1, LQ, LK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ptfast.attention(q, k, v, mask, key_mask=key_mask_of("left"))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad is not None and v.grad is not None
    ref = oracle.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), key_mask_of("left"))
    assert_close64(out, ref, "autocast out", tol=1e-2)
    with pytest.raises(TypeError, match="dtype"):
        ptfast.attention(q, k.bfloat16(), v)


def test_chunked_path_matches_oracle(monkeypatch):
    # A tiny budget forces many (batch, row) chunks: results must not depend on the chunking.
    q, k, v = make_qkv(b=3, lq=41, d=24)
    mask, key_mask = torch.randn(3, 1, 41, LK), key_mask_of("holes", b=3)
    whole, whole_grads = run_and_check(q, k, v, attn_mask=mask, key_mask=key_mask, is_causal=True)
    monkeypatch.setattr(torch_attention, "CHUNK_BUDGET_BYTES", 7 * H * LK * 16)
    spec = torch_attention.Spec(mask, key_mask, None, 0.0, True, 1.0)
    assert len(list(torch_attention._chunks(3, H, 41, LK, spec))) > 3
    chunked, chunked_grads = run_and_check(q, k, v, attn_mask=mask, key_mask=key_mask, is_causal=True)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(torch_attention, "CHUNK_BUDGET_BYTES", 1)  # one row per chunk
    run_and_check(q, k, v, attn_mask=mask > 0, is_causal=True)
    run_and_check(*make_qkv(b=3, lq=41, d=24, dtype=torch.bfloat16), attn_mask=mask > 0, is_causal=True)


def _warm_up():
    q, k, v = make_qkv(1, 1, 64, 64, d=32)
    ptfast.attention(q, k, v, is_causal=True).sum().backward()


def test_causal_long_sequence_memory_is_bounded():
    """Causal-only attention at L = 8192: forward + backward grow peak RSS far below one L x L fp32 matrix."""
    _warm_up()  # first-call costs (lazy imports, op registration caches) are not attention memory
    n = 8192
    q, k, v = (torch.randn(1, 1, n, 32, requires_grad=True) for _ in range(3))

    def step():
        ptfast.attention(q, k, v, is_causal=True).sum().backward()

    growth = peak_rss_growth_bytes(step)
    assert growth < n * n * 4 / 8, f"peak RSS grew {growth / 2**20:.0f} MiB"
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_chunked_long_sequence_memory_follows_budget(monkeypatch, dropout_p):
    """causal + key_mask (and dropout) at L = 8192 materializes only budget-sized chunks, forward and backward."""
    _warm_up()
    budget = 32 << 20
    monkeypatch.setattr(torch_attention, "CHUNK_BUDGET_BYTES", budget)
    n = 8192
    q, k, v = (torch.randn(1, 1, n, 32, requires_grad=True) for _ in range(3))
    key_mask = torch.ones(1, n, dtype=torch.bool)
    key_mask[:, -7:] = False

    def step():
        ptfast.attention(q, k, v, None, dropout_p, True, key_mask=key_mask).sum().backward()

    growth = peak_rss_growth_bytes(step)
    assert growth < 3 * budget < n * n * 4, f"peak RSS grew {growth / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_oracle(dtype):
    """The torch backend on a GPU (SDPA's CUDA kernels, the hash on device) against the float64 oracle."""
    key_mask, float_mask = key_mask_of("holes"), torch.randn(B, 1, LQ, LK)
    cases = [{}, {"is_causal": True}, {"key_mask": key_mask}, {"key_mask": key_mask, "dropout_p": 0.2},
             {"key_mask": key_mask, "is_causal": True, "attn_mask": float_mask, "dropout_p": 0.1}]  # fmt: skip
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for kwargs in cases:
        q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in make_qkv(d=40))
        dev_kwargs = {n: x.cuda() if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}
        torch.manual_seed(3)
        drawn = torch.randint(0, 2**31, (2,), dtype=torch.int64, device="cuda").tolist()
        torch.manual_seed(3)
        out = ptfast.attention(q, k, v, **dev_kwargs)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        p = kwargs.get("dropout_p", 0.0)
        keep = oracle.keep_mask(drawn, p, B, H, LQ, LK) if p > 0 else None
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        ref = oracle.attention(*leaves, kwargs.get("attn_mask"), kwargs.get("key_mask"),
                               kwargs.get("is_causal", False), None, p, keep)  # fmt: skip
        ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
        assert_close64(out.cpu(), ref, f"out {kwargs}", tol=tol)
        for g, r in zip(grads, ref_grads, strict=True):
            assert_close64(g.cpu(), r, f"grad {kwargs}", tol=tol)
