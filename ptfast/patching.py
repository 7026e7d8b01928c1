"""``ptfast.patch(model)``: swap supported blocks of an existing model for fused ptfast modules, in place.

Covered now: VGG-style ``nn.Sequential`` stacks (torchvision layout: ``Conv2d, ReLU[, MaxPool2d(2, 2)]``).
A ``Conv2d -> ReLU -> MaxPool2d(2, 2)`` run becomes :class:`ptfast.nn.ConvReLUPool2d` and ``Conv2d -> ReLU``
becomes :class:`ptfast.nn.ConvReLU2d`; the ReLU / pool slots become ``nn.Identity`` so indices, parameter
objects and state_dict keys stay what they were (old checkpoints load, optimizers keep their state).
Modules that carry hooks (feature extractors tap ``relu1_2`` etc.) are left alone, as are convolutions the
fused op does not support. Patching is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ptfast.nn.conv import ConvReLU2d, ConvReLUPool2d, unsupported_reason

log = logging.getLogger("ptfast")


@dataclass
class PatchReport:
    """What ``patch`` replaced and what it left alone (and why)."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"ptfast.patch: {len(self.replaced)} replaced, {len(self.skipped)} left alone"]
        lines += [f"  replaced {r}" for r in self.replaced]
        lines += [f"  kept     {s}" for s in self.skipped]
        return "\n".join(lines)


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        or getattr(m, "_state_dict_hooks", None)
    )


def _is_pool2x2(m: nn.Module) -> bool:
    def pair(v):
        return v if isinstance(v, tuple) else (v, v)

    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size) == (2, 2)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
        and not _has_hooks(m)
    )


def _patch_sequential(seq: nn.Sequential, prefix: str, report: PatchReport) -> None:
    children = list(seq._modules.items())
    i = 0
    while i < len(children):
        name, conv = children[i]
        if type(conv) is not nn.Conv2d or i + 1 >= len(children):
            i += 1
            continue
        relu_name, relu = children[i + 1]
        if type(relu) is not nn.ReLU:
            i += 1
            continue
        where = f"{prefix}{name}"
        reason = unsupported_reason(conv)
        if reason is None and (_has_hooks(conv) or _has_hooks(relu)):
            reason = "a hook is registered on the conv or its ReLU"
        if reason is not None:
            report.skipped.append(f"{where} (Conv2d+ReLU): {reason}")
            i += 2
            continue
        pool_name, pool = children[i + 2] if i + 2 < len(children) else (None, None)
        if pool is not None and _is_pool2x2(pool):
            seq._modules[name] = ConvReLUPool2d.from_conv(conv)
            seq._modules[relu_name] = nn.Identity()
            seq._modules[pool_name] = nn.Identity()
            report.replaced.append(f"{where}: Conv2d+ReLU+MaxPool2d -> ConvReLUPool2d")
            i += 3
        else:
            seq._modules[name] = ConvReLU2d.from_conv(conv)
            seq._modules[relu_name] = nn.Identity()
            report.replaced.append(f"{where}: Conv2d+ReLU -> ConvReLU2d")
            i += 2


def patch(model: nn.Module, *, conv: bool = True, verbose: bool = False) -> nn.Module:
    """Swap supported blocks of ``model`` for fused ptfast modules, in place; returns ``model``.

    Args:
        model: any ``nn.Module``; VGG-style ``nn.Sequential`` stacks inside it are patched.
        conv: set False to leave convolution blocks alone.
        verbose: print the report (it is always logged at INFO on the ``ptfast`` logger).

    The report of the last call is kept on ``model.ptfast_patch_report``.
    """
    report = PatchReport()
    if conv:
        for prefix, module in list(model.named_modules()):
            if isinstance(module, nn.Sequential):
                _patch_sequential(module, f"{prefix}." if prefix else "", report)
    model.ptfast_patch_report = report
    log.info("%s", report)
    if verbose:
        print(report)
    return model
