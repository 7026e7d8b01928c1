"""conv_relu on the triton backend under TRITON_INTERPRET=1 (CPU tensors), against a float64 reference.

The backend runs its default algorithms (implicit-GEMM forward; see test_triton_implicit_gemm.py for the
others); the bias+ReLU kernel used after a cuDNN conv is tested directly below.

Runs only in the interpreter process (``python tests/run.py``). The reference is ``relu(conv2d(...))``
computed in float64; fp32 must match it tightly, fp16 follows the low-precision rule of docs/design.md §5 against
PyTorch's own fp16 ops. bf16 is tested on the GPU only (tests/test_gpu_conv_backends.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule

pytestmark = pytest.mark.interpreter

N, CIN, COUT, H, W = 2, 3, 5, 7, 9


def _reference(x, weight, bias, padding: int, grad):
    """(out, dx, dweight, dbias) of relu(conv2d(x, weight, bias)) computed with autograd in x's dtype."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = F.relu(F.conv2d(x, weight, bias, padding=padding))
    inputs = [x, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    return (out.detach(), *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("k", "padding"), [(3, 1), (3, 0), (1, 0), (1, 1)])
def test_conv_relu_triton_matches_float64(dtype, channels_last, with_bias, k, padding) -> None:
    x64 = torch.randn(N, CIN, H, W, dtype=torch.float64)
    w64 = torch.randn(COUT, CIN, k, k, dtype=torch.float64) / (CIN * k * k) ** 0.5
    b64 = torch.randn(COUT, dtype=torch.float64) if with_bias else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    b = b64.to(dtype).requires_grad_() if with_bias else None

    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = ptfast.conv_relu(x, w, b, padding=padding)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, w] + ([b] if with_bias else []), grad)
    assert_ran(events, "conv_relu", "triton", ("forward", "backward"))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)

    # The oracle sees the same (rounded) inputs as ptfast, in float64.
    oracle = _reference(x.double(), w.double(), b.double() if with_bias else None, padding, grad.double())
    names = ["out", "dx", "dweight", "dbias"][: len(oracle)]
    if dtype == torch.float32:
        for name, ours, ref in zip(names, (out, *grads), oracle, strict=True):
            assert_close64(ours, ref, f"{name} {dtype}")
    else:
        same = _reference(x, w, b, padding, grad)
        for name, ours, theirs, ref in zip(names, (out, *grads), same, oracle, strict=True):
            assert_rule(ours, theirs, ref, f"{name} {dtype}")


@pytest.mark.parametrize(("dtype", "match"), [(torch.float64, "float64"), (torch.bfloat16, "bfloat16")])
def test_conv_relu_dtype_refused_by_triton(dtype, match) -> None:
    # bf16: the interpreter rounds fp32 -> bf16 toward zero, so the backend refuses it on CPU tensors.
    x = torch.randn(N, CIN, H, W, dtype=dtype)
    w = torch.randn(COUT, CIN, 3, 3, dtype=dtype)
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match=match):
        ptfast.conv_relu(x, w, padding=1)


# Shapes whose contiguous inner dimension (H*W for NCHW, C for channels_last) selects each block config of
# the kernel, with partial tiles in both directions.
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((2, 3, 3, 5), False),  # inner 15   -> 64x16
        ((3, 5, 7, 9), False),  # inner 63   -> 16x64
        ((2, 3, 15, 17), False),  # inner 255  -> 4x256
        ((2, 3, 37, 41), False),  # inner 1517 -> 1x1024, two column tiles
        ((3, 5, 3, 7), True),  # inner 5    -> 64x16
        ((2, 33, 5, 3), True),  # inner 33   -> 16x64
        ((2, 200, 3, 5), True),  # inner 200  -> 4x256
        ((2, 1100, 2, 3), True),  # inner 1100 -> 1x1024, two column tiles
    ],
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_relu_kernel_every_block_config(shape, channels_last, with_bias) -> None:
    from ptfast.backends.triton.bias_relu import bias_relu_

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(shape).contiguous(memory_format=fmt)
    y[0, 0, 0, 0] = float("nan")  # NaN propagates like torch.relu
    bias = torch.randn(shape[1]) if with_bias else None
    expected = torch.relu(y.double() + (bias.double().view(1, -1, 1, 1) if with_bias else 0.0))
    result = bias_relu_(y, bias)
    assert result is y and y.is_contiguous(memory_format=fmt)
    # fp32 add of two fp32 values, rounded once: equal to the float64 sum rounded to fp32.
    torch.testing.assert_close(y, expected.float(), rtol=0, atol=0, equal_nan=True)


def test_conv_relu_triton_under_torch_compile_fullgraph() -> None:
    # The backend choice (supports(), device checks) is traced by dynamo; it must not break the graph.
    x = torch.randn(N, CIN, H, W, requires_grad=True)
    w = torch.randn(COUT, CIN, 3, 3, requires_grad=True)
    b = torch.randn(COUT, requires_grad=True)

    def step(x, w, b):
        return ptfast.conv_relu(x, w, b, padding=1)

    torch._dynamo.reset()
    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, b)
        out.backward(torch.ones_like(out))
    assert_ran(events, "conv_relu", "triton", ("forward", "backward"))
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert_close64(out, ref, "compiled out")
