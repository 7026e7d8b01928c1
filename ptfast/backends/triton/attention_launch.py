"""Launchers of the Triton attention kernels for the padded and the packed layout (imports triton).

A :class:`Layout` describes where sequence ``b``, head ``h``, row ``m``, feature ``d`` of each tensor lives as a
4-tuple of strides ``(b, h, m, d)``: ``(B, H, L, D)`` tensors use their own strides, packed ``(total, H, D)``
tensors a batch stride of 0 (rows are offset by ``cu_seqlens`` inside the kernels). Every shape decision is made
from shapes and Python ints, never from tensor values, so nothing here synchronizes with the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ptfast import _dropout
from ptfast.backends import triton as triton_backend
from ptfast.backends.triton import attention_config
from ptfast.backends.triton.attention_kernels import (
    DELTA_BLOCK_M,
    _attn_bwd_delta,
    _attn_bwd_dkdv,
    _attn_bwd_dq,
    _attn_fwd,
)

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Layout:
    """One attention problem: batch (or sequence) count, heads, row counts and where the rows are."""

    batch: int  # B, or the number of packed sequences
    heads: int
    len_q: int  # Lq, or total_q for packed tensors (the kernels clamp sequence bounds into it)
    len_k: int
    grid_q: int  # query rows a program grid must cover: Lq, or max_seqlen_q
    grid_k: int
    cu_q: Tensor | None  # int32 (B + 1,) for packed tensors
    cu_k: Tensor | None
    packed: bool

    def strides(self, t: Tensor) -> tuple[int, int, int, int]:
        if self.packed:  # (total, H, D)
            return (0, t.stride(1), t.stride(0), t.stride(2))
        return tuple(t.stride())  # (B, H, L, D)

    def lse_strides(self, lse: Tensor) -> tuple[int, int, int]:
        if self.packed:  # (H, total)
            return (0, lse.stride(0), lse.stride(1))
        return tuple(lse.stride())  # (B, H, L)

    def new_lse(self, like: Tensor) -> Tensor:
        shape = (self.heads, self.len_q) if self.packed else (self.batch, self.heads, self.len_q)
        return like.new_empty(shape, dtype=torch.float32)


def _mask_args(mask: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int, int, int], int]:
    """(pointer tensor, (b, h, m, n) strides with 0 on broadcast dims, MASK_KIND)."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    strides = tuple(mask.stride(d) if mask.shape[d] > 1 else 0 for d in range(4))
    return mask, strides, 1 if mask.dtype == torch.bool else 2


def _key_mask_args(key_mask: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
    if key_mask is None:
        return q, (0, 0)
    return key_mask, (key_mask.stride(0), key_mask.stride(1))


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    if dropout_p <= 0:
        return 0, 1.0
    return _dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    layout: Layout,
    out: Tensor,
) -> Tensor:
    """Fill ``out`` (same layout as q); return the fp32 row log-sum-exp in base 2 (``+inf``: fully excluded row)."""
    lse = layout.new_lse(q)
    if out.numel() == 0:
        return lse
    if dropout_p >= 1.0:  # everything dropped (the uint32 threshold 2^32 does not exist)
        out.zero_()
        return lse.fill_(math.inf)
    head_dim = q.shape[-1]
    blocks = attention_config.blocks_for(q.device, q.dtype, head_dim).forward_for(dropout_p > 0)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    km_t, km_strides = _key_mask_args(key_mask, q)
    threshold, drop_scale = _dropout_args(dropout_p)
    grid = (triton.cdiv(layout.grid_q, blocks.block_m), layout.batch * layout.heads)
    with triton_backend.device_guard(q):
        triton_backend.checked(_attn_fwd, grid)(
            q, k, v, out, lse, mask_t, km_t, seed if seed is not None else q,
            layout.cu_q if layout.cu_q is not None else q, layout.cu_k if layout.cu_k is not None else q,
            *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
            *layout.lse_strides(lse), *mask_strides, *km_strides,
            layout.heads, layout.len_q, layout.len_k, head_dim, scale * LOG2E, threshold, drop_scale,
            MASK_KIND=mask_kind, HAS_KEY_MASK=key_mask is not None, CAUSAL=is_causal, DROPOUT=dropout_p > 0,
            IS_VARLEN=layout.packed, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
            BLOCK_D=attention_config.padded_head_dim(head_dim),
            PRECISION=triton_backend.dot_precision(q.dtype, q.device), num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )  # fmt: skip
    return lse


def backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    layout: Layout,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
) -> None:
    """Fill ``dq``, ``dk``, ``dv`` (contiguous, shaped like q, k, v)."""
    if dropout_p >= 1.0 or q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return
    head_dim = q.shape[-1]
    block_d = attention_config.padded_head_dim(head_dim)
    cfg = attention_config.blocks_for(q.device, q.dtype, head_dim)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    km_t, km_strides = _key_mask_args(key_mask, q)
    threshold, drop_scale = _dropout_args(dropout_p)
    seed_t = seed if seed is not None else q
    cu_q = layout.cu_q if layout.cu_q is not None else q
    cu_k = layout.cu_k if layout.cu_k is not None else q
    bh = layout.batch * layout.heads
    delta = torch.empty_like(lse)
    atomic = attention_config.backward_uses_atomic_dq()
    dq_buf = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device) if atomic else dq
    features = dict(
        MASK_KIND=mask_kind, HAS_KEY_MASK=key_mask is not None, CAUSAL=is_causal, DROPOUT=dropout_p > 0,
        IS_VARLEN=layout.packed, BLOCK_D=block_d, PRECISION=triton_backend.dot_precision(q.dtype, q.device),
    )  # fmt: skip
    common = (
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(grad),
        *layout.lse_strides(lse), *mask_strides, *km_strides, *layout.strides(dq_buf), *layout.strides(dk),
        layout.heads, layout.len_q, layout.len_k, head_dim, scale * LOG2E, scale, threshold, drop_scale,
    )  # fmt: skip
    with triton_backend.device_guard(q):
        triton_backend.checked(_attn_bwd_delta, (triton.cdiv(layout.grid_q, DELTA_BLOCK_M), bh))(
            out, grad, delta, cu_q, *layout.strides(out), *layout.strides(grad), *layout.lse_strides(lse),
            layout.heads, layout.len_q, head_dim,
            IS_VARLEN=layout.packed, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d,
        )  # fmt: skip
        kv = cfg.backward_kv
        triton_backend.checked(_attn_bwd_dkdv, (triton.cdiv(layout.grid_k, kv.block_n), bh))(
            q, k, v, grad, lse, delta, dk, dv, dq_buf, mask_t, km_t, seed_t, cu_q, cu_k, *common,
            ATOMIC_DQ=atomic, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.num_warps,
            num_stages=kv.num_stages, **features,
        )  # fmt: skip
        if atomic:
            dq.copy_(dq_buf)
            return
        qc = cfg.backward_q
        triton_backend.checked(_attn_bwd_dq, (triton.cdiv(layout.grid_q, qc.block_m), bh))(
            q, k, v, grad, lse, delta, dq, mask_t, km_t, seed_t, cu_q, cu_k, *common,
            BLOCK_M=qc.block_m, BLOCK_N=qc.block_n, num_warps=qc.num_warps, num_stages=qc.num_stages, **features,
        )  # fmt: skip
