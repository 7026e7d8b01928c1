"""conv + bias + ReLU (+ 2x2 max-pool) on the CUDA backend: cuDNN convolution, then one ``csrc/`` epilogue kernel.

``conv_relu``: ``csrc/bias_relu`` in place (bias, the optional residual and ReLU in one pass).
``conv_relu_pool``: ``csrc/bias_relu_pool``, one kernel for bias +
ReLU + max-pool + a uint8 argmax, and its backward kernel that rebuilds the conv-output gradient (and sums the
bias gradient at pooled resolution, in a fixed order) from (grad, pooled output, argmax): no full-resolution
activation and no int64 indices are saved. The shared shape of this path is in
:mod:`ptfast.backends.conv_epilogue`.
"""

from __future__ import annotations

import torch

from ptfast._dispatch import constant_while_compiling
from ptfast.backends import conv_epilogue
from ptfast.backends import cuda as cuda_backend


# supports() runs inside torch.compile's trace: probe the environment once, bake the answer in.
@constant_while_compiling
def device_reason(device: torch.device) -> str | None:
    return cuda_backend.unavailable_reason(device)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, padding, pool)."""
    return conv_epilogue.supports("cuda", meta, device_reason, has_pool_kernels=True)


def extension():
    ext = cuda_backend.extension()
    if ext is None:
        raise RuntimeError(cuda_backend.extension_reason())
    return ext


def _bias_relu_pool(z: torch.Tensor, bias: torch.Tensor | None, need_argmax: bool):
    return extension().bias_relu_pool(z, bias, need_argmax)


def _pool_relu_backward(grad, out, argmax, conv_hw: tuple[int, int], need_dbias: bool):
    g, dbias = extension().pool_relu_backward(grad, out, argmax, conv_hw[0], conv_hw[1], need_dbias)
    return g, dbias if need_dbias else None


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
    return conv_epilogue.forward(
        x, weight, bias, residual, stride, padding, pool, _bias_relu_,
        bias_relu_pool=_bias_relu_pool, need_argmax=need_argmax,
    )  # fmt: skip


def _bias_relu_(z: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    return extension().bias_relu_(z, bias, residual)


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
    return conv_epilogue.backward(
        grad, out, argmax, x, weight, x_shape, stride, padding, pool, needs, pool_relu_backward=_pool_relu_backward
    )
