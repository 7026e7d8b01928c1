"""The Triton implicit-GEMM convolution (fused forward and dgrad) under TRITON_INTERPRET=1 (CPU tensors).

Runs only in the interpreter process (``python tests/run.py``). fp32 must match the float64 oracle
(tests/oracles/conv.py) tightly; fp16 follows the low-precision rule of docs/design.md §5 against PyTorch's own
fp16 ops. Sizes are odd and chosen so both ways of walking K run (flat: Cin 3 or 5; taps: Cin 16 or 32), M and
Cout span several tiles with partial last tiles (interpreter tiles are 32 x 16 x 16), and pooling floors odd
conv outputs. Ties and NaN are checked on constructed small-integer inputs against the torch backend, bit for
bit, with a real 3x3 kernel (the sums are exact in every summation order). bf16 runs on the GPU only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.triton import conv_config
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, conv_inputs, conv_params
from tests.oracles.conv import conv_relu_ref
from tests.test_nn_patch import tiny_vgg

pytestmark = pytest.mark.interpreter

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _torch_same_dtype(x, weight, bias, padding, pool, grad):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = F.relu(F.conv2d(x, weight, bias, padding=padding))
    if pool:
        out = F.max_pool2d(out, 2, 2)
    return (out.detach(), *torch.autograd.grad(out, conv_params(x, weight, bias), grad.to(out.dtype)))


def _oracle(x, weight, bias, padding, pool, grad):
    x, weight = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bias = bias.detach().double().requires_grad_() if bias is not None else None
    out = conv_relu_ref(x, weight, bias, padding, pool=pool)
    return (out.detach(), *torch.autograd.grad(out, conv_params(x, weight, bias), grad.double()))


def _run(x, weight, bias, padding, pool, forward="implicit_gemm", dgrad="triton", wgrad="triton"):
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    op = "conv_relu_pool" if pool else "conv_relu"
    with ptfast.use_backend("triton"), conv_config.use_algos(forward, dgrad, wgrad), record_dispatch() as events:
        out = fn(x, weight, bias, padding=padding)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
        grads = torch.autograd.grad(out, conv_params(x, weight, bias), grad)
    phases = ("forward", "backward", f"forward:{forward}", f"dgrad:{dgrad}", f"wgrad:{wgrad}")
    assert_ran(events, op, "triton", phases)
    return out, grads, grad


# (N, Cin, Cout, H, W, k, padding): flat walk (Cin 3, 5), tap walk (Cin 16, 32), Cout over one/two/three column
# tiles, odd and even conv outputs, a 1x1 and a 5x5 kernel, padding 0 and 2.
SHAPES = [
    (2, 3, 7, 9, 11, 3, 1),
    (2, 5, 19, 7, 6, 3, 1),
    (1, 16, 33, 9, 7, 3, 1),
    (2, 32, 16, 5, 8, 3, 0),
    (2, 16, 9, 6, 7, 5, 2),
    (3, 5, 17, 5, 7, 1, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_implicit_gemm_matches_float64(dtype, layout, pool, shape) -> None:
    n, cin, cout, h, w, k, padding = shape
    fmt = FORMATS[layout]
    x, weight, bias = conv_inputs(n, cin, cout, h, w, k, dtype, fmt, with_bias=True)
    out, grads, grad = _run(x, weight, bias, padding, pool)
    hc, wc = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    assert out.shape == ((n, cout, hc // 2, wc // 2) if pool else (n, cout, hc, wc))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert grads[0].is_contiguous(memory_format=fmt)  # dx comes back in x's layout

    oracle = _oracle(x, weight, bias, padding, pool, grad)
    names = ("out", "dx", "dweight", "dbias")
    if dtype == torch.float32:
        for name, ours, ref in zip(names, (out, *grads), oracle, strict=True):
            assert_close64(ours, ref, f"{name} {dtype}")
    else:
        same = _torch_same_dtype(x, weight, bias, padding, pool, grad)
        for name, ours, theirs, ref in zip(names, (out, *grads), same, oracle, strict=True):
            assert_rule(ours, theirs, ref, f"{name} {dtype}")


@pytest.mark.parametrize(
    ("forward", "dgrad", "wgrad"),
    [("implicit_gemm", "cudnn", "cudnn"), ("cudnn", "triton", "cudnn"), ("cudnn", "cudnn", "triton")],
)
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
def test_every_algorithm_mix(forward, dgrad, wgrad, pool) -> None:
    # Both forwards save the same (out, argmax): any backward algorithm must follow either forward.
    x, weight, bias = conv_inputs(2, 5, 19, 7, 9, 3, torch.float32, torch.channels_last, True, seed=5)
    out, grads, grad = _run(x, weight, bias, 1, pool, forward, dgrad, wgrad)
    for name, ours, ref in zip(
        ("out", "dx", "dw", "db"), (out, *grads), _oracle(x, weight, bias, 1, pool, grad), strict=True
    ):
        assert_close64(ours, ref, f"{name} {forward}/{dgrad}/{wgrad}")


def test_dgrad_falls_back_to_cudnn_when_padding_exceeds_kernel() -> None:
    # padding > k - 1 has no stride-1 dgrad convolution (its padding would be negative): cuDNN computes dx.
    x, weight, bias = conv_inputs(2, 5, 7, 6, 7, 1, torch.float32, torch.channels_last, True, seed=6)
    with ptfast.use_backend("triton"), conv_config.use_algos("implicit_gemm", "triton"), record_dispatch() as ev:
        out = ptfast.conv_relu(x, weight, bias, padding=1)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, weight, bias], grad)
    assert_ran(ev, "conv_relu", "triton", ("forward:implicit_gemm", "dgrad:cudnn"))
    for name, ours, ref in zip(
        ("out", "dx", "dw", "db"), (out, *grads), _oracle(x, weight, bias, 1, False, grad), strict=True
    ):
        assert_close64(ours, ref, name)


def _integer_inputs(layout, cin):
    """Small-integer x, 3x3 weight and bias: every conv sum is an exact small integer, with many ties."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-2, 3, (2, cin, 9, 11), generator=gen).float()
    x[0, :, :4, :4] = 0.0  # windows whose four conv outputs all equal the bias: ties, positive or negative
    weight = torch.randint(-1, 2, (19, cin, 3, 3), generator=gen).float()
    bias = torch.randint(-2, 3, (19,), generator=gen).float()
    return x.contiguous(memory_format=FORMATS[layout]), weight, bias


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("cin", [3, 16], ids=["flat", "taps"])
def test_ties_match_torch_backend_bit_for_bit(layout, cin) -> None:
    x, weight, bias = _integer_inputs(layout, cin)
    results = {}
    for backend in ("torch", "triton"):
        out, argmax = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, backend)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        with ptfast.use_backend(backend), conv_config.use_algos("implicit_gemm", "triton", "triton"):
            out_api = ptfast.conv_relu_pool(xs, ws, bs)
            grad = torch.arange(out_api.numel(), dtype=torch.float32).view_as(out_api) % 7 - 3
            grads = torch.autograd.grad(out_api, (xs, ws, bs), grad)
        assert torch.equal(out_api, out)
        results[backend] = (out, argmax, *grads)
    n_ties = (results["torch"][0][0, :, :2, :2] == 0).sum()
    assert n_ties > 0  # the constructed zero windows really tie
    for name, ours, theirs in zip(
        ("out", "argmax", "dx", "dw", "db"), results["triton"], results["torch"], strict=True
    ):
        assert torch.equal(ours, theirs), name
    # A window of four equal values: the first (offset 0) wins.
    assert (results["triton"][1][0, :, 0, 0] == 0).all()


