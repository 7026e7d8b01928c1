"""Property-based tests (hypothesis, derandomized, fixed example count): every op on the torch backend against
its float64 oracle over small random shapes, including length 1, empty batches, empty keys and all-ignored
labels. Inputs are float64 so any disagreement is a semantic difference, not rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ptfast
from ptfast._dropout import SEED_BOUND
from tests.helpers import assert_close64
from tests.oracles import attention as attention_oracle
from tests.oracles.conv import conv_relu_ref
from tests.oracles.masked_lm_loss import masked_lm_loss as masked_lm_loss_ref

F64 = torch.float64


def _check_grads(out, ref, leaves, ref_leaves, seed):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    wanted = [(a, b) for a, b in zip(leaves, ref_leaves, strict=True) if a.requires_grad]
    got = torch.autograd.grad(out, [a for a, _ in wanted], g, allow_unused=True)
    want = torch.autograd.grad(ref, [b for _, b in wanted], g, allow_unused=True)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        x = torch.zeros_like(wanted[i][0]) if x is None else x
        y = torch.zeros_like(wanted[i][1]) if y is None else y
        assert_close64(x, y, f"grad {i}", tol=1e-9)


@given(
    b=st.integers(0, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 9),
    lk=st.integers(0, 9),
    d=st.sampled_from([1, 3, 8]),
    causal=st.booleans(),
    use_key_mask=st.booleans(),
    mask_kind=st.sampled_from([None, "bool", "float", "bool_row"]),
    dropout_p=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_oracle(b, h, lq, lk, d, causal, use_key_mask, mask_kind, dropout_p, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=F64) for n in (lq, lk, lk))
    key_mask = torch.rand(b, lk, generator=gen) > 0.3 if use_key_mask else None
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.4
    elif mask_kind == "bool_row":  # broadcast over batch and heads, some rows fully excluded
        attn_mask = torch.rand(lq, lk, generator=gen) > 0.6
    elif mask_kind == "float":
        attn_mask = torch.randn(1, h, lq, lk, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    out = ptfast.attention(*leaves, attn_mask, dropout_p, causal, key_mask=key_mask)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(seed)  # the wrapper draws its seed exactly like this
        drawn = torch.randint(0, SEED_BOUND, (2,), dtype=torch.int64).tolist()
        keep = attention_oracle.keep_mask(drawn, dropout_p, b, h, lq, lk)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_oracle.attention(*ref_leaves, attn_mask, key_mask, causal, None, dropout_p, keep)
    assert out.shape == ref.shape
    assert_close64(out, ref, "out", tol=1e-9)
    _check_grads(out, ref, leaves, ref_leaves, seed)


@given(
    lead=st.sampled_from([(0,), (1,), (7,), (2, 5)]),
    e=st.integers(1, 9),
    vocab=st.integers(1, 13),
    ignore=st.sampled_from(["none", "some", "all"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.2]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_lm_loss_matches_oracle(lead, e, vocab, ignore, reduction, smoothing, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, e, generator=gen, dtype=F64)
    weight = torch.randn(vocab, e, generator=gen, dtype=F64)
    bias = torch.randn(vocab, generator=gen, dtype=F64) if with_bias else None
    labels = torch.randint(0, vocab, lead, generator=gen)
    if ignore == "all":
        labels.fill_(-100)
    elif ignore == "some":
        labels[torch.rand(lead, generator=gen) < 0.5] = -100
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = ptfast.masked_lm_loss(leaves[0], leaves[1], labels, leaves[2], **kwargs)
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref = masked_lm_loss_ref(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2], **kwargs)
    assert out.shape == ref.shape and out.dtype == F64
    assert_close64(out, ref, "loss", tol=1e-9)  # NaN (mean over no rows) must match NaN
    present = [(a, r) for a, r in zip(leaves, ref_leaves, strict=True) if a is not None]
    _check_grads(out, ref, [a for a, _ in present], [r for _, r in present], seed)


@given(
    n=st.integers(0, 2),
    cin=st.integers(1, 4),
    cout=st.integers(1, 4),
    height=st.integers(1, 8),
    width=st.integers(1, 8),
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3), (3, 1)]),
    padding=st.integers(0, 2),
    pool=st.booleans(),
    with_bias=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_oracle_or_refuses(
    n, cin, cout, height, width, kernel, padding, pool, with_bias, channels_last, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, height, width, generator=gen, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, *kernel, generator=gen, dtype=F64)
    bias = torch.randn(cout, generator=gen, dtype=F64) if with_bias else None
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    hc, wc = height + 2 * padding - kernel[0] + 1, width + 2 * padding - kernel[1] + 1
    if hc < 1 or wc < 1 or (pool and (hc < 2 or wc < 2)):
        with pytest.raises(ValueError, match="smaller than the kernel|too small for 2x2"):
            fn(x, weight, bias, padding=padding)
        return
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[2], padding=padding)
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref = conv_relu_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2], padding, pool)
    assert out.shape == ref.shape
    assert_close64(out, ref, "out", tol=1e-9)
    present = [(a, r) for a, r in zip(leaves, ref_leaves, strict=True) if a is not None]
    _check_grads(out, ref, [a for a, _ in present], [r for _, r in present], seed)
