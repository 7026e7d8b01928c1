"""``auto``'s CPU route for conv_relu(_pool) and add_relu: PyTorch's own differentiable ops instead of the op's
custom Function (backends/torch/conv.py ``eager_forward``, ops/add_relu.py ``add_relu_into``).

It must give what the op gives, including the contract's one difference from stock (a NaN output passes no
gradient: the op then runs), be recorded as the torch backend forward and backward, and be taken only where it
applies. The float64 oracle tests of both paths are tests/test_conv.py's (``route`` parameter).
"""

from __future__ import annotations

import math

import pytest
import torch

import ptfast
from ptfast.ops.add_relu import add_relu_into
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, autograd_node_names


def _leaves(n=3, cin=6, cout=5, h=11, w=9, channels_last=False, seed=0, residual=False, stride=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.3
    leaves = [x, weight, bias]
    if residual:
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        r = torch.randn(n, cout, ho, wo, generator=g)
        leaves.append(r.contiguous(memory_format=torch.channels_last) if channels_last else r)
    return [t.requires_grad_() for t in leaves]


def _call(kind, leaves, stride=1):
    if kind == "pool":
        return ptfast.conv_relu_pool(*leaves[:3])
    return ptfast.conv_relu(*leaves[:3], stride=stride, residual=leaves[3] if len(leaves) > 3 else None)


def _names(out):
    return autograd_node_names(out.grad_fn)


def _run(kind, leaves, grad_seed=1, stride=1):
    with record_dispatch() as events:
        out = _call(kind, leaves, stride)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
        grads = torch.autograd.grad(out, leaves, grad)
    return out, grads, events


CASES = [("pool", {}), ("relu", {}), ("relu", {"residual": True, "stride": 2})]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind,extra", CASES, ids=["pool", "relu", "relu_residual_s2"])
def test_auto_route_gives_what_the_op_gives(kind, extra, channels_last):
    stride = extra.get("stride", 1)
    leaves = _leaves(channels_last=channels_last, residual=extra.get("residual", False), stride=stride)
    out, grads, events = _run(kind, leaves, stride=stride)
    assert not any(n.endswith("_eagerBackward") for n in _names(out)), _names(out)  # PyTorch's nodes only
    assert_ran(events, "conv_relu_pool" if kind == "pool" else "conv_relu", "torch", ("forward", "backward"))
    with ptfast.use_backend("torch"):
        want, want_grads, _ = _run(kind, leaves, stride=stride)
    assert _names(want)[0].endswith("_eagerBackward")
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        # Layouts of gradients are autograd's here (the channels-last convolution's dx is channels-last); what
        # lands in a leaf's .grad takes the leaf's layout all the same (AccumulateGrad's layout contract).
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _call(kind, leaves, stride).sum().backward()
    for leaf in leaves:
        assert leaf.grad.stride() == leaf.stride()


@pytest.mark.parametrize("kind", ["pool", "relu"])
def test_a_nan_output_runs_the_op_so_it_passes_no_gradient(kind):
    """ReLU's own backward passes a NaN output's gradient on; the contract (and the op) gives 0 there."""
    leaves = _leaves(cin=1, cout=1, seed=2)  # one channel in and out: a NaN stays where it is put
    with torch.no_grad():
        leaves[0][0, 0, 4, 4] = math.nan
    out, grads, _ = _run(kind, leaves)
    assert out.isnan().any() and _names(out)[0].endswith("_eagerBackward")
    with ptfast.use_backend("torch"):
        want, want_grads, _ = _run(kind, leaves)
    assert torch.equal(out.isnan(), want.isnan())
    for got, ref in zip(grads, want_grads, strict=True):
        assert torch.equal(got.isnan(), ref.isnan())
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient: the route's values are the op's, NaN included
        again = _call(kind, leaves)
    assert torch.equal(again.isnan(), want.isnan())


def test_the_route_is_auto_and_cpu_eager_only():
    leaves = _leaves()
    with ptfast.use_backend("torch"):
        assert _names(_call("relu", leaves))[0] == "conv_relu_eagerBackward"
    empty = _leaves(n=0)
    assert _names(_call("pool", empty))[0] == "conv_relu_eagerBackward"  # PyTorch's pooling refuses empty input
    compiled = torch.compile(lambda *t: _call("relu", t), fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    torch.testing.assert_close(out, _call("relu", leaves), rtol=1e-6, atol=1e-6)  # the op, under compile


def test_backward_is_recorded_only_while_recording():
    """The route's backward record is a hook on the output's node, added only inside record_dispatch: outside,
    backward runs no Python at all."""
    leaves = _leaves()
    out = _call("pool", leaves)
    with record_dispatch() as events:
        out.sum().backward()
    assert events == []
    with record_dispatch() as events:
        _call("pool", leaves).sum().backward()
    assert sorted(events) == [("conv_relu_pool", "torch", "backward"), ("conv_relu_pool", "torch", "forward")]


def _add_leaves(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 7, 9, generator=g).requires_grad_() for _ in range(2)]


def test_add_relu_route_and_add_relu_into():
    x, r = _add_leaves()
    grad = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(4))
    with record_dispatch() as events:
        out = ptfast.add_relu(x, r)
        got = torch.autograd.grad(out, (x, r), grad)
    assert _names(out)[:2] == ["ReluBackward0", "AddBackward0"]
    assert sorted(set(events)) == [("add_relu", "torch", "forward")]  # its backward is ReLU's: no backend's
    with ptfast.use_backend("torch"):
        want = ptfast.add_relu(x, r)
        want_grads = torch.autograd.grad(want, (x, r), grad)
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(got, want_grads, strict=True))

    # add_relu_into: a fresh temporary (as in a ResNet block's tail) is written into on the route, as stock's
    # `out += identity; relu(out)`; elsewhere it is left alone. Same values and gradients either way.
    for backend in ("auto", "torch"):
        y = x * 1.0  # fresh, read by nothing else
        with ptfast.use_backend(backend):
            res = add_relu_into(y, r)
        assert (res.data_ptr() == y.data_ptr()) == (backend == "auto")
        assert torch.equal(res, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(res, (x, r), grad), want_grads, strict=True))
