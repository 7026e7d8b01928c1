"""GPU tests of the cuda and triton conv_relu(_pool) backends.

The cuda backend is cuDNN's conv + a fused epilogue kernel; the triton backend runs each of its algorithms
(:mod:`ptfast.backends.triton.conv_config`): the implicit-GEMM forward with the epilogue inside the GEMM (the
default) with cuDNN's or the Triton dgrad and wgrad, and cuDNN's conv + the Triton epilogue kernel.

* ``conv_relu`` through the public API with an explicit backend, forward and all gradients, bf16/fp16/fp32,
  NCHW and channels_last, with and without bias, against a float64 reference, using the low-precision rule
  of docs/design.md §5: ``err(ptfast) <= 2 * err(torch in the same dtype) + 1e-5``, where "torch in the same dtype"
  is ``F.relu(F.conv2d(...))`` (fp32 convolutions may use TF32 in both, as cuDNN allows by default).
* ``conv_relu_pool`` the same way (fused bias + ReLU + 2x2 max-pool + uint8 argmax, fused backward), plus exact
  ties against the torch backend on small-integer inputs.
* The bias+ReLU kernels on their own: bit-exact against ``relu(y.float() + bias.float())`` rounded once to
  y's dtype (both kernels add in fp32 and round to nearest-even once), NaN propagation, grid-stride tails.

Only collected with a GPU; a backend that cannot run here (extension not built, old GPU) is skipped with its
reason, which ``pytest -rs`` shows.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends import cuda as cuda_backend
from ptfast.backends import triton as triton_backend
from ptfast.backends.triton import conv_config
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, assert_rule

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


# "backend" or "backend:forward/dgrad/wgrad algorithms" (triton only).
CONV_BACKENDS = ["cuda", "triton", "triton:implicit_gemm/triton/triton", "triton:cudnn/cudnn/cudnn"]


def _use(spec: str):
    """(backend name, context manager selecting it and, for triton, its algorithms)."""
    backend, _, algos = spec.partition(":")
    forward, dgrad, wgrad = algos.split("/") if algos else (None, None, None)
    ctx = contextlib.ExitStack()
    ctx.enter_context(ptfast.use_backend(backend))
    if backend == "triton":
        ctx.enter_context(conv_config.use_algos(forward, dgrad, wgrad))
    return backend, ctx


def _require(backend: str) -> None:
    backend = backend.partition(":")[0]
    device = torch.device("cuda")
    reason = cuda_backend.unavailable_reason(device) if backend == "cuda" else triton_backend.device_reason(device)
    if reason is not None:
        pytest.skip(reason)


def _bias_relu_kernel(backend: str):
    _require(backend)
    if backend == "cuda":
        return cuda_backend.extension().bias_relu_
    from ptfast.backends.triton.bias_relu import bias_relu_

    return bias_relu_


def _conv_relu_and_grads(x, weight, bias, padding: int, grad, pool: bool = False):
    """(out, dx, dweight[, dbias]) of relu(conv2d(x, weight, bias)) (then max_pool2d(2, 2) with ``pool``) with
    PyTorch's own ops in x's dtype."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = F.relu(F.conv2d(x, weight, bias, padding=padding))
    if pool:
        out = F.max_pool2d(out, 2, 2)
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return (out.detach(), *torch.autograd.grad(out, inputs, grad.to(out.dtype)))


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("n", "cin", "cout", "h", "w", "k", "padding"),
    [
        (2, 3, 5, 7, 9, 3, 1),
        (2, 3, 5, 7, 9, 1, 0),
        (3, 16, 24, 15, 17, 3, 0),
        (2, 64, 64, 33, 31, 3, 1),
        (2, 3, 64, 45, 43, 3, 1),  # VGG's first layer (flat K walk), several row tiles
        (2, 128, 136, 13, 11, 3, 1),  # Cout over two 128-wide column tiles, a partial one
    ],
)
def test_conv_relu_backend_vs_float64(backend, dtype, channels_last, with_bias, n, cin, cout, h, w, k, padding):
    _require(backend)
    dev = torch.device("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = (torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(cout, device=dev).to(dtype).requires_grad_() if with_bias else None
    inputs = [x, weight] + ([bias] if with_bias else [])

    backend, ctx = _use(backend)
    with ctx, record_dispatch() as events:
        out = ptfast.conv_relu(x, weight, bias, padding=padding)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad)
    assert_ran(events, "conv_relu", backend, ("forward", "backward"))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)

    # Oracle: the same (already rounded) inputs in float64; "torch same dtype": PyTorch's ops in dtype.
    bias64 = bias.double() if with_bias else None
    oracle = _conv_relu_and_grads(x.double(), weight.double(), bias64, padding, grad.double())
    same = _conv_relu_and_grads(x, weight, bias, padding, grad)
    names = ["out", "dx", "dweight", "dbias"][: len(oracle)]
    for name, ours, theirs, ref in zip(names, (out, *grads), same, oracle, strict=True):
        assert_rule(ours, theirs, ref, f"{backend} {name} {dtype}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("n", "cin", "cout", "h", "w", "k", "padding"),
    [
        (2, 3, 5, 7, 9, 3, 1),
        (3, 16, 24, 15, 17, 3, 0),
        (2, 64, 64, 33, 31, 3, 1),
        (2, 3, 4, 1, 5, 1, 0),
        (2, 128, 136, 13, 11, 3, 1),
    ],
)
def test_conv_relu_pool_backend_vs_float64(backend, dtype, channels_last, with_bias, n, cin, cout, h, w, k, padding):
    """Fused bias/ReLU/pool/argmax (in the GEMM or after cuDNN) and the fused backward, by the low-precision rule."""
    _require(backend)
    dev = torch.device("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = (torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(cout, device=dev).to(dtype).requires_grad_() if with_bias else None
    inputs = [x, weight] + ([bias] if with_bias else [])
    backend, ctx = _use(backend)
    with ctx, record_dispatch() as events:
        out = ptfast.conv_relu_pool(x, weight, bias, padding=padding)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad)
    assert_ran(events, "conv_relu_pool", backend, ("forward", "backward"))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    bias64 = bias.double() if with_bias else None
    oracle = _conv_relu_and_grads(x.double(), weight.double(), bias64, padding, grad.double(), pool=True)
    same = _conv_relu_and_grads(x, weight, bias, padding, grad, pool=True)
    names = ["out", "dx", "dweight", "dbias"][: len(oracle)]
    for name, ours, theirs, ref in zip(names, (out, *grads), same, oracle, strict=True):
        if ref.numel() == 0 or ref.abs().max() == 0:
            assert ours.shape == ref.shape and (ours == 0).all(), name
            continue
        assert_rule(ours, theirs, ref, f"{backend} pool {name} {dtype}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_relu_pool_ties_and_argmax_match_torch_backend(backend, channels_last) -> None:
    """Small-integer inputs make ties: the fused epilogue's output, argmax-driven gradients equal the torch
    backend's bit for bit (first maximum in row-major order)."""
    _require(backend)
    dev = torch.device("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device=dev).manual_seed(3)
    x = torch.randint(-2, 3, (2, 3, 9, 11), device=dev, generator=g).float().contiguous(memory_format=fmt)
    weight = torch.randint(-1, 2, (4, 3, 3, 3), device=dev, generator=g).float()
    bias = torch.randint(-2, 3, (4,), device=dev, generator=g).float()
    results = {}
    for name in ("torch", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with _use(name)[1]:
            out = ptfast.conv_relu_pool(*leaves, padding=1)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results[name] = (out, *grads)
    for ours, ref in zip(results[backend], results["torch"], strict=True):
        assert torch.equal(ours, ref)


# (shape, channels_last): inner sizes (H*W or C) below, at and above each block / warp width, short rows that
# share a block, and for the CUDA kernel more rows than gridDim.y = 65535 covers in one pass (grid-stride).
KERNEL_SHAPES = [
    ((2, 3, 5, 7), False),
    ((2, 5, 1, 1), False),
    ((2, 1, 4, 4), True),
    ((3, 7, 33, 31), False),
    ((2, 3, 37, 41), True),
    ((2, 64, 17, 19), True),
    ((2, 1100, 2, 3), True),
    ((1, 3, 1024, 1024), True),  # rows = 2^20 > 65535 * 8
    ((8, 70000, 1, 3), False),  # rows = 560000 > 65535 * 8 (inner 3 -> CUDA block 32 x 8)
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "channels_last"), KERNEL_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_relu_kernel_exact(backend, dtype, shape, channels_last, with_bias) -> None:
    kernel = _bias_relu_kernel(backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
    y[0, 0, 0, 0] = float("nan")
    bias = torch.randn(shape[1], device="cuda").to(dtype) if with_bias else None
    expected = y.float()
    if with_bias:
        expected = expected + bias.float().view(1, -1, 1, 1)
    expected = torch.relu(expected).to(dtype)
    kernel(y, bias)
    torch.cuda.synchronize()
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


def test_cuda_extension_rejects_bad_inputs() -> None:
    kernel = _bias_relu_kernel("cuda")
    y = torch.randn(2, 3, 4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(y.transpose(2, 3), None)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(y, torch.randn(3, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="shape"):
        kernel(y, torch.randn(4, device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA"):
        kernel(y.cpu(), None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        kernel(y.double(), None)


# Odd sizes: short rows sharing a block, rows of one warp and a partial one, rows wider than a block.
RESIDUAL_SHAPES = [(3, 5, 7, 9), (2, 64, 17, 19), (2, 1100, 2, 3)]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_relu_kernel_residual(backend, dtype, shape, channels_last, with_bias) -> None:
    """y = relu(y + bias[c] + residual) in one pass: within one rounding to y's dtype (plus the fp32 sum's own
    error) of the float64 result, bit-exact against the same fp32 sum rounded once, NaN from y or the residual
    propagates, and the residual is left as it was."""
    kernel = _bias_relu_kernel(backend)
    dev = torch.device("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device=dev).manual_seed(5)
    y = torch.randn(shape, device=dev, generator=gen).to(dtype).contiguous(memory_format=fmt)
    residual = torch.randn(shape, device=dev, generator=gen).to(dtype).contiguous(memory_format=fmt)
    y[0, 0, 0, 0] = float("nan")
    residual[-1, -1, -1, -1] = float("nan")
    bias = torch.randn(shape[1], device=dev, generator=gen).to(dtype) if with_bias else None
    bias64 = bias.double().view(1, -1, 1, 1) if with_bias else torch.zeros((), device=dev, dtype=torch.float64)
    ref64 = torch.relu(y.double() + bias64 + residual.double())
    magnitude = y.double().abs() + bias64.abs() + residual.double().abs()
    same_fp32 = torch.relu(y.float() + bias64.float() + residual.float()).to(dtype)
    residual_before = residual.clone()

    kernel(y, bias, residual)
    torch.cuda.synchronize()

    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(residual, residual_before, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, same_fp32, rtol=0, atol=0, equal_nan=True)
    nan = ref64.isnan()
    assert torch.equal(y.isnan(), nan)
    # Rounding to dtype: <= eps/2 * |ref| (+ subnormal spacing); the fp32 sum of three terms: <= 2^-23 * magnitude.
    finfo = torch.finfo(dtype)
    tol = finfo.eps * ref64.abs() + 2.0**-22 * magnitude + finfo.tiny
    err = (y.double() - ref64).abs()
    assert (err[~nan] <= tol[~nan]).all(), f"max error {err[~nan].max().item()} over the fp32 + rounding bound"


def test_cuda_extension_residual_checks() -> None:
    """A residual must have y's device, dtype, shape and strides (a size-1 dim's stride is free); y is untouched
    by a rejected call."""
    kernel = _bias_relu_kernel("cuda")
    y = torch.randn(2, 3, 4, 5, device="cuda")
    bias = torch.randn(3, device="cuda")
    before = y.clone()
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        kernel(y, bias, torch.randn(2, 3, 5, 4, device="cuda"))  # same numel, wrong shape
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        kernel(y, bias, torch.randn(1, 3, 4, 5, device="cuda"))  # broadcastable is not enough
    with pytest.raises(RuntimeError, match="residual has dtype"):
        kernel(y, bias, torch.randn(2, 3, 4, 5, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="residual must have y's strides"):
        kernel(y, bias, torch.randn(2, 3, 4, 5, device="cuda").contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="residual is on"):
        kernel(y, bias, torch.randn(2, 3, 4, 5))
    torch.cuda.synchronize()
    assert torch.equal(y, before)
    # C == 1: NCHW and channels_last differ only in dim 1's stride, which addresses nothing; accepted.
    y1 = torch.randn(2, 1, 4, 5, device="cuda")
    r1 = torch.empty(2, 1, 4, 5, device="cuda", memory_format=torch.channels_last).normal_()
    assert r1.stride() != y1.stride()
    expected = torch.relu(y1 + r1)
    kernel(y1, None, r1)
    torch.testing.assert_close(y1, expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bias_relu_kernel_beyond_int32_elements(backend) -> None:
    """> 2^31 elements (4.3 GB in fp16): offsets past 2^31 must not wrap. Checks the last rows only."""
    kernel = _bias_relu_kernel(backend)
    y = torch.randn(1, 2, 32768, 32769, device="cuda", dtype=torch.float16)
    assert y.numel() > 2**31
    bias = torch.randn(2, device="cuda", dtype=torch.float16)
    tail = y[:, :, -3:, :].clone()
    expected = torch.relu(tail.float() + bias.float().view(1, -1, 1, 1)).half()
    kernel(y, bias)
    torch.testing.assert_close(y[:, :, -3:, :], expected, rtol=0, atol=0)


# VGG-16 layer shapes at full resolution (batch 2): (Cin, Cout, H=W, followed by a pool).
VGG16_SHAPES = [(3, 64, 224, False), (64, 64, 224, True), (128, 256, 56, False), (512, 512, 14, True)]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize(("cin", "cout", "hw", "pool"), VGG16_SHAPES, ids=lambda v: str(v))
def test_vgg16_layers_bf16_channels_last(backend, cin, cout, hw, pool) -> None:
    """The benchmarked configuration (bf16, channels_last, real VGG-16 sizes) by the low-precision rule."""
    _require(backend)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(11)
    cl = torch.channels_last
    x = torch.randn(2, cin, hw, hw, device=dev, generator=gen).bfloat16().contiguous(memory_format=cl)
    weight = (torch.randn(cout, cin, 3, 3, device=dev, generator=gen) * (2.0 / (cin * 9)) ** 0.5).bfloat16()
    bias = (0.1 * torch.randn(cout, device=dev, generator=gen)).bfloat16()
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    op = "conv_relu_pool" if pool else "conv_relu"
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    backend, ctx = _use(backend)
    with ctx, record_dispatch() as events:
        out = fn(*leaves, padding=1)
        grad = torch.randn(out.shape, device=dev, generator=gen).bfloat16()
        grads = torch.autograd.grad(out, leaves, grad)
    assert_ran(events, op, backend, ("forward", "backward"))
    assert out.is_contiguous(memory_format=cl)
    oracle = _conv_relu_and_grads(*(t.double() for t in leaves), 1, grad.double(), pool=pool)
    same = _conv_relu_and_grads(*leaves, 1, grad, pool=pool)
    for name, ours, theirs, ref in zip(("out", "dx", "dw", "db"), (out, *grads), same, oracle, strict=True):
        assert_rule(ours, theirs, ref, f"{backend} {op} {name} bf16 {cin}->{cout}@{hw}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_patched_vgg_bf16_matches_stock(backend) -> None:
    """A patched torchvision-layout VGG (tiny widths, odd sizes) against the stock model, both bf16 on the GPU,
    each compared with the float64 model by the low-precision rule."""
    import copy

    from tests.test_nn_patch import tiny_vgg

    _require(backend)
    torch.manual_seed(12)
    stock = tiny_vgg().cuda().bfloat16()
    stock64 = copy.deepcopy(stock).double()  # the same (rounded) weights in float64
    model = ptfast.patch(copy.deepcopy(stock))
    x = torch.randn(3, 3, 37, 29, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last)
    x64 = x.double()
    backend, ctx = _use(backend)
    with ctx, record_dispatch() as events:
        out = model(x)
        out.float().sum().backward()
    assert_ran(events, "conv_relu_pool", backend, ("forward", "backward"))
    assert_ran(events, "conv_relu", backend, ("forward", "backward"))
    ref_same = stock(x)
    ref_same.float().sum().backward()
    ref64 = stock64(x64)
    ref64.sum().backward()
    assert_rule(out, ref_same, ref64, f"{backend} patched VGG out")
    named = zip(model.named_parameters(), stock.parameters(), stock64.parameters(), strict=True)
    for (name, p), q, r in named:
        assert_rule(p.grad, q.grad, r.grad, f"{backend} patched VGG grad {name}")
