"""The max-pools ``ptfast.patch`` does not fuse, run in channels-last on a CPU.

PyTorch's NCHW max-pooling on a CPU is a scalar loop; its channels-last kernel is vectorised over channels. A
ResNet's stem pool (3x3, stride 2, padding 1) on a 64x16x16x16 fp32 activation: 1.03 ms NCHW against 0.21 ms
converting to channels-last, pooling and converting back; forward+backward 1.15 ms against 0.69 ms (measured,
torch 2.13, 2 threads; 16x64x56x56: 12.6 ms against 3.8 ms forward). That pool is a tenth of a small ResNet's
training step on a CPU. Both kernels give the same values and send the gradient to the same element (the first
maximum of a window; the NaN both pick), which ``tests/test_pool.py`` checks on ties and NaNs, so the
result is stock's bit for bit.

``ptfast.patch`` switches the class of each plain ``nn.MaxPool2d`` instance (not a subclass, no indices
returned, no hooks) to :class:`ChannelsLastMaxPool2d` (``patching_cnn.switch_max_pools``), keeping the object, its
settings and its place; on any other device or input it is ``nn.MaxPool2d`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptfast._eager import direct_call_allowed


def _runs_channels_last(x: Tensor) -> bool:
    """A plain-contiguous fp32 NCHW batch on a CPU with more than one channel (at one channel both layouts are
    the same memory, and stock's choice already is what this would do)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.shape[1] > 1
        and x.is_contiguous()
        and x.numel() > 0
    )


_POOL = torch.ops.aten.max_pool2d_with_indices  # one name, which the tests watch


class _PoolChannelsLast(torch.autograd.Function):
    """Forward in channels-last; backward in NCHW, stock's own kernel on the indices made NCHW (a pooled-size
    copy). Autograd's layout conversions would instead hand the whole backward mixed layouts, whose slow paths
    (pooling backward, the ReLU's and BatchNorm's before it) cost more than the forward saves (measured)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        y, index = _POOL(x.contiguous(memory_format=torch.channels_last), *_pairs(args))
        ctx.args = args
        ctx.save_for_backward(x, index.contiguous())
        return y.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, index = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = _pairs(ctx.args)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, kernel, stride, padding, dilation, ceil_mode, index
        )  # fmt: skip
        return dx, None


def _pairs(args: tuple) -> tuple:
    """``nn.MaxPool2d``'s ints or pairs as the aten op's lists (stride None means the kernel size)."""
    kernel, stride, padding, dilation, ceil_mode = args
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    return pair(kernel), pair(kernel if stride is None else stride), pair(padding), pair(dilation), bool(ceil_mode)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose CPU fp32 NCHW inputs are pooled in channels-last (see the module docstring); the
    output is NCHW like stock's."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not _runs_channels_last(x) or not direct_call_allowed((x,)):
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PoolChannelsLast.apply(x, self)
        y = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
        )
        return y.contiguous()
