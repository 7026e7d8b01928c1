"""Fused conv modules: drop-in subclasses of ``nn.Conv2d`` (same parameters, same state_dict keys).

They accept only what the fused op supports: stride 1 (stride 1 or 2 without pooling), dilation 1, one group, zero
padding that is the same on every side. ``from_conv`` builds one that shares an existing conv's parameters
(optimizer state and tied references keep working). :class:`ConvBN2d` (a conv followed by a BatchNorm and no
ReLU, like ResNet's ``downsample``) takes any convolution: it only folds the BatchNorm.

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

import weakref
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptfast._dispatch import auto_is_torch_on_cpu, autograd_route_applies
from ptfast.backends.torch.conv import memory_format
from ptfast.ops.conv import conv_relu, conv_relu_pool

_T = TypeVar("_T", bound="_FusedConv2d")


def unsupported_reason(conv: nn.Conv2d, pool: bool = False) -> str | None:
    """Why ``conv`` cannot be fused with its ReLU (and, with ``pool``, a 2x2 max-pool); ``None`` if it can."""
    if conv.stride not in ((1, 1), (2, 2)):
        return f"stride {_pair_text(conv.stride)} unsupported (1 or 2)"
    if pool and conv.stride != (1, 1):
        return f"stride {_pair_text(conv.stride)} before a 2x2 max-pool unsupported (stride 1 only)"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if symmetric_padding(conv) is None:
        return f"padding {conv.padding!r} is not the same on every side"
    return None


def _pair_text(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else str(v)


def symmetric_padding(conv: nn.Conv2d) -> int | None:
    """The conv's zero padding as one int when it is the same on every side, else None."""
    pad = conv.padding
    if pad == "valid":
        return 0
    if pad == "same":
        kh, kw = conv.kernel_size
        return (kh - 1) // 2 if kh == kw and kh % 2 == 1 else None
    return pad[0] if pad[0] == pad[1] else None


class _FusedConv2d(nn.Conv2d):
    _pool: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._check()

    def _check(self) -> None:
        reason = unsupported_reason(self, self._pool)
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
        return symmetric_padding(self)  # type: ignore[return-value]


def _stock_math_on_cpu(module: _FusedConv2d, x: object) -> bool:
    """Whether this call runs the replaced modules' own math (``Conv2d``, in-place ReLU, ``MaxPool2d``) rather
    than the op: on a CPU under ``auto``, eagerly on plain tensors, where auto's CPU route of the op would compute
    just that and only add the op's Python (~25 us per call warm, several times that right after a step's
    kernels). Measured on a channels-last VGG-16/4 train step at 64x64 (interleaved): 0.976x of stock through the
    op, 0.99-1.01x this way (three runs; one module call where stock makes two or three). Pooling an NCHW input
    keeps the op (a one-channel image too, which PyTorch convolves in NCHW): its route pools in channels-last,
    where PyTorch's NCHW max-pool is a scalar loop (a hand-written VGG step on 1x32x32 digits measured 1.0x with
    the first layer here against 1.2x through the op). An empty batch keeps the op (PyTorch's pooling backward
    refuses one). The op's contract at a NaN conv output (zero gradient) is then stock's (ReLU passes the gradient
    on), as in the model before ``ptfast.patch``. Explicit backends, compiled code, dispatch modes, functorch
    transforms, and a process where a kernel backend runs CPU tensors (Triton under its interpreter) run the op."""
    if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dim() != 4 or x.shape[0] == 0:
        return False
    if module._pool and memory_format(x) != torch.channels_last:  # one channel is NCHW here too, as for conv2d
        return False
    if not auto_is_torch_on_cpu():  # Triton under its interpreter: auto may pick a kernel, the op decides
        return False
    return autograd_route_applies("torch", x.device, (x, module.weight, module.bias))


class ConvReLU2d(_FusedConv2d):
    """``relu(conv(x))`` in one fused op (stride 1 or 2). Input ``(N, Cin, H, W)`` NCHW or channels_last."""

    def forward(self, x: Tensor) -> Tensor:
        if _stock_math_on_cpu(self, x):
            return torch.relu_(self._conv_forward(x, self.weight, self.bias))
        return conv_relu(x, self.weight, self.bias, stride=self.stride[0], padding=self.fused_padding)


class ConvReLUPool2d(_FusedConv2d):
    """``max_pool2d(relu(conv(x)), 2, 2)`` in one fused op; odd sizes floor like ``nn.MaxPool2d(2, 2)``."""

    _pool = True

    def forward(self, x: Tensor) -> Tensor:
        if _stock_math_on_cpu(self, x):
            return F.max_pool2d(torch.relu_(self._conv_forward(x, self.weight, self.bias)), 2, 2)
        return conv_relu_pool(x, self.weight, self.bias, padding=self.fused_padding)


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