@pytest.mark.parametrize("tile", [(16, 16, 16), (64, 32, 16), (32, 64, 32)])
def test_tilings_agree(tile) -> None:
    # Window-major GEMM rows: any BLOCK_M (a multiple of 4) holds whole windows; results equal the default's.
    x, weight, bias = _integer_inputs("channels_last", 32)
    ref_out, ref_arg = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "torch")
    with conv_config.use_algos("implicit_gemm"), conv_config.use_blocks(*tile):
        out, argmax = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "triton")
        plain, _ = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, False, False, "triton")
    assert torch.equal(out, ref_out) and torch.equal(argmax, ref_arg)
    assert torch.equal(plain, torch.relu(F.conv2d(x, weight, bias, padding=1)))


@pytest.mark.parametrize("cin", [3, 16], ids=["flat", "taps"])
def test_int64_index_path_agrees(monkeypatch, cin) -> None:
    # Tensors spanning 2^31 elements switch the kernel to int64 index math (LARGE); forced here on small ones.
    from ptfast.backends.triton import implicit_gemm

    x, weight, bias = _integer_inputs("nchw", cin)
    with conv_config.use_algos("implicit_gemm"):
        small = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "triton")
        g = x[:, :3].repeat(1, 7, 1, 1)[:, :19]  # a (2, 19, 9, 11) conv-output gradient of small integers
        dx_small = implicit_gemm.conv_dgrad(g, weight, list(x.shape), 1)
        dw_small = implicit_gemm.conv_wgrad(g, x, weight, 1, 1, True)
        monkeypatch.setattr(implicit_gemm, "_extent", lambda t: 2**31)
        large = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "triton")
        dx_large = implicit_gemm.conv_dgrad(g, weight, list(x.shape), 1)
        dw_large = implicit_gemm.conv_wgrad(g, x, weight, 1, 1, True)
    assert torch.equal(small[0], large[0]) and torch.equal(small[1], large[1]) and torch.equal(dx_small, dx_large)
    assert torch.equal(dw_small[0], dw_large[0]) and torch.equal(dw_small[1], dw_large[1])


