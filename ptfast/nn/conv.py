"""Fused conv modules: drop-in subclasses of ``nn.Conv2d`` (same parameters, same state_dict keys).

They accept only what the fused op supports: stride 1, dilation 1, one group, zero padding that is the same on
every side. ``from_conv`` builds one that shares an existing conv's parameters (optimizer state and tied
references keep working).
"""

from __future__ import annotations

from typing import TypeVar

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
