"""``ptfast.add_relu`` on the torch backend: the oracle in every dtype and layout, edge cases, validation,
autograd, ``opcheck``, ``torch.compile``, and what a ResNet's training-mode block tail runs."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import ptfast
from ptfast.testing import record_dispatch
from tests import add_relu_cases as cases


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_oracle(dtype, layout):
    cases.check("torch", (3, 5, 7, 9), dtype, layout)


def test_edge_cases():
    cases.check_edge_cases("torch", torch.float32)


def test_auto_on_cpu_runs_torch():
    x, r = cases.inputs((2, 3, 5, 7), torch.float32, torch.contiguous_format)
    with record_dispatch() as events:
        ptfast.add_relu(x, r).sum().backward()
    assert ("add_relu", "torch", "forward") in events


def test_residual_in_another_layout_and_one_input_needing_grad():
    x, r = cases.inputs((2, 5, 7, 3), torch.float64, torch.channels_last)
    r_nchw = r.detach().contiguous()  # read in x's layout; needs no gradient
    out = ptfast.add_relu(x, r_nchw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.relu(x + r_nchw), rtol=0, atol=0)
    (dx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(dx, (x + r_nchw > 0).double(), rtol=0, atol=0)


def test_fp64_gradcheck():
    x, r = cases.inputs((2, 3, 4, 5), torch.float64, torch.contiguous_format, seed=3)
    torch.autograd.gradcheck(ptfast.add_relu, (x, r))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x, r = cases.inputs((2, 3, 5, 7), torch.float32, cases.FORMATS[layout], seed=5)
    opcheck(torch.ops.ptfast.add_relu.default, (x, r, "torch"))


def test_compile_fullgraph_matches_eager():
    x, r = cases.inputs((2, 3, 5, 7), torch.float32, torch.channels_last, seed=9)

    def step(a, b):
        return (ptfast.add_relu(a, b) * torch.arange(7.0)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, r)
    grads_c = torch.autograd.grad(loss_c, (x, r))
    loss_e = step(x, r)
    grads_e = torch.autograd.grad(loss_e, (x, r))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_validation_errors():
    x = torch.randn(2, 3, 5, 7)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ptfast.add_relu(x, 1.0)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        ptfast.add_relu(x[0], x[0])
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but x has torch.float32"):
        ptfast.add_relu(x, x.half())
    with pytest.raises(ValueError, match="without broadcasting"):
        ptfast.add_relu(x, x[:, :1])
    with pytest.raises(TypeError, match="x must have dtype"):
        ptfast.add_relu(x.int(), x.int())
    with pytest.raises(ptfast.BackendNotSupportedError, match="float64"), ptfast.use_backend("triton"):
        ptfast.add_relu(x.double(), x.double())
