"""``ptfast.patch`` for CNNs: find conv chains from each module's dataflow and fuse them, keeping the user's model.

Every module that contains a ``Conv2d`` is read with torch.fx (:mod:`ptfast.cnn_trace`: its own forward, every
submodule a leaf, the same in training and eval mode). In its graph each ``Conv2d`` call starts a chain
``conv -> [BatchNorm] -> [+ residual] -> ReLU [-> 2x2 max-pool]``; then one of two rewrites, both keeping the
model's class, parameter objects and state_dict keys:

* **module swaps** (the model itself, ``nn.Sequential`` stacks, attribute-style VGGs): when every link of the
  chain is a module called exactly once (``self.pool1(self.relu1(self.conv1(x)))``), the conv becomes a fused
  module of :mod:`ptfast.nn.conv` sharing its parameters, and the ReLU / pool slots become ``nn.Identity``
  (the BatchNorm's class becomes its identity-forward subclass). A conv followed by a BatchNorm and anything
  else becomes :class:`~ptfast.nn.conv.ConvBN2d` (the BatchNorm folded in eval mode). What a swap cannot
  express (a residual add or ``F.relu`` / ``F.max_pool2d`` in the forward's code, a ReLU module called
  twice) stays as it is, and the report says so.
* **fused blocks** (ResNet's ``BasicBlock`` / ``Bottleneck`` and blocks like them, never the model itself):
  a submodule whose forward is nothing but submodule calls, adds, ReLUs and 2x2 max-pools runs a plan of that
  very graph with each chain as one fused step (:mod:`ptfast.nn.fused_block`), residual add included.

A chain is fused only when it is provably the same computation: each intermediate value has one use, no hook
is on the modules it skips, nothing between its first and last node may write into its inputs, the conv's
settings are supported. Every conv that is not fused is reported with the reason. A module that cannot be
read (data-dependent control flow, extra forward arguments, ...) keeps its convs as they are, with that reason;
``nn.Sequential`` stacks inside it are still read on their own.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ptfast import cnn_trace
from ptfast.nn.conv import (
    ConvBN2d,
    ConvBNReLU2d,
    ConvBNReLUPool2d,
    ConvReLU2d,
    ConvReLUPool2d,
    bn_unsupported_reason,
    unsupported_reason,
)
from ptfast.nn.fused_block import FUNCTIONS, Chain, Plan, Step, is_fused_block, switch_to_fused
from ptfast.nn.pool import ChannelsLastMaxPool2d

FOLD_NOTE = " (folded BatchNorm on the fly in eval mode; stock unfused math in training mode)"


def has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        or getattr(m, "_state_dict_hooks", None)
    )


@dataclass
class _Context:
    model: nn.Module
    names: dict[int, str]  # id(module) -> its first qualified name
    instances: Counter  # id(module) -> how many places hold it
    calls: Counter  # id(module) -> call sites over every graph read
    replaced: list[str]
    skipped: list[str]

    def name(self, owner: nn.Module, node: fx.Node) -> str:
        return self.names.get(id(cnn_trace.module_of(owner, node)), str(node.target))


def _conv_bn_reason(ctx: _Context, owner: nn.Module, chain: cnn_trace.FoundChain) -> str | None:
    """Why the chain's conv (and its BatchNorm) cannot be replaced at all, whatever follows."""
    conv = cnn_trace.module_of(owner, chain.conv)
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of Conv2d: its forward is unknown to ptfast"
    if has_hooks(conv):
        return "has a hook"
    if chain.bn is not None:
        bn = cnn_trace.module_of(owner, chain.bn)
        return bn_unsupported_reason(conv, bn) or ("its BatchNorm has a hook" if has_hooks(bn) else None)
    return None


def _kind(chain: cnn_trace.FoundChain, relu: bool = True, pool: bool = True, add: bool = True) -> str:
    parts = ["Conv2d"] + (["BatchNorm2d"] if chain.bn else [])
    parts += ["add"] if add and chain.add else []
    parts += ["ReLU"] if relu and chain.relu else []
    parts += ["MaxPool2d"] if pool and chain.pool else []
    return "+".join(parts)


# --- module swaps ----------------------------------------------------------------------------------------------


def _swap(owner: nn.Module, target: str, new: nn.Module) -> None:
    parent_path, _, leaf = target.rpartition(".")
    parent = owner.get_submodule(parent_path) if parent_path else owner
    parent._modules[leaf] = new


