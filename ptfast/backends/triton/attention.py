"""``ptfast.attention`` on the Triton backend: FlashAttention-2 style kernels (:mod:`.attention_kernels`).

What it runs and why it refuses the rest:

* CUDA tensors on sm_80 or newer, or CPU tensors under ``TRITON_INTERPRET=1`` (the test suite's interpreter tier);
* fp16, bf16 and fp32 (fp32 computed in fp32, ``tl.dot`` using tf32 only when PyTorch's matmul setting allows it);
  not fp64 (no fp64 tensor-core path worth having; the torch backend runs it), and not bf16 under the
  interpreter (triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly);
* head dims 1..256, padded inside the kernel to a power of two >= 16 (so any size, not only 16/32/64/128);
* any strides, any lengths, Lq != Lk, every mask form of the contract (bool / float masks read tile by tile
  through their strides, ``key_mask``, top-left causal), dropout per the hash of :mod:`ptfast._dropout`.

Saves the row log-sum-exp (base 2, see :mod:`.attention_kernels`) for backward (``SAVES_LSE``). triton is
imported only when a kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast._dispatch import Fault
from ptfast.backends import triton as triton_backend
from ptfast.backends.triton import attention_config

SAVES_LSE = True

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor_reason(q: Tensor) -> str | None:
    """Why the Triton attention kernels refuse q/k/v like ``q`` (``None`` if they accept them)."""
    reason = triton_backend.device_reason_while_compiling(q.device)
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_DTYPES:
        return f"triton: {q.dtype} inputs are not supported (fp16, bf16, fp32); the torch backend runs them"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "triton: bfloat16 under the interpreter (TRITON_INTERPRET) computes tl.dot wrongly; use a GPU"
    if q.shape[-1] > attention_config.MAX_HEAD_DIM:
        return f"triton: head_dim {q.shape[-1]} > {attention_config.MAX_HEAD_DIM}"
    return None


def grid_reason(sequences: int, heads: int) -> str | None:
    """The kernels put (sequence, head) pairs on the launch grid's second axis, limited to 65535 programs."""
    if sequences * heads > triton_backend.MAX_GRID[1]:
        return Fault(
            f"triton: {sequences} sequences x {heads} heads = {sequences * heads} (sequence, head) pairs > "
            f"{triton_backend.MAX_GRID[1]}, the launch grid's limit; split the batch",
            key="attention grid",
        )
    return None


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs (``meta``: q, k, v, attn_mask, key_mask, ...), else why not."""
    q = meta["q"]
    return tensor_reason(q) or grid_reason(q.shape[0], q.shape[1])


def _fold_key_mask(
    attn_mask: Tensor | None, key_mask: Tensor | None, batch: int
) -> tuple[Tensor | None, Tensor | None]:
    """A bool mask that only varies along the key axis (HF's expanded ``(B, 1, Lq, Lk)`` padding mask arrives
    here compacted to ``(B|1, 1, 1, Lk)``) becomes a key mask, so it takes the key-mask path: padding-only key
    blocks skipped, one vector load per key block instead of a tile load. Forward and backward both fold."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        return attn_mask, key_mask
    km = attn_mask[:, 0, 0, :].expand(batch, -1)  # a view: batch stride 0 when broadcast over the batch
    return None, km if key_mask is None else key_mask & km


def _layout(q: Tensor, k: Tensor):
    from ptfast.backends.triton.attention_launch import Layout  # imports triton: only when a kernel runs

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    return Layout(B, H, Lq, Lk, Lq, Lk, None, None, packed=False)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Lq, D) contiguous, lse (B, H, Lq) fp32)``."""
    from ptfast.backends.triton import attention_launch

    out = q.new_empty(q.shape)
    attn_mask, key_mask = _fold_key_mask(attn_mask, key_mask, q.shape[0])
    lse = attention_launch.forward(q, k, v, attn_mask, key_mask, seed, dropout_p, is_causal, scale, _layout(q, k), out)
    return out, lse


def backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype."""
    from ptfast.backends.triton import attention_launch

    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    attn_mask, key_mask = _fold_key_mask(attn_mask, key_mask, q.shape[0])
    attention_launch.backward(
        grad, q, k, v, out, lse, attn_mask, key_mask, seed, dropout_p, is_causal, scale, _layout(q, k), dq, dk, dv
    )
    return dq, dk, dv
