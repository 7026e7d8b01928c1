"""``torch.library.opcheck`` on every ptfast op with every backend that runs on this GPU (CUDA tensors, fp16 and
bf16): the schema (nothing mutated, no output aliasing an input), the autograd registration, the fake kernels
against the real outputs (shapes, strides, dtypes) and AOT dispatch with dynamic shapes. ``auto:triton`` is the
string ``auto`` passes to the op (Triton with the torch fallback on a kernel fault). The CPU tiers run the same
checks on the torch backend (main tier) and the triton backend under the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from ptfast.backends import cuda as cuda_backend

pytestmark = pytest.mark.gpu

B, H, D = 2, 3, 64
DTYPES = [torch.float16, torch.bfloat16]
ATTENTION_BACKENDS = ["torch", "triton", "auto:triton"]
CONV_BACKENDS = ["torch", "triton", "auto:triton", "cuda"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(*shape, dtype, seed, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device="cuda", generator=_gen(seed)) * scale).to(dtype)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize(("dropout", "masks"), [(False, False), (True, True)])
def test_opcheck_attention(backend, dtype, dropout, masks) -> None:
    q, k, v = (_randn(B, H, n, D, dtype=dtype, seed=i).requires_grad_() for i, n in enumerate((77, 65, 65)))
    mask = (torch.rand(B, 1, 77, 65, device="cuda", generator=_gen(5)) > 0.3) if masks else None
    key_mask = (
        (torch.arange(65, device="cuda")[None, :] < torch.tensor([65, 40], device="cuda")[:, None]) if masks else None
    )
    seed = torch.tensor([17, 99], dtype=torch.int64, device="cuda") if dropout else None
    args = (q, k, v, mask, key_mask, seed, 0.1 if dropout else 0.0, masks, 1 / math.sqrt(D), backend)
    opcheck(torch.ops.ptfast.attention.default, args)
    out, lse = torch.ops.ptfast.attention(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    opcheck(torch.ops.ptfast.attention_backward.default, bwd)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_opcheck_attention_varlen(backend) -> None:
    q, k, v = (_randn(n, H, D, dtype=torch.bfloat16, seed=i).requires_grad_() for i, n in enumerate((123, 97, 97)))
    cu_q = torch.tensor([0, 49, 49, 123], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 25, 61, 97], dtype=torch.int32, device="cuda")
    seed = torch.tensor([5, 6], dtype=torch.int64, device="cuda")
    args = (q, k, v, cu_q, cu_k, 74, 36, seed, 0.1, True, 0.125, backend)
    opcheck(torch.ops.ptfast.attention_varlen.default, args)
    out, lse = torch.ops.ptfast.attention_varlen(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    opcheck(torch.ops.ptfast.attention_varlen_backward.default, bwd)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_opcheck_masked_lm_loss(backend, dtype) -> None:
    h = _randn(377, 256, dtype=dtype, seed=1).requires_grad_()
    w = _randn(1001, 256, dtype=dtype, seed=2, scale=0.05).requires_grad_()
    b = _randn(1001, dtype=dtype, seed=3, scale=0.5).requires_grad_()
    labels = torch.randint(0, 1001, (377,), device="cuda", generator=_gen(4))
    labels[torch.rand(377, device="cuda", generator=_gen(5)) < 0.7] = -100
    opcheck(torch.ops.ptfast.masked_lm_loss.default, (h, w, labels, b, -100, 0.1, backend))
    _, row_max, log_sum = torch.ops.ptfast.masked_lm_loss(
        h.detach(), w.detach(), labels, b.detach(), -100, 0.1, backend
    )
    grad = torch.randn(377, device="cuda", generator=_gen(6))
    args = [h.detach(), w.detach(), labels, b.detach(), row_max, log_sum, -100, 0.1]
    for needs in ((True, True, True), (False, True, False)):
        opcheck(torch.ops.ptfast.masked_lm_loss_backward.default, (grad, *args, *needs, backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_opcheck_masked_lm_loss_sum_with_grads(dtype) -> None:
    """The torch backend's forward with gradients (reduction mean / sum) and its scaling backward, on CUDA."""
    h = _randn(377, 256, dtype=dtype, seed=1).requires_grad_()
    w = _randn(1001, 256, dtype=dtype, seed=2, scale=0.05).requires_grad_()
    b = _randn(1001, dtype=dtype, seed=3, scale=0.5).requires_grad_()
    labels = torch.randint(0, 1001, (377,), device="cuda", generator=_gen(4))
    labels[torch.rand(377, device="cuda", generator=_gen(5)) < 0.7] = -100
    op = torch.ops.ptfast.masked_lm_loss_sum_with_grads.default
    opcheck(op, (h, w, labels, b, -100, 0.1, True, True, True, "torch"))
    _, n_valid, dh, dw, db = op(h.detach(), w.detach(), labels, b.detach(), -100, 0.1, True, True, True, "torch")
    back = torch.ops.ptfast.masked_lm_loss_sum_with_grads_backward.default
    opcheck(back, (torch.tensor(3.7, device="cuda"), n_valid, dh, dw, db, "torch"))


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
def test_opcheck_conv_relu(backend, channels_last, pool) -> None:
    if backend == "cuda":
        reason = cuda_backend.unavailable_reason(torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _randn(2, 32, 15, 14, dtype=torch.bfloat16, seed=1).contiguous(memory_format=fmt)
    weight = _randn(48, 32, 3, 3, dtype=torch.bfloat16, seed=2, scale=0.06).requires_grad_()
    bias = _randn(48, dtype=torch.bfloat16, seed=3).requires_grad_()
    opcheck(torch.ops.ptfast.conv_relu.default, (x, weight, bias, None, 1, 1, pool, pool, backend))
    out, argmax = torch.ops.ptfast.conv_relu(x, weight.detach(), bias.detach(), None, 1, 1, pool, pool, backend)
    grad = torch.randn(out.shape, device="cuda", generator=_gen(4)).to(out.dtype)
    for needs in ((True, True, True), (False, True, True)):
        args = (grad, out, argmax, x, weight.detach(), list(x.shape), channels_last, 1, 1, pool, *needs, False, backend)
        opcheck(torch.ops.ptfast.conv_relu_backward.default, args)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_opcheck_add_relu(backend, channels_last) -> None:
    if backend == "cuda":
        reason = cuda_backend.unavailable_reason(torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _randn(2, 48, 15, 13, dtype=torch.bfloat16, seed=1).contiguous(memory_format=fmt).requires_grad_()
    residual = _randn(2, 48, 15, 13, dtype=torch.bfloat16, seed=2).contiguous(memory_format=fmt).requires_grad_()
    opcheck(torch.ops.ptfast.add_relu.default, (x, residual, backend))
