"""``ptfast.attention_varlen`` on the Triton backend: the kernels of :mod:`.attention_kernels` on packed tensors.

Each program reads its sequence's bounds from ``cu_seqlens`` on the device (clamped, so bad values when value
checks are off can never cause an out-of-bounds access); the grid is sized from ``max_seqlen_*`` and programs
past a sequence's end exit at once, so there is no host sync and no padding. Same dtype / head-dim support as
the padded op (see :mod:`ptfast.backends.triton.attention`).
"""

from __future__ import annotations

from torch import Tensor

from ptfast.backends.triton.attention import grid_reason, tensor_reason

SAVES_LSE = True


def supports(**meta: object) -> str | None:
    q = meta["q"]
    return tensor_reason(q) or grid_reason(meta["cu_seqlens_q"].shape[0] - 1, q.shape[1])


def _layout(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int):
    from ptfast.backends.triton.attention_launch import Layout  # imports triton: only when a kernel runs

    return Layout(cu_q.numel() - 1, q.shape[1], q.shape[0], k.shape[0], max_q, max_k, cu_q, cu_k, packed=True)


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
    """``(out (total_q, H, D) contiguous, lse (H, total_q) fp32)``."""
    from ptfast.backends.triton import attention_launch

    # zeros: tokens no sequence covers (only possible with bad cu_seqlens and checks off) read as 0, not garbage.
    out = q.new_zeros(q.shape)
    if cu_seqlens_q.numel() < 2:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=out.dtype).float().fill_(float("inf"))
    layout = _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    lse = attention_launch.forward(q, k, v, None, None, seed, dropout_p, is_causal, scale, layout, out)
    return out, lse


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
    """``(dq, dk, dv)`` in the packed layout, contiguous."""
    from ptfast.backends.triton import attention_launch

    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if cu_seqlens_q.numel() < 2:
        return dq, dk, dv
    layout = _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    attention_launch.backward(
        grad, q, k, v, out, lse, None, None, seed, dropout_p, is_causal, scale, layout, dq, dk, dv
    )
    return dq, dk, dv
