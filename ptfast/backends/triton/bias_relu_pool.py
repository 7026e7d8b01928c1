"""Triton kernels for conv_relu_pool's epilogue: bias + ReLU + 2x2 max-pool + uint8 argmax, and its backward.

This module imports triton at import time; the triton conv backend imports it lazily, only when it runs, so
``import ptfast`` never imports triton. Importing it registers every configuration the two launchers can pick
with the compile-for-target registry (:mod:`ptfast.backends.triton.compile_targets`).

Forward, :func:`bias_relu_pool`: ``z`` is the convolution output *without* bias, ``(N, C, H, W)``, contiguous
in NCHW or channels_last. For every pooled element the kernel reads its 2x2 window, adds the bias and rounds
to z's dtype *before* comparing (the contract's tie rule is about the kernel's own rounded output), takes the
first maximum in row-major order (NaN wins, the first NaN among several), applies ReLU to the winner (ReLU
commutes with max) and stores the pooled value plus a 1-byte window offset ``dy * 2 + dx``. On windows whose
values are all <= 0 the argmax is the first maximum of the pre-ReLU values, exactly like the torch backend's
``max(dim)``; backward masks those with ``out > 0`` anyway.

Backward, :func:`pool_relu_backward`: the gradient w.r.t. the conv output (pre-ReLU), full resolution, in
out's memory format: ``grad`` at the argmax position of each window when ``out > 0``, 0 everywhere else
(rows/cols the pool floored away included, so the buffer needs no zero-fill pass). The bias gradient is the
sum of the same masked gradient, taken at pooled resolution: each program writes fp32 partial sums of its
tile to a small buffer, which one deterministic ``torch.sum`` reduces (no atomics, run-to-run identical).

Both layouts are tiled as a row-major matrix ``[rows, inner]`` over the pooled grid, with the contiguous
dimension as columns (like :mod:`.bias_relu`):

* NCHW: ``row = (n * C + c) * Ho + i``, ``column = j``;
* NHWC (channels_last): ``row = (n * Ho + i) * Wo + j``, ``column = c``.

Full-resolution tensors are addressed through their strides, so one kernel body serves both layouts. Block
shapes come from a fixed table keyed on ``inner`` (no autotuning: every process picks the same kernel).
Offsets are int64: tensors may exceed 2^31 elements.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ptfast.backends import triton as triton_backend
from ptfast.backends.triton import compile_targets


@triton.jit
def _tile(pid, rows, inner, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    col_tiles = tl.cdiv(inner, BLOCK_C)
    r = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    q = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return r, q


@triton.jit
def _rounded(z_ptr, offsets, mask, b, HAS_BIAS: tl.constexpr):
    """One window element as ``round_to_dtype(z + bias)``, held in fp32 (exact after the rounding)."""
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
    if HAS_BIAS:
        z = (z.to(tl.float32) + b).to(z.dtype)
    return z.to(tl.float32)


@triton.jit
def _take(best, idx, cand, k: tl.constexpr):
    # Strict '>' keeps the first maximum; a NaN replaces a number but never an earlier NaN (torch's max(dim)).
    take = (cand > best) | ((cand != cand) & (best == best))
    return tl.where(take, cand, best), tl.where(take, k, idx)


@triton.jit
def _bias_relu_pool_kernel(
    z_ptr,
    bias_ptr,
    out_ptr,
    argmax_ptr,
    rows,
    inner,
    channels,
    Ho,
    Wo,
    z_sn,
    z_sc,
    z_sh,
    z_sw,
    HAS_BIAS: tl.constexpr,
    NEED_ARGMAX: tl.constexpr,
    CHANNEL_IS_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r, q = _tile(pid, rows, inner, BLOCK_R, BLOCK_C)
    r_ok = r < rows
    q_ok = q < inner
    mask = r_ok[:, None] & q_ok[None, :]
    if CHANNEL_IS_ROW:  # NCHW: row = (n * C + c) * Ho + i, column = j
        nc = r // Ho
        c = nc % channels
        base = (nc // channels) * z_sn + c * z_sc + 2 * (r % Ho) * z_sh
        base = base[:, None] + 2 * q[None, :] * z_sw
        if HAS_BIAS:
            b = tl.load(bias_ptr + c, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        else:
            b = 0.0
    else:  # NHWC: row = (n * Ho + i) * Wo + j, column = c
        t = r // Wo
        base = (t // Ho) * z_sn + 2 * (t % Ho) * z_sh + 2 * (r % Wo) * z_sw
        base = base[:, None] + q[None, :] * z_sc
        if HAS_BIAS:
            b = tl.load(bias_ptr + q, mask=q_ok, other=0.0).to(tl.float32)[None, :]
        else:
            b = 0.0
    best = _rounded(z_ptr, base, mask, b, HAS_BIAS)
    idx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    best, idx = _take(best, idx, _rounded(z_ptr, base + z_sw, mask, b, HAS_BIAS), 1)
    best, idx = _take(best, idx, _rounded(z_ptr, base + z_sh, mask, b, HAS_BIAS), 2)
    best, idx = _take(best, idx, _rounded(z_ptr, base + z_sh + z_sw, mask, b, HAS_BIAS), 3)
    # where(v < 0, 0, v) rather than maximum: NaN stays NaN, like torch.relu.
    best = tl.where(best < 0.0, 0.0, best)
    offsets = r[:, None] * inner + q[None, :]
    tl.store(out_ptr + offsets, best.to(out_ptr.dtype.element_ty), mask=mask)
    if NEED_ARGMAX:
        tl.store(argmax_ptr + offsets, idx.to(tl.uint8), mask=mask)


@triton.jit
def _pool_relu_backward_kernel(
    grad_ptr,
    out_ptr,
    argmax_ptr,
    g_ptr,
    part_ptr,
    rows,
    inner,
    channels,
    Hh,
    Wh,
    Ho,
    Wo,
    H,
    W,
    p_sn,
    p_sc,
    p_sh,
    p_sw,
    g_sn,
    g_sc,
    g_sh,
    g_sw,
    NEED_DBIAS: tl.constexpr,
    CHANNEL_IS_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The grid covers the pooled grid extended to ceil(H/2) x ceil(W/2) windows, so the rows/cols the pool
    # floored away are written (with 0) by the same pass that writes the gradient.
    pid = tl.program_id(0).to(tl.int64)
    r, q = _tile(pid, rows, inner, BLOCK_R, BLOCK_C)
    mask = (r < rows)[:, None] & (q < inner)[None, :]
    if CHANNEL_IS_ROW:  # NCHW: row = (n * C + c) * Hh + i, column = j
        nc = r // Hh
        n = (nc // channels)[:, None]
        c = (nc % channels)[:, None]
        i = (r % Hh)[:, None]
        j = q[None, :]
    else:  # NHWC: row = (n * Hh + i) * Wh + j, column = c
        t = r // Wh
        n = (t // Hh)[:, None]
        i = (t % Hh)[:, None]
        j = (r % Wh)[:, None]
        c = q[None, :]
    pooled = mask & (i < Ho) & (j < Wo)
    p_off = n * p_sn + c * p_sc + i * p_sh + j * p_sw
    grad = tl.load(grad_ptr + p_off, mask=pooled, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + p_off, mask=pooled, other=0.0)
    arg = tl.load(argmax_ptr + p_off, mask=pooled, other=255).to(tl.int32)
    # At the argmax the ReLU mask equals out > 0 (where, not a product: a NaN/inf grad under out <= 0 gives 0).
    gm = tl.where(out > 0, grad, 0.0)
    g_base = n * g_sn + c * g_sc + 2 * i * g_sh + 2 * j * g_sw
    y_ok = 2 * i + 1 < H
    x_ok = 2 * j + 1 < W
    dtype = g_ptr.dtype.element_ty
    tl.store(g_ptr + g_base, tl.where(arg == 0, gm, 0.0).to(dtype), mask=mask)
    tl.store(g_ptr + g_base + g_sw, tl.where(arg == 1, gm, 0.0).to(dtype), mask=mask & x_ok)
    tl.store(g_ptr + g_base + g_sh, tl.where(arg == 2, gm, 0.0).to(dtype), mask=mask & y_ok)
    tl.store(g_ptr + g_base + g_sh + g_sw, tl.where(arg == 3, gm, 0.0).to(dtype), mask=mask & y_ok & x_ok)
    if NEED_DBIAS:
        # fp32 partial sums of this tile, one slot per (row, column tile) resp. (row tile, channel): each slot
        # has exactly one writer, and the caller's torch.sum reduces them in a fixed order.
        col_tiles = tl.cdiv(inner, BLOCK_C)
        if CHANNEL_IS_ROW:
            rr = pid // col_tiles * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
            tl.store(part_ptr + rr * col_tiles + pid % col_tiles, tl.sum(gm, axis=1), mask=rr < rows)
        else:
            qq = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
            tl.store(part_ptr + (pid // col_tiles) * inner + qq, tl.sum(gm, axis=0), mask=qq < inner)


# (BLOCK_R, BLOCK_C, num_warps), picked by the length of the contiguous inner dimension (pooled width in NCHW,
# C in channels_last): the narrowest tile that covers a whole row, capped at 512 columns. ~512 pooled elements
# per program (each reads 4 inputs, or writes 4 outputs in backward).
BLOCK_CONFIGS: tuple[tuple[int, int, int], ...] = ((64, 8, 4), (16, 32, 4), (4, 128, 4), (2, 256, 4), (1, 512, 4))

_TRITON_DTYPES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TRITON_DTYPES)


def pick_config(inner: int) -> tuple[int, int, int]:
    for cfg in BLOCK_CONFIGS:
        if cfg[1] >= inner:
            return cfg
    return BLOCK_CONFIGS[-1]


def _layout(channels_last: bool) -> str:
    return "nhwc" if channels_last else "nchw"


def _register_configs() -> None:
    """Every (dtype, layout, block config) the two launchers can launch, in its heaviest specialization (bias and
    argmax on; dbias on): the lighter ones only drop code, and compiling all four variants of each would
    quadruple the CI check for no new information about fitting a GPU."""
    ints = ("rows", "inner", "channels")
    for tdtype, channels_last, has_bias, need_argmax, cfg in itertools.product(
        _TRITON_DTYPES.values(), (False, True), (True,), (True,), BLOCK_CONFIGS
    ):
        block_r, block_c, num_warps = cfg
        compile_targets.register(
            f"bias_relu_pool[{tdtype},{_layout(channels_last)},{'bias' if has_bias else 'nobias'},"
            f"{'argmax' if need_argmax else 'noargmax'},{block_r}x{block_c},w{num_warps}]",
            _bias_relu_pool_kernel,
            signature={
                "z_ptr": f"*{tdtype}",
                "bias_ptr": f"*{tdtype}",
                "out_ptr": f"*{tdtype}",
                "argmax_ptr": "*u8",
                **dict.fromkeys(ints + ("Ho", "Wo", "z_sn", "z_sc", "z_sh", "z_sw"), "i32"),
            },
            constexprs={
                "HAS_BIAS": has_bias,
                "NEED_ARGMAX": need_argmax,
                "CHANNEL_IS_ROW": not channels_last,
                "BLOCK_R": block_r,
                "BLOCK_C": block_c,
            },
            num_warps=num_warps,
            divisible_by_16=("z_ptr", "bias_ptr", "out_ptr", "argmax_ptr"),
        )
    for tdtype, channels_last, need_dbias, cfg in itertools.product(
        _TRITON_DTYPES.values(), (False, True), (True,), BLOCK_CONFIGS
    ):
        block_r, block_c, num_warps = cfg
        sizes = ("Hh", "Wh", "Ho", "Wo", "H", "W")
        strides = ("p_sn", "p_sc", "p_sh", "p_sw", "g_sn", "g_sc", "g_sh", "g_sw")
        compile_targets.register(
            f"bias_relu_pool_backward[{tdtype},{_layout(channels_last)},{'dbias' if need_dbias else 'nodbias'},"
            f"{block_r}x{block_c},w{num_warps}]",
            _pool_relu_backward_kernel,
            signature={
                "grad_ptr": f"*{tdtype}",
                "out_ptr": f"*{tdtype}",
                "argmax_ptr": "*u8",
                "g_ptr": f"*{tdtype}",
                "part_ptr": "*fp32",
                **dict.fromkeys(ints + sizes + strides, "i32"),
            },
            constexprs={
                "NEED_DBIAS": need_dbias,
                "CHANNEL_IS_ROW": not channels_last,
                "BLOCK_R": block_r,
                "BLOCK_C": block_c,
            },
            num_warps=num_warps,
            divisible_by_16=("grad_ptr", "out_ptr", "argmax_ptr", "g_ptr", "part_ptr"),
        )


_register_configs()


def _is_channels_last(t: torch.Tensor, what: str) -> bool:
    # Contiguous both ways (C == 1 or H * W == 1) reads the same memory either way: take NCHW.
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"{what} must be contiguous in NCHW or channels_last, got strides {t.stride()}")


def bias_relu_pool(z: torch.Tensor, bias: torch.Tensor | None, need_argmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, argmax)``: ``max_pool2d(relu(z + bias[c]), 2, 2)`` and the uint8 window offset of each maximum.

    ``z``: ``(N, C, H, W)`` fp16/bf16/fp32, contiguous in NCHW or channels_last (the conv output without
    bias); ``bias``: ``(C,)`` same dtype/device, contiguous, or None. ``out`` and ``argmax`` are
    ``(N, C, H // 2, W // 2)`` in z's memory format; ``argmax`` is an empty uint8 tensor when
    ``need_argmax`` is False (nothing written for it then).
    """
    if z.dim() != 4 or z.dtype not in _TRITON_DTYPES:
        raise ValueError(f"bias_relu_pool: z must be a 4-D fp16/bf16/fp32 tensor, got {z.dtype} {tuple(z.shape)}")
    n, c, h, w = z.shape
    channels_last = _is_channels_last(z, "bias_relu_pool: z")
    if bias is not None and (bias.shape != (c,) or bias.dtype != z.dtype or not bias.is_contiguous()):
        raise ValueError(
            f"bias_relu_pool: bias must be a contiguous ({c},) {z.dtype} tensor, got {bias.dtype} {tuple(bias.shape)}"
        )
    ho, wo = h // 2, w // 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, ho, wo), dtype=z.dtype, device=z.device, memory_format=fmt)
    argmax = (
        torch.empty((n, c, ho, wo), dtype=torch.uint8, device=z.device, memory_format=fmt)
        if need_argmax
        else z.new_empty(0, dtype=torch.uint8)
    )
    if out.numel() == 0:
        return out, argmax
    rows, inner = (n * ho * wo, c) if channels_last else (n * c * ho, wo)
    block_r, block_c, num_warps = pick_config(inner)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(inner, block_c),)
    with triton_backend.device_guard(z):
        triton_backend.checked(_bias_relu_pool_kernel, grid)(
            z,
            bias if bias is not None else z,  # never read when HAS_BIAS is False
            out,
            argmax if need_argmax else out,  # never written when NEED_ARGMAX is False
            rows,
            inner,
            c,
            ho,
            wo,
            *z.stride(),
            HAS_BIAS=bias is not None,
            NEED_ARGMAX=need_argmax,
            CHANNEL_IS_ROW=not channels_last,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out, argmax


def pool_relu_backward(
    grad: torch.Tensor,
    out: torch.Tensor,
    argmax: torch.Tensor,
    conv_hw: tuple[int, int],
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g_conv, dbias)``: the gradient w.r.t. the pre-ReLU conv output, and (optionally) w.r.t. the bias.

    ``grad``, ``out``: ``(N, C, Ho, Wo)`` same dtype (any strides for ``grad``); ``argmax``: uint8, same
    shape, from :func:`bias_relu_pool`; ``conv_hw``: the conv output's ``(H, W)`` (``Ho == H // 2``).
    ``g_conv``: ``(N, C, H, W)`` in out's memory format and grad's dtype. ``dbias``: ``(C,)`` in grad's
    dtype, accumulated in fp32, or None when ``need_dbias`` is False.
    """
    if out.dim() != 4 or out.dtype not in _TRITON_DTYPES or grad.dtype != out.dtype:
        raise ValueError(
            f"pool_relu_backward: grad/out must be 4-D fp16/bf16/fp32 of one dtype, got {grad.dtype} {out.dtype}"
        )
    if grad.shape != out.shape or argmax.shape != out.shape or argmax.dtype != torch.uint8:
        raise ValueError(
            f"pool_relu_backward: grad {tuple(grad.shape)}, out {tuple(out.shape)} and uint8 argmax "
            f"{argmax.dtype} {tuple(argmax.shape)} must have one shape"
        )
    n, c, ho, wo = out.shape
    h, w = conv_hw
    if ho != h // 2 or wo != w // 2:
        raise ValueError(f"pool_relu_backward: pooled {ho}x{wo} does not match conv output {h}x{w}")
    channels_last = _is_channels_last(out, "pool_relu_backward: out")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # One stride set addresses grad, out and argmax: give all three out's layout (no-ops when they have it;
    # grad may be an expanded view, e.g. from out.sum().backward()).
    grad = grad.contiguous(memory_format=fmt)
    argmax = argmax.contiguous(memory_format=fmt)
    out = out.contiguous(memory_format=fmt)
    g = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    hh, wh = (h + 1) // 2, (w + 1) // 2
    rows, inner = (n * hh * wh, c) if channels_last else (n * c * hh, wh)
    block_r, block_c, num_warps = pick_config(inner)
    row_tiles, col_tiles = triton.cdiv(max(rows, 1), block_r), triton.cdiv(max(inner, 1), block_c)
    part = None
    if need_dbias:
        part_shape = (row_tiles * block_r * col_tiles,) if not channels_last else (row_tiles, c)
        part = torch.empty(part_shape, dtype=torch.float32, device=grad.device)
    if g.numel() > 0:
        with triton_backend.device_guard(grad):
            triton_backend.checked(_pool_relu_backward_kernel, (row_tiles * col_tiles,))(
                grad,
                out,
                argmax,
                g,
                part if part is not None else g,  # never written when NEED_DBIAS is False
                rows,
                inner,
                c,
                hh,
                wh,
                ho,
                wo,
                h,
                w,
                *grad.stride(),
                *g.stride(),
                NEED_DBIAS=need_dbias,
                CHANNEL_IS_ROW=not channels_last,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
                num_warps=num_warps,
            )
    if part is None:
        return g, None
    if g.numel() == 0:
        return g, grad.new_zeros(c)
    if channels_last:
        dbias = part.sum(dim=0)
    else:
        # Slots past `rows` (the last row tile's tail) are never written: cut them off before reducing.
        dbias = part[: rows * col_tiles].view(n, c, hh * col_tiles).sum(dim=(0, 2))
    return g, dbias.to(grad.dtype)
