"""Fused conv modules: drop-in subclasses of ``nn.Conv2d`` (same parameters, same state_dict keys).

They accept only what the fused op supports: stride 1, dilation 1, one group, zero padding that is the same on
every side. ``from_conv`` builds one that shares an existing conv's parameters (optimizer state and tied
references keep working).

``ConvBNReLU2d`` / ``ConvBNReLUPool2d`` (built by ``ptfast.patch`` for torchvision's ``vgg*_bn``) also compute
the ``BatchNorm2d`` that follows the conv. Design, chosen so that checkpoints, optimizers and hooks keep working:

- The BatchNorm stays the *same object in its own slot* of the ``nn.Sequential`` (so ``features.1.weight``,
  ``.running_mean``, ... keep their keys and Parameter objects). Its class is switched in place to
  :class:`BatchNorm2dInFusedConv`, a ``BatchNorm2d`` subclass whose forward is the identity: the slot must not
  normalize a second time. A class (not a lambda put on the instance) keeps deepcopy, pickle and
  ``torch.compile`` working without special cases, and the repr shows what happened.
- The fused conv holds the BatchNorm as a plain attribute, *not* as a submodule (a submodule would duplicate
  the state_dict keys under ``features.0.``). deepcopy and pickle keep the two references to one object.
- Every forward decides from the BatchNorm's current mode: when stock PyTorch would normalize with the running
  statistics (eval mode with running stats: the usual frozen fine-tuning setup), the BatchNorm is folded into
  the conv weight and bias on the fly (autograd flows through the folding to conv and BN parameters; nothing
  is cached, so later changes to the BN are seen) and the fused op runs. Otherwise (training mode, or no
  running stats) the stock math runs unfused: conv, ``BatchNorm2d.forward`` (batch statistics, running-stat
  and ``num_batches_tracked`` updates exactly as stock), ReLU, pool.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptfast

_T = TypeVar("_T", bound="_FusedConv2d")


def unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be fused (``None`` if it can)."""
    if conv.stride != (1, 1):
        return f"stride {conv.stride} (only stride 1 is fused)"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if _symmetric_padding(conv) is None:
        return f"padding {conv.padding!r} is not the same on every side"
    return None


def _symmetric_padding(conv: nn.Conv2d) -> int | None:
    pad = conv.padding
    if pad == "valid":
        return 0
    if pad == "same":
        kh, kw = conv.kernel_size
        return (kh - 1) // 2 if kh == kw and kh % 2 == 1 else None
    return pad[0] if pad[0] == pad[1] else None


