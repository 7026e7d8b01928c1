"""Read a module's own forward with torch.fx and find the conv chains in it (used by :mod:`ptfast.patching_cnn`).

Every submodule is a leaf: the graph of a module says which of its submodules its forward calls, in what order,
on what values, and what functions and tensor methods it applies in between, nothing more. A module is read in
training and in eval mode, and the two graphs must agree, so nothing ptfast concludes depends on the mode it
was patched in. ``x += y`` is recorded as ``operator.iadd`` (plain fx records ``add``), so the graph keeps the
in-place semantics the code has.

A chain starts at a ``Conv2d`` call and follows single-use values: ``[BatchNorm] -> [+ residual] -> ReLU
[-> 2x2 max-pool]``. :class:`FoundChain` records how far it got and what stopped it, in words for the report.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
INPLACE_FUNCTIONS = (operator.iadd, torch.relu_, F.relu_)
INPLACE_METHODS = ("relu_", "add_")


class TraceFailure(Exception):
    """The module's forward could not be read (the message says why, for the report)."""


class _InplaceAwareProxy(fx.Proxy):
    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceAwareProxy(node, self)


def _check_signature(module: nn.Module) -> None:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    ok = len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)
    if not ok or params[0].default is not inspect.Parameter.empty:
        raise TraceFailure(f"{type(module).__name__}.forward takes other arguments than one input")


def _trace_once(module: nn.Module) -> fx.Graph:
    before = dict(module.__dict__)
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - any failure of user code under tracing means "cannot read it"
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        raise TraceFailure(f"could not trace {type(module).__name__}.forward: {type(e).__name__}: {first_line}") from e
    finally:
        changed = [k for k, v in module.__dict__.items() if k not in before or before[k] is not v]
        module.__dict__.clear()
        module.__dict__.update(before)
    if changed:
        raise TraceFailure(f"{type(module).__name__}.forward assigns self.{changed[0]}")
    return graph


def canonical(graph: fx.Graph) -> list[tuple]:
    """A comparable form of ``graph``: each node's op, target and arguments (nodes by position)."""
    index = {n: i for i, n in enumerate(graph.nodes)}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("node", index[a])
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, tuple(arg(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, arg(v)) for k, v in a.items()))
        return ("const", repr(a))

    return [(n.op, repr(n.target), arg(n.args), arg(n.kwargs)) for n in graph.nodes]


