"""conv + bias + ReLU on the Triton backend: cuDNN convolution, then the Triton bias+ReLU kernel in place.

The Triton kernel (:mod:`.bias_relu`) is imported only when this backend actually runs, so ``import ptfast``
never imports triton. Under ``TRITON_INTERPRET=1`` it also runs on CPU tensors (the test suite's interpreter
tier). The shared shape of this path is in :mod:`ptfast.backends.conv_epilogue`.
"""

from __future__ import annotations

import torch

from ptfast._dispatch import constant_while_compiling
from ptfast.backends import conv_epilogue
from ptfast.backends import triton as triton_backend

# Ops this backend module is registered for but has no kernel for yet (read by ptfast.env_report).
NOT_IMPLEMENTED: dict[str, str] = {"conv_relu_pool": conv_epilogue.pool_reason("triton")}

backward = conv_epilogue.backward


# supports() runs inside torch.compile's trace: probe the environment once, bake the answer in.
@constant_while_compiling
def _device_reason(device: torch.device) -> str | None:
    return triton_backend.device_reason(device)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, padding, pool)."""
    reason = conv_epilogue.supports("triton", meta, _device_reason)
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
    from ptfast.backends.triton.bias_relu import bias_relu_  # imports triton: only when this backend runs

    return conv_epilogue.forward(x, weight, bias, padding, pool, bias_relu_)
