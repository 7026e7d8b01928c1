"""The checks of ``ptfast.add_relu`` shared by every backend's tier (torch: tests/test_add_relu.py; triton
under the interpreter: tests/interpreter/test_triton_add_relu.py; GPU: tests/test_gpu_add_relu.py).

Each check draws odd-sized random inputs (both signs, so the ReLU masks about half), runs the op on one explicit
backend, asserts that backend ran, and compares the output and both gradients with the float64 oracle
(tests/oracles/conv.py): tight in fp32/fp64, DESIGN §4's rule (against PyTorch's own ``relu(x + r)`` in the same
dtype) in fp16/bf16.
"""

from __future__ import annotations

import torch

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles.conv import add_relu_ref

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def inputs(shape, dtype, fmt, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(2))
    return tuple(t.to(device, dtype).contiguous(memory_format=fmt).requires_grad_() for t in (x, r))


def check(backend: str, shape, dtype, layout: str, device="cpu", seed=0) -> None:
    """Forward and both gradients of ``add_relu`` on ``backend`` against the oracle (and layout, dtype, shape)."""
    fmt = FORMATS[layout]
    x, r = inputs(shape, dtype, fmt, device, seed)
    with ptfast.use_backend(backend), record_dispatch() as events:
        out = ptfast.add_relu(x, r)
    assert_ran(events, "add_relu", backend)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad = grad.to(device, dtype)
    dx, dr = torch.autograd.grad(out, (x, r), grad)
    x64, r64 = (t.detach().cpu().double().requires_grad_() for t in (x, r))
    ref = add_relu_ref(x64, r64)
    ref_dx, ref_dr = torch.autograd.grad(ref, (x64, r64), grad.cpu().double())
    ours = {"out": out, "dx": dx, "dresidual": dr}
    refs = {"out": ref, "dx": ref_dx, "dresidual": ref_dr}
    if dtype in (torch.float16, torch.bfloat16):
        tx, tr = (t.detach().requires_grad_() for t in (x, r))
        theirs_out = torch.relu(tx + tr)
        theirs = dict(zip(("dx", "dresidual"), torch.autograd.grad(theirs_out, (tx, tr), grad), strict=True))
        theirs["out"] = theirs_out
        for name, value in ours.items():
            assert_rule(value.cpu(), theirs[name].cpu(), refs[name], name)
    else:
        for name, value in ours.items():
            assert_close64(value.cpu(), refs[name], name)


def check_edge_cases(backend: str, dtype, device="cpu") -> None:
    """Empty batch, a single element, all-negative sums (zeros, zero gradients), NaN propagating."""
    with ptfast.use_backend(backend):
        empty = torch.randn(0, 3, 5, 7, device=device, dtype=dtype)
        assert ptfast.add_relu(empty, empty.clone()).shape == (0, 3, 5, 7)
        one = torch.full((1, 1, 1, 1), 0.75, device=device, dtype=dtype)
        assert ptfast.add_relu(one, one).item() == 1.5
        x = -torch.rand(2, 3, 5, 7, device=device, dtype=dtype).add_(0.01).requires_grad_()
        out = ptfast.add_relu(x, x.detach() * 0.5)
        assert torch.count_nonzero(out) == 0
        (dx,) = torch.autograd.grad(out.sum(), x)
        assert torch.count_nonzero(dx) == 0 and not torch.isnan(dx).any()
        y = torch.randn(2, 3, 5, 7, device=device, dtype=dtype)
        y[1, 2, 3, 4] = float("nan")
        y.requires_grad_()
        out = ptfast.add_relu(y, torch.ones_like(y))
        assert torch.isnan(out[1, 2, 3, 4]) and torch.isnan(out).sum() == 1
        # ReLU's backward (threshold_backward), as stock's relu: the gradient passes at the NaN output
        grad = torch.rand_like(y) + 0.5
        (dy,) = torch.autograd.grad(out, y, grad)
        assert dy[1, 2, 3, 4] == grad[1, 2, 3, 4]
