"""conv + bias (+ residual) + ReLU (+ 2x2 max-pool) on PyTorch's own ops (cuDNN / oneDNN convolution).

Forward saves only what backward needs: the (pooled) output and, with pooling, a 1-byte argmax per window
(window offset 0..3 in row-major order). At the argmax the ReLU mask equals ``out > 0``, so backward rebuilds
the conv-output gradient from (grad, out, argmax) without any full-resolution activation; that gradient is
also the residual's.

On a CPU, with pooling, the fp32 forward runs in channels-last (NHWC) whatever x's layout, and its pooled results
are converted back to x's: PyTorch's NCHW max-pooling on a CPU is a scalar loop, ~20x slower than its NHWC kernel,
and oneDNN's fp32 convolution is faster on NHWC operands (measured, 2 threads, 32x64x32x32: pool 6.6 ms NCHW vs
0.3 ms NHWC, conv 23 ms vs 13 ms, converting x 3.4 ms). Without pooling the full-size output would have to be
converted back, which costs what the convolution gains; backward stays in x's layout for the same reason (its
convolution gains ~8 ms, converting x, the gradient and dx back costs about as much).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def supports(**meta: object) -> str | None:
    return None  # everything the functional API's validation admits


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last only when x is laid out that way and not also plain-contiguous (ambiguous at C=1)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pool_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the forward's convolution and pooling run in (see the module docstring)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.channels_last
    return memory_format(x)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x with channels-last strides, which decide the layout convolution picks. One channel (or a 1x1 image) is
    ambiguous: x is then channels-last contiguous already, but ``contiguous`` keeps its NCHW strides and the
    convolution would run (and pool) in NCHW, so x is re-viewed with the strides channels-last gives."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (h * w * c, 1, w * c, c), x.storage_offset())


def conv_hw(x_shape, weight_shape, stride: int, padding: int) -> tuple[int, int]:
    """The convolution's output height and width (before pooling)."""
    return (
        (x_shape[2] + 2 * padding - weight_shape[2]) // stride + 1,
        (x_shape[3] + 2 * padding - weight_shape[3]) // stride + 1,
    )


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
    fmt = memory_format(x)
    no_argmax = x.new_empty(0, dtype=torch.uint8)
    if pool and pool_format(x) == torch.channels_last:  # the module docstring says why
        x = _channels_last(x)
    z = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    if residual is not None:  # stock order: (conv + bias) + residual, each rounded to the dtype
        z.add_(residual)
    if not pool:
        return torch.relu_(z).contiguous(memory_format=fmt), no_argmax
    if not need_argmax:  # inference / frozen inputs: PyTorch's pooling kernel, no indices kept
        return F.max_pool2d(torch.relu_(z), 2, 2).contiguous(memory_format=fmt), no_argmax
    # PyTorch's pooling kernel on the pre-ReLU output (relu commutes with max; it takes the first maximum of a
    # window in row-major order, as the contract does), its flat indices turned into the uint8 window offset.
    # Backward never reads the offset of a window the ReLU zeroes (or whose maximum is NaN); it is still the
    # contract's offset, NaN windows included (see _first_nan_offsets).
    values, index = F.max_pool2d(z, 2, 2, return_indices=True)
    offset = _window_offsets(index, z.shape[2], z.shape[3])
    offset = _first_nan_offsets(z, values, offset)
    out = torch.relu_(values).contiguous(memory_format=fmt)
    return out, offset.contiguous(memory_format=fmt)


