"""conv_relu with stride 2, any odd square kernel (1x1, 3x3, 7x7) and a residual, on the torch backend.

Every case is checked against the float64 oracle (tests/oracles/conv.py): forward and the gradients of x,
weight, bias and residual; low precision by DESIGN §4's rule against PyTorch's own ops in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, conv_inputs, conv_params
from tests.oracles.conv import conv_relu_ref

# (kernel, stride, padding, H, W): the ResNet shapes (3x3 s1/s2, 1x1 s1/s2 for Bottleneck and downsample, the
# 7x7 s2 stem) on odd, non-square images.
GEOMETRIES = [(3, 1, 1, 9, 7), (3, 2, 1, 9, 8), (1, 1, 0, 7, 5), (1, 2, 0, 9, 6), (7, 2, 3, 13, 11)]
GEOMETRY_IDS = ["3x3s1", "3x3s2", "1x1s1", "1x1s2", "7x7s2"]


def _residual(x, weight, stride, padding, dtype, fmt, seed=7):
    n, _, h, w = x.shape
    cout, _, k, _ = weight.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, cout, ho, wo, dtype=torch.float64, generator=gen)
    return r.to(dtype).contiguous(memory_format=fmt).requires_grad_()


def _stock(x, weight, bias, stride, padding, residual):
    z = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    return F.relu(z + residual if residual is not None else z)


@pytest.mark.parametrize(("k", "stride", "padding", "h", "w"), GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fp32_matches_oracle(k, stride, padding, h, w, residual, fmt):
    x, weight, bias = conv_inputs(3, 5, 7, h, w, k, torch.float32, fmt, with_bias=True)
    res = _residual(x, weight, stride, padding, torch.float32, fmt) if residual else None
    leaves = conv_params(x, weight, bias) + ([res] if residual else [])
    with record_dispatch() as events:
        out = ptfast.conv_relu(x, weight, bias, stride=stride, padding=padding, residual=res)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
    assert_ran(events, "conv_relu", "torch", ("forward", "backward"))
    ref = conv_relu_ref(x, weight, bias, padding, stride=stride, residual=res)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert out.shape == ref.shape and out.is_contiguous(memory_format=fmt)
    assert_close64(out, ref, "out")
    for name, g, r in zip(("dx", "dweight", "dbias", "dresidual"), got, want, strict=False):
        assert g.shape == r.shape
        assert_close64(g, r, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 2, 1), (1, 2, 0), (7, 2, 3)], ids=["3x3", "1x1", "7x7"])
def test_low_precision_rule(dtype, k, stride, padding):
    fmt = torch.channels_last
    x, weight, bias = conv_inputs(3, 13, 11, 17, 15, k, dtype, fmt, with_bias=True, seed=3)
    res = _residual(x, weight, stride, padding, dtype, fmt)
    leaves = [x, weight, bias, res]
    out = ptfast.conv_relu(x, weight, bias, stride=stride, padding=padding, residual=res)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    base = _stock(x, weight, bias, stride, padding, res)
    base_grads = torch.autograd.grad(base, leaves, grad)
    ref = conv_relu_ref(x, weight, bias, padding, stride=stride, residual=res)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert out.dtype == dtype
    assert_rule(out, base, ref, "out")
    for name, g, gb, r in zip(("dx", "dweight", "dbias", "dresidual"), got, base_grads, want, strict=True):
        assert g.dtype == dtype
        assert_rule(g, gb, r, name)


def test_fp64_gradcheck():
    x, weight, bias = conv_inputs(2, 3, 4, 7, 6, 3, torch.float64, torch.contiguous_format, with_bias=True)
    res = _residual(x, weight, 2, 1, torch.float64, torch.contiguous_format)

    def fn(x, weight, bias, res):
        return ptfast.conv_relu(x, weight, bias, stride=2, padding=1, residual=res)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, res))


def test_residual_only_needs_grad():
    """A frozen conv with a trainable residual branch: only the residual gets a gradient (the conv saves no x)."""
    x, weight, bias = conv_inputs(2, 5, 6, 9, 9, 3, torch.float32, torch.channels_last, with_bias=True)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    res = _residual(x, weight, 2, 1, torch.float32, torch.channels_last)
    out = ptfast.conv_relu(x, weight, bias, stride=2, padding=1, residual=res)
    grad = torch.randn_like(out)
    (dres,) = torch.autograd.grad(out, res, grad)
    ref = conv_relu_ref(x, weight, bias, 1, stride=2, residual=res)
    (want,) = torch.autograd.grad(ref, res, grad.double())
    assert_close64(dres, want, "dresidual")


def test_residual_in_another_layout_is_accepted():
    """The residual is read in the output's layout: an NCHW residual next to channels_last x still matches."""
    x, weight, bias = conv_inputs(2, 5, 6, 9, 8, 3, torch.float32, torch.channels_last, with_bias=True)
    res = _residual(x, weight, 1, 1, torch.float32, torch.contiguous_format)
    out = ptfast.conv_relu(x, weight, bias, padding=1, residual=res)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close64(out, conv_relu_ref(x, weight, bias, 1, residual=res), "out")


