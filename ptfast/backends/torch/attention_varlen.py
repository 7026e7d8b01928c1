"""``ptfast.attention_varlen`` on the torch backend: pad, run the padded attention with a key mask, unpad.

Sync-free: every token's sequence index (``searchsorted`` on ``cu_seqlens``) and position within its sequence are
derived on the device; tokens are scattered into ``(B, max_seqlen, H, D)`` buffers, where ``B`` comes from
``cu_seqlens``' shape and ``max_seqlen`` is a Python int. Keys past a sequence's length are excluded by a
``(B, max_seqlen_k)`` key mask; padded query rows are computed and dropped. Positions are within-sequence, so
causality (top-left per sequence) and the dropout hash match the padded batch exactly.

Indices are clamped, so bad ``cu_seqlens`` values (when value checks are off) give garbage, never an
out-of-bounds access.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast.backends.torch import attention as padded

SAVES_LSE = False


def supports(**meta: object) -> str | None:
    return None


def _token_index(cu: Tensor, total: int, max_len: int) -> tuple[Tensor, Tensor]:
    """(sequence index, position within the sequence) of each of ``total`` packed tokens, clamped in range."""
    nseq = cu.numel() - 1
    cu64 = cu.to(torch.int64)
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu64[1:].contiguous(), t, right=True).clamp_(0, nseq - 1)
    pos = (t - cu64[seq]).clamp_(0, max(max_len, 1) - 1)
    return seq, pos


def _pad(x: Tensor, seq: Tensor, pos: Tensor, nseq: int, max_len: int) -> Tensor:
    """``(total, H, D)`` -> ``(B, H, max_len, D)`` with zeros in the padding (a transposed view)."""
    buf = x.new_zeros(nseq, max(max_len, 1), x.shape[1], x.shape[2])
    buf[seq, pos] = x
    return buf.transpose(1, 2)


def _unpad(xp: Tensor, seq: Tensor, pos: Tensor) -> Tensor:
    return xp.transpose(1, 2)[seq, pos].contiguous()


def _padded_problem(q, k, v, cu_q, cu_k, max_q, max_k, seed, dropout_p, is_causal, scale):
    nseq = cu_q.numel() - 1
    seq_q, pos_q = _token_index(cu_q, q.shape[0], max_q)
    seq_k, pos_k = _token_index(cu_k, k.shape[0], max_k)
    len_k = (cu_k[1:].to(torch.int64) - cu_k[:-1].to(torch.int64))[:, None]
    key_mask = torch.arange(max(max_k, 1), device=k.device)[None, :] < len_k
    spec = padded.Spec(None, key_mask, seed, dropout_p, is_causal, scale)
    qp, kp, vp = (
        _pad(q, seq_q, pos_q, nseq, max_q),
        _pad(k, seq_k, pos_k, nseq, max_k),
        _pad(v, seq_k, pos_k, nseq, max_k),
    )
    return spec, (seq_q, pos_q, seq_k, pos_k), (qp, kp, vp)


def _empty(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor) -> bool:
    return cu_q.numel() < 2 or q.numel() == 0 or k.numel() == 0 or v.numel() == 0


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(out (total_q, H, Dv), lse)``; ``lse`` is empty (see ``SAVES_LSE``)."""
    lse = q.new_empty(0, dtype=torch.float32)
    if _empty(q, k, v, cu_seqlens_q):
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]), lse
    spec, (seq_q, pos_q, _, _), (qp, kp, vp) = _padded_problem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p, is_causal, scale
    )
    return _unpad(padded.attend(qp, kp, vp, spec), seq_q, pos_q), lse


def backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the packed layout; padded query rows get a zero incoming gradient."""
    if _empty(q, k, v, cu_seqlens_q):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    spec, (seq_q, pos_q, seq_k, pos_k), (qp, kp, vp) = _padded_problem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p, is_causal, scale
    )
    gp = _pad(grad, seq_q, pos_q, cu_seqlens_q.numel() - 1, max_seqlen_q)
    op = _pad(out, seq_q, pos_q, cu_seqlens_q.numel() - 1, max_seqlen_q) if dropout_p > 0 else None
    dqp, dkp, dvp = padded.attend_backward(gp, qp, kp, vp, op, spec)
    return _unpad(dqp, seq_q, pos_q), _unpad(dkp, seq_k, pos_k), _unpad(dvp, seq_k, pos_k)