@pytest.mark.parametrize("layout", list(FORMATS))
def test_nan_propagates_like_pytorch(layout) -> None:
    x, weight, bias = _integer_inputs(layout, 3)
    x[1, 0, 4, 5] = float("nan")  # reaches a 3x3 neighbourhood of every output channel
    with conv_config.use_algos("implicit_gemm"):
        out, argmax = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "triton")
        plain, _ = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, False, False, "triton")
    ref_out, ref_arg = torch.ops.ptfast.conv_relu(x, weight, bias, None, 1, 1, True, True, "torch")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(argmax, ref_arg)
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    stock = torch.relu(F.conv2d(x, weight, bias, padding=1))
    torch.testing.assert_close(plain, stock, rtol=0, atol=0, equal_nan=True)


def test_no_grad_forward_keeps_no_argmax() -> None:
    x, weight, bias = conv_inputs(2, 5, 7, 9, 8, 3, torch.float32, torch.channels_last, True, seed=8)
    with ptfast.use_backend("triton"), conv_config.use_algos("implicit_gemm"):
        with_grad = ptfast.conv_relu_pool(x, weight, bias)
        with torch.no_grad():
            inference = ptfast.conv_relu_pool(x, weight, bias)
        out, argmax = torch.ops.ptfast.conv_relu(
            x.detach(), weight.detach(), bias.detach(), None, 1, 1, True, False, "triton"
        )
    assert not inference.requires_grad and torch.equal(inference, with_grad.detach())
    assert argmax.numel() == 0 and torch.equal(out, inference)


@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
def test_frozen_weight_and_strided_input(pool) -> None:
    # A non-contiguous view (every other column of a wider tensor) is read through its strides; frozen weight
    # and bias: only dx flows.
    gen = torch.Generator().manual_seed(10)
    wide = torch.randn(2, 16, 7, 18, generator=gen)
    x = wide[:, :, :, ::2].requires_grad_()
    weight = torch.randn(9, 16, 3, 3, generator=gen) / 12
    bias = torch.randn(9, generator=gen)
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    algos = conv_config.use_algos("implicit_gemm", "triton", "triton")
    with ptfast.use_backend("triton"), algos, record_dispatch() as ev:
        out = fn(x, weight, bias)
        (dx,) = torch.autograd.grad(out.sum(), x)
    op = "conv_relu_pool" if pool else "conv_relu"
    assert (op, "triton", "dgrad:triton") in ev and not any(e[2].startswith("wgrad") for e in ev)  # no wgrad
    x64 = x.detach().double().requires_grad_()
    ref = conv_relu_ref(x64, weight.double(), bias.double(), 1, pool=pool)
    (dref,) = torch.autograd.grad(ref.sum(), x64)
    assert_close64(out, ref, "out")
    assert_close64(dx, dref, "dx")


@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
def test_empty_batch_and_zero_input_channels(pool) -> None:
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with ptfast.use_backend("triton"), conv_config.use_algos("implicit_gemm", "triton", "triton"):
        x = torch.randn(0, 5, 6, 7, requires_grad=True)
        weight = torch.randn(7, 5, 3, 3, requires_grad=True)
        bias = torch.randn(7, requires_grad=True)
        out = fn(x, weight, bias)
        assert out.shape == ((0, 7, 3, 3) if pool else (0, 7, 6, 7))
        dx, dw, db = torch.autograd.grad(out.sum(), (x, weight, bias))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros(7))
        # Cin = 0: the convolution is empty and the output is relu(bias) (pooled: the same).
        bias = torch.randn(7, requires_grad=True)
        w0 = torch.randn(7, 0, 3, 3, requires_grad=True)
        out0 = fn(torch.randn(2, 0, 6, 7), w0, bias)
        grad0 = torch.randn_like(out0)
        dw0, db0 = torch.autograd.grad(out0, (w0, bias), grad0)
    expected = torch.relu(bias.detach()).view(1, 7, 1, 1).expand(out0.shape)
    assert torch.equal(out0, expected) and dw0.shape == w0.shape
    torch.testing.assert_close(db0, (grad0 * (out0 > 0)).sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("layout", list(FORMATS))
def test_patched_tiny_vgg_matches_stock(layout) -> None:
    stock = tiny_vgg()
    model = ptfast.patch(copy.deepcopy(stock))
    x = torch.randn(2, 3, 19, 17).contiguous(memory_format=FORMATS[layout])
    algos = conv_config.use_algos("implicit_gemm", "triton", "triton")
    with ptfast.use_backend("triton"), algos, record_dispatch() as ev:
        out = model(x)
        out.sum().backward()
    for op in ("conv_relu", "conv_relu_pool"):
        assert_ran(ev, op, "triton", ("forward", "backward", "forward:implicit_gemm", "wgrad:triton"))
    ref = stock(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), stock.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
