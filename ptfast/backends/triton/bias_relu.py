"""Triton kernel: ``out = max(y + bias[c] [+ residual], 0)`` on a 4-D NCHW or channels_last tensor, in place
(``out`` is ``y``: the conv epilogue) or into a new tensor of y's layout (``ptfast.add_relu``).

This module imports triton at import time; the triton conv backend imports it lazily, only when it runs, so
``import ptfast`` never imports triton. Importing it also registers every configuration :func:`bias_relu_` can
launch with the compile-for-target registry (:mod:`ptfast.backends.triton.compile_targets`).

Both layouts are viewed as a row-major matrix ``[rows, inner]`` with a contiguous inner dimension:

* NCHW: ``rows = N * C``, ``inner = H * W``, channel ``= row % C`` (one bias value per row);
* NHWC (channels_last): ``rows = N * H * W``, ``inner = C``, channel ``= column``.

Each program handles one ``BLOCK_R x BLOCK_C`` tile; the block shape comes from a fixed table keyed on
``inner`` (no autotuning, so every process picks the same kernel), keeping ~1024 elements per program.
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
def _bias_relu_kernel(
    y_ptr,
    out_ptr,
    bias_ptr,
    residual_ptr,
    rows,
    inner,
    channels,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CHANNEL_IS_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(inner, BLOCK_C)
    r = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r_ok = r < rows
    c_ok = c < inner
    mask = r_ok[:, None] & c_ok[None, :]
    offsets = r[:, None] * inner + c[None, :]
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    v = y.to(tl.float32)
    if HAS_BIAS:
        if CHANNEL_IS_ROW:
            b = tl.load(bias_ptr + r % channels, mask=r_ok, other=0.0).to(tl.float32)
            v = v + b[:, None]
        else:
            b = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            v = v + b[None, :]
    if HAS_RESIDUAL:  # laid out like y (same offsets); one rounding of conv + bias + residual
        v = v + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # where(v < 0, 0, v) rather than maximum: NaN stays NaN, like torch.relu.
    v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + offsets, v.to(y.dtype), mask=mask)


# (BLOCK_R, BLOCK_C, num_warps), picked by the length of the contiguous inner dimension: the narrowest tile
# that covers a whole row (H*W in NCHW, C in channels_last), capped at 1024 columns.
BLOCK_CONFIGS: tuple[tuple[int, int, int], ...] = ((64, 16, 4), (16, 64, 4), (4, 256, 4), (1, 1024, 4))

_TRITON_DTYPES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TRITON_DTYPES)


def pick_config(inner: int) -> tuple[int, int, int]:
    for cfg in BLOCK_CONFIGS:
        if cfg[1] >= inner:
            return cfg
    return BLOCK_CONFIGS[-1]


def _config_name(dtype: str, channels_last: bool, has_bias: bool, residual: bool, cfg: tuple[int, int, int]) -> str:
    layout = "nhwc" if channels_last else "nchw"
    res = ",residual" if residual else ""
    return f"bias_relu[{dtype},{layout},{'bias' if has_bias else 'nobias'}{res},{cfg[0]}x{cfg[1]},w{cfg[2]}]"


def _register_configs() -> None:
    """Every (dtype, layout, bias or not, residual or not, block config) that :func:`bias_relu_` can launch."""
    configs = itertools.product(_TRITON_DTYPES.values(), (False, True), (True, False), (False, True), BLOCK_CONFIGS)
    for tdtype, channels_last, has_bias, residual, (block_r, block_c, num_warps) in configs:
        compile_targets.register(
            _config_name(tdtype, channels_last, has_bias, residual, (block_r, block_c, num_warps)),
            _bias_relu_kernel,
            signature={
                "y_ptr": f"*{tdtype}",
                "out_ptr": f"*{tdtype}",
                "bias_ptr": f"*{tdtype}",
                "residual_ptr": f"*{tdtype}",
                "rows": "i32",
                "inner": "i32",
                "channels": "i32",
            },
            constexprs={
                "HAS_BIAS": has_bias,
                "HAS_RESIDUAL": residual,
                "CHANNEL_IS_ROW": not channels_last,
                "BLOCK_R": block_r,
                "BLOCK_C": block_c,
            },
            num_warps=num_warps,
            divisible_by_16=("y_ptr", "out_ptr", "bias_ptr", "residual_ptr"),
        )


_register_configs()


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension longer than 1 (the only ones that address memory)."""
    if a.shape != b.shape:
        return False
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


def bias_relu_(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """In place ``y = relu(y + bias[c] + residual)`` (``bias=None`` / ``residual=None``: left out); returns ``y``.

    ``y``: ``(N, C, H, W)`` fp16/bf16/fp32, contiguous in NCHW or channels_last; ``bias``: ``(C,)``, same dtype
    and device, contiguous; ``residual``: y's shape, dtype and strides. The caller (the conv backend) has
    validated everything else.
    """
    return bias_relu(y, bias, residual, out=y)


def bias_relu(
    y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``relu(y + bias[c] + residual)`` written to ``out`` (default: a new tensor laid out like ``y``); returns it.

    Shapes and layouts as :func:`bias_relu_`; ``out`` (``y`` itself for in place) has y's shape, dtype and strides.
    """
    if y.dim() != 4 or y.dtype not in _TRITON_DTYPES:
        raise ValueError(f"bias_relu: y must be a 4-D fp16/bf16/fp32 tensor, got {y.dtype} {tuple(y.shape)}")
    n, c, h, w = y.shape
    # Contiguous both ways (C == 1 or H * W == 1) reads the same memory either way: take NCHW.
    if y.is_contiguous():
        channels_last, rows, inner = False, n * c, h * w
    elif y.is_contiguous(memory_format=torch.channels_last):
        channels_last, rows, inner = True, n * h * w, c
    else:
        raise ValueError(f"bias_relu: y must be contiguous in NCHW or channels_last, got strides {y.stride()}")
    if bias is not None and (bias.shape != (c,) or bias.dtype != y.dtype or not bias.is_contiguous()):
        raise ValueError(
            f"bias_relu: bias must be a contiguous ({c},) {y.dtype} tensor, got {bias.dtype} {tuple(bias.shape)}"
        )
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != y.shape or t.dtype != y.dtype or not same_layout(t, y)):
            raise ValueError(
                f"bias_relu: {name} must match y's shape, dtype and strides, got {t.dtype} "
                f"{tuple(t.shape)} strides {t.stride()}"
            )
    if out is None:
        out = torch.empty_like(y, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if y.numel() == 0:
        return out
    block_r, block_c, num_warps = pick_config(inner)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(inner, block_c),)
    with triton_backend.device_guard(y):
        triton_backend.checked(_bias_relu_kernel, grid)(
            y,
            out,
            bias if bias is not None else y,  # never read when HAS_BIAS is False
            residual if residual is not None else y,  # never read when HAS_RESIDUAL is False
            rows,
            inner,
            c,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            CHANNEL_IS_ROW=not channels_last,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out
