"""``ptfast.masked_lm_loss`` on the Triton backend: the fused kernels of :mod:`.masked_lm_loss_kernels`.

What it runs and why it refuses the rest:

* CUDA tensors on sm_80 or newer, or CPU tensors under ``TRITON_INTERPRET=1`` (the test suite's interpreter tier);
* hidden in fp16, bf16 or fp32 (weight and bias of any float dtype: under autocast they stay fp32 and are
  cast tile by tile inside the kernel); not fp64 (the torch backend runs it) and not bf16 under the interpreter
  (triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly).

Ignored rows are compacted on the device (a stable sort of the validity flags and a device-side count), so no
host sync and fixed shapes. The default backward is atomic-free and bitwise reproducible (run to run and across
processes): one kernel sums dhidden per row tile and another dweight/dbias per vocabulary tile, each in a fixed
order, recomputing the logit tiles (5 GEMMs in all). The opt-in atomic backward (``use_atomic_backward()`` or
``PTFAST_MLM_ATOMIC=1``) recomputes them once (4 GEMMs) and accumulates all three gradients in fp32 with atomics,
so their last bits vary run to run; ``torch.use_deterministic_algorithms(True)`` refuses it with PyTorch's usual
error.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ptfast.backends import triton as triton_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(**meta: object) -> str | None:
    """``None`` if this backend runs these inputs (``meta``: hidden, weight, labels, bias, ...), else why not."""
    hidden = meta["hidden"]
    reason = triton_backend.device_reason_while_compiling(hidden.device)
    if reason is not None:
        return reason
    if hidden.dtype not in SUPPORTED_DTYPES:
        return f"triton: {hidden.dtype} hidden states are not supported (fp16, bf16, fp32); the torch backend runs them"
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16:
        return "triton: bfloat16 under the interpreter (TRITON_INTERPRET) computes tl.dot wrongly; use a GPU"
    weight, bias = meta["weight"], meta.get("bias")
    if weight.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64):
        return "triton: float64 weight or bias is not supported"
    return None


_atomic: list[bool | None] = [None]
_atomic_lock = threading.Lock()


@contextmanager
def use_atomic_backward(enabled: bool = True) -> Iterator[None]:
    """Turn the atomic backward on or off (process-wide: autograd runs backward on another thread), overriding
    ``PTFAST_MLM_ATOMIC``."""
    with _atomic_lock:
        old = _atomic[0]
        _atomic[0] = bool(enabled)
    try:
        yield
    finally:
        with _atomic_lock:
            _atomic[0] = old


def atomic_backward_enabled() -> bool:
    """Whether the atomic backward was asked for (``use_atomic_backward`` wins over ``PTFAST_MLM_ATOMIC``)."""
    if _atomic[0] is not None:
        return _atomic[0]
    return os.environ.get("PTFAST_MLM_ATOMIC", "0") not in ("", "0")


def backward_uses_atomics() -> bool:
    """The backward's mode, checked when it runs: atomics if asked for, refused under deterministic mode."""
    if not atomic_backward_enabled():
        return False
    triton_backend.alert_not_deterministic(
        "ptfast.masked_lm_loss backward with atomics (use_atomic_backward / PTFAST_MLM_ATOMIC)"
    )
    return True


def _blocks(device: torch.device, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int, int]:
    from ptfast.backends.triton import masked_lm_loss_kernels as k

    if device.type != "cuda":
        return k.INTERPRETER_BLOCKS
    return (k.GPU_BLOCKS_BACKWARD if backward else k.GPU_BLOCKS)[4 if dtype == torch.float32 else 2]


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """The kernels index labels and bias with unit stride (hidden and weight get their strides): a strided view
    such as ``b[::2]`` is copied (V or N elements)."""
    return t if t is None or t.stride(0) == 1 or t.shape[0] <= 1 else t.contiguous()


