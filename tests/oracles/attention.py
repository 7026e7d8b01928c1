"""Naive float64 oracle for ``ptfast.attention`` / ``ptfast.attention_varlen``, written from the math.

Independent of ptfast (no import of it): scores ``q @ k^T * scale``, plus an additive float mask, boolean
exclusions (mask, key mask, top-left causal) as -inf, softmax, rows with no admissible key -> 0, dropout as
``keep / (1 - p)`` after the softmax, then ``@ v``. The dropout keep mask is a second, numpy-uint32 implementation
of the hash specified in ``ptfast/_dropout.py``, so the oracle reproduces the exact mask a backend must use.
Gradients come from autograd through this float64 graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_U32 = np.uint32


def _fmix32(x: np.ndarray) -> np.ndarray:
    # numpy uint32 arithmetic wraps modulo 2**32, which is exactly the specified arithmetic.
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> _U32(13))
    x = x * _U32(0xC2B2AE35)
    x = x ^ (x >> _U32(16))
    return x


def hash_words(seed: tuple[int, int], B: int, H: int, Lq: int, Lk: int, b_offset: int = 0) -> np.ndarray:
    """uint32 ``(B, H, Lq, Lk)``: the spec's ``u`` of element (b + b_offset, h, i, j), positions counted from 0."""
    s0, s1 = _U32(seed[0]), _U32(seed[1])
    b = (np.arange(B, dtype=np.uint64) + b_offset).astype(_U32).reshape(B, 1, 1, 1)
    h = np.arange(H, dtype=_U32).reshape(1, H, 1, 1)
    i = np.arange(Lq, dtype=_U32).reshape(1, 1, Lq, 1)
    j = np.arange(Lk, dtype=_U32).reshape(1, 1, 1, Lk)
    with np.errstate(over="ignore"):
        kb = _fmix32(s0 + b * _U32(0x9E3779B1))
        kbh = _fmix32(kb ^ (h * _U32(0x85EBCA77)))
        krow = _fmix32(kbh ^ (s1 + i * _U32(0xC2B2AE3D)))
        return _fmix32(krow + j * _U32(0x27D4EB2F))


def keep_mask(seed: tuple[int, int], p: float, B: int, H: int, Lq: int, Lk: int, b_offset: int = 0) -> torch.Tensor:
    """Bool ``(B, H, Lq, Lk)``: keep(b + b_offset, h, i, j) with positions counted from 0."""
    u = hash_words(seed, B, H, Lq, Lk, b_offset)
    return torch.from_numpy(u.astype(np.int64) >= math.floor(p * 2**32))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 attention of ``(B, H, Lq, D)`` q and ``(B, H, Lk, D)`` k/v; differentiable in q, k, v.

    ``keep``: bool mask broadcastable to ``(B, H, Lq, Lk)`` used when ``dropout_p > 0``.
    """
    q, k, v = q.double(), k.double(), v.double()
    Lq, Lk = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    s = torch.where(allowed, s, -math.inf)
    row_ok = (s != -math.inf).any(-1, keepdim=True)
    s = torch.where(row_ok, s, 0.0)  # keep excluded rows finite so neither output nor gradient is NaN
    p = torch.softmax(s, dim=-1) * row_ok
    if dropout_p > 0:
        p = p * keep.double() / (1.0 - dropout_p)
    return p @ v


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Packed float64 attention, sequence by sequence (positions and dropout indices within each sequence)."""
    outs = []
    H = q.shape[1]
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)[None]
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        keep = None
        if dropout_p > 0:
            keep = keep_mask(seed, dropout_p, 1, H, qb.shape[2], kb.shape[2], b_offset=b)
        ob = attention(qb, kb, vb, is_causal=is_causal, scale=scale, dropout_p=dropout_p, keep=keep)
        outs.append(ob[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(0, H, v.shape[-1], dtype=torch.float64)
    return torch.cat(outs, dim=0)
