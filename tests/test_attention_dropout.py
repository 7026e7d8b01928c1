"""Attention dropout: the exact keep mask of the hash spec (``ptfast/_dropout.py``), seeding and recomputation.

The oracle reimplements the hash in numpy uint32 arithmetic, so these tests pin the torch backend to the spec a
Triton kernel must also reproduce bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import ptfast
from ptfast import _dropout
from ptfast.backends.torch import attention as torch_attention
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, ran_the_op
from tests.oracles import attention as oracle
from tests.test_attention import LK, B, H, key_mask_of, make_qkv, run_and_check

# "auto": on a CPU, eager, the dropout math as PyTorch's own autograd ops (backends/torch/attention.py,
# eager_dropout); "torch": the explicit backend, the op with its own explicit backward. Both must meet the oracle.
ROUTES = pytest.mark.parametrize("route", ["auto", "torch"], ids=["auto_route", "op"])


@ROUTES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_dropout_matches_oracle_keep_mask(dtype, p, route):
    out, _ = run_and_check(*make_qkv(dtype=dtype), dropout_p=p, backend=route)
    assert ran_the_op(out) == (route == "torch")
    out, _ = run_and_check(
        *make_qkv(dtype=dtype, d=40), dropout_p=p, key_mask=key_mask_of("holes"), is_causal=True, backend=route
    )
    assert ran_the_op(out) == (route == "torch")


@ROUTES
def test_dropout_with_every_mask_and_excluded_rows(route):
    q, k, v = make_qkv(lq=19)
    key_mask = key_mask_of("right")
    key_mask[1] = False
    bool_mask = torch.rand(B, H, 19, LK) > 0.2
    out, (dq, _, _) = run_and_check(
        q, k, v, attn_mask=bool_mask, key_mask=key_mask, is_causal=True, dropout_p=0.2, scale=0.3, backend=route
    )
    assert (out[1] == 0).all() and (dq[1] == 0).all()
    assert ran_the_op(out) == (route == "torch")
    out, _ = run_and_check(q, k, v, attn_mask=torch.randn(B, 1, 19, LK), dropout_p=0.2, backend=route)
    assert ran_the_op(out) == (route == "torch")


def test_torch_hash_equals_numpy_spec():
    seed = torch.tensor([123456789, 2**31 - 1], dtype=torch.int64)
    b = torch.arange(5).view(-1, 1, 1, 1) + 3
    h = torch.arange(4).view(1, -1, 1, 1)
    i = torch.arange(33).view(1, 1, -1, 1)
    ours = _dropout.keep_mask(seed, 0.3, b, h, i, torch.arange(47))
    ref = oracle.keep_mask((123456789, 2**31 - 1), 0.3, 5, 4, 33, 47, b_offset=3)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 0.999999])
def test_torch_hash_equals_numpy_spec_with_large_indices(p):
    """The int32 arithmetic's wrap-around, sign-bit shifts and unsigned comparison, at every threshold range and at
    batch/row/column indices whose products overflow 32 bits many times over."""
    seed = torch.tensor([2**31 - 2, 987654321], dtype=torch.int64)
    b = torch.arange(3).view(-1, 1, 1, 1) + 70001
    h = torch.arange(5).view(1, -1, 1, 1)
    i = torch.arange(37).view(1, 1, -1, 1)
    ours = _dropout.keep_mask(seed, p, b, h, i, torch.arange(61))
    assert torch.equal(ours, oracle.keep_mask((2**31 - 2, 987654321), p, 3, 5, 37, 61, b_offset=70001))
    big_rows = _dropout.keep_mask(seed, p, b[:1], h[:, :1], i + 2**30, torch.arange(61) + 2**30)
    assert big_rows.float().mean().item() == pytest.approx(1 - p, abs=0.2)


def _keep_scale_case(p: float) -> tuple[torch.Tensor, torch.Tensor]:
    seed = (2**31 - 2, 987654321)
    b = torch.arange(3).view(-1, 1, 1, 1) + 70001
    h = torch.arange(5).view(1, -1, 1, 1)
    i = torch.arange(37).view(1, 1, -1, 1)
    row_keys = _dropout.row_keys(torch.tensor(seed), b, h, i)
    ours = _dropout.keep_scale_from_keys(row_keys, _dropout.col_terms(torch.arange(61)), p, torch.float32)
    keep = oracle.keep_mask(seed, p, 3, 5, 37, 61, b_offset=70001)
    scale = 0.0 if p >= 1 else 1 / (1 - p)
    return ours, keep.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def test_keep_scale_is_exactly_keep_over_one_minus_p():
    """The fp32 factor built in the hash's int32 word: exactly 0 or fp32(1 / (1 - p)), at the spec's thresholds,
    including T = 0 and T = 1, p = 1, and thresholds equal to (and one above) hash values actually drawn, where the
    clamp decides between neighbouring words."""
    words = oracle.hash_words((2**31 - 2, 987654321), 3, 5, 37, 61, b_offset=70001).ravel()
    drawn = [int(words[7]), int(words.max()), int(words[words > 0].min())]
    ps = [0.0, 2.0**-33, 2.0**-32, 0.1, 0.37, 0.5, 0.999999, 1.0]
    ps += [w / 2**32 for w in drawn] + [(w + 1) / 2**32 for w in drawn]
    for p in ps:
        ours, ref = _keep_scale_case(p)
        assert ours.dtype == torch.float32 and torch.equal(ours, ref), p
    for p in (0.2, 1.0):  # other work dtypes take the bool path
        row_keys = _dropout.row_keys(
            torch.tensor([1, 2]), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.arange(3).view(1, 1, -1, 1)
        )
        got = _dropout.keep_scale_from_keys(row_keys, _dropout.col_terms(torch.arange(5)), p, torch.float64)
        want = _dropout.keep_from_keys(row_keys, _dropout.col_terms(torch.arange(5)), p).double() * (
            0.0 if p == 1 else 1 / (1 - p)
        )
        assert got.dtype == torch.float64 and torch.equal(got, want)


def test_p_one_keeps_nothing():
    keep = _dropout.keep_mask(
        torch.tensor([5, 6]),
        1.0,
        torch.zeros(2, 1, 1, 1, dtype=torch.int64),
        torch.arange(3).view(1, -1, 1, 1),
        torch.arange(4).view(1, 1, -1, 1),
        torch.arange(5),
    )
    assert keep.shape == (2, 3, 4, 5) and not keep.any()


def test_keep_rate_and_independence_across_batch_and_heads():
    seed = _dropout.draw_seed(torch.device("cpu"))
    keep = _dropout.keep_mask(
        seed, 0.25, torch.arange(3).view(-1, 1, 1, 1), torch.arange(4).view(1, -1, 1, 1),
        torch.arange(97).view(1, 1, -1, 1), torch.arange(131),
    )  # fmt: skip
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    for b in range(3):
        for h in range(4):
            assert abs(keep[b, h].float().mean().item() - 0.75) < 0.03
    assert not torch.equal(keep[0, 0], keep[1, 0]) and not torch.equal(keep[0, 0], keep[0, 1])
    # rows and columns are not shifted copies of each other
    assert not torch.equal(keep[0, 0, 1:, :-1], keep[0, 0, :-1, 1:])
    assert _dropout.threshold(0.0) == 0 and _dropout.threshold(0.5) == 2**31


def test_same_seed_same_output_and_fresh_draws():
    q, k, v = make_qkv()
    torch.manual_seed(11)
    a = ptfast.attention(q, k, v, dropout_p=0.3)
    b = ptfast.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    a2 = ptfast.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)
    assert not torch.equal(a, ptfast.attention(q, k, v))


def test_dropout_independent_of_chunking(monkeypatch):
    q, k, v = make_qkv(b=3, lq=41)
    key_mask = key_mask_of("holes", b=3)
    torch.manual_seed(5)
    whole = ptfast.attention(q, k, v, dropout_p=0.2, key_mask=key_mask, is_causal=True)
    monkeypatch.setattr(torch_attention, "CHUNK_BUDGET_BYTES", 5 * H * LK * 64)
    torch.manual_seed(5)
    chunked = ptfast.attention(q, k, v, dropout_p=0.2, key_mask=key_mask, is_causal=True)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    run_and_check(q, k, v, dropout_p=0.2, key_mask=key_mask, is_causal=True)


@ROUTES
def test_dropout_p_one_gives_zeros(route):
    q, k, v = make_qkv()
    with ptfast.use_backend(route):
        out = ptfast.attention(q, k, v, dropout_p=1.0)
    assert (out == 0).all() and ran_the_op(out) == (route == "torch")
    out.sum().backward()
    assert (q.grad == 0).all()


def test_activation_checkpointing_reproduces_gradients():
    q, k, v = make_qkv(d=40)
    key_mask = key_mask_of("left")

    def block(q, k, v):
        return ptfast.attention(q * 1.5, k, v, dropout_p=0.25, key_mask=key_mask, is_causal=True).square()

    torch.manual_seed(3)
    plain = torch.autograd.grad(block(q, k, v).sum(), (q, k, v))
    torch.manual_seed(3)
    ckpt = torch.autograd.grad(checkpoint(block, q, k, v, use_reentrant=False).sum(), (q, k, v))
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.equal(a, b)


@ROUTES
def test_dropout_single_query_row(route):
    out, _ = run_and_check(*make_qkv(lq=1), dropout_p=0.3, key_mask=key_mask_of("right"), backend=route)
    assert ran_the_op(out) == (route == "torch")


def _dropout_call(q, k, v, seed: int, **kwargs):
    torch.manual_seed(seed)
    with record_dispatch() as events:
        out = ptfast.attention(q, k, v, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape).to(out.dtype))  # not _like: layouts differ
    return out, grads, events


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_route_equals_the_op_and_is_recorded(dtype):
    """Auto's CPU dropout route runs the op's own forward math (same bits, same keep mask from the same seed) under
    PyTorch's autograd; its gradients are the op's explicit backward's up to rounding, and it is recorded as the
    torch backend, forward and backward."""
    q, k, v = make_qkv(dtype=dtype, lq=19, noncontig=True)
    kwargs = dict(dropout_p=0.3, key_mask=key_mask_of("holes"), attn_mask=torch.rand(B, 1, 19, LK) > 0.1)
    out, grads, events = _dropout_call(q, k, v, 21, **kwargs)
    assert not ran_the_op(out)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    with ptfast.use_backend("torch"):
        want, want_grads, _ = _dropout_call(q, k, v, 21, **kwargs)
    assert ran_the_op(want)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.manual_seed(21)
    with torch.no_grad():  # the route's in-place variant
        torch.testing.assert_close(ptfast.attention(q, k, v, **kwargs), want, rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, **tol)


def test_auto_route_steps_aside_where_the_op_must_run(monkeypatch):
    """Inputs over the chunk budget (what autograd would keep between the passes must stay within it), autocast,
    an empty key axis and an explicit backend run the op."""
    q, k, v = make_qkv()
    assert not ran_the_op(ptfast.attention(q, k, v, dropout_p=0.2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ran_the_op(ptfast.attention(q, k, v, dropout_p=0.2))
    empty_k, empty_v = (t[:, :, :0].detach().requires_grad_() for t in (k, v))
    out = ptfast.attention(q, empty_k, empty_v, dropout_p=0.2)
    assert ran_the_op(out) and (out == 0).all()
    monkeypatch.setattr(torch_attention, "CHUNK_BUDGET_BYTES", 5 * H * LK * 96)
    assert ran_the_op(ptfast.attention(q, k, v, dropout_p=0.2))
