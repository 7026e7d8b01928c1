"""``ptfast.attention`` on the triton backend under TRITON_INTERPRET=1 (CPU tensors), against the float64 oracle.

Runs only in the interpreter process (``python tests/run.py``). fp32 must match the oracle tightly (the interpreter
computes ``tl.dot`` in IEEE fp32), dropout included: the kernel reproduces the hash keep mask of
``ptfast/_dropout.py`` bit for bit, so the oracle applies the very same mask. fp16 follows the low-precision rule of
docs/design.md §5 against PyTorch's own fp16 attention given the same combined mask; bf16 is tested on a GPU only
(``tests/test_gpu_triton_attention.py``), and refused here.

Covered: head dims (incl. non-powers of two), Lq != Lk both ways, Lq = 1 and Lk = 1, bool masks (full,
broadcast, HF-style stride-0 expanded, 2-D), float masks, key masks (right/left padding, holes, a whole padded key
block), causal, every mask combined, custom scale, non-contiguous / stride-0 / strided-last-dim inputs, fully
excluded rows (exact zeros, zero grads), empty shapes, NaN propagation, dropout (exact mask, keep rate,
independence across batch/heads, forward and backward under different block configs, activation checkpointing,
p = 1), the opt-in atomic dQ mode, torch.compile, and the refusals (bf16 on CPU, fp64, head dim > 256) with
``auto`` falling back to torch.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles import attention as oracle
from tests.test_attention import key_mask_of, make_qkv, sdpa_reference

pytestmark = pytest.mark.interpreter

# The backend under test. Flip to "torch" only to validate the test logic itself, never in a commit.
BACKEND = "triton"

B, H, LQ, LK = 2, 3, 37, 29
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


def blocks(forward=None, backward=None):
    """Force the triton kernels' block sizes for the duration of the block (None = the default config)."""
    if forward is None and backward is None:
        return contextlib.nullcontext()
    from ptfast.backends.triton import attention_config

    return attention_config.use_blocks(forward=forward, backward=backward)


def atomic_dq(on: bool):
    from ptfast.backends.triton import attention_config

    return attention_config.use_atomic_dq(on)


def seed_words(seed: int) -> list[int]:
    """Seed torch and return the two dropout seed words the functional wrapper will draw next."""
    torch.manual_seed(seed)
    drawn = torch.randint(0, 2**31, (2,), dtype=torch.int64).tolist()
    torch.manual_seed(seed)
    return drawn


def check(q, k, v, *, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, seed=7,
          fwd_blocks=None, bwd_blocks=None, tol=None):  # fmt: skip
    """Forward + backward on BACKEND (asserted), output and grads checked against the float64 oracle.

    fp32: ``assert_close64`` (tol); fp16: the low-precision rule against ``sdpa_reference`` in fp16.
    Forward runs under ``fwd_blocks``, backward under ``bwd_blocks`` (forward/backward block configs).
    """
    drawn = seed_words(seed)
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        with blocks(forward=fwd_blocks):
            out = ptfast.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, key_mask=key_mask)
        grad = torch.randn_like(out)
        with blocks(backward=bwd_blocks):
            grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    assert not any(e[1] != BACKEND for e in events), f"another backend ran too: {events}"
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype
    keep = None
    if dropout_p > 0:
        keep = oracle.keep_mask(drawn, dropout_p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention(*leaves, attn_mask, key_mask, is_causal, scale, dropout_p, keep)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    if q.dtype == torch.float32:
        assert_close64(out, ref, "out", tol=tol)
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            assert_close64(g, r, f"d{name}", tol=tol)
    else:
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        tout = sdpa_reference(tq, tk, tv, attn_mask, key_mask, is_causal, scale, dropout_p, keep)
        tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
        assert_rule(out, tout, ref, "out")
        for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
            assert_rule(g, t, r, f"d{name}")
    return out, grads


# --- no mask, head dims, lengths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,d", [(torch.float32, 16), (torch.float32, 40), (torch.float16, 24), (torch.float16, 64)], ids=str
)
def test_no_mask(dtype, d):
    check(*make_qkv(d=d, dtype=dtype))


