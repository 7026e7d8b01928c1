"""Blocks whose forward is a pure dataflow (submodule calls, adds, ReLUs, 2x2 max-pools), run with their conv chains
fused: ResNet's ``BasicBlock`` / ``Bottleneck`` and any block written the same way.

A block's conv chains cannot be fused by swapping modules alone: its ReLU module is called twice (after the first
conv and after the residual add) and the residual add is code in its forward. ``ptfast.patch`` therefore reads
the block's forward with torch.fx (every submodule a leaf, in training and in eval mode, which must agree), turns
the graph into a :class:`Plan` (a list of :class:`Step`) and switches the *instance's* class to a subclass of its
own class (:func:`fused_class`) whose forward runs the plan: the same operations in the same order, except that
each fusable chain ``conv -> [BatchNorm] -> [+ residual] -> ReLU [-> 2x2 max-pool]`` (or ``conv -> BatchNorm``
alone) is one :class:`Chain` step. Parameters, buffers, submodules, state_dict keys, hooks on the block,
``isinstance`` and the class's own methods stay as they were.

A chain step runs fused when stock PyTorch would not use batch statistics (eval mode or no BatchNorm): the
BatchNorm is folded into the conv's weight and bias on the fly (:func:`ptfast.nn.conv.folded_weights`) and
one ``ptfast.conv_relu(..., residual=...)`` (or ``conv_relu_pool``, or ``F.conv2d`` for a conv+BN chain)
computes it. With BatchNorm in training mode the conv and the BN run stock (batch statistics, running-stat
updates: exactly stock's) and, for a block tail ``conv -> BN -> + residual -> ReLU``, ``ptfast.add_relu`` does
the add and the ReLU in one pass; other chains with a training-mode BN run their stock steps. Whenever the fused
op would not compute what stock does (a hook put on one of the chain's modules after patching, a residual of
another shape or dtype, a conv whose settings changed), the chain's own stock steps run unchanged. A call with
other arguments than one tensor runs the class's stock forward.

Plans are plain data (strings, ints, functions named by a key of :data:`FUNCTIONS`), so patched blocks deep-copy
and pickle (``torch.save(model)``; loading needs ptfast importable).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptfast._dispatch import auto_is_torch_on_cpu, requested_backend
from ptfast.backends.torch.conv import conv_hw
from ptfast.nn.conv import folded_weights, symmetric_padding, unsupported_reason, uses_running_stats
from ptfast.ops.add_relu import add_relu_into
from ptfast.ops.conv import conv_relu, conv_relu_pool

# The functions a plan may call, by name: plans hold the name, so they pickle (F.max_pool2d itself does not).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "F.relu": F.relu,
    "F.relu_": F.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "F.max_pool2d": F.max_pool2d,
    "torch.max_pool2d": torch.max_pool2d,
    "operator.add": operator.add,
    "operator.iadd": operator.iadd,
    "torch.add": torch.add,
}

# An argument of a step: ("slot", i) reads the value computed by the step that wrote slot i (slot 0: the input),
# ("const", v) is a constant from the traced code.
Arg = tuple[str, Any]


@dataclass(frozen=True)
class Step:
    """One operation of the block's forward, writing slot ``out``.

    ``kind``: ``"module"`` (``target``: a submodule path), ``"function"`` (``target``: a key of :data:`FUNCTIONS`),
    ``"method"`` (``target``: the tensor method's name) or ``"chain"`` (``target``: a :class:`Chain`).
    """

    kind: str
    target: Any
    args: tuple[Arg, ...]
    kwargs: tuple[tuple[str, Arg], ...]
    out: int


@dataclass(frozen=True)
class Chain:
    """A fusable chain: ``conv -> [bn] -> [+ residual] -> [relu] -> [2x2 max-pool]``.

    ``args`` of its step: (the conv's input, the residual or ``("const", None)``). ``residual_inplace``: the
    stock code adds in place into the chain's value (``out += identity``, which keeps that value's dtype) or
    not (``out + identity``, which promotes). ``watched``: the submodule paths whose calls the fused path skips
    (hooks on them send the chain to its ``stock`` steps, which write the same slots the chain replaces).
    """

    conv: str
    bn: str | None
    relu: bool
    pool: bool
    residual_inplace: bool | None
    watched: tuple[str, ...]
    stock: tuple[Step, ...]

    def describe(self) -> str:
        parts = [self.conv] + ([self.bn] if self.bn else [])
        parts += ["add(residual)"] if self.residual_inplace is not None else []
        parts += ["relu"] if self.relu else []
        parts += ["max_pool2x2"] if self.pool else []
        return "+".join(parts)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    slots: int
    output: int

    def chains(self) -> list[Chain]:
        return [s.target for s in self.steps if s.kind == "chain"]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _sub(block: nn.Module, path: str) -> nn.Module:
    """``block.get_submodule(path)`` without its checks, which cost a small block's forward ~40 us of Python
    per call on a CPU (a plan looks up ~20 submodules); get_submodule itself says what is wrong if one is gone."""
    module = block
    try:
        for name in path.split("."):
            module = module._modules[name]
    except KeyError:
        return block.get_submodule(path)
    return module


def _value(arg: Arg, slots: list) -> Any:
    return slots[arg[1]] if arg[0] == "slot" else arg[1]


def _run_step(block: nn.Module, step: Step, slots: list) -> Any:
    args = [_value(a, slots) for a in step.args]
    kwargs = {k: _value(a, slots) for k, a in step.kwargs}
    if step.kind == "module":
        return _sub(block, step.target)(*args, **kwargs)
    if step.kind == "function":
        return FUNCTIONS[step.target](*args, **kwargs)
    if step.kind == "method":
        return getattr(args[0], step.target)(*args[1:], **kwargs)
    return _run_chain(block, step.target, args[0], args[1], slots)


def run_plan(block: nn.Module, plan: Plan, x: Tensor) -> Any:
    slots: list = [None] * plan.slots
    slots[0] = x
    for step in plan.steps:
        slots[step.out] = _run_step(block, step, slots)
    return slots[plan.output]


def _fused_weights(block: nn.Module, chain: Chain, x: Any, residual: Any) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) to run ``chain`` fused with, or None when its stock steps must run instead."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    if any(_has_hooks(_sub(block, path)) for path in chain.watched):
        return None
    conv = _sub(block, chain.conv)
    if not isinstance(conv, nn.Conv2d) or (chain.relu and unsupported_reason(conv, chain.pool) is not None):
        return None
    bn = _sub(block, chain.bn) if chain.bn else None
    if bn is not None and not uses_running_stats(bn):
        return None  # batch statistics: stock math
    weight, bias = (conv.weight, conv.bias) if bn is None else folded_weights(conv.weight, conv.bias, bn)
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and weight.dtype != x.dtype:
        return None  # stock conv2d refuses mixed dtypes: let it say so
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.device != x.device:
            return None
        expected = (
            x.shape[0],
            weight.shape[0],
            *conv_hw(x.shape, weight.shape, conv.stride[0], symmetric_padding(conv)),
        )
        if tuple(residual.shape) != expected:
            return None  # stock would broadcast (or fail): keep its behaviour
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if residual.dtype != dtype and not chain.residual_inplace:
            return None  # `out + identity` promotes to another dtype than the fused op's
    return weight, bias


def _batch_stats_tail(block: nn.Module, chain: Chain, x: Any, residual: Any) -> bool:
    """Whether ``chain`` is a ResNet block tail ``conv -> BN -> (+ residual) -> ReLU`` whose BN uses batch
    statistics (training mode): conv and BN then run stock and ``ptfast.add_relu`` fuses the rest."""
    if chain.bn is None or not chain.relu or chain.pool or chain.residual_inplace is None:
        return False
    if not isinstance(x, Tensor) or not isinstance(residual, Tensor):
        return False
    if any(_has_hooks(_sub(block, path)) for path in chain.watched):
        return False
    return not uses_running_stats(_sub(block, chain.bn))


def _run_stock(block: nn.Module, chain: Chain, slots: list) -> Any:
    for step in chain.stock:
        slots[step.out] = _run_step(block, step, slots)
    return slots[chain.stock[-1].out]


def _run_chain(block: nn.Module, chain: Chain, x: Any, residual: Any, slots: list) -> Any:
    fused = _fused_weights(block, chain, x, residual)
    if fused is None:
        if not _batch_stats_tail(block, chain, x, residual):
            return _run_stock(block, chain, slots)
        y = _sub(block, chain.bn)(_sub(block, chain.conv)(x))
        if isinstance(y, Tensor) and y.dim() == 4 and y.shape == residual.shape and y.dtype == residual.dtype:
            return add_relu_into(y, residual)  # y is fresh and read by nothing else
        # Broadcasting or promoting: stock's own arithmetic (y is fresh and used once, as in stock's `out += r`).
        z = y.add_(residual) if chain.residual_inplace else y + residual
        return torch.relu_(z)
    weight, bias = fused
    conv = _sub(block, chain.conv)
    if not chain.relu:
        return conv._conv_forward(x, weight, bias)
    padding = symmetric_padding(conv)
    if chain.pool:
        return conv_relu_pool(x, weight, bias, padding=padding)
    if residual is not None and residual.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        residual = residual.to(x.dtype)  # `out += identity` rounds identity into out's dtype as well
    return conv_relu(x, weight, bias, stride=conv.stride[0], padding=padding, residual=residual)


def _fusion_pays_on_cpu(block: nn.Module, plan: Plan) -> bool:
    """Whether running ``plan`` on a CPU computes less than the block's stock forward: some chain folds a
    BatchNorm that uses running statistics into its conv, or pools. Otherwise (training-mode BatchNorms, plain
    conv + ReLU) the plan runs stock's own composition on a CPU (auto's routes: conv then ReLU, add then ReLU, as
    stock's ``out += identity; relu(out)``) and only adds its interpreter's Python: ~70 us per small block
    forward, measured, several times that right after a step's convolutions. Stock's forward then runs, under
    ``auto`` (an explicit backend runs the plan, as it runs the ops instead of auto's CPU routes)."""
    for chain in plan.chains():
        if chain.pool:
            return True
        if chain.bn is not None and uses_running_stats(_sub(block, chain.bn)):
            return True
    return False


class FusedBlockMixin:
    """The forward of a block whose instance class was switched by ``ptfast.patch`` (see the module docstring)."""

    _ptfast_base: type[nn.Module]
    _ptfast_plan: Plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs:
            return self._ptfast_base.forward(self, *args, **kwargs)
        x = args[0]
        # (auto_is_torch_on_cpu: under the Triton interpreter auto may pick kernels for the plan's ops)
        if (
            isinstance(x, Tensor)
            and x.device.type == "cpu"
            and requested_backend() == "auto"
            and auto_is_torch_on_cpu()
        ):
            if not _fusion_pays_on_cpu(self, self._ptfast_plan):
                return self._ptfast_base.forward(self, x)
        return run_plan(self, self._ptfast_plan, x)

    def extra_repr(self) -> str:
        base = self._ptfast_base.extra_repr(self)
        fused = ", ".join(c.describe() for c in self._ptfast_plan.chains())
        return f"{base}, ptfast fused: {fused}" if base else f"ptfast fused: {fused}"

    def __reduce_ex__(self, protocol: int):
        return (_rebuild, (self._ptfast_base,), self.__dict__)


_classes: dict[type, type] = {}
_lock = threading.Lock()


def fused_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` whose forward runs the instance's plan (one class per base, made once)."""
    with _lock:
        cls = _classes.get(base)
        if cls is None:
            name = f"Fused{base.__name__}"
            cls = type(name, (FusedBlockMixin, base), {"_ptfast_base": base, "__module__": base.__module__})
            _classes[base] = cls
        return cls


def _rebuild(base: type[nn.Module]) -> nn.Module:
    block = base.__new__(base)
    block.__class__ = fused_class(base)
    return block


def switch_to_fused(block: nn.Module, plan: Plan) -> None:
    """Make ``block`` run ``plan``: its class becomes :func:`fused_class` of its class; nothing else changes."""
    object.__setattr__(block, "_ptfast_plan", plan)
    block.__class__ = fused_class(type(block))


def is_fused_block(module: nn.Module) -> bool:
    return isinstance(module, FusedBlockMixin)


__all__ = ["Chain", "FusedBlockMixin", "Plan", "Step", "fused_class", "is_fused_block", "run_plan", "switch_to_fused"]
