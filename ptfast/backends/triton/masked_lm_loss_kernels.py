"""Triton kernels of the fused masked-LM loss: vocabulary projection + cross-entropy, logits never stored.

This module imports triton; the masked-LM backend imports it only when it runs. Importing it registers the
configurations the launcher can pick with the compile-for-target check.

Rows whose label is ignored cost no matrix work: the launcher orders the valid rows first on the device (a stable
sort of the validity flags: no ``.item()``, no ``nonzero()``) and stores their count in a device tensor. The grid
covers every row, and programs whose row tile starts past the count exit at once, so CUDA graphs and
``torch.compile`` see fixed shapes.

* ``_mlm_fwd``: one program per (tile of valid rows, vocabulary split) — splitting the vocabulary keeps every SM
  busy when few rows are labelled (BERT: 15%); loops over the split's vocabulary tiles, each logit tile built by a
  K-loop of ``tl.dot`` over the hidden size with an fp32 accumulator (weight tiles are cast to hidden's dtype as
  they are loaded, so an fp32 weight under autocast is never copied), an online log-sum-exp in fp32, the target
  logit and (for label smoothing) the sum of logits. Writes per-split partials that the launcher combines.
* ``_mlm_bwd_dh_deterministic`` / ``_mlm_bwd_dw_deterministic``: the default, bitwise-reproducible backward: one
  program per row tile (dhidden) and one per vocabulary tile (dweight, dbias), each summing into its own rows in
  a fixed order; the logit tiles are recomputed by both kernels (5 GEMMs in all instead of 4). Each forms
  ``dlogits = g * (softmax - (1 - eps) * onehot - eps / V)`` in fp32.
* ``_mlm_bwd``: the opt-in atomic backward (``PTFAST_MLM_ATOMIC=1``): one program per (row tile, vocabulary tile)
  recomputes its logit tile and adds ``dlogits @ W`` to dhidden, ``dlogits^T @ h`` to dweight and the column sums
  to dbias, all fp32 buffers, with atomics (so the summation order of the gradients varies run to run in the
  last bits).

All row, vocabulary and hidden offsets are int64 (8192 x 256000 logits exceed 2^31).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ptfast.backends.triton import compile_targets


@triton.jit
def _logit_tile(
    H,
    W,
    BIAS,
    rows,
    m_ok,
    offs_v,
    v_ok,
    E,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 logits ``(BLOCK_M, BLOCK_V)`` of the given rows against the given vocabulary entries."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < E
        h = tl.load(
            H + rows[:, None] * stride_hn + offs_k.to(tl.int64)[None, :] * stride_he,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wt = tl.load(
            W + offs_v.to(tl.int64)[None, :] * stride_wv + offs_k.to(tl.int64)[:, None] * stride_we,
            mask=k_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(h, wt.to(h.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _mlm_fwd(
    H,
    W,
    BIAS,
    LABELS,
    ORDER,
    COUNT,
    PART,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    stride_pk,
    stride_ps,
    V,
    E,
    v_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial results of one (row tile, vocabulary split): ``PART[k, split, row]`` holds, for k = 0..3, the
    running max, the sum of exp(z - max), the target logit (0 if the target is in another split) and the sum of
    the split's logits. The launcher combines the splits (a few (splits, N) torch ops, no host sync)."""
    m0 = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    count = tl.load(COUNT)
    if m0 >= count:  # surplus tile: fewer valid rows than the grid was sized for
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    rows = tl.load(ORDER + offs_m, mask=m_ok, other=0).to(tl.int64)
    target = tl.load(LABELS + rows, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = _logit_tile(
            H, W, BIAS, rows, m_ok, offs_v, v_ok, E, stride_hn, stride_he, stride_wv, stride_we,
            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
        )  # fmt: skip
        z_target += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(v_ok[None, :], z, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp2((m_i - m_new) * 1.4426950408889634) + tl.sum(
            tl.exp2((z - m_new[:, None]) * 1.4426950408889634), axis=1
        )
        m_i = m_new
    part = PART + split.to(tl.int64) * stride_ps + rows
    tl.store(part, m_i, mask=m_ok)
    tl.store(part + stride_pk, l_i, mask=m_ok)
    tl.store(part + 2 * stride_pk, z_target, mask=m_ok)
    tl.store(part + 3 * stride_pk, z_sum, mask=m_ok)


@triton.jit
def _dlogits(
    H,
    W,
    BIAS,
    rows,
    m_ok,
    target,
    shift,
    log_sum,
    g,
    offs_v,
    v_ok,
    V,
    E,
    eps,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``g * d loss / d z`` of one (rows x vocabulary) tile in fp32, 0 outside the valid rows and vocabulary."""
    z = _logit_tile(
        H, W, BIAS, rows, m_ok, offs_v, v_ok, E, stride_hn, stride_he, stride_wv, stride_we,
        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
    )  # fmt: skip
    # softmax = exp((z - m) - log(sum exp(z - m))) from the two saved parts: z - m is exact for logits near the
    # max (they share its exponent), so a large common offset of the logits costs no accuracy, where subtracting
    # one fp32 log-sum-exp (rounded at the logits' magnitude) would scale the whole row by up to exp(5e-4) at 1e4.
    p = tl.exp2(((z - shift[:, None]) - log_sum[:, None]) * 1.4426950408889634)
    # formed in fp32 (the target column included) before any rounding
    dz = p - eps / V - tl.where(offs_v[None, :] == target[:, None], 1.0 - eps, 0.0)
    return tl.where(m_ok[:, None] & v_ok[None, :], dz * g[:, None], 0.0)


@triton.jit
def _row_tile(ORDER, COUNT, LABELS, LSE, GRAD, stride_g, m0, BLOCK_M: tl.constexpr):
    """(rows, in-range mask, target, shift m, log(sum exp(z - m)), incoming gradient) of the compacted valid rows
    ``m0 .. m0 + BLOCK_M``; ``LSE`` is the ``(N, 2)`` pair the forward saved."""
    count = tl.load(COUNT)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    rows = tl.load(ORDER + offs_m, mask=m_ok, other=0).to(tl.int64)
    target = tl.load(LABELS + rows, mask=m_ok, other=0)
    shift = tl.load(LSE + 2 * rows, mask=m_ok, other=0.0)
    log_sum = tl.load(LSE + 2 * rows + 1, mask=m_ok, other=0.0)
    g = tl.load(GRAD + rows * stride_g, mask=m_ok, other=0.0).to(tl.float32)
    return rows, m_ok, target, shift, log_sum, g


@triton.jit
def _mlm_bwd(
    GRAD,
    H,
    W,
    BIAS,
    LABELS,
    ORDER,
    COUNT,
    LSE,
    DH,
    DW,
    DB,
    stride_g,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    V,
    E,
    eps,
    HAS_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DH ``(N, E)``, DW ``(V, E)`` (both contiguous) and DB ``(V,)`` are fp32 accumulators."""
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= tl.load(COUNT):
        return
    rows, m_ok, target, shift, log_sum, g = _row_tile(ORDER, COUNT, LABELS, LSE, GRAD, stride_g, m0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    dz = _dlogits(
        H, W, BIAS, rows, m_ok, target, shift, log_sum, g, offs_v, v_ok, V, E, eps, stride_hn, stride_he, stride_wv,
        stride_we, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
    )  # fmt: skip
    if NEED_DB:
        tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=v_ok)
    for k0 in range(0, E, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < E
        h = tl.load(
            H + rows[:, None] * stride_hn + offs_k.to(tl.int64)[None, :] * stride_he,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        dz_lp = dz.to(h.dtype)
        if NEED_DH:
            w = tl.load(
                W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_k.to(tl.int64)[None, :] * stride_we,
                mask=v_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(h.dtype)
            dh = tl.dot(dz_lp, w, input_precision=PRECISION)
            tl.atomic_add(DH + rows[:, None] * E + offs_k[None, :], dh, mask=m_ok[:, None] & k_ok[None, :])
        if NEED_DW:
            dw = tl.dot(tl.trans(dz_lp), h, input_precision=PRECISION)
            tl.atomic_add(
                DW + offs_v.to(tl.int64)[:, None] * E + offs_k[None, :], dw, mask=v_ok[:, None] & k_ok[None, :]
            )


@triton.jit
def _mlm_bwd_dh_deterministic(
    GRAD,
    H,
    W,
    BIAS,
    LABELS,
    ORDER,
    COUNT,
    LSE,
    DH,
    stride_g,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    V,
    E,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dhidden of one row tile, summed over the vocabulary tiles in a fixed order into this program's own rows
    of the fp32 buffer DH ``(N, E)`` (read-modify-write, no atomics: bitwise reproducible)."""
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= tl.load(COUNT):
        return
    rows, m_ok, target, shift, log_sum, g = _row_tile(ORDER, COUNT, LABELS, LSE, GRAD, stride_g, m0, BLOCK_M)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        dz = _dlogits(
            H, W, BIAS, rows, m_ok, target, shift, log_sum, g, offs_v, v_ok, V, E, eps, stride_hn, stride_he, stride_wv,
            stride_we, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
        )  # fmt: skip
        dz_lp = dz.to(H.dtype.element_ty)
        for k0 in range(0, E, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < E
            w = tl.load(
                W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_k.to(tl.int64)[None, :] * stride_we,
                mask=v_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(H.dtype.element_ty)
            ptrs = DH + rows[:, None] * E + offs_k[None, :]
            ok = m_ok[:, None] & k_ok[None, :]
            acc = tl.load(ptrs, mask=ok, other=0.0)
            tl.store(ptrs, acc + tl.dot(dz_lp, w, input_precision=PRECISION), mask=ok)


@triton.jit
def _mlm_bwd_dw_deterministic(
    GRAD,
    H,
    W,
    BIAS,
    LABELS,
    ORDER,
    COUNT,
    LSE,
    DW,
    DB,
    stride_g,
    stride_hn,
    stride_he,
    stride_wv,
    stride_we,
    V,
    E,
    eps,
    HAS_BIAS: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dweight and dbias of one vocabulary tile, summed over the valid row tiles in a fixed order into this
    program's own rows of the fp32 buffers DW ``(V, E)`` and DB ``(V,)`` (bitwise reproducible)."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    count = tl.load(COUNT)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        rows, m_ok, target, shift, log_sum, g = _row_tile(ORDER, COUNT, LABELS, LSE, GRAD, stride_g, m0, BLOCK_M)
        dz = _dlogits(
            H, W, BIAS, rows, m_ok, target, shift, log_sum, g, offs_v, v_ok, V, E, eps, stride_hn, stride_he, stride_wv,
            stride_we, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
        )  # fmt: skip
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            dz_lp = dz.to(H.dtype.element_ty)
            for k0 in range(0, E, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < E
                h = tl.load(
                    H + rows[:, None] * stride_hn + offs_k.to(tl.int64)[None, :] * stride_he,
                    mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                ptrs = DW + offs_v.to(tl.int64)[:, None] * E + offs_k[None, :]
                ok = v_ok[:, None] & k_ok[None, :]
                acc = tl.load(ptrs, mask=ok, other=0.0)
                tl.store(ptrs, acc + tl.dot(tl.trans(dz_lp), h, input_precision=PRECISION), mask=ok)
    if NEED_DB:
        tl.store(DB + offs_v, db, mask=v_ok)


# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) by bytes per element of hidden: one table for every
# supported GPU (each entry fits the smallest shared memory, sm_89's 99 KiB; the compile check verifies it), and
# small tiles under the interpreter so odd sizes span several tiles. Untuned: no GPU has timed them yet. The
# backward kernels keep a (BLOCK_M, BLOCK_V) fp32 dlogits tile live across their second GEMM's K loop, next to
# that loop's accumulator: a narrower K step (same logit tile, same tensor-core shape) keeps them spill-free.
GPU_BLOCKS = {2: (64, 128, 64, 8, 2), 4: (64, 64, 32, 4, 2)}
GPU_BLOCKS_BACKWARD = {2: (64, 128, 32, 8, 2), 4: (64, 64, 32, 4, 2)}
INTERPRETER_BLOCKS = (16, 32, 16, 4, 1)

_DTYPES = ("fp16", "bf16", "fp32")

# Integer arguments of a typical launch: the BERT-base head (hidden 768, vocabulary 30522) on contiguous tensors,
# 4096 rows in 4 vocabulary splits. The JIT compiles unit strides as constants, and so does the check.
_LAUNCH_INTS = {"stride_hn": 768, "stride_he": 1, "stride_wv": 768, "stride_we": 1, "V": 30522, "E": 768}
_LAUNCH_INTS_FWD = {**_LAUNCH_INTS, "stride_pk": 4 * 4096, "stride_ps": 4096, "v_per_split": 7680}
_LAUNCH_INTS_BWD = {**_LAUNCH_INTS, "stride_g": 1}


def _register_configs() -> None:
    for tdtype in _DTYPES:
        bm, bv, bk, warps, stages = GPU_BLOCKS[4 if tdtype == "fp32" else 2]
        bwd_bm, bwd_bv, bwd_bk, bwd_warps, bwd_stages = GPU_BLOCKS_BACKWARD[4 if tdtype == "fp32" else 2]
        ptr = f"*{tdtype}"
        precision = "tf32" if tdtype == "fp32" else "ieee"
        common_sig = {
            "H": ptr, "W": ptr, "BIAS": "*fp32", "LABELS": "*i64", "ORDER": "*i32", "COUNT": "*i32",
            "stride_hn": "i32", "stride_he": "i32", "stride_wv": "i32", "stride_we": "i32", "V": "i32", "E": "i32",
        }  # fmt: skip
        blocks = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, "PRECISION": precision}
        bwd_blocks = {"BLOCK_M": bwd_bm, "BLOCK_V": bwd_bv, "BLOCK_K": bwd_bk, "PRECISION": precision}
        compile_targets.register(
            f"masked_lm_loss_fwd[{tdtype},{bm}x{bv}x{bk},w{warps},s{stages}]",
            _mlm_fwd,
            signature={
                **common_sig,
                "PART": "*fp32",
                "stride_pk": "i32",
                "stride_ps": "i32",
                "v_per_split": "i32",
            },  # fmt: skip
            constexprs={"HAS_BIAS": True, **blocks},
            num_warps=warps,
            num_stages=stages,
            divisible_by_16=("H", "W"),
            hot=tdtype != "fp32",
            launch_ints=_LAUNCH_INTS_FWD,
        )
        compile_targets.register(
            f"masked_lm_loss_bwd[{tdtype},{bwd_bm}x{bwd_bv}x{bwd_bk},w{bwd_warps},s{bwd_stages}]",
            _mlm_bwd,
            signature={
                **common_sig,
                "GRAD": "*fp32",
                "LSE": "*fp32",
                "DH": "*fp32",
                "DW": "*fp32",
                "DB": "*fp32",
                "stride_g": "i32",
                "eps": "fp32",
            },  # fmt: skip
            constexprs={"HAS_BIAS": True, "NEED_DH": True, "NEED_DW": True, "NEED_DB": True, **bwd_blocks},
            num_warps=bwd_warps,
            num_stages=bwd_stages,
            divisible_by_16=("H", "W"),
            hot=tdtype != "fp32",
            launch_ints=_LAUNCH_INTS_BWD,
        )
        det_sig = {**common_sig, "GRAD": "*fp32", "LSE": "*fp32", "stride_g": "i32", "eps": "fp32"}
        compile_targets.register(
            f"masked_lm_loss_bwd_dh_deterministic[{tdtype},{bwd_bm}x{bwd_bv}x{bwd_bk},w{bwd_warps},s{bwd_stages}]",
            _mlm_bwd_dh_deterministic,
            signature={**det_sig, "DH": "*fp32"},
            constexprs={"HAS_BIAS": True, **bwd_blocks},
            num_warps=bwd_warps,
            num_stages=bwd_stages,
            divisible_by_16=("H", "W"),
            hot=tdtype != "fp32",
            launch_ints=_LAUNCH_INTS_BWD,
        )
        compile_targets.register(
            f"masked_lm_loss_bwd_dw_deterministic[{tdtype},{bwd_bm}x{bwd_bv}x{bwd_bk},w{bwd_warps},s{bwd_stages}]",
            _mlm_bwd_dw_deterministic,
            signature={**det_sig, "DW": "*fp32", "DB": "*fp32"},
            constexprs={"HAS_BIAS": True, "NEED_DW": True, "NEED_DB": True, **bwd_blocks},
            num_warps=bwd_warps,
            num_stages=bwd_stages,
            divisible_by_16=("H", "W"),
            hot=tdtype != "fp32",
            launch_ints=_LAUNCH_INTS_BWD,
        )


_register_configs()
