"""Launchers of the Triton implicit-GEMM convolution (:mod:`.implicit_gemm_kernels`): the fused forward (stride 1
or 2, optional residual), the stride-1 dgrad and the weight gradient.

Both take PyTorch tensors in NCHW or channels_last (any strides for the activations) and return their result
in the activation's memory format. The weight is re-laid once per call as the GEMM's B matrix
``[kh * kw * Cin, Cout]`` (at most a few MB for VGG; cheap next to the convolution itself).
"""

from __future__ import annotations

import functools

import torch
import triton

from ptfast.backends import triton as triton_backend
from ptfast.backends.torch import conv as torch_conv
from ptfast.backends.triton import conv_config
from ptfast.backends.triton.bias_relu import same_layout
from ptfast.backends.triton.implicit_gemm_kernels import _conv_gemm_fwd, _conv_gemm_wgrad


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` addresses through its strides."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))


def _launch(
    x: torch.Tensor,
    w_mat: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    argmax: torch.Tensor | None,
    kernel_hw: tuple[int, int],
    pad_hw: tuple[int, int],
    relu: bool,
    pool: bool,
    stride: int = 1,
    residual: torch.Tensor | None = None,
) -> None:
    n, cin, h, w = x.shape
    cout, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    m = n * ho * wo * (4 if pool else 1)
    if m == 0 or cout == 0:
        return
    blocks = conv_config.blocks_for(x.device, x.dtype, cout)
    flat_k, block_k = conv_config.k_walk(cin, blocks, x.device)
    grid = (triton.cdiv(m, blocks.block_m) * triton.cdiv(cout, blocks.block_n),)
    large = max(_extent(x), _extent(out), m) >= 2**31 - 1
    with triton_backend.device_guard(x):
        triton_backend.checked(_conv_gemm_fwd, grid)(
            x,
            w_mat,
            bias if bias is not None else w_mat,  # never read without HAS_BIAS
            residual if residual is not None else out,  # never read without HAS_RESIDUAL
            out,
            argmax if argmax is not None else out,  # never written without NEED_ARGMAX
            m,
            cin,
            cout,
            h,
            w,
            ho,
            wo,
            *pad_hw,
            *x.stride(),
            *out.stride(),
            KH=kernel_hw[0],
            KW=kernel_hw[1],
            STRIDE=stride,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            RELU=relu,
            POOL=pool,
            NEED_ARGMAX=argmax is not None,
            FLAT_K=flat_k,
            LARGE=large,
            DOT_PRECISION=triton_backend.conv_dot_precision(x.dtype, x.device),
            BLOCK_M=blocks.block_m,
            BLOCK_N=blocks.block_n,
            BLOCK_K=block_k,
            GROUP_M=conv_config.GROUP_M,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )


def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: int,
    padding: int,
    pool: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, argmax)``: ``relu(conv2d(x, weight, bias, stride, padding) + residual)``, 2x2 max-pooled when
    ``pool`` (then stride 1 and no residual), in one kernel.

    ``x``: ``(N, Cin, H, W)``; ``weight``: ``(Cout, Cin, kh, kw)``; ``bias``: ``(Cout,)`` or None; ``residual``:
    None or the unpooled output's shape; one dtype (fp16/bf16/fp32). ``out``: ``(N, Cout, Hc, Wc)`` or pooled
    ``(N, Cout, Hc // 2, Wc // 2)`` in x's memory format; ``argmax``: uint8 window offsets of that shape and
    format when ``pool and need_argmax``, else an empty uint8 tensor.
    """
    n, _, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    hc, wc = torch_conv.conv_hw(x.shape, weight.shape, stride, padding)
    shape = (n, cout, hc // 2, wc // 2) if pool else (n, cout, hc, wc)
    fmt = torch_conv.memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    argmax = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt) if pool and need_argmax else None
    w_mat = weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()
    bias = bias.contiguous() if bias is not None else None
    if residual is not None:  # read with out's strides: make the layouts agree (a no-op when they already do)
        residual = residual.contiguous(memory_format=fmt)
        if not same_layout(residual, out):
            residual = torch.empty_like(out).copy_(residual)
    _launch(x, w_mat, bias, out, argmax, (kh, kw), (padding, padding), True, pool, stride, residual)
    return out, argmax if argmax is not None else x.new_empty(0, dtype=torch.uint8)


def dgrad_supported(weight_shape: tuple[int, ...] | list[int], stride: int, padding: int) -> bool:
    """The stride-1 dgrad is a convolution with padding ``k - 1 - p`` on each axis: it exists while
    ``p <= k - 1``. A strided conv's dgrad (a transposed conv with holes) is left to cuDNN."""
    return stride == 1 and padding <= weight_shape[2] - 1 and padding <= weight_shape[3] - 1


def conv_dgrad(
    g: torch.Tensor,
    weight: torch.Tensor,
    x_shape: list[int],
    padding: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """The input gradient of ``conv2d(x, weight, padding=padding)`` (stride 1) for the output gradient ``g``.

    ``g``: ``(N, Cout, Hc, Wc)``, any strides, ``weight``'s dtype; returns ``(N, Cin, H, W)`` in
    ``memory_format``. Needs :func:`dgrad_supported`.
    """
    cout, cin, kh, kw = weight.shape
    if not dgrad_supported(weight.shape, 1, padding):
        raise ValueError(f"conv_dgrad: padding {padding} > kernel size - 1 ({kh}x{kw}); use cuDNN's dgrad")
    dx = torch.empty(x_shape, dtype=g.dtype, device=g.device, memory_format=memory_format)
    # dx[n, ci, i, j] = sum_{co, r, s} g[n, co, i + r - (kh-1-p), j + s - (kw-1-p)] * w[co, ci, kh-1-r, kw-1-s]
    w_mat = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(kh * kw * cout, cin).contiguous()
    _launch(g, w_mat, None, dx, None, (kh, kw), (kh - 1 - padding, kw - 1 - padding), relu=False, pool=False)
    return dx


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(device: torch.device, tiles: int, row_chunks: int) -> int:
    """How many row splits the weight gradient's reduction gets: enough programs to fill the GPU ~4 times over
    (the first VGG layers have a single (Cout, K) tile and millions of rows); 3 under the interpreter, so
    tests cross split boundaries."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = triton.cdiv(4 * _sm_count(index), tiles)
    else:
        target = 3
    return max(1, min(target, row_chunks))


def conv_wgrad(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dweight, dbias)`` of ``conv2d(x, weight, stride=stride, padding=padding)`` for the output gradient ``g``.

    ``g``: ``(N, Cout, Hc, Wc)``, ``x``: ``(N, Cin, H, W)``, any strides, weight's dtype. Accumulated in fp32
    per row split, the splits summed in a fixed order (run-to-run identical). ``dweight`` in weight's memory
    format and dtype; ``dbias`` (``sum`` of g over N, H, W) or None.
    """
    cout, cin, kh, kw = weight.shape
    n, _, h, w = x.shape
    hc, wc = g.shape[2], g.shape[3]
    k_total = kh * kw * cin
    m = n * hc * wc
    blocks = conv_config.blocks_for(x.device, x.dtype, cout)
    flat_k, block_k = conv_config.k_walk(cin, blocks, x.device)
    block_m = conv_config.wgrad_block_m(x.device, x.dtype)
    tiles_k, tiles_n = triton.cdiv(k_total, block_k), triton.cdiv(cout, blocks.block_n)
    splits = _splits(x.device, tiles_k * tiles_n, triton.cdiv(m, block_m))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m if m else block_m
    dw_part = torch.zeros((splits, cout, k_total), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((splits, cout), dtype=torch.float32, device=x.device) if need_dbias else None
    if m > 0 and cout > 0 and k_total > 0:
        large = max(_extent(x), _extent(g), splits * cout * k_total, m) >= 2**31 - 1
        with triton_backend.device_guard(x):
            triton_backend.checked(_conv_gemm_wgrad, (tiles_k, tiles_n, splits))(
                g,
                x,
                dw_part,
                db_part if db_part is not None else dw_part,  # never written without NEED_DBIAS
                m,
                cin,
                cout,
                h,
                w,
                hc,
                wc,
                padding,
                padding,
                rows_per_split,
                *g.stride(),
                *x.stride(),
                KH=kh,
                KW=kw,
                STRIDE=stride,
                NEED_DBIAS=need_dbias,
                FLAT_K=flat_k,
                LARGE=large,
                DOT_PRECISION=triton_backend.conv_dot_precision(x.dtype, x.device),
                BLOCK_M=block_m,
                BLOCK_N=blocks.block_n,
                BLOCK_K=block_k,
                num_warps=blocks.num_warps,
                num_stages=blocks.num_stages,
            )
    elif need_dbias and m > 0:  # no input channels: only the bias gradient
        db_part = g.sum(dim=(0, 2, 3), dtype=torch.float32).unsqueeze(0)
    dw = dw_part.sum(dim=0).view(cout, kh, kw, cin).permute(0, 3, 1, 2)
    dw = dw.to(weight.dtype).contiguous(memory_format=torch_conv.memory_format(weight))
    db = db_part.sum(dim=0).to(weight.dtype) if db_part is not None else None
    return dw, db
