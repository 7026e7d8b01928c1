"""conv_relu_pool on the triton backend under TRITON_INTERPRET=1 (CPU tensors), with its default algorithms.

The default forward is the implicit GEMM with the epilogue inside (more of it in test_triton_implicit_gemm.py);
the standalone epilogue kernels used after a cuDNN conv are tested directly at the end of this file.

Runs only in the interpreter process (``python tests/run.py``). fp32 must match the float64 oracle
(tests/oracles/conv.py) tightly; fp16 follows the low-precision rule of docs/design.md §5 against PyTorch's own
fp16 ops. Ties and NaN are checked on constructed inputs against the torch backend, bit for bit, and the two
kernels (:mod:`ptfast.backends.triton.bias_relu_pool`) directly, on odd sizes in both layouts.
bf16 is tested on the GPU only (the interpreter rounds fp32 -> bf16 wrongly).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.torch import conv as torch_conv
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, conv_inputs, conv_params
from tests.oracles.conv import conv_relu_ref

pytestmark = pytest.mark.interpreter

OP = "conv_relu_pool"
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _torch_same_dtype(x, weight, bias, padding, grad):
    """(out, *grads) of max_pool2d(relu(conv2d(...))) in x's dtype with PyTorch's own ops."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2, 2)
    return (out.detach(), *torch.autograd.grad(out, conv_params(x, weight, bias), grad.to(out.dtype)))


def _oracle(x, weight, bias, padding, grad):
    """(out, *grads) from the float64 oracle, on the same (rounded) inputs as ptfast."""
    x, weight = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bias = bias.detach().double().requires_grad_() if bias is not None else None
    out = conv_relu_ref(x, weight, bias, padding, pool=True)
    return (out.detach(), *torch.autograd.grad(out, conv_params(x, weight, bias), grad.double()))