@pytest.mark.parametrize("d", [1, 72, 256])
def test_head_dims_padded_inside(d):
    """Head dims that are not a tile width (1, 72) and the largest supported one (256)."""
    check(*make_qkv(lq=21, lk=19, d=d), key_mask=key_mask_of("right", lk=19), is_causal=True)


@pytest.mark.parametrize(
    "dtype,lq,lk",
    [(torch.float32, *s) for s in ((1, 29), (37, 1), (1, 1), (13, 41), (41, 13))]
    + [(torch.float16, 1, 29), (torch.float16, 41, 13)],
    ids=str,
)
def test_lengths(dtype, lq, lk):
    """A single query row, a single key, Lq < Lk and Lq > Lk."""
    check(*make_qkv(lq=lq, lk=lk, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_small_blocks_many_tiles(dtype):
    """Online softmax across several key tiles and partial tiles in both directions (forced 16-wide blocks)."""
    check(*make_qkv(lq=41, lk=35, d=24, dtype=dtype), key_mask=key_mask_of("holes", lk=35), is_causal=True,
          fwd_blocks=(16, 16), bwd_blocks=(16, 32))  # fmt: skip
    if dtype == torch.float32:
        check(*make_qkv(lq=41, lk=35, d=40), fwd_blocks=(32, 16), bwd_blocks=(32, 16))


def test_default_blocks_several_tiles():
    """Lengths past one default tile in both directions, with padding and causality."""
    lk = 143
    key_mask = torch.ones(1, lk, dtype=torch.bool)
    key_mask[0, 131:] = False
    check(*make_qkv(b=1, h=2, lq=161, lk=lk, d=64), key_mask=key_mask, is_causal=True)


# --- masks ------------------------------------------------------------------------------------------------------


def _bool_mask(kind: str, lq=LQ, lk=LK) -> torch.Tensor:
    if kind == "expanded":  # HF: a (B, 1, 1, Lk) padding mask expanded to (B, 1, Lq, Lk), stride 0 over Lq
        m = torch.rand(B, 1, 1, lk) > 0.3
        m[..., 0] = True
        m = m.expand(B, 1, lq, lk)
        assert m.stride(2) == 0
        return m
    shape = {"full": (B, H, lq, lk), "broadcast": (1, 1, lq, lk), "2d": (lq, lk)}[kind]
    m = torch.rand(shape) > 0.3
    m[..., 0] = True  # at least one admissible key per row (fully excluded rows are tested on their own)
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["full", "broadcast", "expanded", "2d"])
def test_bool_mask(dtype, kind):
    check(*make_qkv(dtype=dtype), attn_mask=_bool_mask(kind))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_mask(dtype):
    check(*make_qkv(dtype=dtype), attn_mask=(torch.randn(B, 1, LQ, LK) * 2).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_expanded_float_mask(dtype):
    """HF-style additive padding mask with finfo.min, expanded (stride 0) over heads and query rows."""
    base = torch.randn(B, 1, 1, LK)
    base[0, ..., 17:] = torch.finfo(torch.float32).min
    mask = base.expand(B, H, LQ, LK)
    assert mask.stride()[1:3] == (0, 0)
    check(*make_qkv(dtype=dtype), attn_mask=mask)


def test_float_mask_row_of_finfo_min_follows_plain_arithmetic():
    """A float mask that is finfo.min on every key of a row (an HF-style fully padded sequence) is plain arithmetic
    like SDPA: equal logits, so the row averages v (not 0, not NaN); only -inf / bool exclusions give 0.

    Forward only against the oracle: the gradient of such a row is ill-conditioned in fp32 (lse absorbs log(Lk)),
    so only its finiteness is checked."""
    q, k, v = make_qkv()
    base = torch.randn(B, 1, 1, LK)
    base[1] = torch.finfo(torch.float32).min
    base[0, ..., 17:] = torch.finfo(torch.float32).min
    mask = base.expand(B, H, LQ, LK)
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        out = ptfast.attention(q, k, v, mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    ref = oracle.attention(q.double(), k.double(), v.double(), mask)
    assert_close64(out[0], ref[0], "partly padded batch element")
    assert_close64(out[1], ref[1], "batch element whose every key has finfo.min (mean of v)")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "dtype,kind",
    [(dt, kind) for dt in DTYPES for kind in ("right", "left", "holes")] + [(torch.float32, "block")],
    ids=str,
)
def test_key_mask(dtype, kind):
    """Right/left padding, random holes, and a whole padded 16-key block in the middle (a skipped block)."""
    if kind == "block":
        lk = 53
        key_mask = torch.ones(B, lk, dtype=torch.bool)
        key_mask[:, 16:32] = False
        key_mask[1, 40:] = False
        check(*make_qkv(lk=lk, dtype=dtype), key_mask=key_mask, fwd_blocks=(16, 16), bwd_blocks=(16, 16))
    else:
        check(*make_qkv(dtype=dtype), key_mask=key_mask_of(kind))


@pytest.mark.parametrize(
    "dtype,lq,lk",
    [(torch.float32, *s) for s in ((19, 29), (37, 29), (29, 29), (1, 29), (29, 1))]
    + [(torch.float16, 19, 29), (torch.float16, 37, 29)],
    ids=str,
)
def test_causal(dtype, lq, lk):
    """Top-left causal with Lq < Lk, Lq > Lk (rows past Lk see every key), square, one row, one key."""
    check(*make_qkv(lq=lq, lk=lk, dtype=dtype), is_causal=True)


def test_causal_small_blocks():
    """Causal with the diagonal crossing tiles of unequal height and width."""
    check(*make_qkv(lq=41, lk=35), is_causal=True, fwd_blocks=(16, 32), bwd_blocks=(32, 16))
    check(*make_qkv(lq=35, lk=41), is_causal=True, fwd_blocks=(32, 16), bwd_blocks=(16, 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lq", [37, 19])
def test_all_masks_combined(dtype, lq):
    bool_mask = torch.rand(B, 1, lq, LK) > 0.2
    float_mask = torch.randn(1, H, lq, LK).to(dtype)
    check(*make_qkv(lq=lq, dtype=dtype, d=40), attn_mask=bool_mask & (float_mask > -5),
          key_mask=key_mask_of("holes"), is_causal=True)  # fmt: skip
    check(*make_qkv(lq=lq, dtype=dtype), attn_mask=float_mask, key_mask=key_mask_of("left"), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_custom_scale(dtype):
    check(*make_qkv(dtype=dtype), scale=0.37, key_mask=key_mask_of("right"))
    check(*make_qkv(dtype=dtype, d=40), scale=0.21, is_causal=True)


# --- layouts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_hf_layout(dtype):
    """q/k/v as transposed (B, L, H, D) views, the layout Hugging Face passes."""
    q, k, v = make_qkv(dtype=dtype, noncontig=True, d=40)
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, key_mask=key_mask_of("right"), is_causal=True)
    check(q, k, v)


def test_packed_kv_strided_head_dim_and_stride0_heads():
    """k/v sliced from one packed (B, Lk, 2, H, D) tensor; q with a strided last dim; k/v expanded over heads."""
    d = 24
    kv = torch.randn(B, LK, 2, H, d)
    k, v = (kv[:, :, i].transpose(1, 2).requires_grad_() for i in range(2))
    q = torch.randn(B, H, LQ, 2 * d)[..., ::2].requires_grad_()
    assert q.stride(-1) == 2 and k.stride(2) == 2 * H * d
    check(q, k, v, key_mask=key_mask_of("left"))
    k1 = torch.randn(B, 1, LK, d, requires_grad=True)
    v1 = torch.randn(B, 1, LK, d, requires_grad=True)
    k, v = k1.expand(B, H, LK, d), v1.expand(B, H, LK, d)
    assert k.stride(1) == 0
    drawn = seed_words(3)
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        out = ptfast.attention(q, k, v, is_causal=True, dropout_p=0.2)
        grad = torch.randn_like(out)
        dq, dk1, dv1 = torch.autograd.grad(out, (q, k1, v1), grad)
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    leaves = [t.detach().double().requires_grad_() for t in (q, k1, v1)]
    keep = oracle.keep_mask(drawn, 0.2, B, H, LQ, LK)
    ref = oracle.attention(leaves[0], leaves[1].expand(B, H, LK, d), leaves[2].expand(B, H, LK, d),
                           is_causal=True, dropout_p=0.2, keep=keep)  # fmt: skip
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert_close64(out, ref, "out (stride-0 heads)")
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk1, dv1), ref_grads, strict=True):
        assert_close64(g, r, f"{name} (stride-0 heads)")


# --- excluded rows, empty shapes, NaN ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_excluded_rows_are_exact_zeros(dtype):
    """Rows with no admissible key (bool mask, -inf float mask, key mask, causal combos): 0 output, 0 grad."""
    q, k, v = make_qkv(dtype=dtype)
    bool_mask = torch.rand(B, H, LQ, LK) > 0.3
    bool_mask[0, 1, 4] = False  # excluded by the bool mask
    float_mask = torch.randn(B, H, LQ, LK)
    float_mask[1, 2, 7] = -math.inf  # every additive logit -inf
    key_mask = key_mask_of("right")
    key_mask[1] = False  # batch element 1 has no real key at all
    results = {}
    for name, kwargs in (("bool+key", {"attn_mask": bool_mask, "key_mask": key_mask}),
                         ("float", {"attn_mask": float_mask}),
                         ("all", {"attn_mask": bool_mask, "key_mask": key_mask, "is_causal": True})):  # fmt: skip
        out, grads = results[name] = check(q, k, v, **kwargs)
        assert not out.isnan().any() and not any(g.isnan().any() for g in grads), f"NaN with {name}"
    for name in ("bool+key", "all"):
        out, (dq, dk, dv) = results[name]
        assert (out[0, 1, 4] == 0).all() and (out[1] == 0).all(), name
        assert (dq[0, 1, 4] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all(), name
    out, (dq, _, _) = results["float"]
    assert (out[1, 2, 7] == 0).all() and (dq[1, 2, 7] == 0).all()


def test_excluded_rows_with_small_blocks_and_key_mask_gap():
    """Padded key blocks skipped and fully padded batch rows, with many tiles."""
    lk = 53
    key_mask = torch.ones(B, lk, dtype=torch.bool)
    key_mask[0, 16:48] = False
    key_mask[1] = False
    out, (dq, dk, dv) = check(*make_qkv(lk=lk), key_mask=key_mask, is_causal=True, dropout_p=0.2,
                              fwd_blocks=(16, 16), bwd_blocks=(16, 16))  # fmt: skip
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[0, :, 16:48] == 0).all() and (dv[0, :, 16:48] == 0).all()


@pytest.mark.parametrize("shape", [(0, H, LQ, LK), (B, 0, LQ, LK), (B, H, 0, LK), (B, H, LQ, 0), (1, 1, 1, 1)])
def test_edge_shapes(shape):
    """Empty batch / heads / queries / keys (Lk = 0 gives zeros and zero grads) and a 1x1 problem."""
    b, h, lq, lk = shape
    q, k, v = make_qkv(b, h, lq, lk, d=24)
    with ptfast.use_backend(BACKEND):
        out = ptfast.attention(q, k, v, key_mask=torch.ones(b, lk, dtype=torch.bool), is_causal=True)
        assert out.shape == (b, h, lq, 24)
        out.backward(torch.randn_like(out))
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if lk == 0:
        assert (out == 0).all() and (q.grad == 0).all()
    if min(shape) > 0:
        check(q, k, v, is_causal=True, dropout_p=0.3)


def test_nan_propagates_to_its_row_only():
    q, k, v = make_qkv()
    with torch.no_grad():
        q[0, 1, 3, 2] = math.nan
    with ptfast.use_backend(BACKEND):
        out = ptfast.attention(q, k, v, key_mask=key_mask_of("right"), is_causal=True)
    assert out[0, 1, 3].isnan().all()
    out = out.detach().clone()
    out[0, 1, 3] = 0
    assert not out.isnan().any()


# --- dropout ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_dropout_matches_oracle_keep_mask(dtype, p):
    check(*make_qkv(dtype=dtype), dropout_p=p)
    check(*make_qkv(dtype=dtype, d=40), dropout_p=p, key_mask=key_mask_of("holes"), is_causal=True)


def test_dropout_with_every_mask_and_excluded_rows():
    q, k, v = make_qkv(lq=19)
    key_mask = key_mask_of("right")
    key_mask[1] = False
    bool_mask = torch.rand(B, H, 19, LK) > 0.2
    out, (dq, _, _) = check(q, k, v, attn_mask=bool_mask, key_mask=key_mask, is_causal=True, dropout_p=0.2,
                            scale=0.3)  # fmt: skip
    assert (out[1] == 0).all() and (dq[1] == 0).all()
    check(q, k, v, attn_mask=torch.randn(B, 1, 19, LK), dropout_p=0.2)
    check(q, k, v, attn_mask=_bool_mask("expanded", lq=19), dropout_p=0.2)


def test_realised_keep_mask_rate_and_independence():
    """Read the realised mask out of the kernel (uniform softmax via scale 0, v = identity): it is the hash mask,
    keeps ~1 - p overall and per (batch, head), and differs between batch elements, heads and shifted rows."""
    b, h, lq, lk, d, p = 3, 4, 45, 40, 48, 0.25
    q = torch.randn(b, h, lq, d)
    k = torch.randn(b, h, lk, d)
    v = torch.eye(lk, d).expand(b, h, lk, d).contiguous()
    drawn = seed_words(13)
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        out = ptfast.attention(q, k, v, dropout_p=p, scale=0.0)
    assert_ran(events, "attention", BACKEND)
    weights = out[..., :lk] * lk * (1 - p)  # 1 where kept, 0 where dropped
    keep = weights > 0.5
    torch.testing.assert_close(weights, keep.float(), rtol=0, atol=1e-5)
    assert (out[..., lk:] == 0).all()
    assert torch.equal(keep, oracle.keep_mask(drawn, p, b, h, lq, lk)), "realised mask != hash spec"
    assert abs(keep.float().mean().item() - (1 - p)) < 0.015
    for bi in range(b):
        for hi in range(h):
            assert abs(keep[bi, hi].float().mean().item() - (1 - p)) < 0.05, (bi, hi)
    # independent masks agree on ~ (1-p)^2 + p^2 = 0.625 of the elements, identical ones on all
    for x, y in ((keep[0, 0], keep[1, 0]), (keep[0, 0], keep[0, 1]), (keep[2, 3], keep[1, 2])):
        assert (x == y).float().mean().item() < 0.75
    assert (keep[0, 0, 1:, :-1] == keep[0, 0, :-1, 1:]).float().mean().item() < 0.75  # no shifted copies
    assert (keep[0, 0, 1:] == keep[0, 0, :-1]).float().mean().item() < 0.75


def test_dropout_mask_same_in_forward_and_backward_with_different_blocks():
    """Forward under one block config, backward under another: grads match the oracle with the exact mask, and
    forwards under different configs agree."""
    q, k, v = make_qkv(lq=41, lk=35, d=40)
    key_mask = key_mask_of("holes", lk=35)
    kwargs = {"key_mask": key_mask, "is_causal": True, "dropout_p": 0.3}
    out_a, _ = check(q, k, v, **kwargs, seed=5, fwd_blocks=(16, 32), bwd_blocks=(32, 16))
    out_b, _ = check(q, k, v, **kwargs, seed=5, fwd_blocks=(64, 16), bwd_blocks=(16, 64))
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)


def test_same_seed_same_output_and_fresh_draws():
    q, k, v = make_qkv()
    with ptfast.use_backend(BACKEND):
        torch.manual_seed(11)
        a = ptfast.attention(q, k, v, dropout_p=0.3)
        b = ptfast.attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(11)
        a2 = ptfast.attention(q, k, v, dropout_p=0.3)
        plain = ptfast.attention(q, k, v)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)
    assert not torch.equal(a, plain)


