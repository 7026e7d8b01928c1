"""conv_relu / conv_relu_pool on the torch backend against the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, ran_the_op
from tests.oracles.conv import conv_relu_ref


def _make(n=2, cin=3, cout=5, h=9, w=7, k=(3, 3), dtype=torch.float32, channels_last=False, bias=True):
    x = torch.randn(n, cin, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, *k) / (cin * k[0] * k[1]) ** 0.5).to(dtype)
    b = torch.randn(cout, dtype=dtype) * 0.3 if bias else None
    return x, weight, b


def _torch_same_dtype(x, weight, bias, padding, pool):
    y = F.relu(F.conv2d(x, weight, bias, padding=padding))
    return F.max_pool2d(y, 2, 2) if pool else y


def _grads(out, inputs, grad):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad)


# "auto": on a CPU, eager, PyTorch's own differentiable ops (backends/torch/conv.py, eager_forward); "torch": the
# explicit backend, the op with its own backward. Both are the torch backend and both must meet the oracle.
ROUTES = pytest.mark.parametrize("route", ["auto", "torch"], ids=["auto_route", "op"])


@ROUTES
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k,padding", [((3, 3), 1), ((1, 1), 0), ((2, 3), 0), ((3, 3), 2)])
def test_fp32_matches_oracle(pool, channels_last, bias, k, padding, route):
    x, weight, b = _make(k=k, channels_last=channels_last, bias=bias)
    params = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with record_dispatch() as events, ptfast.use_backend(route):
        out = fn(x, weight, b, padding=padding)
        grad = torch.randn_like(out)
        got = _grads(out, (x, weight, b), grad)
    assert_ran(events, "conv_relu_pool" if pool else "conv_relu", "torch", ("forward", "backward"))
    assert ran_the_op(out) == (route == "torch")

    ref = conv_relu_ref(x, weight, b, padding, pool)
    want = torch.autograd.grad(ref, params, grad.double())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close64(out, ref, "out")
    for name, g, r in zip(("dx", "dweight", "dbias")[: len(got)], got, want, strict=True):
        assert_close64(g, r, name)


@ROUTES
@pytest.mark.parametrize("pool", [False, True], ids=["relu", "relu_pool"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision_rule(pool, dtype, channels_last, route):
    x, weight, b = _make(n=3, cin=13, cout=11, h=15, w=13, dtype=dtype, channels_last=channels_last)
    for t in (x, weight, b):
        t.requires_grad_()
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with ptfast.use_backend(route):
        out = fn(x, weight, b)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, weight, b), grad)
    assert ran_the_op(out) == (route == "torch")
    base = _torch_same_dtype(x, weight, b, 1, pool)
    base_grads = torch.autograd.grad(base, (x, weight, b), grad)
    ref = conv_relu_ref(x, weight, b, 1, pool)
    want = torch.autograd.grad(ref, (x, weight, b), grad.double())
    assert out.dtype == dtype
    assert_rule(out, base, ref, "out")
    for name, g, gb, r in zip(("dx", "dweight", "dbias"), got, base_grads, want, strict=True):
        assert g.dtype == dtype
        assert_rule(g, gb, r, name)


def test_fp64_gradcheck():
    x, weight, b = _make(n=1, cin=2, cout=3, h=5, w=6, dtype=torch.float64)
    for t in (x, weight, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ptfast.conv_relu(*a), (x, weight, b))
    assert torch.autograd.gradcheck(lambda *a: ptfast.conv_relu_pool(*a), (x, weight, b))


def test_pool_ties_go_to_first_maximum():
    # A 1x1 identity convolution makes the conv output equal the (small-integer) input, so windows tie exactly.
    x = torch.tensor([[[[3.0, 3.0, 1.0, 2.0, 7.0], [3.0, 1.0, 2.0, 2.0, 7.0], [0.0, 5.0, 5.0, 4.0, 9.0]]]])
    x.requires_grad_()
    weight = torch.ones(1, 1, 1, 1)
    out = ptfast.conv_relu_pool(x, weight, None, padding=0)
    (dx,) = torch.autograd.grad(out, x, torch.tensor([[[[10.0, 20.0]]]]))
    assert out.tolist() == [[[[3.0, 2.0]]]]
    expected = torch.zeros_like(x)
    expected[0, 0, 0, 0] = 10.0  # first of the three 3s in row-major order
    expected[0, 0, 0, 3] = 20.0  # first of the three 2s; row 2 and column 4 are floored away
    assert torch.equal(dx, expected)
    ref = conv_relu_ref(x, weight, None, 0, pool=True)
    (dref,) = torch.autograd.grad(ref, x, torch.tensor([[[[10.0, 20.0]]]], dtype=torch.float64))
    assert torch.equal(dx.double(), dref)


def test_nan_propagates():
    x, weight, b = _make(n=1, cin=2, cout=3, h=6, w=6)
    x[0, 1, 2, 3] = float("nan")
    for pool in (False, True):
        fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
        out = fn(x, weight, b)
        ref = _torch_same_dtype(x, weight, b, 1, pool)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()


@pytest.mark.parametrize("pool", [False, True])
def test_empty_batch(pool):
    x, weight, b = _make(n=0)
    for t in (x, weight, b):
        t.requires_grad_()
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    out = fn(x, weight, b)
    assert out.shape == ((0, 5, 4, 3) if pool else (0, 5, 9, 7))
    dx, dw, db = torch.autograd.grad(out.sum(), (x, weight, b))
    assert dx.shape == x.shape and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("pool", [False, True])
def test_frozen_weights_and_no_grad(pool):
    x, weight, b = _make()
    x.requires_grad_()
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    out = fn(x, weight, b)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    ref = conv_relu_ref(x, weight, b, 1, pool)
    (dref,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    assert_close64(dx, dref, "dx with frozen weight")
    with torch.no_grad():
        out_ng = fn(x, weight, b)
    assert not out_ng.requires_grad
    assert_close64(out_ng, ref, "no_grad out")
    # Forward-only path keeps no argmax.
    _, argmax = torch.ops.ptfast.conv_relu(x.detach(), weight, b, None, 1, 1, pool, False, "torch")
    assert argmax.numel() == 0


def test_autocast_bf16():
    x, weight, b = _make(n=2, cin=4, cout=6, h=8, w=9)
    weight.requires_grad_()
    b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ptfast.conv_relu_pool(x, weight, b)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = conv_relu_ref(x, weight, b, 1, pool=True)
    base = F.max_pool2d(F.relu(F.conv2d(x.bfloat16(), weight.bfloat16(), b.bfloat16(), padding=1)), 2, 2)
    assert_rule(out, base, ref, "autocast out")


@pytest.mark.parametrize("pool", [False, True])
def test_compile_fullgraph_matches_eager(pool):
    x, weight, b = _make(channels_last=True)
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu

    def step(x, weight, b):
        return (fn(x, weight, b) * 1.5).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = [weight.clone().requires_grad_(), b.clone().requires_grad_()]
    loss_c = compiled(x, *params)
    grads_c = torch.autograd.grad(loss_c, params)
    params_e = [weight.clone().requires_grad_(), b.clone().requires_grad_()]
    loss_e = step(x, *params_e)
    grads_e = torch.autograd.grad(loss_e, params_e)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("need_argmax", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(pool, need_argmax, channels_last):
    # channels_last: the backward's fake kernel must promise dx in x's layout (it once said contiguous).
    x, weight, b = _make(n=2, cin=3, cout=4, h=7, w=8, channels_last=channels_last)
    # A pooled forward without its argmax is what the wrapper runs when nothing needs a gradient (its backward
    # cannot route one and refuses to).
    weight.requires_grad_(need_argmax or not pool)
    opcheck(torch.ops.ptfast.conv_relu.default, (x, weight, b, None, 1, 1, pool, need_argmax and pool, "torch"))
    out, argmax = torch.ops.ptfast.conv_relu(x, weight.detach(), b, None, 1, 1, pool, pool, "torch")
    grad = torch.randn_like(out)
    args = (grad, out, argmax, x, weight.detach(), list(x.shape), channels_last, 1, 1, pool, True, True, True, False)
    opcheck(torch.ops.ptfast.conv_relu_backward.default, (*args, "torch"))


def test_pooled_backward_without_argmax_is_refused():
    x, weight, b = _make(n=2, cin=3, cout=4, h=7, w=8)
    out, argmax = torch.ops.ptfast.conv_relu(x, weight, b, None, 1, 1, True, False, "torch")
    assert argmax.numel() == 0
    args = (torch.ones_like(out), out, argmax, x, weight, list(x.shape), False, 1, 1, True, True, True, True, False)
    with pytest.raises(RuntimeError, match="without its argmax"):
        torch.ops.ptfast.conv_relu_backward(*args, "torch")


@pytest.mark.parametrize(
    ("cout", "size", "pool"),
    [(1, 7, False), (1, 7, True), (4, 3, False), (4, 4, True)],
    ids=["one-channel", "one-channel-pooled", "one-pixel", "one-pixel-pooled"],
)
def test_dx_keeps_x_layout_when_the_output_layout_is_ambiguous(cout, size, pool):
    """Regression (found by the property tests): with one output channel, or a 1x1 (pooled) output, the output is
    both contiguous and channels_last; dx was laid out like the output (NCHW) instead of like x (channels_last)."""
    x, weight, b = _make(n=2, cin=3, cout=cout, h=size, w=size, channels_last=True)
    x.requires_grad_()
    padding = 0 if cout == 4 else 1  # 3x3 -> 1x1; 4x4 -> 2x2, pooled to 1x1
    out = (ptfast.conv_relu_pool if pool else ptfast.conv_relu)(x, weight, b, padding=padding)
    assert out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)  # ambiguous
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert dx.is_contiguous(memory_format=torch.channels_last) and not dx.is_contiguous()


def test_validation_errors():
    x, weight, b = _make()
    with pytest.raises(ValueError, match="4 dimensions"):
        ptfast.conv_relu(x[0], weight, b)
    with pytest.raises(TypeError, match="dtype"):
        ptfast.conv_relu(x.to(torch.int32), weight, b)
    with pytest.raises(ValueError, match="channels"):
        ptfast.conv_relu(x[:, :2], weight, b)
    with pytest.raises(ValueError, match="bias has 4 entries"):
        ptfast.conv_relu(x, weight, b[:4])
    with pytest.raises(ValueError, match="padding"):
        ptfast.conv_relu(x, weight, b, padding=-1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ptfast.conv_relu(x[..., :2, :2], weight, b, padding=0)
    with pytest.raises(ValueError, match="too small for 2x2"):
        ptfast.conv_relu_pool(x[..., :1, :], weight, b, padding=1)
    with pytest.raises(TypeError, match="dtype"):
        ptfast.conv_relu(x, weight.double(), b)
    with pytest.raises(ValueError, match="is on meta"):
        ptfast.conv_relu(x, weight.to("meta"), b)


def test_explicit_backend_that_cannot_run_raises():
    x, weight, b = _make()
    with ptfast.use_backend("cuda"), pytest.raises(ptfast.BackendNotSupportedError, match="cuda"):
        ptfast.conv_relu(x, weight, b)
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="triton"):
        ptfast.conv_relu_pool(x, weight, b)


def test_pool_argmax_takes_the_first_nan_and_the_first_maximum():
    """PyTorch's pooling kernel keeps the last NaN of a window; the contract (and the GPU kernels) the first.
    A 1x1 conv with weight 1 on one channel (more channels would spread a NaN through the zero weights), so the
    conv output is the input: windows with several NaNs, one NaN, a tie, and none."""
    z = torch.randn(4, 1, 6, 7)
    z[0, 0, 0, 0] = z[0, 0, 1, 1] = math.nan  # window (0, 0): NaN at offsets 0 and 3 -> 0
    z[1, 0, 2, 3] = z[1, 0, 3, 2] = z[1, 0, 3, 3] = math.nan  # window (1, 1): offsets 1, 2, 3 -> 1
    z[2, 0, 4, 5] = math.nan  # window (2, 2): offset 1 only
    z[3, 0, 0, 2] = z[3, 0, 0, 3] = z[3, 0, 1, 2] = z[3, 0, 1, 3] = 5.0  # window (0, 1): a 4-way tie -> 0
    out, argmax = torch.ops.ptfast.conv_relu(z, torch.ones(1, 1, 1, 1), None, None, 1, 0, True, True, "torch")
    windows = z[:, :, :6, :6].reshape(4, 1, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(4, 1, 3, 3, 4)
    nan = windows.isnan()
    first_nan = torch.where(nan.any(-1), nan.to(torch.uint8).argmax(-1), -1)
    want = torch.where(first_nan >= 0, first_nan, windows.nan_to_num(-math.inf).argmax(-1))
    assert argmax.dtype == torch.uint8 and torch.equal(argmax.long(), want)
    assert (argmax[0, 0, 0, 0], argmax[1, 0, 1, 1], argmax[2, 0, 2, 2], argmax[3, 0, 0, 1]) == (0, 1, 1, 0)
    assert out[0, 0, 0, 0].isnan() and out[1, 0, 1, 1].isnan() and out[2, 0, 2, 2].isnan()
    torch.testing.assert_close(out, F.max_pool2d(F.relu(z), 2, 2), equal_nan=True)


def _first_of_each_window(z: torch.Tensor) -> torch.Tensor:
    """The contract's window offset (row-major 0..3): the first NaN, else the first maximum."""
    n, c, h, w = z.shape
    ho, wo = h // 2, w // 2
    windows = z[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)
    nan = windows.isnan()
    first_nan = torch.where(nan.any(-1), nan.to(torch.uint8).argmax(-1), -1)
    return torch.where(first_nan >= 0, first_nan, windows.nan_to_num(-math.inf).argmax(-1))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_pool_argmax_contract_holds_with_several_channels(channels_last):
    """On a CPU the fp32 conv and pool run in channels-last whatever x's layout (backends/torch/conv.py), where
    PyTorch's pooling kernel is another one than for NCHW: ties still go to the first maximum, NaN windows to the
    first NaN, and the gradients follow. An identity 1x1 conv over small integers: many exact ties."""
    c = 3
    x = torch.randint(-3, 4, (2, c, 6, 7), generator=torch.Generator().manual_seed(5)).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.eye(c).view(c, c, 1, 1)
    out, argmax = torch.ops.ptfast.conv_relu(x, weight, None, None, 1, 0, True, True, "torch")
    assert torch.equal(argmax.long(), _first_of_each_window(x))
    x.requires_grad_()
    grad = torch.randn(2, c, 3, 3, generator=torch.Generator().manual_seed(6))
    (dx,) = torch.autograd.grad(ptfast.conv_relu_pool(x, weight, None, padding=0), x, grad)
    ref = conv_relu_ref(x, weight, None, 0, pool=True)
    (dref,) = torch.autograd.grad(ref, x, grad.double())
    assert torch.equal(dx.double(), dref)

    nan_x = x.detach().clone()  # a NaN reaches every channel through the zero weights (0 * NaN)
    nan_x[0, 1, 0, 0] = nan_x[0, 1, 1, 1] = nan_x[1, 2, 3, 3] = nan_x[1, 0, 2, 2] = math.nan
    out, argmax = torch.ops.ptfast.conv_relu(nan_x, weight, None, None, 1, 0, True, True, "torch")
    z = F.conv2d(nan_x.double(), weight.double())
    assert torch.equal(argmax.long(), _first_of_each_window(z))
    assert torch.equal(out.isnan(), F.max_pool2d(z, 2, 2).isnan())


