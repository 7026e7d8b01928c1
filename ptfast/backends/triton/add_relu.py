"""``add_relu`` on the Triton backend: the conv epilogue's bias/residual/ReLU kernel (:mod:`.bias_relu`) without a
bias, writing a new tensor instead of its input. Imported lazily: ``import ptfast`` never imports triton."""

from __future__ import annotations

import torch

from ptfast.backends import triton as triton_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs (``meta``: x, residual), else why not."""
    x = meta.get("x")
    if not isinstance(x, torch.Tensor):
        return "triton: no input tensor given"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"triton: dtype {x.dtype} not supported (float16, bfloat16, float32)"
    reason = triton_backend.device_reason_while_compiling(x.device)
    if reason is None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # The interpreter (triton 3.9) converts fp32 -> bf16 by truncation, not round-to-nearest-even.
        return "triton: bfloat16 under the interpreter (TRITON_INTERPRET) rounds wrongly; use a GPU"
    return reason


def forward(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    from ptfast.backends.triton.bias_relu import bias_relu

    return bias_relu(x, None, residual)
