"""Triton implicit-GEMM convolution (stride 1 or 2) with bias (+ residual) + ReLU + 2x2 max-pool + argmax inside
the GEMM epilogue.

This module imports triton at import time; it is imported only when the triton conv backend runs (or by the
compile-for-target check), and importing it registers every configuration of :mod:`.conv_config` with
:mod:`ptfast.backends.triton.compile_targets` (the registrations: :mod:`.implicit_gemm_targets`).

The convolution ``out[n, co, oh, ow] = sum_{r, s, ci} x[n, ci, S*oh + r - pad_h, S*ow + s - pad_w] * w[co, ci, r, s]``
(``S`` the stride, a constexpr) is one GEMM ``[M, K] x [K, Cout]`` whose A operand is never materialized (no
im2col buffer):

* GEMM rows ``m`` are output pixels. Without pooling ``m = (n * Ho + oh) * Wo + ow``. With pooling the rows
  are ordered by pooling window, ``m = ((n * Ho + ph) * Wo + pw) * 4 + dy * 2 + dx`` over the *pooled* grid
  ``(Ho, Wo) = (Hc // 2, Wc // 2)``, so every tile of ``BLOCK_M`` rows holds ``BLOCK_M / 4`` whole windows and
  the conv-output rows/columns the pool floors away are never computed.
* ``K`` runs over ``(r, s, ci)``; B is the weight re-laid as ``w_mat[(r * KW + s) * Cin + ci, co]`` (built by
  the launcher; contiguous, Cout fastest). Two ways to walk K (``FLAT_K``):

  - taps (``FLAT_K=False``, when ``Cin`` is a multiple of ``BLOCK_K``): for each tap ``(r, s)``, channel blocks
    of ``BLOCK_K``. A tile of A is ``BLOCK_M`` rows of ``BLOCK_K`` consecutive channels (contiguous in
    channels_last), with one bounds mask per row for the zero padding.
  - flat (``FLAT_K=True``, small or odd ``Cin``, e.g. VGG's RGB input): K is split into ``BLOCK_K`` chunks of
    the flattened ``(r, s, ci)`` index, decoded per column, so a 3-channel layer does 27 useful columns of 32
    instead of 9 taps of 3 out of 16.

* x and out are addressed through their strides: NCHW and channels_last both work (channels_last is the fast
  one: a row of A is contiguous). Index math is int32 unless some tensor spans 2^31 elements (``LARGE``).

Epilogue (fp32 accumulator): ``+ bias``; then without pooling ``+ residual`` (``HAS_RESIDUAL``: a tensor laid
out like the output, read with the output's strides: ResNet's block tail), ReLU and the store. With pooling the
values are rounded to the output dtype *first* (the contract's ties are about the kernel's own rounded output), each
window's four values are taken apart by a reshape/permute/split of the accumulator tile, and the first maximum
in row-major order wins (a NaN wins over numbers; the first NaN among several) — the same rule as the
standalone epilogue kernel (:func:`ptfast.backends.triton.bias_relu_pool._take`). ReLU is applied to the winner
(it commutes with max) and the window offset is stored as one uint8 when ``NEED_ARGMAX``.

The same kernel with ``HAS_BIAS = RELU = POOL = False`` computes the input gradient (dgrad) of a stride-1
convolution: ``dx = conv(g, flip(w)^T, padding = k - 1 - p)``.

:func:`_conv_gemm_wgrad` computes the weight gradient ``dw = g^T A`` (A the same implicit im2col matrix),
whose reduction runs over all N * Hc * Wc output pixels: it is split into row ranges, each program writes an
fp32 partial tile, and the launcher sums the splits in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ptfast.backends.triton import implicit_gemm_targets
from ptfast.backends.triton.bias_relu_pool import _take


@triton.jit
def _int64(a, b, c, d):
    # tl.cast, not .to(): the JIT turns a stride equal to 1 (channels_last's channel stride) into a constant int,
    # which has no .to().
    return tl.cast(a, tl.int64), tl.cast(b, tl.int64), tl.cast(c, tl.int64), tl.cast(d, tl.int64)


@triton.jit
def _tile_ids(M, Cout, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles sweep all column tiles together, so their A rows and the whole weight
    # matrix stay in L2 while they are reused.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(Cout, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _conv_gemm_fwd(
    x_ptr,
    w_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    argmax_ptr,
    M,
    Cin,
    Cout,
    H,
    W,
    Ho,
    Wo,
    pad_h,
    pad_w,
    x_sn,
    x_sc,
    x_sh,
    x_sw,
    o_sn,
    o_sc,
    o_sh,
    o_sw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    POOL: tl.constexpr,
    NEED_ARGMAX: tl.constexpr,
    FLAT_K: tl.constexpr,
    LARGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    if LARGE:  # some offset reaches 2^31: every index times a stride in int64 (else int32, fewer registers)
        pid_m = pid_m.to(tl.int64)
        x_sn, x_sc, x_sh, x_sw = _int64(x_sn, x_sc, x_sh, x_sw)
        o_sn, o_sc, o_sh, o_sw = _int64(o_sn, o_sc, o_sh, o_sw)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    if POOL:
        win = m // 4
        q = m % 4
        t = win // Wo
        oh = 2 * (t % Ho) + q // 2
        ow = 2 * (win % Wo) + q % 2
        n = t // Ho
    else:
        t = m // Wo
        oh = t % Ho
        ow = m % Wo
        n = t // Ho
    x_row = n * x_sn
    ih0 = oh * STRIDE - pad_h
    iw0 = ow * STRIDE - pad_w
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        K = KH * KW * Cin
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            ci = k % Cin
            tap = k // Cin
            ih = ih0[:, None] + (tap // KW)[None, :]
            iw = iw0[:, None] + (tap % KW)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + x_row[:, None] + ih * x_sh + iw * x_sw + ci[None, :] * x_sc, mask=a_ok, other=0.0)
            b = tl.load(w_ptr + k[:, None] * Cout + co[None, :], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # Cin % BLOCK_K == 0 (the launcher's rule): channel blocks are never partial, only rows are masked.
        c_blocks = Cin // BLOCK_K
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            c0 = (it % c_blocks) * BLOCK_K
            ih = ih0 + tap // KW
            iw = iw0 + tap % KW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = x_row + ih * x_sh + iw * x_sw + c0 * x_sc
            a = tl.load(x_ptr + a_rows[:, None] + kk[None, :] * x_sc, mask=row_ok[:, None], other=0.0)
            k = tap * Cin + c0 + kk
            b = tl.load(w_ptr + k[:, None] * Cout + co[None, :], mask=co_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out_ty = out_ptr.dtype.element_ty
    if POOL:
        # Rows are window-major (4 consecutive rows = one window, offsets dy * 2 + dx): split them apart.
        v = tl.reshape(acc.to(out_ty).to(tl.float32), (BLOCK_M // 4, 4, BLOCK_N))
        v = tl.reshape(tl.permute(v, (0, 2, 1)), (BLOCK_M // 4, BLOCK_N, 2, 2))
        left, right = tl.split(v)  # dx = 0 / dx = 1, each indexed by dy
        v0, v2 = tl.split(left)
        v1, v3 = tl.split(right)
        best = v0
        idx = tl.zeros([BLOCK_M // 4, BLOCK_N], dtype=tl.int32)
        best, idx = _take(best, idx, v1, 1)
        best, idx = _take(best, idx, v2, 2)
        best, idx = _take(best, idx, v3, 3)
        if RELU:
            best = tl.where(best < 0.0, 0.0, best)  # where, not maximum: NaN stays NaN like torch.relu
        w_id = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
        tw = w_id // Wo
        o_rows = (tw // Ho) * o_sn + (tw % Ho) * o_sh + (w_id % Wo) * o_sw
        offsets = o_rows[:, None] + co[None, :] * o_sc
        o_ok = (w_id < M // 4)[:, None] & co_ok[None, :]
        tl.store(out_ptr + offsets, best.to(out_ty), mask=o_ok)
        if NEED_ARGMAX:
            tl.store(argmax_ptr + offsets, idx.to(tl.uint8), mask=o_ok)
    else:
        o_rows = n * o_sn + oh * o_sh + ow * o_sw
        offsets = o_rows[:, None] + co[None, :] * o_sc
        o_ok = m_ok[:, None] & co_ok[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(residual_ptr + offsets, mask=o_ok, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)
        tl.store(out_ptr + offsets, acc.to(out_ty), mask=o_ok)


@triton.jit
def _conv_gemm_wgrad(
    g_ptr,
    x_ptr,
    dw_part_ptr,
    db_part_ptr,
    M,
    Cin,
    Cout,
    H,
    W,
    Hc,
    Wc,
    pad_h,
    pad_w,
    rows_per_split,
    g_sn,
    g_sc,
    g_sh,
    g_sw,
    x_sn,
    x_sc,
    x_sh,
    x_sw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    FLAT_K: tl.constexpr,
    LARGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weight gradient ``dw[co, k] = sum_m g[m, co] * A[m, k]`` (A: the forward's implicit im2col matrix) over one
    split of the GEMM rows; every (split, co, k) slot of ``dw_part`` (fp32, ``[splits, Cout, K]``) has exactly one
    writer, and the launcher sums the splits in a fixed order (deterministic, no atomics). With ``NEED_DBIAS``
    the programs of the first K tile also write the split's ``sum_m g[m, co]`` to ``db_part [splits, Cout]``."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    if LARGE:
        split = split.to(tl.int64)
        g_sn, g_sc, g_sh, g_sw = _int64(g_sn, g_sc, g_sh, g_sw)
        x_sn, x_sc, x_sh, x_sw = _int64(x_sn, x_sc, x_sh, x_sw)
    K = KH * KW * Cin
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    kk = tl.arange(0, BLOCK_K)
    if FLAT_K:
        k = pid_k * BLOCK_K + kk
        k_ok = k < K
        ci = k % Cin
        r = (k // Cin) // KW
        s = (k // Cin) % KW
    else:  # Cin % BLOCK_K == 0: one tap, BLOCK_K consecutive channels
        c_blocks = Cin // BLOCK_K
        tap = pid_k // c_blocks
        c0 = (pid_k % c_blocks) * BLOCK_K
        k = tap * Cin + c0 + kk
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < row_end
        t = m // Wc
        oh = t % Hc
        ow = m % Wc
        n = t // Hc
        g_rows = n * g_sn + oh * g_sh + ow * g_sw
        gt = tl.load(g_ptr + g_rows[:, None] + co[None, :] * g_sc, mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        if FLAT_K:
            ih = (oh * STRIDE - pad_h)[:, None] + r[None, :]
            iw = (ow * STRIDE - pad_w)[:, None] + s[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + (n * x_sn)[:, None] + ih * x_sh + iw * x_sw + ci[None, :] * x_sc, mask=a_ok, other=0.0)
        else:
            ih = oh * STRIDE - pad_h + tap // KW
            iw = ow * STRIDE - pad_w + tap % KW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = n * x_sn + ih * x_sh + iw * x_sw + c0 * x_sc
            a = tl.load(x_ptr + a_rows[:, None] + kk[None, :] * x_sc, mask=row_ok[:, None], other=0.0)
        acc = tl.dot(tl.trans(gt), a, acc, input_precision=DOT_PRECISION)
        if NEED_DBIAS:
            db += tl.sum(gt.to(tl.float32), axis=0)
    slot = split * Cout * K + co[:, None] * K + k[None, :]
    k_store_ok = k_ok[None, :] if FLAT_K else k[None, :] < K
    tl.store(dw_part_ptr + slot, acc, mask=co_ok[:, None] & k_store_ok)
    if NEED_DBIAS:
        if pid_k == 0:
            tl.store(db_part_ptr + split * Cout + co, db, mask=co_ok)


# Compile-for-target registrations (VGG's and ResNet's specializations) live in their own module, which only
# needs the two kernels: importing this module registers them, as compile_targets.KERNEL_MODULES expects.
implicit_gemm_targets.register_all(_conv_gemm_fwd, _conv_gemm_wgrad)