def test_empty_batch_and_frozen_no_grad():
    x, weight, bias = conv_inputs(0, 5, 6, 9, 8, 3, torch.float32, torch.channels_last, with_bias=True)
    res = torch.randn(0, 6, 5, 4).requires_grad_()
    out = ptfast.conv_relu(x, weight, bias, stride=2, residual=res)
    assert out.shape == (0, 6, 5, 4)
    out.sum().backward()
    assert res.grad.shape == res.shape
    with torch.no_grad():
        x2, w2, b2 = conv_inputs(2, 5, 6, 9, 8, 3, torch.float32, torch.channels_last, with_bias=True)
        out = ptfast.conv_relu(x2, w2, b2, stride=2, residual=torch.randn(2, 6, 5, 4))
    assert not out.requires_grad


def test_compile_fullgraph_matches_eager():
    x, weight, bias = conv_inputs(2, 5, 6, 9, 8, 3, torch.float32, torch.channels_last, with_bias=True)
    res = _residual(x, weight, 2, 1, torch.float32, torch.channels_last)

    def step(x, weight, bias, res):
        return ptfast.conv_relu(x, weight, bias, stride=2, padding=1, residual=res).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, weight, bias, res)
    grads_c = torch.autograd.grad(loss_c, (x, weight, bias, res))
    loss_e = step(x, weight, bias, res)
    grads_e = torch.autograd.grad(loss_e, (x, weight, bias, res))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias = conv_inputs(2, 3, 4, 9, 8, 3, torch.float32, fmt, with_bias=True)
    x = x.detach()
    res = _residual(x, weight, 2, 1, torch.float32, fmt)
    opcheck(torch.ops.ptfast.conv_relu.default, (x, weight, bias, res, 2, 1, False, False, "torch"))
    out, argmax = torch.ops.ptfast.conv_relu(
        x, weight.detach(), bias.detach(), res.detach(), 2, 1, False, False, "torch"
    )
    grad = torch.randn_like(out)
    args = (grad, out, argmax, x, weight.detach(), list(x.shape), channels_last, 2, 1, False, True, True, True, True)
    opcheck(torch.ops.ptfast.conv_relu_backward.default, (*args, "torch"))


def test_validation_errors():
    x, weight, bias = conv_inputs(2, 3, 4, 9, 8, 3, torch.float32, torch.contiguous_format, with_bias=True)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ptfast.conv_relu(x, weight, bias, stride=3)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ptfast.conv_relu(x, weight, bias, stride=True)
    with pytest.raises(ValueError, match="residual has shape"):
        ptfast.conv_relu(x, weight, bias, stride=2, residual=torch.randn(2, 4, 9, 8))
    with pytest.raises(ValueError, match="residual has shape"):  # no broadcasting
        ptfast.conv_relu(x, weight, bias, residual=torch.randn(1, 4, 9, 8))
    with pytest.raises(TypeError, match="dtype"):
        ptfast.conv_relu(x, weight, bias, residual=torch.randn(2, 4, 9, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 dimensions"):
        ptfast.conv_relu(x, weight, bias, residual=torch.randn(4, 9, 8))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ptfast.conv_relu(x[..., :2, :2], weight, bias, stride=2, padding=0)