@pytest.mark.parametrize("cin", [1, 3], ids=["one_channel", "three_channels"])
def test_cpu_fp32_pooling_runs_channels_last(monkeypatch, cin):
    """The intended path ran: on a CPU the fp32 conv + pool forward runs channels-last (its NCHW pooling kernel is
    ~20x slower), one input channel included (ambiguous strides), and the results come back in x's layout."""
    seen = []
    real_conv2d = F.conv2d

    def spy(x, *args, **kwargs):
        z = real_conv2d(x, *args, **kwargs)
        seen.append((z.dtype, z.stride(1) == 1))
        return z

    monkeypatch.setattr(F, "conv2d", spy)
    x, weight, b = _make(cin=cin)
    out = ptfast.conv_relu_pool(x, weight, b)
    assert seen == [(torch.float32, True)] and out.is_contiguous()
    ptfast.conv_relu_pool(x.double(), weight.double(), b.double())
    assert seen[1] == (torch.float64, False)  # fp64 is not oneDNN's: it stays in x's layout


def test_cpu_relu_mask_equals_the_where_mask_of_other_devices():
    """The torch backend's ReLU mask in backward: on a CPU threshold_backward plus a NaN fix-up, elsewhere
    ``where(out > 0, grad, 0)``. Same bits for every pattern: NaN / inf outputs, NaN / inf gradients under
    ``out <= 0``, zeros, and (fp32 / bf16) with no NaN output at all."""
    from ptfast.backends.torch import conv as torch_conv

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.relu(torch.randn(3, 5, 7, 9, generator=g)).to(dtype)
        grad = torch.randn(3, 5, 7, 9, generator=g).to(dtype)
        assert torch.equal(torch_conv._relu_grad(grad, out), torch.where(out > 0, grad, 0.0))
        out[0, 1, 2, 3], out[1, 0, 0, 0], out[2, 4, 6, 8] = math.nan, math.inf, 0.0
        grad[0, 1, 2, 3], grad[2, 4, 6, 8], grad[2, 0, 1, 1] = 1.5, math.nan, math.inf
        out[2, 0, 1, 1] = 0.0
        got = torch_conv._relu_grad(grad, out)
        assert torch.equal(got, torch.where(out > 0, grad, 0.0))
        assert got[0, 1, 2, 3] == 0 and got[2, 4, 6, 8] == 0 and got[2, 0, 1, 1] == 0
