"""``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` on the attention ops (torch backend)."""

from __future__ import annotations

import math

import pytest
import torch

import ptfast
from ptfast.ops import attention as attention_ops  # noqa: F401  (registers torch.ops.ptfast.attention*)
from tests.test_attention import LK, LQ, B, H, key_mask_of, make_qkv


def _fwd_bwd(fn, *inputs, seed=9):
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], torch.ones_like(out) * 0.7)
    return out, grads


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"is_causal": True, "key_mask": True}, {"mask": True, "dropout_p": 0.2, "key_mask": True}],
    ids=["plain", "causal_keymask", "mask_dropout"],
)
def test_compile_fullgraph_matches_eager(kwargs):
    q, k, v = make_qkv(d=24)
    key_mask = key_mask_of("holes") if kwargs.get("key_mask") else None
    mask = torch.randn(B, 1, LQ, LK) if kwargs.get("mask") else None
    p, causal = kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False)

    def fn(q, k, v):
        return ptfast.attention(q, k, v, mask, p, causal, key_mask=key_mask) * 2

    eager = _fwd_bwd(fn, q, k, v)
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v)
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b)


def test_compile_varlen_matches_eager():
    q, k, v = (torch.randn(n, H, 24) for n in (31, 31, 31))
    cu = torch.tensor([0, 12, 12, 31], dtype=torch.int32)

    def fn(q, k, v):
        return ptfast.attention_varlen(q, k, v, cu, cu, 19, 19, dropout_p=0.1, is_causal=True)

    eager = _fwd_bwd(fn, q, k, v)
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v)
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b)


def _attention_args(dropout: bool, masks: bool):
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(lq=13, lk=11, d=24))
    mask = (torch.rand(B, 1, 13, 11) > 0.3) if masks else None
    key_mask = key_mask_of("right", lk=11) if masks else None
    seed = torch.tensor([17, 99], dtype=torch.int64) if dropout else None
    return (q, k, v, mask, key_mask, seed, 0.2 if dropout else 0.0, masks, 1 / math.sqrt(24), "torch")


@pytest.mark.parametrize("dropout,masks", [(False, False), (True, True), (False, True)])
def test_opcheck_attention(dropout, masks):
    args = _attention_args(dropout, masks)
    torch.library.opcheck(torch.ops.ptfast.attention.default, args)
    q, k, v = args[:3]
    out, lse = torch.ops.ptfast.attention(*args)
    grad = torch.randn_like(out)
    bwd_args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.ptfast.attention_backward.default, bwd_args)


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_attention_varlen(dropout):
    q, k, v = (torch.randn(n, H, 24, requires_grad=True) for n in (23, 17, 17))
    cu_q = torch.tensor([0, 9, 9, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11, 17], dtype=torch.int32)
    seed = torch.tensor([5, 6], dtype=torch.int64) if dropout else None
    args = (q, k, v, cu_q, cu_k, 14, 6, seed, 0.3 if dropout else 0.0, True, 0.2, "torch")
    torch.library.opcheck(torch.ops.ptfast.attention_varlen.default, args)
    out, lse = torch.ops.ptfast.attention_varlen(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.ptfast.attention_varlen_backward.default, bwd)
