"""The padded attention op's output layout: what the fake kernel promises is exactly what runs.

Compiled code reads the op's outputs with the strides the fake kernel promised, so a backend whose real output had
other strides would be read wrongly without any error. The torch backend lays ``out`` out like the query (as
``(B, L, H, D)`` in memory, "heads inner", for the transposed views a Transformer gives it, else contiguous) and
the gradients always heads inner, as SDPA's CPU kernels do; other backends are contiguous.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ptfast.backends.torch import attention as torch_attention
from ptfast.ops import attention as attention_ops  # noqa: F401  (registers torch.ops.ptfast.attention*)
from tests.test_attention import key_mask_of, make_qkv

B, H, LQ, LK = 2, 3, 13, 23  # key_mask_of's batch and key length

PLANS = {
    "flash_key_mask": dict(key_mask=True),
    "flash_plain_noncontig": dict(noncontig=True),
    "chunked_per_query_mask": dict(mask=True, causal=True),
    "dropout": dict(key_mask=True, dropout_p=0.3),
    "dropout_noncontig_causal": dict(noncontig=True, dropout_p=0.2, causal=True),
    "fp64_recomputed": dict(key_mask=True, dtype=torch.float64),
}


def _args(plan: dict, lk: int = LK) -> tuple:
    q, k, v = (t.detach() for t in make_qkv(h=H, lq=LQ, lk=lk, d=24, dtype=plan.get("dtype", torch.float32),
                                           noncontig=plan.get("noncontig", False)))  # fmt: skip
    mask = torch.rand(B, 1, LQ, lk) > 0.3 if plan.get("mask") else None
    key_mask = key_mask_of("right", lk=lk) if plan.get("key_mask") else None
    p = plan.get("dropout_p", 0.0)
    seed = torch.tensor([11, 12]) if p > 0 else None
    return q, k, v, mask, key_mask, seed, p, plan.get("causal", False), 0.3, "torch"


def _heads_inner_strides(shape) -> tuple[int, ...]:
    b, h, n, d = shape
    return torch.empty(b, n, h, d).transpose(1, 2).stride()


def _fake(args: tuple, mode: FakeTensorMode) -> tuple:
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_fake_kernel_promises_the_real_strides(plan: dict) -> None:
    args = _args(plan)
    out, lse = torch.ops.ptfast.attention(*args)
    grad = torch.randn_like(out)
    grads = torch.ops.ptfast.attention_backward(grad, *args[:3], out, lse, *args[3:])
    with FakeTensorMode() as mode:
        fake_out, _ = torch.ops.ptfast.attention(*_fake(args, mode))
        fake_grads = torch.ops.ptfast.attention_backward(*_fake((grad, *args[:3], out, lse, *args[3:]), mode))
    want = _heads_inner_strides(out.shape) if plan.get("noncontig") else torch.empty(out.shape).stride()
    assert out.stride() == fake_out.stride() == want
    assert not out._is_view()  # a view would forbid in-place edits of the output under autograd
    for real, fake, x in zip(grads, fake_grads, args[:3], strict=True):
        assert real.shape == x.shape and real.stride() == fake.stride() == _heads_inner_strides(x.shape)


@pytest.mark.parametrize("lk", [0, 1])
def test_empty_and_single_key_keep_the_layout(lk: int) -> None:
    for plan in ({}, {"dropout_p": 0.5}):
        args = _args(plan, lk=lk)
        out, lse = torch.ops.ptfast.attention(*args)
        grads = torch.ops.ptfast.attention_backward(torch.randn_like(out), *args[:3], out, lse, *args[3:])
        assert out.is_contiguous()
        assert all(g.stride() == _heads_inner_strides(g.shape) for g in grads)


def test_a_result_in_another_layout_is_copied_into_the_promised_one(monkeypatch) -> None:
    """What happens when ``auto`` falls back to the torch backend for a call traced for a contiguous backend."""
    args = _args(PLANS["flash_key_mask"])
    want, lse = torch.ops.ptfast.attention(*args)
    grad = torch.randn_like(want)
    want_grads = torch.ops.ptfast.attention_backward(grad, *args[:3], want, lse, *args[3:])
    monkeypatch.setattr(torch_attention, "GRADS_HEADS_INNER", False)  # the op now promises contiguous gradients
    out, _ = torch.ops.ptfast.attention(*args)
    grads = torch.ops.ptfast.attention_backward(grad, *args[:3], out, lse, *args[3:])
    assert all(g.is_contiguous() for g in grads)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
