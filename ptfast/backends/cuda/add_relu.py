"""``add_relu`` on the CUDA backend: ``csrc/bias_relu`` (the conv epilogue kernel) without a bias, writing a new
tensor laid out like x."""

from __future__ import annotations

import torch

from ptfast.backends.cuda import conv as cuda_conv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs (``meta``: x, residual), else why not."""
    x = meta.get("x")
    if not isinstance(x, torch.Tensor):
        return "cuda: no input tensor given"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"cuda: dtype {x.dtype} not supported (float16, bfloat16, float32)"
    return cuda_conv.device_reason(x.device)


def forward(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return cuda_conv.extension().bias_relu(x, None, residual)
