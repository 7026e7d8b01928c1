"""conv + bias + ReLU on the Triton backend: cuDNN convolution, then a fused in-place bias+ReLU Triton kernel.

``F.conv2d`` without bias writes the conv output once; the Triton kernel (:mod:`.bias_relu`, imported only
when this backend actually runs, so ``import ptfast`` never imports triton) reads and writes it once more.
Under ``TRITON_INTERPRET=1`` it also runs on CPU tensors (the test suite's interpreter tier). The pooled
variant has no kernel yet. Backward needs only the output (``out > 0`` is the ReLU mask), identical to the
torch backend's, so it delegates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptfast._dispatch import constant_while_compiling
from ptfast.backends import triton as triton_backend
from ptfast.backends.torch import conv as torch_conv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Ops this backend module is registered for but has no kernel for yet (read by ptfast.env_report).
NOT_IMPLEMENTED: dict[str, str] = {"conv_relu_pool": "triton: conv_relu_pool kernel not implemented yet"}


# supports() runs inside torch.compile's trace: probe the environment once, bake the answer in.
@constant_while_compiling
def _device_reason(device: torch.device) -> str | None:
    return triton_backend.device_reason(device)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, padding, pool)."""
    if meta.get("pool"):
        return NOT_IMPLEMENTED["conv_relu_pool"]
    x = meta.get("x")
    if not isinstance(x, torch.Tensor):
        return "triton: no input tensor given"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"triton: dtype {x.dtype} not supported (float16, bfloat16, float32)"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # The interpreter (triton 3.9) converts fp32 -> bf16 by truncation, not round-to-nearest-even.
        return "triton: bfloat16 under the interpreter (TRITON_INTERPRET) rounds wrongly; use a GPU"
    return _device_reason(x.device)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if pool:  # supports() refuses pool, so the dispatcher never gets here with it
        raise NotImplementedError(NOT_IMPLEMENTED["conv_relu_pool"])
    from ptfast.backends.triton.bias_relu import bias_relu_  # imports triton: only when this backend runs

    # cuDNN picks x's layout for its output already; .contiguous() makes the layout certain (no-op then).
    z = F.conv2d(x, weight, None, padding=padding).contiguous(memory_format=torch_conv.memory_format(x))
    bias_relu_(z, bias.contiguous() if bias is not None else None)
    return z, x.new_empty(0, dtype=torch.uint8)


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
    """Same saved tensors as the torch backend (the output is identical), so its backward applies as is."""
    return torch_conv.backward(grad, out, argmax, x, weight, x_shape, padding, pool, needs)