def _compact(labels: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row order with the valid rows first, int32 ``(N,)``; their count, int32 ``(1,)``; the bool validity
    ``(N,)``), all on the device.

    Rows with a label outside ``[0, vocab)`` count as ignored (see the op's docstring), so nothing reads out of
    bounds whatever the label values.
    """
    valid = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
    order = torch.argsort((~valid).to(torch.uint8), stable=True).to(torch.int32)
    return order, valid.sum(dtype=torch.int32).reshape(1), valid


def forward(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """Per-row ``(loss, row_max, log_sum)``, each fp32 ``(N,)``: the loss and the log-sum-exp's two parts (``m``,
    ``log(sum exp(z - m))``); all 0 at ignored rows."""
    from ptfast.backends.triton.masked_lm_loss_kernels import _mlm_fwd

    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if n_rows == 0:
        return tuple(hidden.new_zeros(0, dtype=torch.float32) for _ in range(3))
    if vocab == 0 or hidden.shape[1] == 0:
        return _degenerate(hidden, weight, labels, bias, ignore_index, label_smoothing)
    labels, bias = _unit_stride(labels), _unit_stride(bias)
    order, count, valid = _compact(labels, ignore_index, vocab)
    bm, bv, bk, warps, stages = _blocks(hidden.device, hidden.dtype)
    row_tiles, v_tiles = -(-n_rows // bm), -(-vocab // bv)
    tiles_per_split = -(-v_tiles // _splits(hidden.device, row_tiles, v_tiles))
    splits = -(-v_tiles // tiles_per_split)  # no empty split
    part = torch.empty((4, splits, n_rows), dtype=torch.float32, device=hidden.device)
    with triton_backend.device_guard(hidden):
        triton_backend.checked(_mlm_fwd, (row_tiles, splits))(
            hidden, weight, bias if bias is not None else part, labels, order, count, part,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), part.stride(0), part.stride(1),
            vocab, hidden.shape[1], tiles_per_split * bv, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_V=bv,
            BLOCK_K=bk, PRECISION=triton_backend.dot_precision(hidden.dtype, hidden.device), num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    # Combine the splits: the row max over splits, then log(sum over splits of s * exp(m - top)); rows never
    # written (ignored) -> 0.
    m, s, z_target = part[0], part[1], part[2].sum(0)
    top = m.amax(0)
    log_sum = torch.log((s * torch.exp(m - top)).sum(0))
    eps = float(label_smoothing)
    # (1 - eps)(lse - z_t) + eps * mean_v(lse - z_v), formed from (top - z) differences like log_softmax, so the
    # log-sum-exp itself (rounded at the logits' magnitude: 5e-4 at 1e4) never enters the loss. Without
    # smoothing the logit sum is left out altogether: 0 * (-inf) would make a row with a -inf logit NaN.
    loss = log_sum + (1.0 - eps) * (top - z_target)
    if eps > 0:
        loss = loss - eps * (part[3].sum(0) / vocab - top)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return torch.where(valid, loss, zero), torch.where(valid, top, zero), torch.where(valid, log_sum, zero)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(device: torch.device, row_tiles: int, v_tiles: int) -> int:
    """Vocabulary splits so that the forward grid has about two programs per SM (the interpreter uses 2, so the
    tests exercise the combination)."""
    if device.type != "cuda":
        return min(2, v_tiles)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(v_tiles, -(-2 * sms // row_tiles)))


def _degenerate(hidden, weight, labels, bias, ignore_index, label_smoothing):
    # E == 0 (logits are the bias, or 0) or V == 0 (every label out of range): no GEMM to fuse.
    from ptfast.backends.torch import masked_lm_loss as torch_mlm

    return tuple(t.float() for t in torch_mlm.forward(hidden, weight, labels, bias, ignore_index, label_smoothing))


def backward(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    row_max: Tensor,
    log_sum: Tensor,
    ignore_index: int,
    label_smoothing: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dhidden, dweight, dbias)`` for the entries of ``needs`` that are True (None for the others)."""
    from ptfast.backends.triton.masked_lm_loss_kernels import (
        _mlm_bwd,
        _mlm_bwd_dh_deterministic,
        _mlm_bwd_dw_deterministic,
    )

    need_dh, need_dw, need_db = needs
    need_db = need_db and bias is not None
    n_rows, vocab, embed = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dev = hidden.device
    dh = torch.zeros((n_rows, embed), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros((vocab, embed), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    if n_rows > 0 and vocab > 0 and embed > 0 and (need_dh or need_dw or need_db):
        labels, bias = _unit_stride(labels), _unit_stride(bias)
        order, count, _ = _compact(labels, ignore_index, vocab)
        bm, bv, bk, warps, stages = _blocks(dev, hidden.dtype, backward=True)
        lse_parts = torch.stack((row_max, log_sum), dim=1)  # the kernels read (m, log_sum) pairs, (N, 2)
        dummy = lse_parts
        head = (grad, hidden, weight, bias if bias is not None else dummy, labels, order, count, lse_parts)
        strides = (grad.stride(0), hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
        sizes = (vocab, embed, float(label_smoothing))
        meta = dict(
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
            PRECISION=triton_backend.dot_precision(hidden.dtype, dev), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        row_tiles, v_tiles = -(-n_rows // bm), -(-vocab // bv)
        with triton_backend.device_guard(hidden):
            if backward_uses_atomics():
                triton_backend.checked(_mlm_bwd, (row_tiles, v_tiles))(
                    *head, dh if dh is not None else dummy, dw if dw is not None else dummy,
                    db if db is not None else dummy, *strides, *sizes, NEED_DH=need_dh, NEED_DW=need_dw,
                    NEED_DB=need_db, **meta,
                )  # fmt: skip
            else:
                if need_dh:
                    triton_backend.checked(_mlm_bwd_dh_deterministic, (row_tiles,))(*head, dh, *strides, *sizes, **meta)
                if need_dw or need_db:
                    triton_backend.checked(_mlm_bwd_dw_deterministic, (v_tiles,))(
                        *head, dw if dw is not None else dummy, db if db is not None else dummy, *strides, *sizes,
                        NEED_DW=need_dw, NEED_DB=need_db, **meta,
                    )  # fmt: skip
    elif n_rows > 0 and embed == 0 and vocab > 0 and need_db:
        from ptfast.backends.torch import masked_lm_loss as torch_mlm  # logits are the bias alone

        db = torch_mlm.backward(grad, hidden, weight, labels, bias, row_max, log_sum, ignore_index, label_smoothing,
                                (False, False, True))[2].float()  # fmt: skip
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
