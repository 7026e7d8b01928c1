"""conv + bias + ReLU (+ 2x2 max-pool) on the Triton backend.

Forward, per layer (:func:`ptfast.backends.triton.conv_config.algos_for`):

* ``implicit_gemm`` (the default for channels_last activations): one Triton kernel computes the convolution
  as an implicit GEMM with bias, ReLU and, for ``conv_relu_pool``, the 2x2 max-pool and its uint8 argmax in
  the GEMM's epilogue (:mod:`.implicit_gemm_kernels`): the full-resolution conv output is never written.
* ``cudnn`` (the default for NCHW, where the GEMM's loads would be gathers): cuDNN's convolution, then one
  epilogue kernel (:mod:`.bias_relu`, :mod:`.bias_relu_pool`); the shared shape of this path is
  :mod:`ptfast.backends.conv_epilogue`.

Backward: with pooling, the fused kernel of :mod:`.bias_relu_pool` rebuilds the conv-output gradient and the
bias gradient from (grad, pooled output, argmax); the input gradient is the Triton implicit GEMM on the flipped
weight or cuDNN's, the weight gradient a Triton split-row GEMM or cuDNN's (per layer). Both forwards save the
same (out, argmax), so either backward follows either forward.

The Triton kernels are imported only when this backend actually runs, so ``import ptfast`` never imports
triton. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors (the test suite's interpreter tier).
"""

from __future__ import annotations

import torch

from ptfast import _dispatch
from ptfast.backends import conv_epilogue
from ptfast.backends import triton as triton_backend
from ptfast.backends.torch import conv as torch_conv
from ptfast.backends.triton import conv_config

# Ops this backend module is registered for but has no kernel for yet (read by ptfast.env_report): none.
NOT_IMPLEMENTED: dict[str, str] = {}


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs, else why not (``meta``: x, weight, bias, residual, stride,
    padding, pool)."""
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
    residual: torch.Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    algos = _algos(x, weight, stride, padding, x.shape[2])
    # Which algorithm ran, for tests (ptfast.testing.record_dispatch): phase "forward:<algo>".
    _dispatch.record(_op(pool), "triton", f"forward:{algos.forward}")
    if algos.forward == "implicit_gemm":
        from ptfast.backends.triton.implicit_gemm import conv_bias_relu  # imports triton

        return conv_bias_relu(x, weight, bias, residual, stride, padding, pool, need_argmax)
    # These import triton: only when this backend runs.
    from ptfast.backends.triton.bias_relu import bias_relu_
    from ptfast.backends.triton.bias_relu_pool import bias_relu_pool

    return conv_epilogue.forward(
        x, weight, bias, residual, stride, padding, pool, bias_relu_,
        bias_relu_pool=bias_relu_pool, need_argmax=need_argmax,
    )  # fmt: skip


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
    """(dx, dweight, dbias, dresidual); with pooling the conv-output and bias gradients come from the fused
    kernel. A strided conv's input gradient is cuDNN's (the Triton dgrad is the stride-1 transposed conv)."""
    pool_relu_backward = dgrad = wgrad = None
    if pool:
        from ptfast.backends.triton.bias_relu_pool import pool_relu_backward  # imports triton
    algos = _algos(out, weight, stride, padding, x_shape[2])
    if (needs[0] and algos.dgrad == "triton") or (needs[1] and algos.wgrad == "triton"):
        from ptfast.backends.triton import implicit_gemm  # imports triton

        if needs[0] and algos.dgrad == "triton" and implicit_gemm.dgrad_supported(weight.shape, stride, padding):
            dgrad = implicit_gemm.conv_dgrad
        if needs[1] and algos.wgrad == "triton":
            wgrad = implicit_gemm.conv_wgrad
    if needs[0]:
        _dispatch.record(_op(pool), "triton", "dgrad:triton" if dgrad is not None else "dgrad:cudnn")
    if needs[1]:
        _dispatch.record(_op(pool), "triton", "wgrad:triton" if wgrad is not None else "wgrad:cudnn")
    return conv_epilogue.backward(
        grad,
        out,
        argmax,
        x,
        weight,
        x_shape,
        stride,
        padding,
        pool,
        needs,
        pool_relu_backward=pool_relu_backward,
        dgrad=dgrad,
        wgrad=wgrad,
    )


def _op(pool: bool) -> str:
    return "conv_relu_pool" if pool else "conv_relu"


def _algos(
    activation: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, input_h: int
) -> conv_config.Algos:
    """The layer's algorithms; ``activation`` (x in forward, the saved output in backward) gives the layout."""
    conv_h = (input_h + 2 * padding - weight.shape[2]) // stride + 1
    channels_last = torch_conv.memory_format(activation) == torch.channels_last
    return conv_config.algos_for(
        activation.device, weight.dtype, weight.shape[1], weight.shape[0], conv_h, channels_last=channels_last
    )