class _FusedConv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._check()

    def _check(self) -> None:
        reason = unsupported_reason(self)
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot fuse this convolution: {reason}")

    @classmethod
    def from_conv(cls: type[_T], conv: nn.Conv2d) -> _T:
        """A fused module sharing ``conv``'s parameters, buffers and settings (``conv`` is left unchanged)."""
        return cls._adopt(conv)

    @classmethod
    def _adopt(cls: type[_T], conv: nn.Conv2d) -> _T:
        fused = cls.__new__(cls)
        state = dict(conv.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(state[key])  # own containers, same Parameter objects
        fused.__dict__.update(state)
        fused._check()
        return fused

    @property
    def fused_padding(self) -> int:
        return _symmetric_padding(self)  # type: ignore[return-value]


class ConvReLU2d(_FusedConv2d):
    """``relu(conv(x))`` in one fused op. Input ``(N, Cin, H, W)`` NCHW or channels_last."""

    def forward(self, x: Tensor) -> Tensor:
        return ptfast.conv_relu(x, self.weight, self.bias, padding=self.fused_padding)


class ConvReLUPool2d(_FusedConv2d):
    """``max_pool2d(relu(conv(x)), 2, 2)`` in one fused op; odd sizes floor like ``nn.MaxPool2d(2, 2)``."""

    def forward(self, x: Tensor) -> Tensor:
        return ptfast.conv_relu_pool(x, self.weight, self.bias, padding=self.fused_padding)


def bn_unsupported_reason(conv: nn.Conv2d, bn: nn.Module) -> str | None:
    """Why ``bn`` (following ``conv``) cannot be computed inside a fused conv (``None`` if it can)."""
    if type(bn) is not nn.BatchNorm2d:  # a subclass may override forward; SyncBatchNorm needs its all-reduce
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if bn.num_features != conv.out_channels:
        return f"BatchNorm2d has {bn.num_features} features, the conv {conv.out_channels} channels"
    return None


def fold_batch_norm(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Conv weight and bias with eval-mode ``bn`` folded in: ``bn(conv(x, w, b)) == conv(x, w', b')``.

    ``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(running_var + eps)`` per output
    channel. Plain differentiable tensor ops, so gradients reach ``w``, ``b``, ``gamma`` and ``beta``.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shifted = -bn.running_mean if bias is None else bias - bn.running_mean
    new_bias = shifted * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias
    # The fused op takes one dtype; BN parameters kept in fp32 next to a low-precision conv are cast down here.
    new_weight = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
    return new_weight, new_bias.to(weight.dtype)


class BatchNorm2dInFusedConv(nn.BatchNorm2d):
    """A ``BatchNorm2d`` whose normalization is computed by the fused conv before it; its own forward passes
    its input through. Same parameters, buffers and state_dict keys as the ``BatchNorm2d`` it was
    (``ptfast.patch`` switches the class of that very object). Do not call it on other inputs.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the name nn.BatchNorm2d.forward uses
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", computed by the preceding fused conv"


class _FusedConvBN2d(_FusedConv2d):
    _pool: bool = False

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(f"build {type(self).__name__} with {type(self).__name__}.from_conv_bn(conv, bn)")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d):
        raise TypeError(f"{cls.__name__} needs its BatchNorm2d: use {cls.__name__}.from_conv_bn(conv, bn)")

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """A fused module sharing ``conv``'s parameters that also computes ``bn``.

        ``bn`` is modified in place: its class becomes :class:`BatchNorm2dInFusedConv` (an identity forward),
        so it must stay where it is and only the returned module should be put in ``conv``'s place.
        """
        reason = bn_unsupported_reason(conv, bn)
        if reason is not None:
            raise ValueError(f"{cls.__name__} cannot fuse this BatchNorm: {reason}")
        fused = cls._adopt(conv)
        # object.__setattr__: a plain reference, not a submodule (which would duplicate the BN's state_dict keys).
        object.__setattr__(fused, "bn", bn)
        bn.__class__ = BatchNorm2dInFusedConv
        return fused

    def uses_folded_bn(self) -> bool:
        """Whether the next forward folds the BatchNorm (stock would use its running statistics) and fuses."""
        bn = self.bn
        # Same rule as nn.BatchNorm2d.forward: batch statistics in training mode or without running stats.
        return not bn.training and bn.running_mean is not None and bn.running_var is not None

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if self.uses_folded_bn():
            weight, bias = fold_batch_norm(self.weight, self.bias, bn)
            op = ptfast.conv_relu_pool if self._pool else ptfast.conv_relu
            return op(x, weight, bias, padding=self.fused_padding)
        # Batch statistics cannot be folded: stock math, with the class's forward (the instance's is the identity).
        y = torch.relu(nn.BatchNorm2d.forward(bn, self._conv_forward(x, self.weight, self.bias)))
        return F.max_pool2d(y, 2, 2) if self._pool else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", with BatchNorm2d (folded in eval mode)"


class ConvBNReLU2d(_FusedConvBN2d):
    """``relu(bn(conv(x)))``: fused with the BatchNorm folded in when ``bn`` uses running stats, else stock."""


class ConvBNReLUPool2d(_FusedConvBN2d):
    """``max_pool2d(relu(bn(conv(x))), 2, 2)``: fused with the BatchNorm folded in when ``bn`` uses running
    stats, else stock math."""

    _pool = True
