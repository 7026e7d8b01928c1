"""``ptfast.attention_varlen``: the oracle per sequence, equality with the padded op plus ``key_mask``, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles import attention as oracle

H, D = 3, 24
LENS_Q = [13, 0, 29, 7, 1]
LENS_K = [11, 5, 29, 0, 3]


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed(lens_q, lens_k, dtype=torch.float32, d=D):
    q = torch.randn(sum(lens_q), H, d, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), H, d, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), H, d, dtype=dtype, requires_grad=True)
    return q, k, v


def sdpa_per_sequence(q, k, v, cu_q, cu_k, is_causal):
    """PyTorch's own SDPA in q's dtype, one sequence at a time (yardstick for the low-precision rule)."""
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
        kb, vb = (t[cu_k[b] : cu_k[b + 1]].transpose(0, 1) for t in (k, v))
        if kb.shape[1] == 0:
            outs.append(torch.zeros_like(qb).transpose(0, 1))
            continue
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=is_causal).transpose(0, 1))
    return torch.cat(outs)


# bf16 with dropout is covered by the padded tests (varlen equals padded, tested below)
@pytest.mark.parametrize(
    "dtype,dropout_p",
    [(torch.float32, 0.0), (torch.float32, 0.2), (torch.bfloat16, 0.0)],
    ids=["fp32", "fp32-drop", "bf16"],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_matches_oracle_per_sequence(dtype, is_causal, dropout_p):
    q, k, v = packed(LENS_Q, LENS_K, dtype)
    cu_q, cu_k = cu_of(LENS_Q), cu_of(LENS_K)
    torch.manual_seed(4)
    seed = tuple(torch.randint(0, 2**31, (2,), dtype=torch.int64).tolist())
    torch.manual_seed(4)
    with record_dispatch() as events:
        out = ptfast.attention_varlen(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), dropout_p, is_causal)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention_varlen", "torch", ("forward", "backward"))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    ref = oracle.attention_varlen(*leaves, cq, ck, is_causal, None, dropout_p, seed)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    if dtype == torch.float32:
        assert_close64(out, ref, "out")
        for g, r in zip(grads, ref_grads, strict=True):
            assert_close64(g, r, "grad")
    else:
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        tout = sdpa_per_sequence(tq, tk, tv, cq, ck, is_causal)
        tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
        assert_rule(out, tout, ref, "out")
        for g, t, r in zip(grads, tgrads, ref_grads, strict=True):
            assert_rule(g, t, r, "grad")
    # a sequence with no keys (index 3) returns exact zeros with zero gradient
    s3 = slice(int(cu_q[3]), int(cu_q[4]))
    assert (out[s3] == 0).all() and (grads[0][s3] == 0).all()


def _pad(x, cu, max_len):
    """(total, H, D) -> (B, H, max_len, D) with zeros in the padding."""
    out = x.new_zeros(len(cu) - 1, max_len, *x.shape[1:])
    for b in range(len(cu) - 1):
        out[b, : cu[b + 1] - cu[b]] = x[cu[b] : cu[b + 1]]
    return out.transpose(1, 2)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_equals_padded_with_key_mask(is_causal, dropout_p):
    lens = [13, 29, 7, 1]  # same lengths for q and k: the padded batch's rows are exactly the packed tokens
    q, k, v = packed(lens, lens)
    cu = cu_of(lens)
    cl, mx = cu.tolist(), max(lens)
    grad = torch.randn_like(q)
    torch.manual_seed(21)
    out = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, dropout_p, is_causal)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    key_mask = torch.arange(mx)[None, :] < torch.tensor(lens)[:, None]
    torch.manual_seed(21)
    outp = ptfast.attention(*(_pad(t, cl, mx) for t in leaves), None, dropout_p, is_causal, key_mask=key_mask)
    ref = torch.cat([outp[b, :, : lens[b]].transpose(0, 1) for b in range(len(lens))])
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_varlen_edge_cases():
    # no sequences at all
    q, k, v = packed([], [])
    out = ptfast.attention_varlen(q, k, v, cu_of([]), cu_of([]), 0, 0)
    assert out.shape == (0, H, D)
    # only empty sequences, and non-contiguous packed inputs
    q, k, v = packed([0, 0], [0, 0])
    assert ptfast.attention_varlen(q, k, v, cu_of([0, 0]), cu_of([0, 0]), 0, 0).shape == (0, H, D)
    base = torch.randn(H, 17, D, requires_grad=True)
    qt = base.transpose(0, 1)
    out = ptfast.attention_varlen(qt, qt, qt, cu_of([9, 8]), cu_of([9, 8]), 9, 9, is_causal=True)
    ref = oracle.attention_varlen(qt.double(), qt.double(), qt.double(), [0, 9, 17], [0, 9, 17], True)
    assert_close64(out, ref)
    out.sum().backward()
    assert base.grad is not None


def test_varlen_bad_values_without_checks_do_not_crash(monkeypatch):
    monkeypatch.setenv("PTFAST_CHECKS", "0")
    q, k, v = packed([5, 6], [5, 6])
    for cu in ([0, 9, 4], [3, 5, 40], [0, 11, 11], [-7, 2, 11]):
        cu_t = torch.tensor(cu, dtype=torch.int32)
        out = ptfast.attention_varlen(q, k, v, cu_t, cu_t, 2, 0, dropout_p=0.1, is_causal=True)
        out.sum().backward()
        assert out.shape == q.shape