class _FoldCache:
    """The last folded (weight, bias) of one BatchNorm, valid while the same tensors keep the same versions."""

    def __init__(self, tensors: tuple[Tensor | None, ...], eps: float, folded: tuple[Tensor, Tensor]) -> None:
        self.refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        self.versions = tuple(t._version if t is not None else None for t in tensors)
        self.eps, self.folded = eps, folded

    def matches(self, tensors: tuple[Tensor | None, ...], eps: float) -> bool:
        if eps != self.eps:
            return False
        for t, ref, version in zip(tensors, self.refs, self.versions, strict=True):
            if (t is None) != (ref is None) or (t is not None and (ref() is not t or t._version != version)):
                return False
        return True


_fold_caches: weakref.WeakKeyDictionary[nn.Module, _FoldCache] = weakref.WeakKeyDictionary()


def folded_weights(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """:func:`fold_batch_norm`, computed once and reused while no gradient is asked of it and none of the tensors
    it reads changed (same objects, same version counters: an optimizer step, ``load_state_dict`` or ``.to()``
    invalidates it). A frozen backbone otherwise re-reads every conv weight on every forward, which costs more
    than the BatchNorm it replaces at small batch sizes. Never cached under ``torch.compile`` (it traces the fold)."""
    tensors = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad or torch.compiler.is_compiling() or any(t is not None and t.is_inference() for t in tensors):
        return fold_batch_norm(weight, bias, bn)
    cache = _fold_caches.get(bn)
    if cache is not None and cache.matches(tensors, bn.eps):
        return cache.folded
    # Ordinary tensors even inside inference_mode: a later call with an input that needs grad may save them.
    with torch.inference_mode(False), torch.no_grad():
        folded = fold_batch_norm(weight, bias, bn)
    _fold_caches[bn] = _FoldCache(tensors, bn.eps, folded)
    return folded


class BatchNorm2dInFusedConv(nn.BatchNorm2d):
    """A ``BatchNorm2d`` whose normalization is computed by the fused conv before it; its own forward passes
    its input through. Same parameters, buffers and state_dict keys as the ``BatchNorm2d`` it was
    (``ptfast.patch`` switches the class of that very object). Do not call it on other inputs.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the name nn.BatchNorm2d.forward uses
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", computed by the preceding fused conv"


def uses_running_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn``'s next forward normalizes with its running statistics (and so can be folded into the conv):
    the rule of ``nn.BatchNorm2d.forward`` (batch statistics in training mode or without running stats)."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


class _FusedConvBN2d(_FusedConv2d):
    _relu: bool = True

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
        return uses_running_stats(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if self.uses_folded_bn():
            weight, bias = folded_weights(self.weight, self.bias, bn)
            if not self._relu:
                return self._conv_forward(x, weight, bias)
            if self._pool:
                return conv_relu_pool(x, weight, bias, padding=self.fused_padding)
            return conv_relu(x, weight, bias, stride=self.stride[0], padding=self.fused_padding)
        # Batch statistics cannot be folded: stock math, with the class's forward (the instance's is the identity).
        y = nn.BatchNorm2d.forward(bn, self._conv_forward(x, self.weight, self.bias))
        if not self._relu:
            return y
        y = torch.relu_(y)  # y is fresh and BatchNorm's backward does not read it (stock's ReLU(inplace=True))
        return F.max_pool2d(y, 2, 2) if self._pool else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", with BatchNorm2d (folded in eval mode)"


class ConvBN2d(_FusedConvBN2d):
    """``bn(conv(x))`` with no ReLU (ResNet's ``downsample``, a Bottleneck's last conv before its residual add):
    the BatchNorm folded into the conv's weight and bias when it uses running statistics, else stock math. Any
    convolution (stride, groups, dilation) qualifies: folding does not depend on its geometry."""

    _relu = False

    def _check(self) -> None:
        pass  # F.conv2d runs the folded convolution, whatever its settings


class ConvBNReLU2d(_FusedConvBN2d):
    """``relu(bn(conv(x)))``: fused with the BatchNorm folded in when ``bn`` uses running stats, else stock."""


class ConvBNReLUPool2d(_FusedConvBN2d):
    """``max_pool2d(relu(bn(conv(x))), 2, 2)``: fused with the BatchNorm folded in when ``bn`` uses running
    stats, else stock math."""

    _pool = True
