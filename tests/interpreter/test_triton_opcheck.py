"""``torch.library.opcheck`` on every ptfast op with the triton backend (TRITON_INTERPRET=1, CPU tensors, fp32).

The main tier runs the same checks on the torch backend. Here the Triton kernels sit behind the ops: opcheck
verifies the schema (no input is mutated, no output aliases an input), the autograd registration, the fake
kernels against the real outputs (shapes, strides, dtypes) and AOT dispatch with dynamic shapes. Forward and
backward ops, with and without masks / dropout / bias / pooling, each conv algorithm.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from ptfast.backends.triton import conv_config

pytestmark = pytest.mark.interpreter

B, H, D = 2, 3, 24


def _qkv(lq: int, lk: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (lq, lk, lk))


@pytest.mark.parametrize(("dropout", "masks"), [(False, False), (True, True), (False, True)])
def test_opcheck_attention(dropout: bool, masks: bool) -> None:
    q, k, v = _qkv(13, 11)
    mask = (torch.rand(B, 1, 13, 11, generator=torch.Generator().manual_seed(1)) > 0.3) if masks else None
    key_mask = (torch.arange(11)[None, :] < torch.tensor([11, 7])[:, None]) if masks else None
    seed = torch.tensor([17, 99], dtype=torch.int64) if dropout else None
    args = (q, k, v, mask, key_mask, seed, 0.2 if dropout else 0.0, masks, 1 / math.sqrt(D), "triton")
    opcheck(torch.ops.ptfast.attention.default, args)
    out, lse = torch.ops.ptfast.attention(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    opcheck(torch.ops.ptfast.attention_backward.default, bwd)


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_attention_varlen(dropout: bool) -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, H, D, generator=g).requires_grad_() for n in (23, 17, 17))
    cu_q = torch.tensor([0, 9, 9, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11, 17], dtype=torch.int32)
    seed = torch.tensor([5, 6], dtype=torch.int64) if dropout else None
    args = (q, k, v, cu_q, cu_k, 14, 6, seed, 0.3 if dropout else 0.0, True, 0.2, "triton")
    opcheck(torch.ops.ptfast.attention_varlen.default, args)
    out, lse = torch.ops.ptfast.attention_varlen(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    opcheck(torch.ops.ptfast.attention_varlen_backward.default, bwd)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_masked_lm_loss(bias: bool) -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 24, generator=g).requires_grad_()
    w = (torch.randn(101, 24, generator=g) / 5).requires_grad_()
    b = (torch.randn(101, generator=g) * 0.5).requires_grad_() if bias else None
    labels = torch.randint(0, 101, (37,), generator=g)
    labels[torch.rand(37, generator=g) < 0.3] = -100
    opcheck(torch.ops.ptfast.masked_lm_loss.default, (h, w, labels, b, -100, 0.1, "triton"))
    b_data = None if b is None else b.detach()
    _, row_max, log_sum = torch.ops.ptfast.masked_lm_loss(h.detach(), w.detach(), labels, b_data, -100, 0.1, "triton")
    grad = torch.randn(37, generator=g)
    args = [h.detach(), w.detach(), labels, b_data, row_max, log_sum, -100, 0.1]
    for needs in ((True, True, bias), (True, False, False), (False, True, bias)):
        opcheck(torch.ops.ptfast.masked_lm_loss_backward.default, (grad, *args, *needs, "triton"))


@pytest.mark.parametrize(
    ("forward", "dgrad", "wgrad"), [("implicit_gemm", "triton", "triton"), ("cudnn", "cudnn", "cudnn")]
)
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
def test_opcheck_conv_relu(forward: str, dgrad: str, wgrad: str, pool: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 9, 8, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(7, 5, 3, 3, generator=g) / 6).requires_grad_()
    bias = torch.randn(7, generator=g).requires_grad_()
    with conv_config.use_algos(forward, dgrad, wgrad):
        opcheck(torch.ops.ptfast.conv_relu.default, (x, weight, bias, None, 1, 1, pool, pool, "triton"))
        out, argmax = torch.ops.ptfast.conv_relu(x, weight.detach(), bias.detach(), None, 1, 1, pool, pool, "triton")
        grad = torch.randn(out.shape, generator=g)
        for needs in ((True, True, True, False), (True, False, False, False), (False, True, True, False)):
            args = (grad, out, argmax, x, weight.detach(), list(x.shape), True, 1, 1, pool, *needs, "triton")
            opcheck(torch.ops.ptfast.conv_relu_backward.default, args)


@pytest.mark.parametrize("forward", ["implicit_gemm", "cudnn"])
def test_opcheck_conv_relu_strided_residual(forward: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 9, 8, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(7, 5, 3, 3, generator=g) / 6).requires_grad_()
    bias = torch.randn(7, generator=g).requires_grad_()
    residual = torch.randn(2, 7, 5, 4, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    with conv_config.use_algos(forward, "triton", "triton"):
        opcheck(torch.ops.ptfast.conv_relu.default, (x, weight, bias, residual, 2, 1, False, False, "triton"))
        out, argmax = torch.ops.ptfast.conv_relu(
            x, weight.detach(), bias.detach(), residual.detach(), 2, 1, False, False, "triton"
        )
        grad = torch.randn(out.shape, generator=g)
        args = (grad, out, argmax, x, weight.detach(), list(x.shape), True, 2, 1, False, True, True, True, True)
        opcheck(torch.ops.ptfast.conv_relu_backward.default, (*args, "triton"))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_opcheck_add_relu(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, residual = (torch.randn(2, 7, 5, 3, generator=g).contiguous(memory_format=fmt).requires_grad_() for _ in "xr")
    opcheck(torch.ops.ptfast.add_relu.default, (x, residual, "triton"))
