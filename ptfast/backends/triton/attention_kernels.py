"""Triton kernels of FlashAttention-2 style attention: forward, and backward in two or three kernels.

This module imports triton; the attention backends import it only when they run. Importing it registers every
configuration the launchers can pick with the compile-for-target check (see :func:`_register_configs`).

One set of kernels serves the padded op (``(B, H, L, D)`` tensors) and the packed op (``(total, H, D)`` tensors
with ``cu_seqlens``; ``IS_VARLEN``): a program knows its sequence ``b``, head ``h``, the first row of its sequence
(``*_start``, 0 when padded) and the sequence's lengths; the batch stride is 0 for packed tensors.

* ``_attn_fwd``: one program per (query block, batch*head). Streams key/value blocks with an online softmax in
  fp32, base 2 (``qk_scale = scale * log2(e)``), stores the output and the row log-sum-exp in base 2
  (``log2(sum(exp2(scores)))`` = natural lse * log2(e), so backward needs no conversion that could overflow;
  ``+inf`` for a row with no admissible key, whose output is 0). Key blocks split into interior ones (no length
  or causal masking) and boundary ones; under ``key_mask`` the loops cover only the span from the first to the last real
  key (see ``_key_span``), so right/left padding costs no key block.
* ``_attn_bwd_delta``: ``delta = rowsum(dO * O)`` in fp32.
* ``_attn_bwd_dkdv``: one program per (key block, batch*head), loops over query blocks, accumulates dK and dV in
  fp32 registers; a key block with no real token writes zeros at once, and query blocks whose rows are all
  excluded (lse = +inf) are skipped. With ``ATOMIC_DQ`` it
  also adds each tile's dQ share to an fp32 buffer with atomics (opt-in, not bitwise reproducible).
* ``_attn_bwd_dq``: one program per (query block, batch*head), loops over key blocks (deterministic dQ).

Masks: ``MASK_KIND`` 0 none, 1 bool (True = attend), 2 additive float; the mask is read tile by tile through
its strides (0 along broadcast dimensions), so an expanded mask is never materialized. ``HAS_KEY_MASK``: bool
``(B, Lk)``, True = real token. ``CAUSAL``: key j attends query i iff ``j <= i`` (top-left). Dropout: the hash of
``ptfast._dropout`` on (seed, b, h, i, j), i and j counted within the sequence, recomputed in backward.

All offsets that can exceed 2^31 elements (batch/head/row strides, mask rows) are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ptfast.backends.triton import attention_config, compile_targets

# --- dropout hash (spec: ptfast/_dropout.py) ----------------------------------------------------------------


@triton.jit
def _fmix32(x):
    # uint32 arithmetic wraps modulo 2^32 and >> on unsigned is a logical shift, exactly as specified.
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(SEED, b, h, offs_q):
    """``k_row`` of every query position in ``offs_q`` for sequence ``b``, head ``h``."""
    s0 = tl.load(SEED).to(tl.uint32)
    s1 = tl.load(SEED + 1).to(tl.uint32)
    k_b = _fmix32(s0 + b.to(tl.uint32) * 0x9E3779B1)
    k_bh = _fmix32(k_b ^ (h.to(tl.uint32) * 0x85EBCA77))
    return _fmix32(k_bh ^ (s1 + offs_q.to(tl.uint32) * 0xC2B2AE3D))


@triton.jit
def _keep(row_keys, offs_k, drop_threshold, KEYS_ON_ROWS: tl.constexpr):
    """Keep decisions of a score tile (``(BLOCK_Q, BLOCK_K)``, or transposed when ``KEYS_ON_ROWS``)."""
    col = offs_k.to(tl.uint32) * 0x27D4EB2F
    if KEYS_ON_ROWS:
        u = _fmix32(row_keys[None, :] + col[:, None])
    else:
        u = _fmix32(row_keys[:, None] + col[None, :])
    return u >= drop_threshold.to(tl.uint32)


# --- shared pieces ------------------------------------------------------------------------------------------


@triton.jit
def _seq_range(CU, b, total, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``b``: ``(0, total)`` for padded tensors; for packed ones read from
    ``cu_seqlens`` and clamped into ``[0, total]`` so that bad values (when value checks are off) can never make a
    kernel read or write out of bounds."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        end = tl.load(CU + b + 1)
        start = tl.minimum(tl.maximum(start, 0), total)
        end = tl.minimum(tl.maximum(end, start), total)
        return start, end - start
    else:
        return b * 0, total + b * 0


@triton.jit
def _key_span(km_base, stride_kmn, k_len, BLOCK_N: tl.constexpr):
    """``[lo, hi)``: from the first to one past the last real key under ``key_mask`` (``lo`` rounded down to a
    block), ``(0, 0)`` when there is none. The main loops run over this span only, so the key blocks of right or
    left padding cost nothing, without a branch inside the loop (which would stop Triton from pipelining the
    K/V loads); a hole inside the span is masked element by element. The scan reads Lk bytes per program."""
    first = k_len
    last = k_len * 0
    for n0 in range(0, k_len, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < k_len
        real = tl.load(km_base + offs.to(tl.int64) * stride_kmn, mask=ok, other=0).to(tl.int1) & ok
        first = tl.minimum(first, tl.min(tl.where(real, offs, k_len), axis=0))
        last = tl.maximum(last, tl.max(tl.where(real, offs + 1, 0), axis=0))
    lo = (tl.minimum(first, last) // BLOCK_N) * BLOCK_N
    return lo, last


@triton.jit
def _mask_scores(
    s,
    offs_q,
    offs_k,
    q_len,
    k_len,
    mask_base,
    stride_mm,
    stride_mn,
    key_ok,
    LENGTH_MASK: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KEYS_ON_ROWS: tl.constexpr,
):
    """Scores (base-2 units) with excluded entries at -inf and a float mask added (times log2 e).

    ``s`` is ``(BLOCK_Q, BLOCK_K)``, or ``(BLOCK_K, BLOCK_Q)`` when ``KEYS_ON_ROWS`` (the dK/dV kernel).
    ``key_ok``: the tile's key_mask values (used when ``HAS_KEY_MASK``).
    """
    if KEYS_ON_ROWS:
        qi = offs_q[None, :]
        kj = offs_k[:, None]
    else:
        qi = offs_q[:, None]
        kj = offs_k[None, :]
    if LENGTH_MASK:
        s = tl.where(kj < k_len, s, float("-inf"))
    if CAUSAL:
        s = tl.where(kj <= qi, s, float("-inf"))
    if HAS_KEY_MASK:
        if KEYS_ON_ROWS:
            s = tl.where(key_ok[:, None], s, float("-inf"))
        else:
            s = tl.where(key_ok[None, :], s, float("-inf"))
    if MASK_KIND != 0:
        ptrs = mask_base + qi.to(tl.int64) * stride_mm + kj.to(tl.int64) * stride_mn
        in_range = (qi < q_len) & (kj < k_len)
        if MASK_KIND == 1:
            allowed = tl.load(ptrs, mask=in_range, other=0).to(tl.int1)
            s = tl.where(allowed, s, float("-inf"))
        else:
            raw = tl.load(ptrs, mask=in_range, other=0.0).to(tl.float32)
            add = raw * 1.4426950408889634
            # finfo(fp32).min * log2(e) overflows to -inf, which would turn a finite mask value (plain arithmetic:
            # a row of finfo.min is uniform, like SDPA) into an exclusion; keep it finite. -inf and NaN pass.
            add = tl.where((add < -3.4028234663852886e38) & (raw > float("-inf")), -3.4028234663852886e38, add)
            s = s + add
    return s


# --- forward ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    n0,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    d_ok,
    q_len,
    k_len,
    qk_scale,
    mask_base,
    stride_mm,
    stride_mn,
    km_base,
    stride_kmn,
    row_keys,
    drop_threshold,
    BOUNDARY: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax; returns the updated (acc, l_i, m_i)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_len
    key_ok = n_ok
    if HAS_KEY_MASK:
        key_ok = tl.load(km_base + offs_n.to(tl.int64) * stride_kmn, mask=n_ok, other=0).to(tl.int1)
    kt = tl.load(
        k_base + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=n_ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    s = _mask_scores(
        s, offs_m, offs_n, q_len, k_len, mask_base, stride_mm, stride_mn, key_ok,
        BOUNDARY, MASK_KIND, HAS_KEY_MASK, CAUSAL and BOUNDARY, False,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing admissible so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax denominator counts dropped entries too
    if DROPOUT:
        p = tl.where(_keep(row_keys, offs_n, drop_threshold, False), p, 0.0)
    v = tl.load(
        v_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["drop_threshold"])
def _attn_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    MASK,
    KEY_MASK,
    SEED,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_kmb,
    stride_kmn,
    H,
    len_q,
    len_k,
    head_dim,
    qk_scale,
    drop_threshold,
    drop_scale,
    MASK_KIND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_range(CU_Q, b, len_q, IS_VARLEN)  # packed: len_q / len_k are the totals
    k_start, k_len = _seq_range(CU_K, b, len_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:  # packed: this sequence is shorter than max_seqlen_q
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh
    km_base = KEY_MASK + b64 * stride_kmb
    row_keys = offs_m  # placeholder when DROPOUT is off (never used)
    if DROPOUT:
        row_keys = _row_keys(SEED, b, h, offs_m)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo = 0
    hi = k_len
    full_hi = (k_len // BLOCK_N) * BLOCK_N  # key blocks with no key past the end
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)  # blocks every row of the tile may see
    if HAS_KEY_MASK:
        lo, real_hi = _key_span(km_base, stride_kmn, k_len, BLOCK_N)
        hi = tl.minimum(hi, real_hi)
        full_hi = tl.minimum(full_hi, hi)  # may end inside a block: keys past real_hi are masked by key_mask
    for n0 in range(lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, n0, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, d_ok,
            q_len, k_len, qk_scale, mask_base, stride_mm, stride_mn, km_base, stride_kmn, row_keys, drop_threshold,
            False, MASK_KIND, HAS_KEY_MASK, CAUSAL, DROPOUT, BLOCK_N, PRECISION,
        )  # fmt: skip
    for n0 in range(tl.maximum(full_hi, lo), hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, n0, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, d_ok,
            q_len, k_len, qk_scale, mask_base, stride_mm, stride_mn, km_base, stride_kmn, row_keys, drop_threshold,
            True, MASK_KIND, HAS_KEY_MASK, CAUSAL, DROPOUT, BLOCK_N, PRECISION,
        )  # fmt: skip

    # l_i == 0 exactly when no key was admissible (the row max contributes exp2(0) = 1 otherwise). A NaN l_i (NaN
    # in q, k or the float mask) is not "excluded": its output and lse stay NaN, so backward propagates NaN like
    # SDPA instead of skipping the row as fully masked (lse = +inf) and returning zero gradients.
    has_any = l_i != 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with no admissible key: acc = 0 -> 0
    if DROPOUT:
        out = out * drop_scale
    lse = tl.where(has_any, m_i + tl.log2(l_safe), float("inf"))  # base 2: backward needs no conversion
    tl.store(
        OUT + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + rows * stride_lm, lse, mask=m_ok)


# --- backward -----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta(
    OUT,
    DO,
    DELTA,
    CU_Q,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_lb,
    stride_lh,
    stride_lm,
    H,
    len_q,
    head_dim,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_range(CU_Q, b, len_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(OUT + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)  # fmt: skip
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=ok, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + rows * stride_lm, delta, mask=offs_m < q_len)


@triton.jit(do_not_specialize=["drop_threshold"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ_ACC,
    MASK,
    KEY_MASK,
    SEED,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_kmb,
    stride_kmn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    H,
    len_q,
    len_k,
    head_dim,
    qk_scale,
    sm_scale,
    drop_threshold,
    drop_scale,
    MASK_KIND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key block (and, with ATOMIC_DQ, its share of dQ). DK and DV share the ``stride_dk*``
    strides (both contiguous, shaped like k), DQ_ACC has the ``stride_dq*`` ones."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_range(CU_Q, b, len_q, IS_VARLEN)  # packed: len_q / len_k are the totals
    k_start, k_len = _seq_range(CU_K, b, len_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < head_dim
    kv_ok = n_ok[:, None] & d_ok[None, :]
    krows = (k_start + offs_n).to(tl.int64)
    k_off = b64 * stride_kb + h64 * stride_kh + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_off = b64 * stride_vb + h64 * stride_vh + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k = tl.load(K + k_off, mask=kv_ok, other=0.0)
    v = tl.load(V + v_off, mask=kv_ok, other=0.0)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
    do_base = DO + b64 * stride_gb + h64 * stride_gh + q_start.to(tl.int64) * stride_gm
    l_base = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) * stride_lm
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    run = True
    key_ok = n_ok
    if HAS_KEY_MASK:
        key_ok = tl.load(KEY_MASK + b64 * stride_kmb + offs_n.to(tl.int64) * stride_kmn, mask=n_ok, other=0)
        key_ok = key_ok.to(tl.int1)
        run = tl.max(key_ok.to(tl.int32), axis=0) > 0  # padding only: dK = dV = 0
    if run:
        lo = 0
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M  # queries before the first key of this block see none of it
        for m0 in range(lo, q_len, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < q_len
            lse = tl.load(LSE + l_base + offs_m * stride_lm, mask=m_ok, other=float("inf"))
            # Skip only when every row of this block is fully excluded (lse = +inf); a NaN lse must run (NaN
            # gradients, like SDPA), and tl.min's NaN handling differs between the GPU and the interpreter.
            if tl.max((lse != float("inf")).to(tl.int32), axis=0) > 0:
                q_ok = d_ok[:, None] & m_ok[None, :]
                qt = tl.load(q_base + offs_m.to(tl.int64)[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                             mask=q_ok, other=0.0)  # fmt: skip
                do = tl.load(do_base + offs_m.to(tl.int64)[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
                delta = tl.load(DELTA + l_base + offs_m * stride_lm, mask=m_ok, other=0.0)
                st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
                st = _mask_scores(
                    st, offs_m, offs_n, q_len, k_len, mask_base, stride_mm, stride_mn, key_ok,
                    True, MASK_KIND, HAS_KEY_MASK, CAUSAL, True,
                )  # fmt: skip
                pt = tl.exp2(st - lse[None, :])  # lse = +inf -> 0
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                if DROPOUT:
                    keep = _keep(_row_keys(SEED, b, h, offs_m), offs_n, drop_threshold, True)
                    pt_drop = tl.where(keep, pt * drop_scale, 0.0)
                    dpt = tl.where(keep, dpt * drop_scale, 0.0)
                else:
                    pt_drop = pt
                dv += tl.dot(pt_drop.to(do.dtype), do, input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
                    dq_rows = (q_start + offs_m).to(tl.int64)
                    dq_off = b64 * stride_dqb + h64 * stride_dqh + dq_rows[:, None] * stride_dqm
                    dq_off += offs_d[None, :] * stride_dqd
                    tl.atomic_add(DQ_ACC + dq_off, dq, mask=m_ok[:, None] & d_ok[None, :])
    dk_off = b64 * stride_dkb + h64 * stride_dkh + krows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["drop_threshold"])
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    MASK,
    KEY_MASK,
    SEED,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_kmb,
    stride_kmn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    H,
    len_q,
    len_k,
    head_dim,
    qk_scale,
    sm_scale,
    drop_threshold,
    drop_scale,
    MASK_KIND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one query block, looping over key blocks in a fixed order (bitwise reproducible). DQ has the
    ``stride_dq*`` strides; the ``stride_dk*`` ones are unused here (one argument list for both kernels)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_range(CU_Q, b, len_q, IS_VARLEN)  # packed: len_q / len_k are the totals
    k_start, k_len = _seq_range(CU_K, b, len_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    md_ok = m_ok[:, None] & d_ok[None, :]
    q_off = b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_off, mask=md_ok, other=0.0)
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=md_ok, other=0.0)  # fmt: skip
    l_off = b64 * stride_lb + h64 * stride_lh + rows * stride_lm
    lse = tl.load(LSE + l_off, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh
    km_base = KEY_MASK + b64 * stride_kmb
    row_keys = offs_m
    if DROPOUT:
        row_keys = _row_keys(SEED, b, h, offs_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # else every row of this block is fully excluded (lse = +inf): dQ = 0. A NaN lse runs (see _attn_bwd_dkdv).
    if tl.max((lse != float("inf")).to(tl.int32), axis=0) > 0:
        lo = 0
        hi = k_len
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M)
        if HAS_KEY_MASK:
            lo, real_hi = _key_span(km_base, stride_kmn, k_len, BLOCK_N)
            hi = tl.minimum(hi, real_hi)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            key_ok = n_ok
            if HAS_KEY_MASK:
                key_ok = tl.load(km_base + offs_n.to(tl.int64) * stride_kmn, mask=n_ok, other=0).to(tl.int1)
            kv_ok = d_ok[:, None] & n_ok[None, :]
            kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=kv_ok, other=0.0)  # fmt: skip
            vt = tl.load(v_base + offs_n.to(tl.int64)[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                         mask=kv_ok, other=0.0)  # fmt: skip
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            s = _mask_scores(
                s, offs_m, offs_n, q_len, k_len, mask_base, stride_mm, stride_mn, key_ok,
                True, MASK_KIND, HAS_KEY_MASK, CAUSAL, False,
            )  # fmt: skip
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, vt, input_precision=PRECISION)
            if DROPOUT:
                dp = tl.where(_keep(row_keys, offs_n, drop_threshold, False), dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dq_off = b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_ok)


# --- compile-for-target registration -------------------------------------------------------------------------

_TRITON_DTYPES = {2: ("fp16",), 4: ("fp32",)}

#: The forms training runs all the time (constexprs on top of "everything off"). Each is registered as a hot
#: variant (fp16 and bf16, head dims 64 and 128, for sm_80 and sm_90): it must compile without register spills.
HOT_FORMS: dict[str, dict[str, object]] = {
    "bert": {"HAS_KEY_MASK": True, "DROPOUT": True},  # padded BERT pretraining: padding mask + dropout 0.1
    "bert-unpad": {"IS_VARLEN": True, "DROPOUT": True},  # ptfast.patch(unpad=True): packed tokens + dropout
    "causal": {"CAUSAL": True},
    "plain": {},
}
HOT_DTYPES = ("fp16", "bf16")
HOT_HEAD_DIMS = (64, 128)
HOT_ARCHS = (80, 90)


def _strides(prefix: str, dims: str) -> dict[str, str]:
    return {f"stride_{prefix}{d}": "i32" for d in dims}


def _register_configs() -> None:
    """Register, for every table entry, the specializations whose compilation proves it fits its GPU class, and
    the hot variants, which must also compile without spills.

    The full cross product of dtypes x mask kinds x causal x dropout x varlen is thousands of variants. The
    resource use (shared memory) that decides whether a configuration fits is bounded by the variant with every
    feature on, so each table entry registers that one (spills allowed: a float mask plus key mask plus causal
    plus dropout is rare). The forms that decide training speed are :data:`HOT_FORMS`, in both half types (bf16
    is what BERT training uses; the tiles are the same as fp16's, the conversions are not). Table entries no hot
    variant covers (fp32, head dim 256, sm_89) also register their plain variant.
    """
    for arch, table in attention_config.TABLES.items():
        for (nbytes, dim), blocks in table.items():
            tdtype = _TRITON_DTYPES[nbytes][0]
            _register_one(arch, tdtype, dim, blocks, "all-features", _ALL_FEATURES, hot=False)
            hot = arch in HOT_ARCHS and nbytes == 2 and dim in HOT_HEAD_DIMS
            if not hot:
                _register_one(arch, tdtype, dim, blocks, "plain", {}, hot=False)
                continue
            for form, features in HOT_FORMS.items():
                for dtype in HOT_DTYPES:
                    _register_one(arch, dtype, dim, blocks, form, features, hot=True)


def _launch_ints(form: str, dim: int) -> dict[str, int]:
    """Integer arguments of a typical launch of ``form``: BERT-base shapes (12 heads, length 512) as HF passes
    them (q, k, v, dO: ``(B, L, H, D)`` transposed to ``(B, H, L, D)``; outputs and grads contiguous), packed
    ``(total, H, D)`` tensors with an odd total for the unpadded form, a broadcast ``(B, 1, L, L)`` float mask
    for the all-features form. Unit strides become constants in the compiled kernel, as they do at launch."""
    heads, length, total = 12, 512, 3001
    if form == "bert-unpad":
        q = (0, dim, heads * dim, 1)
        out = q
        lse = (0, total, 1)
        length = total
    else:
        q = (length * heads * dim, dim, heads * dim, 1)
        out = (heads * length * dim, length * dim, dim, 1)
        lse = (heads * length, length, 1)
    key_mask = (length, 1) if form in ("bert", "all-features") else (0, 0)
    mask = (length * length, 0, length, 1) if form == "all-features" else (0, 0, 0, 0)
    ints = {"H": heads, "len_q": length, "len_k": length, "head_dim": dim}
    for prefix, dims, strides in (
        ("q", "bhmd", q), ("k", "bhnd", q), ("v", "bhnd", q), ("g", "bhmd", q), ("o", "bhmd", out),
        ("dq", "bhmd", out), ("dk", "bhnd", out), ("l", "bhm", lse), ("m", "bhmn", mask), ("km", "bn", key_mask),
    ):  # fmt: skip
        ints.update({f"stride_{prefix}{d}": s for d, s in zip(dims, strides, strict=True)})
    return ints


_ALL_FEATURES: dict[str, object] = {"MASK_KIND": 2, "HAS_KEY_MASK": True, "CAUSAL": True, "DROPOUT": True}
_NO_FEATURES: dict[str, object] = {"MASK_KIND": 0, "HAS_KEY_MASK": False, "CAUSAL": False, "DROPOUT": False,
                                   "IS_VARLEN": False}  # fmt: skip


def _register_one(
    arch: int, tdtype: str, dim: int, blocks: attention_config.KernelBlocks, form: str,
    features: dict[str, object], *, hot: bool,
) -> None:  # fmt: skip
    ptr = f"*{tdtype}"
    precision = "tf32" if tdtype == "fp32" else "ieee"
    constexprs = {**_NO_FEATURES, **features, "BLOCK_D": dim, "PRECISION": precision}
    common = {
        "MASK": ptr, "KEY_MASK": "*i1", "SEED": "*i64", "CU_Q": "*i32", "CU_K": "*i32",
        **_strides("q", "bhmd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"), **_strides("l", "bhm"),
        **_strides("m", "bhmn"), **_strides("km", "bn"),
        "H": "i32", "len_q": "i32", "len_k": "i32", "head_dim": "i32", "qk_scale": "fp32",
        "drop_threshold": "i64", "drop_scale": "fp32",
    }  # fmt: skip
    tag = f"{form},{tdtype},d{dim},sm{arch}"
    # Pointers from torch's allocator are 16-byte aligned and the launch ints are a typical launch's (see
    # _launch_ints): the JIT specializes on both, so the check compiles what that launch compiles.
    aligned = ("Q", "K", "V", "LSE")
    ints = _launch_ints(form, dim)
    fwd = blocks.forward_for(bool(features.get("DROPOUT")))
    compile_targets.register(
        f"attention_fwd[{tag},{fwd.block_m}x{fwd.block_n},w{fwd.num_warps},s{fwd.num_stages}]",
        _attn_fwd,
        signature={"Q": ptr, "K": ptr, "V": ptr, "OUT": ptr, "LSE": "*fp32", **common, **_strides("o", "bhmd")},
        constexprs={**constexprs, "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n},
        num_warps=fwd.num_warps,
        num_stages=fwd.num_stages,
        divisible_by_16=(*aligned, "OUT"),
        archs=(arch,),
        hot=hot,
        launch_ints={k: v for k, v in ints.items() if not k.startswith(("stride_g", "stride_d"))},
    )
    bwd_sig = {
        "Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", **common,
        **_strides("g", "bhmd"), **_strides("dq", "bhmd"), **_strides("dk", "bhnd"), "sm_scale": "fp32",
    }  # fmt: skip
    for kind, cfg in (("dkdv", blocks.backward_kv), ("dq", blocks.backward_q)):
        extra: dict[str, object] = {}
        sig = dict(bwd_sig)
        if kind == "dkdv":
            kernel = _attn_bwd_dkdv
            sig.update({"DK": ptr, "DV": ptr, "DQ_ACC": "*fp32"})
            pointers = ("DK", "DV", "DQ_ACC")
            # The opt-in atomic-dQ mode rides on the all-features variant; hot variants are the default backward.
            extra["ATOMIC_DQ"] = form == "all-features"
        else:
            kernel = _attn_bwd_dq
            sig.update({"DQ": ptr})
            pointers = ("DQ",)
        compile_targets.register(
            f"attention_bwd_{kind}[{tag},{cfg.block_m}x{cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}]",
            kernel,
            signature=sig,
            constexprs={**constexprs, **extra, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n},
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            divisible_by_16=(*aligned, "DO", "DELTA", *pointers),
            archs=(arch,),
            hot=hot,
            launch_ints={k: v for k, v in ints.items() if not k.startswith("stride_o")},
        )
    if form != "plain" or tdtype != "fp16":  # the small delta kernel: once per (GPU class, head dim)
        return
    compile_targets.register(
        f"attention_bwd_delta[d{dim},sm{arch}]",
        _attn_bwd_delta,
        signature={
            "OUT": ptr,
            "DO": ptr,
            "DELTA": "*fp32",
            "CU_Q": "*i32",
            **_strides("o", "bhmd"),
            **_strides("g", "bhmd"),
            **_strides("l", "bhm"),
            "H": "i32",
            "len_q": "i32",
            "head_dim": "i32",
        },  # fmt: skip
        constexprs={"IS_VARLEN": False, "BLOCK_M": DELTA_BLOCK_M, "BLOCK_D": dim},
        num_warps=4,
        num_stages=1,
        divisible_by_16=("OUT", "DO", "DELTA"),
        archs=(arch,),
        hot=hot,
        launch_ints={k: v for k, v in ints.items() if k.startswith(("stride_o", "stride_g", "stride_l"))}
        | {"H": ints["H"], "len_q": ints["len_q"], "head_dim": dim},
    )


DELTA_BLOCK_M = 64

_register_configs()