def _used_elsewhere(ctx: _Context, owner: nn.Module, node: fx.Node) -> bool:
    m = cnn_trace.module_of(owner, node)
    return ctx.calls[id(m)] != 1 or ctx.instances[id(m)] != 1


def _swappable(ctx: _Context, owner: nn.Module, node: fx.Node, what: str) -> str | None:
    """Why the module called at ``node`` cannot be swapped out (None if it can)."""
    m = cnn_trace.module_of(owner, node)
    if m is None:
        return f"its {what} is {cnn_trace.describe(owner, node)} in the forward's code (a module swap cannot remove it)"
    if _used_elsewhere(ctx, owner, node):
        return f"its {what} module ({ctx.name(owner, node)}) is used in more than one place"
    if has_hooks(m):
        return f"its {what} module ({ctx.name(owner, node)}) has a hook"
    return None


def _patch_by_swaps(ctx: _Context, owner: nn.Module, chains: list[cnn_trace.FoundChain]) -> None:
    for chain in chains:
        where = ctx.name(owner, chain.conv)
        shared = [n for n in (chain.conv, chain.bn) if n is not None and _used_elsewhere(ctx, owner, n)]
        reason = f"{ctx.name(owner, shared[0])} is used in more than one place" if shared else None
        reason = reason or _conv_bn_reason(ctx, owner, chain)
        if reason is not None:
            ctx.skipped.append(f"{where} ({_kind(chain)}): {reason}")
        else:
            _swap_chain(ctx, owner, chain, where)


def _swap_chain(ctx: _Context, owner: nn.Module, chain: cnn_trace.FoundChain, where: str) -> None:
    conv = cnn_trace.module_of(owner, chain.conv)
    rest = chain.stop
    if rest is None and chain.add is not None:
        rest = "a residual add in the forward's code follows (fused only inside a block, not in the model's forward)"
    rest = rest or _swappable(ctx, owner, chain.relu, "ReLU") or unsupported_reason(conv)
    bn = cnn_trace.module_of(owner, chain.bn) if chain.bn is not None else None
    if rest is not None:  # no ReLU to absorb: fold a BatchNorm if there is one
        if bn is None:
            ctx.skipped.append(f"{where} (Conv2d): {rest}")
            return
        _swap(owner, chain.conv.target, ConvBN2d.from_conv_bn(conv, bn))
        ctx.replaced.append(f"{where}: Conv2d+BatchNorm2d -> ConvBN2d{FOLD_NOTE}; not fused with what follows: {rest}")
        return
    pool_reason = None
    if chain.pool is not None:
        pool_reason = _swappable(ctx, owner, chain.pool, "max-pool") or unsupported_reason(conv, pool=True)
    pool_ok = chain.pool is not None and pool_reason is None
    if bn is None:
        new = (ConvReLUPool2d if pool_ok else ConvReLU2d).from_conv(conv)
    else:
        new = (ConvBNReLUPool2d if pool_ok else ConvBNReLU2d).from_conv_bn(conv, bn)
    _swap(owner, chain.conv.target, new)
    _swap(owner, chain.relu.target, nn.Identity())
    if pool_ok:
        _swap(owner, chain.pool.target, nn.Identity())
    line = f"{where}: {_kind(chain, pool=pool_ok)} -> {type(new).__name__}{FOLD_NOTE if bn is not None else ''}"
    if pool_reason is not None:
        line += f"; the 2x2 max-pool after it is not fused: {pool_reason}"
    ctx.replaced.append(line)


# --- fused blocks ----------------------------------------------------------------------------------------------


class _NotABlock(Exception):
    pass


def _arg(a, slots: dict) -> tuple:
    if isinstance(a, fx.Node):
        return ("slot", slots[a])
    if a is None or isinstance(a, (bool, int, float, str)):
        return ("const", a)
    if isinstance(a, tuple) and all(x is None or isinstance(x, (bool, int, float)) for x in a):
        return ("const", a)
    raise _NotABlock(f"an argument {a!r} in the forward")


def _step(owner: nn.Module, node: fx.Node, slots: dict) -> Step:
    args = tuple(_arg(a, slots) for a in node.args)
    kwargs = tuple((k, _arg(v, slots)) for k, v in node.kwargs.items())
    if node.op == "call_module":
        return Step("module", node.target, args, kwargs, slots[node])
    ok = (
        cnn_trace.is_relu(owner, node)
        or cnn_trace.is_add(node)
        or cnn_trace.is_pool2x2(owner, node)
        or (node.op == "call_function" and node.target in cnn_trace.ADD_FUNCTIONS)
    )
    if not ok:
        raise _NotABlock(f"{cnn_trace.describe(owner, node)} in the forward")
    if node.op == "call_method":
        return Step("method", node.target, args, kwargs, slots[node])
    name = next((k for k, fn in FUNCTIONS.items() if fn is node.target), None)
    if name is None:
        raise _NotABlock(f"{cnn_trace.describe(owner, node)} in the forward")
    return Step("function", name, args, kwargs, slots[node])


