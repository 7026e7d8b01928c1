"""conv_relu(_pool) as "PyTorch's convolution (cuDNN), then one epilogue kernel".

The triton and cuda backends of conv_relu both have this shape and differ only in the epilogue kernels they
pass in and in how they probe their device. ``F.conv2d`` without bias writes the conv output once; the
epilogue reads it once more:

* ``conv_relu``: an in-place bias (+ residual) + ReLU kernel (``bias_relu_(z, bias, residual)``); eager PyTorch
  runs conv with bias, then a separate add and ReLU. Backward needs only the output (``out > 0`` is the ReLU
  mask), identical to the torch backend's, so it is the torch backend's backward.
* ``conv_relu_pool``: one kernel for bias + ReLU + 2x2 max-pool + a uint8 argmax
  (``bias_relu_pool(z, bias, need_argmax) -> (out, argmax)``), instead of eager's bias, ReLU and pool
  kernels with int64 indices. Backward: one kernel rebuilds the conv-output gradient (and the bias gradient)
  from (grad, out, argmax) (``pool_relu_backward(grad, out, argmax, conv_hw, need_dbias) -> (g, dbias)``),
  then cuDNN's ``convolution_backward`` gives dx / dweight with its bias gradient turned off.

A backend without pool kernels passes none: :func:`supports` then refuses the pooled op with
:func:`pool_reason`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ptfast.backends.torch import conv as torch_conv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BiasReluPool = Callable[[torch.Tensor, torch.Tensor | None, bool], tuple[torch.Tensor, torch.Tensor]]
PoolReluBackward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], bool], tuple[torch.Tensor, torch.Tensor | None]
]
BiasRelu = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], object]
Dgrad = Callable[[torch.Tensor, torch.Tensor, list[int], int, torch.memory_format], torch.Tensor]
Wgrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, bool], tuple[torch.Tensor, torch.Tensor | None]]


def pool_reason(backend: str) -> str:
    return f"{backend}: conv_relu_pool kernel not implemented yet"


def supports(
    backend: str,
    meta: dict,
    device_reason: Callable[[torch.device], str | None],
    *,
    has_pool_kernels: bool = False,
) -> str | None:
    """``None`` if the epilogue path runs these inputs (``meta``: x, weight, bias, residual, stride, padding,
    pool), else why not.

    ``has_pool_kernels``: the backend passes ``bias_relu_pool`` / ``pool_relu_backward`` kernels to
    :func:`forward` / :func:`backward`; without them the pooled op is refused.
    """
    if meta.get("pool") and not has_pool_kernels:
        return pool_reason(backend)
    x = meta.get("x")
    if not isinstance(x, torch.Tensor):
        return f"{backend}: no input tensor given"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{backend}: dtype {x.dtype} not supported (float16, bfloat16, float32)"
    return device_reason(x.device)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
    bias_relu_: BiasRelu,
    *,
    bias_relu_pool: BiasReluPool | None = None,
    need_argmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual`` (only without pooling) is laid out like x (the op's rule), hence like ``z``."""
    # cuDNN picks x's layout for its output already; .contiguous() makes the layout certain (no-op then).
    fmt = torch_conv.memory_format(x)
    z = F.conv2d(x, weight, None, stride=stride, padding=padding).contiguous(memory_format=fmt)
    bias = bias.contiguous() if bias is not None else None
    if pool:
        if bias_relu_pool is None:  # supports() refuses pool without the kernels: the dispatcher never gets here
            raise NotImplementedError("conv_relu_pool: this backend passed no pool epilogue kernel")
        out, argmax = bias_relu_pool(z, bias, need_argmax)
        return out, argmax if need_argmax else x.new_empty(0, dtype=torch.uint8)
    bias_relu_(z, bias, residual)
    return z, x.new_empty(0, dtype=torch.uint8)


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
    *,
    pool_relu_backward: PoolReluBackward | None = None,
    dgrad: Dgrad | None = None,
    wgrad: Wgrad | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dweight, dbias, dresidual) like :func:`ptfast.backends.torch.conv.backward`; pooled ops use the
    fused kernel.

    ``dgrad(g, weight, x_shape, padding, memory_format) -> dx``: computes the input gradient of a stride-1
    conv instead of cuDNN (in the output's memory format, i.e. x's); never passed for stride 2.
    ``wgrad(g, x, weight, stride, padding, need_dbias) -> (dw, db | None)``: the weight gradient (and the bias
    gradient, when nothing else computes it) instead of cuDNN. Without any of the kernels this is the torch
    backend's backward.
    """
    if (not pool or pool_relu_backward is None) and dgrad is None and wgrad is None:
        return torch_conv.backward(grad, out, argmax, x, weight, x_shape, stride, padding, pool, needs)
    need_dx, need_dw, need_db, need_dres = needs
    conv_hw = torch_conv.conv_hw(x_shape, weight.shape, stride, padding)
    if pool and pool_relu_backward is not None:
        g, dbias = pool_relu_backward(grad.to(out.dtype), out, argmax, conv_hw, need_db)
        dbias = dbias.to(weight.dtype) if dbias is not None else None
        cudnn_db = False  # the kernel summed it at pooled resolution
    else:
        g = torch_conv.conv_output_grad(grad, out, argmax, conv_hw, pool)
        dbias, cudnn_db = None, need_db
    g = g.to(weight.dtype)
    dx = dw = None
    if dgrad is not None and need_dx:
        dx = dgrad(g, weight, x_shape, padding, torch_conv.memory_format(out))
        need_dx = False
    if wgrad is not None and need_dw:
        dw, wgrad_db = wgrad(g, x, weight, stride, padding, cudnn_db)
        need_dw = False
        if cudnn_db:
            dbias, cudnn_db = wgrad_db, False
    if need_dx or need_dw or cudnn_db:
        if x is None:  # only the shape is read when dweight is not needed
            x = g.new_empty(1).expand(x_shape)
        cudnn_dx, cudnn_dw, cudnn_dbias = torch.ops.aten.convolution_backward(
            g,
            x,
            weight,
            [weight.shape[0]] if cudnn_db else None,
            [stride, stride],
            [padding, padding],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_dx, need_dw, cudnn_db],
        )
        dx = cudnn_dx if need_dx else dx
        dw = cudnn_dw if need_dw else dw
        dbias = cudnn_dbias if cudnn_db else dbias
    return dx, dw, dbias, g if need_dres else None
