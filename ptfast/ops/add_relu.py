"""``ptfast.add_relu``: ``relu(x + residual)`` in one pass, the tail of a ResNet block trained with BatchNorm on
batch statistics (``conv -> BN -> (+ identity) -> ReLU``, where the BN cannot be folded into the conv).

Registered op (one definition, all backends behind it):

* ``ptfast::add_relu(x, residual, backend) -> out``: ``out`` has x's shape, dtype and memory format.

Stock PyTorch runs ``out += identity`` and ``relu_(out)``: two kernels, five passes over the activation; the
fused kernel reads x and residual once and writes out once. The backward is ReLU's own (``threshold_backward``
on the saved output, one pass, the same on every backend): both inputs get that gradient, as ``x + residual``
gives it to both. Nothing but the output is saved.

Like ``+`` (which autocast leaves alone), the op never casts: x and residual must have one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast import _dispatch, _validation, verification
from ptfast._eager import RegisteredOp
from ptfast.backends.cuda import add_relu as cuda_add_relu
from ptfast.backends.torch import add_relu as torch_add_relu
from ptfast.backends.torch.conv import memory_format
from ptfast.backends.triton import add_relu as triton_add_relu

_IMPLS = {"torch": torch_add_relu, "triton": triton_add_relu, "cuda": cuda_add_relu}
_AUTO_ORDER = ("cuda", "triton", "torch")
OP = "add_relu"


def _fault_key(x: Tensor, channels_last: bool) -> tuple:
    return (x.device, x.dtype, channels_last)


def _add_relu_impl(x: Tensor, residual: Tensor, backend: str) -> Tensor:
    key = _fault_key(x, memory_format(x) == torch.channels_last)
    return _dispatch.run(OP, "forward", backend, _IMPLS, key, lambda impl: impl.forward(x, residual))


ADD_RELU = RegisteredOp("ptfast::add_relu", _add_relu_impl)


@ADD_RELU.register_fake
def _(x, residual, backend):
    return torch.empty_like(x, memory_format=memory_format(x))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _backward(ctx, grad: Tensor):
    (out,) = ctx.saved_tensors
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return g if ctx.needs_input_grad[0] else None, g if ctx.needs_input_grad[1] else None, None


ADD_RELU.register_autograd(_backward, setup_context=_setup_context)


def _validate(x: object, residual: object) -> None:
    x = _validation.check_tensor(OP, "x", x, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    residual = _validation.check_tensor(OP, "residual", residual, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_same_device(OP, x=x, residual=residual)
    if residual.dtype != x.dtype:
        raise TypeError(f"ptfast.{OP}: residual has dtype {residual.dtype} but x has {x.dtype}; cast one of them")
    if residual.shape != x.shape:
        raise ValueError(
            f"ptfast.{OP}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)} "
            "(added elementwise, without broadcasting)"
        )


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """``relu(x + residual)``, one fused pass forward, ReLU's backward for both inputs.

    Args:
        x: ``(N, C, H, W)``, NCHW or channels_last (any other strides are made NCHW-contiguous first); fp16, bf16,
            fp32 or fp64.
        residual: x's shape and dtype (any layout: it is read in x's).

    Returns:
        ``(N, C, H, W)`` in x's memory format and dtype. NaN propagates, like ``torch.relu``; so does the
        gradient at a NaN output (ReLU's own backward, which masks only where the output is <= 0; ``conv_relu``'s
        fused backward masks with ``out > 0`` instead).
    """
    return _add_relu(x, residual, x_is_scratch=False)


def add_relu_into(x: Tensor, residual: Tensor) -> Tensor:
    """:func:`add_relu` where ``x`` is the caller's fresh temporary, read by nothing else (a ResNet block's
    ``bn2(conv2(...))`` before ``out += identity``): ``auto``'s CPU route may write the result into it, as stock's
    ``out += identity; relu(out)`` does, instead of allocating (a fresh full-size tensor costs a CPU page faults
    that stock does not pay). Every other route, and the result, are :func:`add_relu`'s."""
    return _add_relu(x, residual, x_is_scratch=True)


def _add_relu(x: Tensor, residual: Tensor, x_is_scratch: bool) -> Tensor:
    _validate(x, residual)
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)  # no-ops when already so (the kernels read both with x's offsets)
    residual = residual.contiguous(memory_format=fmt)
    channels_last = fmt == torch.channels_last
    shape_class = verification.add_relu_class(x.dtype, channels_last, x.numel()) if x.is_cuda else None
    requested = _dispatch.requested_backend()
    backend = _dispatch.choose(
        OP, _IMPLS, _AUTO_ORDER, lambda: _fault_key(x, channels_last),
        device=x.device, shape_class=shape_class, requested=requested, x=x, residual=residual,
    )  # fmt: skip
    if _dispatch.autograd_route_applies(backend, x.device, (x, residual), requested):
        # auto's CPU route around the op's own Python: the torch backend's two ops as themselves, so that
        # autograd's own nodes run the same backward (ReLU's on the output, then the add's) in C++.
        out = x.add_(residual).relu_() if x_is_scratch else torch_add_relu.forward(x, residual)
        _dispatch.record_autograd_route(OP, out, backward=False)
        return out
    return ADD_RELU(x, residual, backend)