# Conv-output sizes: 7x9 (both floored), 5x5, 2x3 (a single pooled row/column); (k, padding) varies the conv.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("hw", "k", "padding"), [((7, 9), 3, 1), ((7, 7), 3, 0), ((2, 3), 1, 0)])
def test_conv_relu_pool_triton_matches_float64(dtype, layout, with_bias, hw, k, padding) -> None:
    fmt = FORMATS[layout]
    x, weight, bias = conv_inputs(2, 3, 5, *hw, k, dtype, fmt, with_bias)
    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = ptfast.conv_relu_pool(x, weight, bias, padding=padding)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, conv_params(x, weight, bias), grad)
    assert_ran(events, OP, "triton", ("forward", "backward"))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    hc, wc = hw[0] + 2 * padding - k + 1, hw[1] + 2 * padding - k + 1
    assert out.shape == (2, 5, hc // 2, wc // 2)

    oracle = _oracle(x, weight, bias, padding, grad)
    names = ["out", "dx", "dweight", "dbias"][: len(oracle)]
    if dtype == torch.float32:
        for name, ours, ref in zip(names, (out, *grads), oracle, strict=True):
            assert_close64(ours, ref, f"{name} {dtype}")
    else:
        same = _torch_same_dtype(x, weight, bias, padding, grad)
        for name, ours, theirs, ref in zip(names, (out, *grads), same, oracle, strict=True):
            assert_rule(ours, theirs, ref, f"{name} {dtype}")


def _tie_inputs(layout):
    """Small-integer conv inputs with a 1x1 identity-like kernel: many exact ties, negatives, floored edges."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, 3, 7, 9), generator=gen).float()
    x[0, 0, :2, :2] = 0.0  # a window of zeros: ReLU'd values and pre-ReLU values all tie
    x[1, 2, 2:4, 2:4] = -1.0  # a window of equal negatives
    weight = torch.zeros(4, 3, 1, 1)
    weight[:3, :, 0, 0] = torch.eye(3)
    weight[3, :, 0, 0] = torch.tensor([1.0, -1.0, 2.0])
    bias = torch.tensor([0.0, 1.0, -1.0, 2.0])
    return x.contiguous(memory_format=FORMATS[layout]), weight, bias


@pytest.mark.parametrize("layout", list(FORMATS))
def test_ties_match_torch_backend_bit_for_bit(layout) -> None:
    x, weight, bias = _tie_inputs(layout)
    results = {}
    for backend in ("torch", "triton"):
        out, argmax = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 0, True, True, backend)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        with ptfast.use_backend(backend), record_dispatch() as events:
            out_api = ptfast.conv_relu_pool(xs, ws, bs, padding=0)
            grad = torch.arange(out_api.numel(), dtype=torch.float32).view_as(out_api) % 7 - 3
            grads = torch.autograd.grad(out_api, (xs, ws, bs), grad)
        assert_ran(events, OP, backend, ("forward", "backward"))
        assert torch.equal(out_api, out)
        results[backend] = (out, argmax, *grads)
    for name, ours, theirs in zip(
        ("out", "argmax", "dx", "dw", "db"), results["triton"], results["torch"], strict=True
    ):
        assert torch.equal(ours, theirs), name
    # Row-major first maximum on the all-zero window, pre-ReLU first maximum on the all-negative one.
    assert results["triton"][1][0, 0, 0, 0] == 0 and results["triton"][1][1, 2, 1, 1] == 0


@pytest.mark.parametrize("layout", list(FORMATS))
def test_nan_propagates_and_matches_torch_backend(layout) -> None:
    x, weight, bias = _tie_inputs(layout)
    # A NaN input reaches every output channel (0 * NaN is NaN): two NaN windows per channel.
    x[0, 1, 3, 4] = float("nan")
    x[1, 0, 0, 1] = float("nan")
    x[1, 0, 1, 0] = float("nan")  # two NaNs in one window: the first one is the argmax
    torch_out, torch_arg = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 0, True, True, "torch")
    out, argmax = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 0, True, True, "triton")
    assert torch.isnan(out).sum() == 2 * 4
    torch.testing.assert_close(out, torch_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(argmax, torch_arg) and argmax[1, 0, 0, 0] == 1


@pytest.mark.parametrize("layout", list(FORMATS))
def test_no_grad_and_frozen_weight(layout) -> None:
    x, weight, bias = conv_inputs(2, 3, 5, 7, 9, 3, torch.float32, FORMATS[layout], True, seed=1)
    with ptfast.use_backend("triton"):
        out_grad = ptfast.conv_relu_pool(x, weight, bias)
        with torch.no_grad():
            out_ng = ptfast.conv_relu_pool(x, weight, bias)
    assert not out_ng.requires_grad and out_ng.is_contiguous(memory_format=FORMATS[layout])
    assert torch.equal(out_ng, out_grad.detach())
    # The forward-only path keeps no argmax.
    out_op, argmax = torch.ops.ptfast.conv_relu(
        x.detach(), weight.detach(), bias.detach(), None, 1, 1, True, False, "triton"
    )
    assert argmax.numel() == 0 and torch.equal(out_op, out_ng)


def test_frozen_weight_dx_matches_oracle() -> None:
    x, weight, bias = conv_inputs(2, 3, 5, 7, 9, 3, torch.float32, torch.channels_last, True, seed=2)
    w_frozen, b_frozen = weight.detach(), bias.detach()
    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = ptfast.conv_relu_pool(x, w_frozen, b_frozen)
        (dx,) = torch.autograd.grad(out.sum(), x)  # an expanded (stride-0) incoming gradient
    assert_ran(events, OP, "triton", ("forward", "backward"))
    x64 = x.detach().double().requires_grad_()
    ref = conv_relu_ref(x64, w_frozen, b_frozen, 1, pool=True)
    (dref,) = torch.autograd.grad(ref.sum(), x64)
    # Frozen weight (and bias): only dx flows, and x is not kept for a weight gradient.
    assert_close64(out, ref, "out")
    assert_close64(dx, dref, "dx with frozen weight")


def test_too_small_conv_output_refused() -> None:
    # A 1x1 conv output has nothing to pool: the functional API refuses it before any backend runs.
    x, weight, _ = conv_inputs(1, 3, 5, 3, 3, 3, torch.float32, torch.contiguous_format, False)
    with ptfast.use_backend("triton"), pytest.raises(ValueError, match="too small"):
        ptfast.conv_relu_pool(x, weight, padding=0)


def _window_max(y):
    """(first maximum, its row-major offset) of every 2x2 window, floor mode (max(dim) takes the first)."""
    n, c, h, w = y.shape
    ho, wo = h // 2, w // 2
    windows = y[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5)
    return windows.reshape(n, c, ho, wo, 4).max(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 7, 9),  # NCHW inner 4 -> 64x8; floored row and column
        (1, 2, 1, 1),  # 1x1 conv output: empty pooled output, g_conv all zeros
        (1, 3, 2, 3),  # a single window per channel
        (2, 3, 5, 75),  # NCHW inner 37 -> 4x128
        (2, 40, 5, 5),  # channels_last inner 40 -> 4x128
        (1, 600, 3, 2),  # channels_last inner 600 -> 1x512, two column tiles
    ],
)
def test_kernels_directly(dtype, layout, shape) -> None:
    from ptfast.backends.triton.bias_relu_pool import bias_relu_pool, pool_relu_backward

    fmt = FORMATS[layout]
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    bias = torch.randn(c, generator=gen).to(dtype)
    # The kernel's own rounding: z + bias rounded to dtype before the comparison (what torch's fp16 add does).
    ho, wo = h // 2, w // 2
    values, index = _window_max(z + bias.view(1, c, 1, 1))

    out, argmax = bias_relu_pool(z, bias, True)
    # z contiguous both ways (C == 1 or H * W == 1) is read as NCHW: compare with z's unambiguous format.
    assert out.shape == (n, c, ho, wo) and out.is_contiguous(memory_format=torch_conv.memory_format(z))
    assert torch.equal(out, torch.relu(values)) and torch.equal(argmax, index.to(torch.uint8))
    out_nb, argmax_nb = bias_relu_pool(z, None, False)
    assert argmax_nb.numel() == 0
    assert torch.equal(out_nb, torch.relu(_window_max(z)[0]))

    grad = torch.randn(out.shape, generator=gen).to(dtype)
    g, dbias = pool_relu_backward(grad, out, argmax, (h, w), True)
    assert g.shape == shape and g.dtype == dtype
    assert torch.equal(g, torch_conv.conv_output_grad(grad, out, argmax, (h, w), True))
    expected_db = (grad.double() * (out > 0)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(dbias.double(), expected_db.to(dtype).double(), rtol=1e-3, atol=1e-3)
    g2, none = pool_relu_backward(grad, out, argmax, (h, w), False)
    assert none is None and torch.equal(g2, g)
