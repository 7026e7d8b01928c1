"""conv + bias + ReLU (+ 2x2 max-pool) on the Triton backend: cuDNN convolution, then one Triton epilogue kernel.

``conv_relu``: the in-place bias+ReLU kernel (:mod:`.bias_relu`). ``conv_relu_pool``: the fused
bias+ReLU+max-pool+argmax kernel and its fused backward (:mod:`.bias_relu_pool`). The Triton kernels are
imported only when this backend actually runs, so ``import ptfast`` never imports triton. Under
``TRITON_INTERPRET=1`` they also run on CPU tensors (the test suite's interpreter tier). The shared shape of
this path is in :mod:`ptfast.backends.conv_epilogue`.
"""

from __future__ import annotations

import torch

from ptfast.backends import conv_epilogue
from ptfast.backends import triton as triton_backend

# Ops this backend module is registered for but has no kernel for yet (read by ptfast.env_report): none.
NOT_IMPLEMENTED: dict[str, str] = {}


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, padding, pool)."""
    reason = conv_epilogue.supports("triton", meta, triton_backend.device_reason_while_compiling, has_pool_kernels=True)
    x = meta.get("x")
    if reason is None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # The interpreter (triton 3.9) converts fp32 -> bf16 by truncation, not round-to-nearest-even.
        return "triton: bfloat16 under the interpreter (TRITON_INTERPRET) rounds wrongly; use a GPU"
    return reason


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # These import triton: only when this backend runs.
    from ptfast.backends.triton.bias_relu import bias_relu_
    from ptfast.backends.triton.bias_relu_pool import bias_relu_pool

    return conv_epilogue.forward(
        x, weight, bias, padding, pool, bias_relu_, bias_relu_pool=bias_relu_pool, need_argmax=need_argmax
    )


def backward(
    grad: torch.Tensor,
    out: torch.Tensor,
    argmax: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: list[int],
    padding: int,
    pool: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias); with pooling the conv-output and bias gradients come from the fused kernel."""
    pool_relu_backward = None
    if pool:
        from ptfast.backends.triton.bias_relu_pool import pool_relu_backward  # imports triton
    return conv_epilogue.backward(
        grad, out, argmax, x, weight, x_shape, padding, pool, needs, pool_relu_backward=pool_relu_backward
    )
