"""The eager direct call of ptfast's registered ops (:mod:`ptfast._eager`) against the ``torch.library`` op.

An eager call runs the op's body directly (inside an ``autograd.Function`` made of the op's own setup_context and
backward); compiling, tracing, dispatch modes and tensor subclasses go through the registered op. Both must
compute bitwise the same forward and gradients, run the same backend, and the library op must stay what modes see.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptfast
from ptfast import _eager
from ptfast.ops import add_relu as add_relu_mod
from ptfast.ops import attention as attention_mod
from ptfast.ops import conv as conv_mod
from ptfast.ops import masked_lm_loss as mlm_mod
from ptfast.testing import record_dispatch
from tests.helpers import autograd_node_names


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _explicit_torch(call):  # noqa: ANN001, ANN202
    """``call`` on the explicit torch backend: under ``auto`` an eager CPU call of conv_relu(_pool), add_relu,
    attention's whole-input plan and its dropout, and masked_lm_loss's mean / sum runs PyTorch's own
    differentiable ops, not the op (tests/test_conv_autograd_route.py, tests/test_attention_saved_lse.py,
    tests/test_attention_dropout.py, tests/test_masked_lm_loss_route.py)."""

    def run(t):  # noqa: ANN001, ANN202
        with ptfast.use_backend("torch"):
            return call(t)

    return run


def _cases():
    """(name, make leaves, call(leaves) -> output) for each public op, odd sizes, grads on every float input."""

    def conv_leaves():
        g = _g(1)
        x = torch.randn(2, 5, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
        return [x, torch.randn(7, 5, 3, 3, generator=g) * 0.3, torch.randn(7, generator=g)]

    def res_leaves():
        g = _g(2)
        return [*conv_leaves(), torch.randn(2, 7, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)]

    def attn_leaves():
        g = _g(3)
        return [torch.randn(2, 3, 13, 16, generator=g) for _ in range(3)]

    def mlm_leaves():
        g = _g(4)
        hidden, bias = torch.randn(3, 17, 24, generator=g), torch.randn(37, generator=g)
        return [hidden, torch.randn(37, 24, generator=g) * 0.2, bias]

    def add_leaves():
        g = _g(6)
        return [torch.randn(2, 5, 7, 9, generator=g) for _ in range(2)]

    key_mask = torch.ones(2, 13, dtype=torch.bool)
    key_mask[1, 9:] = False
    labels = torch.randint(0, 37, (3, 17), generator=_g(5))
    labels[0, :5] = -100
    return [
        ("add_relu", add_leaves, _explicit_torch(lambda t: ptfast.add_relu(*t))),
        ("conv_relu", conv_leaves, _explicit_torch(lambda t: ptfast.conv_relu(*t))),
        (
            "conv_relu s2 + residual",
            res_leaves,
            _explicit_torch(lambda t: ptfast.conv_relu(*t[:3], stride=2, residual=t[3])),
        ),
        ("conv_relu_pool", conv_leaves, _explicit_torch(lambda t: ptfast.conv_relu_pool(*t))),
        (
            "attention dropout",
            attn_leaves,
            _explicit_torch(lambda t: ptfast.attention(*t, key_mask=key_mask, dropout_p=0.3)),
        ),
        ("attention causal", attn_leaves, _explicit_torch(lambda t: ptfast.attention(*t, is_causal=True))),
        (
            "masked_lm_loss",
            mlm_leaves,
            _explicit_torch(lambda t: ptfast.masked_lm_loss(t[0], t[1], labels, bias=t[2])),
        ),
        (
            "masked_lm_loss_none",
            mlm_leaves,
            lambda t: ptfast.masked_lm_loss(t[0], t[1], labels, bias=t[2], reduction="none"),
        ),
    ]


CASES = _cases()


def _run(make, call, seed: int = 11):
    leaves = [t.requires_grad_() for t in make()]
    torch.manual_seed(seed)  # the dropout seed comes from torch's generator
    out = call(leaves)
    grad = torch.randn(out.shape, generator=_g(12))
    return out, torch.autograd.grad(out, leaves, grad), out.grad_fn


@pytest.mark.parametrize("name,make,call", CASES, ids=[c[0] for c in CASES])
def test_direct_call_matches_the_library_op(name: str, make, call) -> None:  # noqa: ANN001
    with record_dispatch() as direct_events:
        out, grads, grad_fn = _run(make, call)
    assert any(n.endswith("_eagerBackward") for n in autograd_node_names(grad_fn)), autograd_node_names(
        grad_fn
    )  # the direct path ran
    with _OpLog() as log, record_dispatch() as library_events:  # a dispatch mode sees the library op
        ref, ref_grads, _ = _run(make, call)
    assert any(op.startswith("ptfast.") and "backward" not in op for op in log.ops), log.ops
    assert any(op.startswith("ptfast.") and "backward" in op for op in log.ops) or name == "add_relu"
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    assert sorted(set(direct_events)) == sorted(set(library_events))
    assert {phase for _op, _backend, phase in direct_events} == {"forward", "backward"} or name == "add_relu"


def test_direct_call_without_grad_and_with_parameters() -> None:
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)  # Parameters are plain tensors for the direct path
    x = torch.randn(2, 5, 9, 11, generator=_g(7))
    assert _eager.direct_call_allowed((x, conv.weight, conv.bias, None, 1, 1, False, False, "torch"))
    with ptfast.use_backend("torch"):
        out = ptfast.conv_relu(x, conv.weight, conv.bias)
        assert type(out.grad_fn).__name__ == "conv_relu_eagerBackward"
        with torch.no_grad():
            assert ptfast.conv_relu(x, conv.weight, conv.bias).grad_fn is None
        with torch.inference_mode():
            assert torch.equal(ptfast.conv_relu(x, conv.weight, conv.bias), out.detach())


def test_direct_call_refused_while_tracing_or_under_modes() -> None:
    x = torch.randn(3, 4)
    assert _eager.direct_call_allowed((x, 2, "torch", None))
    with _OpLog():
        assert not _eager.direct_call_allowed((x,))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not _eager.direct_call_allowed((fake,))
    seen = []
    torch.func.vmap(lambda t: seen.append(_eager.direct_call_allowed((t,))) or t)(x)
    assert seen == [False]


def test_every_op_is_one_registered_op() -> None:
    ops = [add_relu_mod.ADD_RELU, conv_mod.CONV_RELU, conv_mod.CONV_RELU_BACKWARD, mlm_mod.MASKED_LM_LOSS,
           mlm_mod.MASKED_LM_LOSS_BACKWARD, mlm_mod.MASKED_LM_LOSS_SUM_WITH_GRADS,
           mlm_mod.MASKED_LM_LOSS_SUM_WITH_GRADS_BACKWARD, attention_mod.ATTENTION, attention_mod.ATTENTION_BACKWARD,
           attention_mod.ATTENTION_VARLEN, attention_mod.ATTENTION_VARLEN_BACKWARD]  # fmt: skip
    for op in ops:
        name = str(op.overload).removesuffix(".default")
        assert getattr(torch.ops.ptfast, name.split(".")[-1]).default is op.overload
        assert (op._function is None) == name.endswith("_backward"), name  # backward ops have no formula


def test_create_graph_goes_through_the_library_backward_op() -> None:
    """Backward ops have no formula: under create_graph=True they go through the registered op (whose autograd
    then says it is not implemented, rather than differentiating a kernel's output as a constant)."""
    x = torch.randn(2, 3, 7, 8, generator=_g(8), requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=_g(9), requires_grad=True)
    with ptfast.use_backend("torch"):
        out = ptfast.conv_relu(x, w)
        assert type(out.grad_fn).__name__ == "conv_relu_eagerBackward"
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert "ptfast_conv_relu_backward" in type(gx.grad_fn).__name__
        (gx_plain,) = torch.autograd.grad(ptfast.conv_relu(x, w).sum(), x)
    assert torch.equal(gx.detach(), gx_plain) and gx_plain.grad_fn is None
