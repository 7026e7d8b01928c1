"""``ptfast.conv_relu`` / ``ptfast.conv_relu_pool``: relu(conv2d(x, w, b) [+ residual]) and its 2x2 max-pooled form.

Registered ops (one definition each, all backends behind them):

* ``ptfast::conv_relu(x, weight, bias, residual, stride, padding, pool, need_argmax, backend) -> (out, argmax)``
  ``out``: ``(N, Cout, Hc, Wc)`` or pooled ``(N, Cout, Hc//2, Wc//2)`` in x's memory format, with
  ``Hc = (H + 2 * padding - kh) // stride + 1``; ``residual`` (None or the unpooled output's shape, laid out like
  the output) is added before the ReLU; ``argmax``: uint8 window offset (row-major 0..3) per pooled element, or
  an empty tensor when not needed.
* ``ptfast::conv_relu_backward(...) -> (dx, dweight, dbias, dresidual)`` (empty tensors for gradients not asked
  for); dx in x's memory format (``x_channels_last``, recorded at forward: the output's own layout is ambiguous
  when it has one channel or one pixel), dweight in weight's, dresidual in the output's.

Autocast: x, weight, bias and residual are cast to the autocast dtype (like ``conv2d``); the output has that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast import _dispatch, _validation, verification
from ptfast._eager import RegisteredOp
from ptfast.backends.cuda import conv as cuda_conv
from ptfast.backends.torch import conv as torch_conv
from ptfast.backends.triton import conv as triton_conv

_IMPLS = {"torch": torch_conv, "triton": triton_conv, "cuda": cuda_conv}
_AUTO_ORDER = ("cuda", "triton", "torch")


def _op_name(pool: bool) -> str:
    return "conv_relu_pool" if pool else "conv_relu"


def _fault_key(
    activation: Tensor, channels_last: bool, weight: Tensor, stride: int, padding: int, pool: bool, residual: bool
) -> tuple:
    """The input class a kernel fault is remembered for: what selects a kernel specialization, never a batch or
    image size. ``activation`` is x in forward, the output in backward (same device and dtype)."""
    shape = tuple(int(s) for s in weight.shape)
    return (activation.device, activation.dtype, channels_last, shape, stride, padding, pool, residual)


def _channels_last(x: Tensor) -> bool:
    return torch_conv.memory_format(x) == torch.channels_last


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _conv_relu_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
    need_argmax: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    key = _fault_key(x, _channels_last(x), weight, stride, padding, pool, residual is not None)
    return _dispatch.run(
        _op_name(pool), "forward", backend, _IMPLS, key,
        lambda impl: impl.forward(x, weight, bias, residual, stride, padding, pool, need_argmax),
    )  # fmt: skip


CONV_RELU = RegisteredOp("ptfast::conv_relu", _conv_relu_impl)


@CONV_RELU.register_fake
def _(x, weight, bias, residual, stride, padding, pool, need_argmax, backend):
    hc, wc = torch_conv.conv_hw(x.shape, weight.shape, stride, padding)
    shape = (x.shape[0], weight.shape[0], hc // 2, wc // 2) if pool else (x.shape[0], weight.shape[0], hc, wc)
    fmt = torch_conv.memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if need_argmax and pool:
        return out, torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt)
    return out, x.new_empty(0, dtype=torch.uint8)


def _conv_relu_backward_impl(
    grad: Tensor,
    out: Tensor,
    argmax: Tensor,
    x: Tensor | None,
    weight: Tensor,
    x_shape: list[int],
    x_channels_last: bool,
    stride: int,
    padding: int,
    pool: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    need_dresidual: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dx, need_dweight, need_dbias, need_dresidual)
    key = _fault_key(out, x_channels_last, weight, stride, padding, pool, need_dresidual)
    dx, dw, db, dres = _dispatch.run(
        _op_name(pool), "backward", backend, _IMPLS, key,
        lambda impl: impl.backward(grad, out, argmax, x, weight, x_shape, stride, padding, pool, needs),
    )  # fmt: skip
    empty = weight.new_empty(0)
    # One layout whatever the backend picked (the fake kernel promises it to torch.compile): dx in x's memory
    # format, dweight in weight's, dresidual in the output's. No-ops when the backend already returned them so.
    return (
        dx.contiguous(memory_format=_format(x_channels_last)) if need_dx else empty,
        dw.contiguous(memory_format=torch_conv.memory_format(weight)) if need_dweight else empty.clone(),
        db if need_dbias else empty.clone(),
        dres.contiguous(memory_format=_format(x_channels_last)) if need_dresidual else empty.clone(),
    )


CONV_RELU_BACKWARD = RegisteredOp("ptfast::conv_relu_backward", _conv_relu_backward_impl)


@CONV_RELU_BACKWARD.register_fake
def _(grad, out, argmax, x, weight, x_shape, x_channels_last, stride, padding, pool, *needs_and_backend):
    need_dx, need_dw, need_db, need_dres, _backend = needs_and_backend
    like = dict(dtype=weight.dtype, device=weight.device)
    fmt_x = _format(x_channels_last)
    dx = torch.empty(x_shape, **like, memory_format=fmt_x) if need_dx else weight.new_empty(0)
    fmt_w = torch_conv.memory_format(weight)
    dw = torch.empty(weight.shape, **like, memory_format=fmt_w) if need_dw else weight.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if need_db else weight.new_empty(0)
    dres = torch.empty(out.shape, **like, memory_format=fmt_x) if need_dres else weight.new_empty(0)
    return dx, dw, db, dres


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, stride, padding, pool, _need_argmax, backend = inputs
    out, argmax = output
    # x is read only by the weight gradient: frozen weights do not keep the input alive. The residual's gradient
    # is the conv output's (from grad and out): the residual itself is never saved.
    ctx.save_for_backward(out, argmax, x if weight.requires_grad else None, weight)
    ctx.x_shape, ctx.x_channels_last = list(x.shape), _channels_last(x)
    ctx.stride, ctx.padding, ctx.pool, ctx.backend = stride, padding, pool, backend


def _backward(ctx, grad_out, _grad_argmax):
    out, argmax, x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
    dx, dw, db, dres = CONV_RELU_BACKWARD(
        grad_out,
        out,
        argmax,
        x,
        weight,
        ctx.x_shape,
        ctx.x_channels_last,
        ctx.stride,
        ctx.padding,
        ctx.pool,
        need_dx,
        need_dw,
        need_db,
        need_dres,
        ctx.backend,
    )
    grads = (dx if need_dx else None, dw if need_dw else None, db if need_db else None)
    return (*grads, dres if need_dres else None, None, None, None, None, None)


CONV_RELU.register_autograd(_backward, setup_context=_setup_context)


def _validate(
    op: str, x: object, weight: object, bias: object, residual: object, stride: object, padding: object, pool: bool
) -> None:
    x = _validation.check_tensor(op, "x", x, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    weight = _validation.check_tensor(op, "weight", weight, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    if bias is not None:
        bias = _validation.check_tensor(op, "bias", bias, ndim=1, dtypes=_validation.FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"ptfast.{op}: bias has {bias.shape[0]} entries but weight has {weight.shape[0]} output channels"
            )
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"ptfast.{op}: padding must be a non-negative int, got {padding!r}")
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"ptfast.{op}: stride must be 1 or 2, got {stride!r}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"ptfast.{op}: x has {x.shape[1]} channels but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)}; grouped convolutions are not supported)"
        )
    if residual is not None:
        residual = _validation.check_tensor(op, "residual", residual, ndim=4, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_same_device(op, x=x, weight=weight, bias=bias, residual=residual)
    if x.shape[2] + 2 * padding < weight.shape[2] or x.shape[3] + 2 * padding < weight.shape[3]:
        raise ValueError(
            f"ptfast.{op}: input {tuple(x.shape[2:])} with padding {padding} is smaller than "
            f"the kernel {tuple(weight.shape[2:])}"
        )
    hc, wc = torch_conv.conv_hw(x.shape, weight.shape, stride, padding)
    if pool and (hc < 2 or wc < 2):
        raise ValueError(f"ptfast.{op}: conv output {hc}x{wc} is too small for 2x2 max-pooling")
    out_shape = (x.shape[0], weight.shape[0], hc, wc)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(
            f"ptfast.{op}: residual has shape {tuple(residual.shape)} but the conv output is {out_shape} "
            "(it is added elementwise, without broadcasting)"
        )


def _conv_relu(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, stride: int, padding: int, pool: bool
) -> Tensor:
    op = _op_name(pool)
    _validate(op, x, weight, bias, residual, stride, padding, pool)
    cast = _validation.autocast_dtype(x.device)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
        residual = residual.to(cast) if residual is not None else None
    else:
        _validation.check_same_dtype(op, x=x, weight=weight, bias=bias, residual=residual)
    channels_last = _channels_last(x)
    if residual is not None:  # the kernels read it with the output's strides (a no-op when already so)
        residual = residual.contiguous(memory_format=_format(channels_last))
    # The verification gate's shape class matters only on CUDA (it gates auto there): no work elsewhere.
    shape_class = None
    if x.is_cuda:
        shape_class = verification.conv_class(
            x.dtype, channels_last, tuple(weight.shape), pool, stride=stride, residual=residual is not None
        )
    requested = _dispatch.requested_backend()
    backend = _dispatch.choose(
        op, _IMPLS, _AUTO_ORDER,
        lambda: _fault_key(x, channels_last, weight, stride, padding, pool, residual is not None),
        device=x.device, shape_class=shape_class, requested=requested,
        x=x, weight=weight, bias=bias, residual=residual, stride=stride, padding=padding, pool=pool,
    )  # fmt: skip
    if _dispatch.autograd_route_applies(backend, x.device, (x, weight, bias, residual), requested):
        out = torch_conv.eager_forward(x, weight, bias, residual, stride, padding, pool)
        if out is not None:  # None: the op's result differs there (see eager_forward)
            _dispatch.record_autograd_route(op, out)
            return out
    need_argmax = pool and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    out, _ = CONV_RELU(x, weight, bias, residual, stride, padding, pool, need_argmax, backend)
    return out


def conv_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 1,
    residual: Tensor | None = None,
) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride=stride, padding=padding) + residual)`` for ungrouped convolutions.

    Args:
        x: ``(N, Cin, H, W)``, NCHW or channels_last; fp16, bf16, fp32 or fp64.
        weight: ``(Cout, Cin, kh, kw)``: any kernel size (1x1, 3x3, the 7x7 stem of ResNet, ...).
        bias: ``(Cout,)`` or None.
        stride: 1 or 2, on both axes.
        padding: zero padding on every side.
        residual: None, or the output's shape ``(N, Cout, Ho, Wo)``, added before the ReLU (the tail of a
            ResNet block); it gets the gradient of the conv output.

    Returns:
        ``(N, Cout, Ho, Wo)`` with ``Ho = (H + 2p - kh) // stride + 1`` (likewise ``Wo``), in x's memory format.
    """
    return _conv_relu(x, weight, bias, residual, stride, padding, pool=False)


def conv_relu_pool(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, padding: int = 1) -> Tensor:
    """``max_pool2d(relu(conv2d(x, weight, bias, padding=padding)), 2, 2)``.

    Odd conv-output sizes are floored like ``nn.MaxPool2d(2, 2)``. Ties in a window go to the first maximum in
    row-major order; NaN propagates. Shapes as :func:`conv_relu`, with the spatial output halved (floored).
    """
    return _conv_relu(x, weight, bias, None, 1, padding, pool=True)