def test_dropout_p_one_gives_zeros():
    q, k, v = make_qkv()
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        out = ptfast.attention(q, k, v, dropout_p=1.0, key_mask=key_mask_of("left"))
        out.sum().backward()
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    assert (out == 0).all()
    assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()


def test_activation_checkpointing_reproduces_gradients():
    """Recomputing the forward under checkpoint (same RNG state) gives bitwise the grads of a plain run."""
    q, k, v = make_qkv(d=40)
    key_mask = key_mask_of("left")

    def block(q, k, v):
        return ptfast.attention(q * 1.5, k, v, dropout_p=0.25, key_mask=key_mask, is_causal=True).square()

    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        torch.manual_seed(3)
        plain = torch.autograd.grad(block(q, k, v).sum(), (q, k, v))
        torch.manual_seed(3)
        ckpt = torch.autograd.grad(checkpoint(block, q, k, v, use_reentrant=False).sum(), (q, k, v))
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    assert events.count(("attention", BACKEND, "forward")) == 3  # plain, checkpointed, recomputed
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.equal(a, b)


def test_dropout_single_query_row():
    check(*make_qkv(lq=1), dropout_p=0.3, key_mask=key_mask_of("right"))


# --- atomic dQ, compile -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_atomic_dq_matches_oracle(dtype):
    """The opt-in atomic dQ backward (fp32 atomics across key blocks) still matches the oracle."""
    q, k, v = make_qkv(lq=41, lk=35, d=40, dtype=dtype)
    with atomic_dq(True):
        check(q, k, v, key_mask=key_mask_of("holes", lk=35), is_causal=True, dropout_p=0.2, bwd_blocks=(16, 16))
        if dtype == torch.float32:
            check(q, k, v, attn_mask=torch.randn(B, 1, 41, 35))


