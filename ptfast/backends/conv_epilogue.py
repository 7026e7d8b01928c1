"""conv_relu as "PyTorch's convolution (cuDNN), then an in-place bias+ReLU kernel".

The triton and cuda backends of conv_relu both have this shape and differ only in the epilogue kernel and in
how they probe their device. ``F.conv2d`` without bias writes the conv output once; the epilogue reads and
writes it once more (eager PyTorch runs conv with bias, then a separate ReLU). The pooled variant has no kernel
yet. Backward needs only the output (``out > 0`` is the ReLU mask), identical to the torch backend's, so it is
the torch backend's backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ptfast.backends.torch import conv as torch_conv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

backward = torch_conv.backward


def pool_reason(backend: str) -> str:
    return f"{backend}: conv_relu_pool kernel not implemented yet"


def supports(backend: str, meta: dict, device_reason: Callable[[torch.device], str | None]) -> str | None:
    """``None`` if the epilogue path runs these inputs (``meta``: x, weight, bias, padding, pool), else why not."""
    if meta.get("pool"):
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
    padding: int,
    pool: bool,
    bias_relu_: Callable[[torch.Tensor, torch.Tensor | None], object],
) -> tuple[torch.Tensor, torch.Tensor]:
    if pool:  # supports() refuses pool, so the dispatcher never gets here with it
        raise NotImplementedError("conv_relu_pool has no epilogue kernel yet")
    # cuDNN picks x's layout for its output already; .contiguous() makes the layout certain (no-op then).
    z = F.conv2d(x, weight, None, padding=padding).contiguous(memory_format=torch_conv.memory_format(x))
    bias_relu_(z, bias.contiguous() if bias is not None else None)
    return z, x.new_empty(0, dtype=torch.uint8)