def _block_chain(ctx: _Context, owner: nn.Module, graph: fx.Graph, node: fx.Node):
    """(chain, None) for the fusable chain starting at conv ``node`` inside a block, or (None, reason)."""
    chain = cnn_trace.find_chain(owner, node)
    reason = _conv_bn_reason(ctx, owner, chain)
    if reason is not None:
        return None, reason
    conv = cnn_trace.module_of(owner, node)
    if chain.relu is not None and unsupported_reason(conv) is not None and chain.bn is not None:
        chain.relu = None  # an unsupported conv with a BatchNorm: fold only
    if chain.relu is None:
        if chain.bn is None:
            return None, chain.stop or unsupported_reason(conv)
        chain.add = chain.residual = chain.pool = None  # conv + BN, folded; what follows runs as written
        problem = cnn_trace.deferral_problem(owner, graph, chain, chain.bn)
        return (None, problem) if problem else (chain, None)
    if unsupported_reason(conv) is not None:
        return None, unsupported_reason(conv)
    if chain.pool is not None and (
        unsupported_reason(conv, pool=True) is not None
        or (chain.pool.op == "call_module" and has_hooks(cnn_trace.module_of(owner, chain.pool)))
    ):
        chain.pool = None
    if chain.relu.op == "call_module" and has_hooks(cnn_trace.module_of(owner, chain.relu)):
        return None, "its ReLU module has a hook"
    problem = cnn_trace.deferral_problem(owner, graph, chain, chain.pool or chain.relu)
    return (None, problem) if problem else (chain, None)