def eager_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
) -> torch.Tensor | None:
    """The op on a CPU as PyTorch's own differentiable ops, so that autograd's C++ nodes run the backward:
    ``out``, or None where that would not give what the op gives (then the op runs).

    The op's custom Function costs ~100 us of Python forward and ~200 us backward per call (measured, torch 2.13,
    2 threads), and the convolution after that Python runs slower too: a small VGG layer's conv backward took
    190 us there against 120 us alone. That kept a small CNN's step 5-20% behind stock. Here the same
    computation is plain ATen: convolution (channels-last when pooling, as :func:`forward`), residual add, 2x2
    max-pooling of the pre-ReLU output (the ReLU commutes with the max, so pooling picks the contract's window:
    the first maximum in row-major order) and the ReLU on the pooled quarter. Autograd's backward is the
    contract's: the ReLU mask is ``out > 0`` (``threshold_backward`` on the output), the pooling scatters to that
    window maximum, the residual gets the conv output's gradient. Except at a NaN output, whose gradient ReLU's
    backward passes on where the contract gives 0: when a gradient is needed and the output holds a NaN (one
    reduction over it), this returns None and the op runs (the convolution again, only in that case).

    What it saves is stock's (x, the conv output, int64 pooling indices), not the op's pooled output and 1-byte
    offsets: on a CPU the time matters and that memory is host memory. The caller checks the call is eager, on a
    CPU, on plain tensors, under ``auto``.
    """
    if x.shape[0] == 0:  # PyTorch's pooling backward refuses an empty batch; the op handles it
        return None
    fmt = memory_format(x)
    if pool and pool_format(x) == torch.channels_last:  # the module docstring says why
        x = _channels_last(x)
    z = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    if residual is not None:  # stock order: (conv + bias) + residual, each rounded to the dtype
        z = z.add_(residual)
    if pool:
        z = F.max_pool2d(z, 2, 2)
    out = torch.relu_(z)
    if out.requires_grad:
        total = out.detach().sum().item()  # ReLU's output is >= 0 or NaN: its sum is NaN only where one is
        if total != total:
            return None
    return out.contiguous(memory_format=fmt)


# Lookup tables instead of index arithmetic: each elementwise op on a CPU costs a pass over the pooled tensor
# (the arithmetic took seven of them forward and six backward); a table lookup is one. Cached per shape.
@functools.lru_cache(maxsize=64)
def _offset_table(h: int, w: int, device: torch.device) -> torch.Tensor:
    """uint8 ``(h * w,)``: flat index ``r * w + c`` -> window offset ``(r & 1) * 2 + (c & 1)``."""
    r = torch.arange(h, device=device).view(h, 1)
    c = torch.arange(w, device=device).view(1, w)
    return ((r & 1) * 2 + (c & 1)).to(torch.uint8).reshape(-1)


