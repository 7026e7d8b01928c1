"""conv + bias (+ residual) + ReLU (+ 2x2 max-pool) on PyTorch's own ops (cuDNN / oneDNN convolution).

Forward saves only what backward needs: the (pooled) output and, with pooling, a 1-byte argmax per window
(window offset 0..3 in row-major order). At the argmax the ReLU mask equals ``out > 0``, so backward rebuilds
the conv-output gradient from (grad, out, argmax) without any full-resolution activation; that gradient is
also the residual's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(**meta: object) -> str | None:
    return None  # everything the functional API's validation admits


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last only when x is laid out that way and not also plain-contiguous (ambiguous at C=1)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_hw(x_shape, weight_shape, stride: int, padding: int) -> tuple[int, int]:
    """The convolution's output height and width (before pooling)."""
    return (
        (x_shape[2] + 2 * padding - weight_shape[2]) // stride + 1,
        (x_shape[3] + 2 * padding - weight_shape[3]) // stride + 1,
    )


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = memory_format(x)
    no_argmax = x.new_empty(0, dtype=torch.uint8)
    z = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    if residual is not None:  # stock order: (conv + bias) + residual, each rounded to the dtype
        z.add_(residual)
    if not pool:
        return torch.relu_(z).contiguous(memory_format=fmt), no_argmax
    if not need_argmax:  # inference / frozen inputs: PyTorch's pooling kernel, no indices kept
        return F.max_pool2d(torch.relu_(z), 2, 2).contiguous(memory_format=fmt), no_argmax
    n, c, h, w = z.shape
    ho, wo = h // 2, w // 2
    windows = z[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5)
    # max over a dim returns the first maximum on ties (and propagates NaN); relu commutes with max.
    values, index = windows.reshape(n, c, ho, wo, 4).max(dim=-1)
    out = torch.relu_(values).contiguous(memory_format=fmt)
    return out, index.to(torch.uint8).contiguous(memory_format=fmt)


def conv_output_grad(
    grad: torch.Tensor, out: torch.Tensor, argmax: torch.Tensor, conv_hw: tuple[int, int], pool: bool
) -> torch.Tensor:
    """Gradient w.r.t. the conv output (pre-ReLU) from the saved (pooled) output and argmax."""
    g = grad * (out > 0)
    if not pool:
        return g
    n, c, ho, wo = g.shape
    full = g.new_zeros(n, c, ho, wo, 4)
    full.scatter_(-1, argmax.long().unsqueeze(-1), g.unsqueeze(-1))
    full = full.reshape(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
    h, w = conv_hw
    full = F.pad(full, (0, w - 2 * wo, 0, h - 2 * ho))  # rows/cols the pool floored away get no gradient
    return full.contiguous(memory_format=memory_format(out))  # cuDNN's backward then needs no layout change


def backward(
    grad: torch.Tensor,
    out: torch.Tensor,
    argmax: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: list[int],
    stride: int,
    padding: int,
    pool: bool,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dweight, dbias, dresidual) for the entries of ``needs`` that are True; ``x`` may be None without
    dweight."""
    g = conv_output_grad(grad, out, argmax, conv_hw(x_shape, weight.shape, stride, padding), pool)
    need_dx, need_dw, need_db, need_dres = needs
    if x is None:  # only the shape is read when dweight is not needed
        x = g.new_empty(1).expand(x_shape)
    g = g.to(weight.dtype)
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        dx, dw, db = torch.ops.aten.convolution_backward(
            g,
            x,
            weight,
            [weight.shape[0]],
            [stride, stride],
            [padding, padding],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_dx, need_dw, need_db],
        )
    return dx, dw, db, g if need_dres else None