def trace(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s own forward, checked to be the same in training and eval mode."""
    _check_signature(module)
    modes = {m: m.training for m in module.modules()}
    try:
        graph = _trace_once(module)
        module.train(not module.training)
        other = _trace_once(module)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if canonical(graph) != canonical(other):
        raise TraceFailure(f"{type(module).__name__}.forward runs other operations in training and in eval mode")
    return graph


# --- what a node is --------------------------------------------------------------------------------------------


def module_of(owner: nn.Module, node: fx.Node) -> nn.Module | None:
    return owner.get_submodule(node.target) if node.op == "call_module" else None


def is_conv(owner: nn.Module, node: fx.Node) -> bool:
    return isinstance(module_of(owner, node), nn.Conv2d)


def is_batch_norm(owner: nn.Module, node: fx.Node) -> bool:
    return isinstance(module_of(owner, node), nn.modules.batchnorm._BatchNorm)


def is_relu(owner: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(module_of(owner, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in RELU_METHODS and len(node.args) == 1 and not node.kwargs


def is_add(node: fx.Node) -> bool:
    target_ok = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )
    return target_ok and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def is_pool2x2(owner: nn.Module, node: fx.Node) -> bool:
    """``nn.MaxPool2d(2, 2)`` or ``F.max_pool2d(x, 2[, 2])`` with nothing else changed (floor mode, no indices)."""
    if node.op == "call_module":
        m = module_of(owner, node)
        if type(m) is not nn.MaxPool2d:
            return False
        kernel, stride, padding, dilation = m.kernel_size, m.stride, m.padding, m.dilation
        ceil_mode, return_indices = m.ceil_mode, m.return_indices
    elif node.op == "call_function" and node.target in POOL_FUNCTIONS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if set(bound) - set(names) or any(isinstance(v, fx.Node) for k, v in bound.items() if k != "input"):
            return False
        kernel = bound.get("kernel_size")
        stride = bound.get("stride") or kernel  # None / () mean "the kernel size"
        padding, dilation = bound.get("padding", 0), bound.get("dilation", 1)
        ceil_mode, return_indices = bound.get("ceil_mode", False), bound.get("return_indices", False)
    else:
        return False
    return (
        _pair(kernel) == (2, 2)
        and _pair(stride) == (2, 2)
        and _pair(padding) == (0, 0)
        and _pair(dilation) == (1, 1)
        and not ceil_mode
        and not return_indices
    )


def mutates_arguments(owner: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` may change one of its tensor arguments in place (a module call may: we do not look in)."""
    if node.op == "call_module":
        return True
    if node.op == "call_function":
        return node.target in INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace"))
    return node.op == "call_method" and (node.target in INPLACE_METHODS or node.target.endswith("_"))


def describe(owner: nn.Module, node: fx.Node) -> str:
    """A node in the report's words: ``Tanh``, ``F.gelu``, ``.sigmoid()``, ``the forward's output``."""
    if node.op == "call_module":
        return type(module_of(owner, node)).__name__
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", "") or ""
        name = getattr(node.target, "__name__", repr(node.target))
        prefix = {"torch.nn.functional": "F.", "_operator": "operator.", "operator": "operator."}.get(mod, "torch.")
        return prefix + name
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the forward's output"
    return node.op


# --- chains ----------------------------------------------------------------------------------------------------


@dataclass
class FoundChain:
    conv: fx.Node
    bn: fx.Node | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    relu: fx.Node | None = None
    pool: fx.Node | None = None
    stop: str | None = None  # why the chain ends before a ReLU (None when it reached one)

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.add, self.relu, self.pool) if n is not None]


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _uses_text(node: fx.Node) -> str:
    n = len(node.users)
    return "its output is unused" if n == 0 else f"its output is used {'twice' if n == 2 else f'{n} times'}"


def find_chain(owner: nn.Module, conv: fx.Node) -> FoundChain:
    """The chain that starts at the call ``conv`` in ``owner``'s graph."""
    chain = FoundChain(conv)
    cur = conv
    nxt = _sole_user(cur)
    if nxt is not None and is_batch_norm(owner, nxt) and len(nxt.args) == 1 and not nxt.kwargs:
        chain.bn, cur = nxt, nxt
        nxt = _sole_user(cur)
    if nxt is None:
        chain.stop = ("the BatchNorm's output: " if chain.bn else "") + _uses_text(cur)
        return chain
    if is_add(nxt):
        if nxt.target in (operator.iadd, "add_") and nxt.args[0] is not cur:
            chain.stop = "it is added in place into another tensor"
            return chain
        chain.add, chain.residual, cur = nxt, next(a for a in nxt.args if a is not cur), nxt
        if chain.residual is cur:
            chain.stop = "it is added to itself"
            return chain
        nxt = _sole_user(cur)
        if nxt is None:
            chain.stop = "the residual sum: " + _uses_text(cur)
            return chain
    if not (is_relu(owner, nxt) and nxt.args[0] is cur):
        chain.stop = f"followed by {describe(owner, nxt)}"
        return chain
    chain.relu, cur = nxt, nxt
    nxt = _sole_user(cur)
    if chain.add is None and nxt is not None and is_pool2x2(owner, nxt) and nxt.args[0] is cur:
        chain.pool = nxt
    return chain


def deferral_problem(owner: nn.Module, graph: fx.Graph, chain: FoundChain, end: fx.Node) -> str | None:
    """Why computing the chain (up to ``end``) at ``end``'s place, instead of at the conv's, could change the
    result: a node in between that may write into the conv's input or the residual."""
    watched = [a for a in (chain.conv.args[0] if chain.conv.args else None, chain.residual) if a is not None]
    members = set(chain.nodes)
    started = False
    for node in graph.nodes:
        if node is chain.conv:
            started = True
            continue
        if node is end:
            return None
        if started and node not in members and mutates_arguments(owner, node):
            if any(a in watched for a in node.all_input_nodes):
                return f"{describe(owner, node)} may change its input in place before the chain ends"
    return None