@functools.lru_cache(maxsize=64)
def _index_tables(ho: int, wo: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 ``(4,)``: window offset -> flat step from the window's corner, int64 ``(ho, wo)``: the corners)."""
    steps = torch.tensor([0, 1, w, w + 1], device=device)
    corners = torch.arange(0, 2 * ho, 2, device=device).view(ho, 1) * w + torch.arange(0, 2 * wo, 2, device=device)
    return steps, corners


def _window_offsets(index: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 window offsets, in index's memory layout (NCHW or channels-last), from PyTorch's flat pooling
    indices. Read in memory order: flattening a channels-last index in logical order would copy the int64s."""
    channels_last = memory_format(index) == torch.channels_last
    dense = index.permute(0, 2, 3, 1) if channels_last else index
    flat = _offset_table(h, w, index.device).index_select(0, dense.reshape(-1)).view(dense.shape)
    return flat.permute(0, 3, 1, 2) if channels_last else flat


def _window_index(offset: torch.Tensor, w: int) -> torch.Tensor:
    """PyTorch's flat pooling indices (int64) from the uint8 window offsets, in the offsets' memory layout: the
    pooling backward takes a slow path when the index and the gradient are laid out differently (channels-last:
    2.7x slower, measured)."""
    steps, corners = _index_tables(offset.shape[2], offset.shape[3], w, offset.device)
    if memory_format(offset) != torch.channels_last:
        return steps.index_select(0, offset.reshape(-1).long()).view(offset.shape).add_(corners)
    dense = offset.permute(0, 2, 3, 1)  # (N, Ho, Wo, C), contiguous
    index = steps.index_select(0, dense.reshape(-1).long()).view(dense.shape).add_(corners.unsqueeze(-1))
    return index.permute(0, 3, 1, 2)


def _first_nan_offsets(z: torch.Tensor, values: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """PyTorch's pooling kernels take the last NaN of a window, the contract (and the GPU kernels) the first.
    Fix the windows whose maximum is NaN. On a CPU only when there is one (a value check costs no sync there);
    elsewhere without a branch (a few elementwise passes, no host sync)."""
    # The sum is NaN if a value is (and also for +inf next to -inf: a false alarm costs only the fix-up); one
    # vectorised reduction instead of isnan + any.
    if z.device.type == "cpu" and not bool(values.sum().isnan()):
        return offset
    nan = torch.isnan(values)
    ho, wo = values.shape[2:]
    first = torch.full_like(offset, 3)
    for k in (2, 1, 0):  # the lowest NaN offset wins
        corner = z[:, :, k >> 1 : 2 * ho : 2, k & 1 : 2 * wo : 2]
        first = torch.where(torch.isnan(corner), k, first)
    return torch.where(nan, first, offset)


def _relu_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``out > 0``, else 0: the ReLU mask of DESIGN §3, so a NaN output passes no gradient (a mask,
    not a product: a NaN grad under ``out <= 0`` gives 0, as in the GPU kernels)."""
    if out.device.type != "cpu":
        return torch.where(out > 0, grad, 0.0)
    # On a CPU the comparison and where are slow scalar loops; threshold_backward (ReLU's own backward, the same
    # mask except that it passes a NaN output's gradient on) is one vectorised pass. out >= 0 or NaN, so its sum
    # is NaN exactly when an output is: only then are those entries zeroed.
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return g.masked_fill_(torch.isnan(out), 0.0) if bool(out.sum().isnan()) else g


def conv_output_grad(
    grad: torch.Tensor, out: torch.Tensor, argmax: torch.Tensor, conv_hw: tuple[int, int], pool: bool
) -> torch.Tensor:
    """Gradient w.r.t. the conv output (pre-ReLU) from the saved (pooled) output and argmax."""
    g = _relu_grad(grad, out)
    if not pool:
        return g
    n, c, ho, wo = g.shape
    h, w = conv_hw
    if argmax.shape != g.shape:  # need_argmax=False: only run when nothing needs a gradient
        raise RuntimeError("conv_relu_pool backward: the forward ran without its argmax (need_argmax=False)")
    # The window offsets back to the flat indices PyTorch's pooling backward scatters with (rows/cols the pool
    # floored away get no gradient); it writes the conv-output gradient in out's layout.
    if g.numel() == 0:  # PyTorch's pooling backward refuses empty inputs
        return g.new_zeros((n, c, h, w)).contiguous(memory_format=memory_format(out))
    index = _window_index(argmax, w)
    like = torch.empty((n, c, h, w), dtype=g.dtype, device=g.device, memory_format=memory_format(out))
    return torch.ops.aten.max_pool2d_with_indices_backward(g, like, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


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
    """(dx, dweight, dbias, dresidual) for the entries of ``needs`` that are True; ``x`` may be None without
    dweight."""
    g = conv_output_grad(grad, out, argmax, conv_hw(x_shape, weight.shape, stride, padding), pool)
    need_dx, need_dw, need_db, need_dres = needs
    if x is None:  # only the shape is read when dweight is not needed
        x = g.new_empty(1).expand(x_shape)
    g = g.to(weight.dtype)
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        dx, dw, db = torch.ops.aten.convolution_backward(
            g,
            x,
            weight,
            [weight.shape[0]],
            [stride, stride],
            [padding, padding],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_dx, need_dw, need_db],
        )
    return dx, dw, db, g if need_dres else None