def _plan(ctx: _Context, owner: nn.Module, graph: fx.Graph) -> tuple[Plan, list[str], list[str]]:
    """The block's plan with its fusable chains, the fused chains in words and the reasons for the others."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(inputs) != 1 or not isinstance(output.args[0], fx.Node):
        raise _NotABlock("its forward does not map one tensor to one tensor")
    slots = {inputs[0]: 0} | {n: i + 1 for i, n in enumerate(nodes)}
    plain = {n: _step(owner, n, slots) for n in nodes}
    chain_at: dict[fx.Node, cnn_trace.FoundChain] = {}
    fused_text, kept = [], []
    for node in nodes:
        if not cnn_trace.is_conv(owner, node) or type(cnn_trace.module_of(owner, node)) is not nn.Conv2d:
            continue
        chain, reason = _block_chain(ctx, owner, graph, node)
        if chain is None:
            kept.append(f"{ctx.name(owner, node)} (Conv2d): {reason}")
            continue
        chain_at[chain.nodes[-1]] = chain
        fused_text.append(_describe_chain(ctx, owner, chain))
    members = {n for c in chain_at.values() for n in c.nodes}
    steps = []
    for node in nodes:
        if node in chain_at:
            c = chain_at[node]
            chain_nodes = [n for n in (c.conv, c.bn, c.add, c.relu, c.pool) if n is not None]
            watched = tuple(n.target for n in chain_nodes if n.op == "call_module")
            spec = Chain(
                conv=c.conv.target,
                bn=c.bn.target if c.bn is not None else None,
                relu=c.relu is not None,
                pool=c.pool is not None,
                residual_inplace=None if c.add is None else c.add.target in (operator.iadd, "add_"),
                watched=watched,
                stock=tuple(plain[n] for n in chain_nodes),
            )
            res = ("slot", slots[c.residual]) if c.residual is not None else ("const", None)
            steps.append(Step("chain", spec, (("slot", slots[c.conv.args[0]]), res), (), slots[node]))
        elif node not in members:
            steps.append(plain[node])
    return Plan(tuple(steps), len(nodes) + 1, slots[output.args[0]]), fused_text, kept


def _describe_chain(ctx: _Context, owner: nn.Module, chain: cnn_trace.FoundChain) -> str:
    op = "conv_relu_pool" if chain.pool else ("conv_relu" if chain.relu else "conv2d")
    op += "(residual)" if chain.add is not None and chain.relu is not None else ""
    names = [str(n.target) if n.op == "call_module" else cnn_trace.describe(owner, n) for n in chain.nodes]
    if chain.relu is None:
        names = names[:2]
    return f"{'+'.join(names)} -> {op}"


def _needs_block(ctx: _Context, owner: nn.Module, chains: list[cnn_trace.FoundChain]) -> bool:
    """A chain that a block plan fuses further than module swaps can."""
    for c in chains:
        if c.add is not None and c.relu is not None:
            return True
        for node in (c.relu, c.pool):
            if node is not None and (node.op != "call_module" or _used_elsewhere(ctx, owner, node)):
                return True
    return False


def _try_block(ctx: _Context, owner: nn.Module, graph: fx.Graph, chains: list) -> bool:
    if owner is ctx.model or not _needs_block(ctx, owner, chains):
        return False
    try:
        plan, fused, kept = _plan(ctx, owner, graph)
    except _NotABlock:
        return False
    if not fused:
        return False
    where = ctx.names[id(owner)]
    switch_to_fused(owner, plan)
    ctx.replaced.append(f"{where} ({type(owner)._ptfast_base.__name__}): fused block: {'; '.join(fused)}{FOLD_NOTE}")
    ctx.skipped.extend(kept)
    return True


# --- entry point -----------------------------------------------------------------------------------------------


def _holders(model: nn.Module) -> list[nn.Module]:
    """Modules with a direct or nested plain Conv2d, outermost first (each once)."""
    has_conv: dict[int, bool] = {}

    def visit(m: nn.Module) -> bool:
        if id(m) not in has_conv:
            has_conv[id(m)] = False  # cycles; a fused block's convs are already taken care of
            if is_fused_block(m):
                return False
            found = [type(c) is nn.Conv2d or visit(c) for c in m.children()]  # a list: visit every child
            has_conv[id(m)] = any(found)
        return has_conv[id(m)]

    visit(model)
    seen, out = set(), []
    for _, m in model.named_modules():
        if has_conv.get(id(m)) and id(m) not in seen and not is_fused_block(m):
            seen.add(id(m))
            out.append(m)
    return out


def patch_convs(model: nn.Module, replaced: list[str], skipped: list[str]) -> None:
    """Fuse the conv chains of ``model`` in place (see the module docstring); report lines go to the lists."""
    names: dict[int, str] = {}
    instances: Counter = Counter()
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name or type(model).__name__)
        instances[id(m)] += 1
    ctx = _Context(model, names, instances, Counter(), replaced, skipped)
    graphs: list[tuple[nn.Module, fx.Graph]] = []
    failures: dict[int, str] = {}
    for owner in _holders(model):
        try:
            graph = cnn_trace.trace(owner)
        except cnn_trace.TraceFailure as e:
            failures[id(owner)] = str(e)
            continue
        graphs.append((owner, graph))
        for node in graph.nodes:
            if node.op == "call_module":
                ctx.calls[id(cnn_trace.module_of(owner, node))] += 1
    seen_convs: set[int] = set()
    for owner, graph in graphs:
        chains = [cnn_trace.find_chain(owner, n) for n in graph.nodes if cnn_trace.is_conv(owner, n)]
        chains = [c for c in chains if type(cnn_trace.module_of(owner, c.conv)) is nn.Conv2d]
        seen_convs.update(id(cnn_trace.module_of(owner, c.conv)) for c in chains)
        if not _try_block(ctx, owner, graph, chains):
            _patch_by_swaps(ctx, owner, chains)
    _report_unseen(model, ctx, seen_convs, failures)


def _report_unseen(model: nn.Module, ctx: _Context, seen: set[int], failures: dict[int, str]) -> None:
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is not nn.Conv2d or id(child) in seen or is_fused_block(parent):
                continue
            where = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = failures.get(id(parent)) or f"not called by {type(parent).__name__}.forward"
            ctx.skipped.append(f"{where} (Conv2d): {reason}")
            seen.add(id(child))


def switch_max_pools(model: nn.Module, replaced: list[str]) -> None:
    """Switch every plain, hook-free ``nn.MaxPool2d`` left in ``model`` (the fusion has taken the pools it fuses)
    to :class:`~ptfast.nn.pool.ChannelsLastMaxPool2d`, in place; one report line for all of them."""
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.MaxPool2d and not m.return_indices and not has_hooks(m):
            m.__class__ = ChannelsLastMaxPool2d
            names.append(name or type(model).__name__)
    if names:
        replaced.append(
            f"{', '.join(names)} (MaxPool2d, not fused with a conv): pooled in channels-last on a CPU "
            "(PyTorch's NCHW max-pool kernel there is a scalar loop; same result), unchanged elsewhere"
        )
