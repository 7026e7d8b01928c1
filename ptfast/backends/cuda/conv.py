"""conv + bias + ReLU on the CUDA backend: cuDNN convolution, then ``csrc/bias_relu`` in place.

The shared shape of this path (and the refusal of the pooled variant) is in :mod:`ptfast.backends.conv_epilogue`.
"""

from __future__ import annotations

import torch

from ptfast._dispatch import constant_while_compiling
from ptfast.backends import conv_epilogue
from ptfast.backends import cuda as cuda_backend

# Ops this backend module is registered for but has no kernel for yet (read by ptfast.env_report).
NOT_IMPLEMENTED: dict[str, str] = {"conv_relu_pool": conv_epilogue.pool_reason("cuda")}

backward = conv_epilogue.backward


# supports() runs inside torch.compile's trace: probe the environment once, bake the answer in.
@constant_while_compiling
def _device_reason(device: torch.device) -> str | None:
    return cuda_backend.unavailable_reason(device)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, padding, pool)."""
    return conv_epilogue.supports("cuda", meta, _device_reason)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ext = cuda_backend.extension()
    if ext is None:
        raise RuntimeError(cuda_backend.extension_reason())
    return conv_epilogue.forward(x, weight, bias, padding, pool, ext.bias_relu_)