def test_torch_compile_fullgraph():
    """A compiled function calling ptfast.attention on the triton backend traces in one graph and matches eager."""
    q, k, v = make_qkv(d=24)
    key_mask = key_mask_of("holes")

    def fn(q, k, v):
        return ptfast.attention(q, k, v, dropout_p=0.2, is_causal=True, key_mask=key_mask) * 2.0

    torch._dynamo.reset()
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        torch.manual_seed(9)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
        cgrads = torch.autograd.grad(compiled.sum(), (q, k, v))
        torch.manual_seed(9)
        eager = fn(q, k, v)
        egrads = torch.autograd.grad(eager.sum(), (q, k, v))
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(cgrads, egrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- dispatch: auto picks triton, refusals ----------------------------------------------------------------------


def test_auto_runs_triton_under_the_interpreter():
    q, k, v = make_qkv()
    with record_dispatch() as events:
        ptfast.attention(q, k, v, key_mask=key_mask_of("right")).sum().backward()
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))


@pytest.mark.parametrize(
    "dtype,d,match",
    [(torch.bfloat16, 24, "bfloat16"), (torch.float64, 24, "float64"), (torch.float32, 320, "256")],
    ids=["bf16-cpu", "fp64", "d320"],
)
def test_refusals_and_auto_fallback(dtype, d, match):
    """Explicit triton refuses with the reason; auto runs the same inputs on torch, correctly."""
    q, k, v = make_qkv(lq=11, lk=7, d=d, dtype=dtype)
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match=match):
        ptfast.attention(q, k, v)
    with record_dispatch() as events:
        out = ptfast.attention(q, k, v, is_causal=True)
    assert_ran(events, "attention", "torch")
    assert ("attention", "triton", "forward") not in events
    ref = oracle.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close64(out, ref, "auto fallback", tol=1e-2 if dtype == torch.bfloat16 else None)


def test_refusal_under_compile_without_fullgraph_is_only_the_error():
    """The refusal breaks the graph; dynamo then compiles each frame it meets, the backend's environment probes
    included. The user gets ptfast's error, not also dynamo's warning about tracing through a functools cache
    (the probes keep their answers in ptfast._compiling.probe_cache; the warn-once cache is cleared, so a warning
    earlier in the process cannot hide this one)."""
    q, k, v = make_qkv(lq=5, lk=5, d=320)
    getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: ptfast.attention(q, k, v), backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="256"):
            compiled(q, k, v)
    assert not [str(c.message) for c in caught if "lru_cache" in str(c.message)]
