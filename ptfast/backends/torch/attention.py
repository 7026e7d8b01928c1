"""``ptfast.attention`` on PyTorch's own fast paths (SDPA), with bounded memory: the production fallback.

Execution plan (chosen from shapes and flags only, never from tensor values, so no host sync):

* no dropout, no mask or a mask that is constant along the query axis (``key_mask`` alone, an HF-style
  ``(B, 1, 1, Lk)`` mask) or causal alone: one ``F.scaled_dot_product_attention`` call on the whole input
  (``is_causal`` passed through, the mask as ``(B|1, H|1, 1, Lk)``), so nothing L x L is ever built here;
* any other mask combination (per-query masks, causal + key_mask, bool + float): query rows (and, for very large
  batches, batch elements) are processed in chunks whose materialized mask stays under ``CHUNK_BUDGET_BYTES``;
  each chunk still runs SDPA;
* dropout (SDPA's own dropout cannot take our keep mask): chunks of explicit math in fp32 — scores, softmax,
  ``keep / (1 - p)`` from :mod:`ptfast._dropout`, ``P @ V`` — with the same budget.

Rows whose every key is excluded get a harmless all-zero additive mask before SDPA and the output is multiplied
by the row validity, so they return exactly 0 with exactly 0 gradient instead of NaN. (On a CPU, where reading a
value costs no device sync, such finishing passes are skipped when they would change nothing.)

Backward works chunk by chunk, accumulating dK/dV (fp32 for half types), so no L x L tensor is kept between
forward and backward: with dropout by the explicit formulas (the scores and the keep factor recomputed, nothing
else); otherwise by recomputing the chunk's SDPA under autograd and calling ``torch.autograd.grad``. Except on a
CPU for the whole-input plan (:func:`saves_lse`): forward keeps the flash kernel's log-sum-exp, and backward is
that kernel's own backward, as for SDPA.

Layouts: ``out`` follows q (see :func:`out_heads_inner`), the gradients are "heads inner" (``GRADS_HEADS_INNER``),
the layouts SDPA's CPU kernels return; the op's fake kernel promises exactly these strides.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ptfast import _attention_layout, _dropout

# The CPU flash kernel's dtypes whose log-sum-exp is fp32 (the op's lse dtype); fp64 recomputes instead.
_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The kernel's own Python binding where torch has one: same native function and autograd node as the OpOverload,
# without OpOverload.__call__'s Python frame (2 us per call warm, measured; this runs on every eager call).
_FLASH_CPU = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
)

CHUNK_BUDGET_BYTES = 128 << 20
# Bytes per (batch, head, query, key) element a chunk allocates at its peak (rough upper bounds):
_BYTES_MASKED = 16  # combined mask (SDPA turns a bool mask into a float one) + bool temporaries
_BYTES_DROPOUT = 96  # fp32 scores and probabilities, int64 hash temporaries, autograd's saved tensors


def supports(**meta: object) -> str | None:
    return None  # everything the functional API's validation admits


class Spec(NamedTuple):
    """Everything besides q/k/v that defines one attention call (masks in compact 4-D / ``(B, Lk)`` form). A
    named tuple: built on every call, at a third of a frozen dataclass's cost."""

    attn_mask: Tensor | None
    key_mask: Tensor | None
    seed: Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float


@dataclass(frozen=True)
class _Chunk:
    b0: int
    b1: int
    r0: int
    r1: int
    sdpa_causal: bool  # causal handled by SDPA's flag (whole-input plan) instead of by the chunk's mask


# Layouts (read by ptfast.ops.attention, whose fake kernels promise exactly these strides). "Heads inner" is a
# (B, H, L, D) tensor laid out as (B, L, H, D) in memory: the transposed views a Transformer's projections give,
# and what SDPA's kernels return for them, so the model's ``transpose(1, 2).reshape(B, L, H * D)`` after attention
# copies nothing. ``out`` follows q (heads inner for such q, else contiguous): the CPU flash kernel's output then
# needs no copy. The gradients are always heads inner, the layout the CPU flash kernel's backward returns.
GRADS_HEADS_INNER = True


def out_heads_inner(q: Tensor) -> bool:
    """Whether ``out`` is laid out heads inner for this query: exactly when the query itself is."""
    return q.stride() == _attention_layout.strides(q.shape, True)


def _heads_inner_zeros(like: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    return _attention_layout.new_empty(like, shape, True).zero_()


def _new_out(q: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """An uninitialized ``out`` in its layout (:func:`out_heads_inner`)."""
    return _attention_layout.new_empty(q, shape, out_heads_inner(q))


def _as_out(q: Tensor, result: Tensor) -> Tensor:
    """``result`` as ``out``: itself where it already has the layout (no new buffer: on a CPU a fresh megabyte costs
    its page faults), else a copy that has it."""
    if result.stride() == _attention_layout.strides(result.shape, out_heads_inner(q)):
        # The CPU flash kernel's output is a transposed view of its own buffer: detach() shares the memory but is
        # no view, since autograd refuses in-place edits of a custom op's output that is one.
        return result.detach() if result._is_view() else result
    return _new_out(q, tuple(result.shape)).copy_(result)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # The dropout path does its own math: half types are computed in fp32 (like SDPA's kernels accumulate).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The op's inputs are already cast by the wrapper; autocast must not re-cast our fp32 dropout math.
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autograd_dispatch() -> contextlib.AbstractContextManager:
    """Re-enable autograd inside a custom-op kernel for the per-chunk recomputation.

    torch.library runs op kernels below the autograd dispatch key (its autograd keys sit in the thread's excluded
    set), so ``enable_grad`` alone records nothing there. Force the thread's key sets minus those keys; autocast
    keys stay excluded.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _whole_input_plan(attn_mask: Tensor | None, key_mask: Tensor | None, dropout_p: float, is_causal: bool) -> bool:
    """One SDPA call on the whole input (see the module docstring): shapes and flags only."""
    per_query_mask = attn_mask is not None and attn_mask.shape[2] != 1
    has_mask = attn_mask is not None or key_mask is not None
    return dropout_p == 0 and not per_query_mask and not (is_causal and has_mask)


def saves_lse(
    q: Tensor, attn_mask: Tensor | None, key_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float
) -> bool:
    """Whether forward returns the row log-sum-exp and backward uses it instead of recomputing the forward.

    On a CPU, for the whole-input plan, forward calls PyTorch's flash kernel directly and keeps its log-sum-exp;
    backward then runs that kernel's own backward on the saved output, which is what SDPA's autograd does (the
    recomputation cost fwd+bwd a third more than stock SDPA, measured). On CUDA SDPA picks among kernels whose
    saved state differs, so backward recomputes there; also for fp64 and a zero scale (see ``_sdpa_chunk``).
    Reads shapes, dtype, device and flags only: the op's fake kernel evaluates it too.
    """
    return (
        q.device.type == "cpu"
        and q.dtype in _FLASH_CPU_DTYPES
        and scale != 0.0
        and _whole_input_plan(attn_mask, key_mask, dropout_p, is_causal)
    )


SAVES_LSE = saves_lse  # read by ptfast.ops.attention (True/False for other backends)


def _chunks(B: int, H: int, Lq: int, Lk: int, spec: Spec) -> Iterator[_Chunk]:
    if _whole_input_plan(spec.attn_mask, spec.key_mask, spec.dropout_p, spec.is_causal):
        yield _Chunk(0, B, 0, Lq, spec.is_causal)
        return
    per_elem = _BYTES_DROPOUT if spec.dropout_p > 0 else _BYTES_MASKED
    rows = max(1, CHUNK_BUDGET_BYTES // (H * Lk * per_elem))  # (batch element, query row) pairs per chunk
    if rows >= Lq:
        bb, rb = max(1, rows // Lq), Lq
    else:
        bb, rb = 1, rows
    for b0 in range(0, B, bb):
        for r0 in range(0, Lq, rb):
            yield _Chunk(b0, min(B, b0 + bb), r0, min(Lq, r0 + rb), False)


def _chunk_masks(spec: Spec, c: _Chunk, Lk: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(bool mask, float mask) for the chunk, each broadcastable to ``(b1-b0, H, r1-r0, Lk)`` (or None)."""
    keep: Tensor | None = None
    add: Tensor | None = None
    am = spec.attn_mask
    if am is not None:
        am = am if am.shape[0] == 1 else am[c.b0 : c.b1]
        am = am if am.shape[2] == 1 else am[:, :, c.r0 : c.r1]  # only this chunk's rows of an expanded mask
        if am.dtype == torch.bool:
            keep = am
        else:
            add = am
    if spec.key_mask is not None:
        km = spec.key_mask[c.b0 : c.b1].unsqueeze(1).unsqueeze(1)  # cheaper than indexing with None
        keep = km if keep is None else keep & km
    if spec.is_causal and not c.sdpa_causal:
        i = torch.arange(c.r0, c.r1, device=device)[:, None]
        causal = torch.arange(Lk, device=device)[None, :] <= i  # top-left aligned like SDPA
        keep = causal if keep is None else keep & causal
    return keep, add


def _sdpa_chunk(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, add: Tensor | None, c: _Chunk, scale: float):
    if scale == 0.0:
        # SDPA's causal path scales its -inf mask too (0 * -inf = NaN): put the zero scale into q instead (q * 0
        # keeps a NaN or inf of q as NaN, like scale * (q . k) does).
        q, scale = q * 0.0, 1.0
    m, valid = _sdpa_mask(q, keep, add)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c.sdpa_causal, scale=scale)
    return _sdpa_finish(out, q, valid)


def _sdpa_finish(out: Tensor, q: Tensor, valid: Tensor | None, inplace: bool = False) -> Tensor:
    """Rows without a key zeroed, NaN query rows restored. ``inplace``: ``out`` is a fresh tensor no autograd graph
    saved (a quarter of the out-of-place pass, and no new buffer); on a CPU, where reading a value costs no device
    sync, the pass is then skipped when it would change nothing."""
    if valid is None:
        # PyTorch's CPU flash kernel (no mask; torch 2.13) returns 0, not NaN, for a query row holding a NaN, where
        # SDPA's math backend, its masked path and the contract give NaN: restore it (isnan, not q * 0, so huge
        # finite q values cannot turn into a spurious NaN).
        if not inplace:
            return torch.where(torch.isnan(q).any(-1, keepdim=True), math.nan, out)
        if not _may_hold_nan(q):
            return out
        nan_rows = torch.isnan(q).any(-1, keepdim=True)
        return torch.where(nan_rows, out.new_full((), math.nan), out, out=out)
    if not inplace:
        return out * valid.to(out.dtype)  # a float factor keeps mul's vectorized path
    return out if _nothing_to_change(valid, True) else out.mul_(valid.to(out.dtype))


def _nothing_to_change(rows: Tensor, harmless: bool) -> bool:
    """On a CPU: whether every entry of ``rows`` is ``harmless`` (so a finishing pass would change nothing)."""
    if rows.device.type != "cpu":
        return False
    return bool(rows.all()) if harmless else not bool(rows.any())


def _may_hold_nan(q: Tensor) -> bool:
    """On a CPU: False where ``q`` surely holds no NaN. One sum instead of ``isnan(q).any()`` (whose bool
    temporary cost ~10x more, measured): a NaN always makes the sum NaN; the only false alarm, opposite infinities,
    just takes the exact per-row path."""
    return q.device.type != "cpu" or bool(q.sum().isnan())


def _sdpa_finish_backward(grad: Tensor, q: Tensor, valid: Tensor | None) -> Tensor:
    """The gradient :func:`_sdpa_finish` passes to its ``out`` (what autograd gives it in the recomputing path);
    ``grad`` itself where that changes nothing (known on a CPU without a sync)."""
    if valid is None:
        if not _may_hold_nan(q):
            return grad
        nan_rows = torch.isnan(q).any(-1, keepdim=True)
        return grad if _nothing_to_change(nan_rows, False) else grad.masked_fill(nan_rows, 0.0)
    return grad if _nothing_to_change(valid, True) else grad * valid.to(grad.dtype)


def _sdpa_mask(q: Tensor, keep: Tensor | None, add: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(the float mask SDPA gets, the rows that have a key) from a chunk's masks; (None, None) without masks.

    Boolean exclusions get a finite fill (finfo.min) instead of -inf: allowed logits are finite scores, so excluded
    keys still get exactly zero weight, and PyTorch's CPU flash kernel runs its backward ~10x faster without -inf
    in the mask."""
    return _additive_mask(keep, add, q.dtype, torch.finfo(q.dtype).min)


def _additive_mask(
    keep: Tensor | None, add: Tensor | None, dtype: torch.dtype, fill: float
) -> tuple[Tensor | None, Tensor | None]:
    """(additive float mask in ``dtype``, the rows that have a key), both in the masks' compact broadcast shape.

    Excluded keys get ``fill``; rows without any key get an all-zero mask (they become uniform and the caller
    zeroes them with the returned validity). (None, None) without masks."""
    if keep is None and add is None:
        return None, None
    if add is None:
        valid = keep.any(-1, keepdim=True)
        m = torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), fill)
        if fill == -math.inf:  # a finite fill already leaves those rows finite
            m.masked_fill_(~valid, 0.0)
    else:  # -inf for a float mask: it keeps a user's finfo.min mask on plain arithmetic
        m = add.to(dtype)
        if keep is not None:
            m = torch.where(keep, m, -math.inf)
        valid = (m != -math.inf).any(-1, keepdim=True)  # NaN counts as valid: it must propagate
        m = m.masked_fill(~valid, 0.0) if m is add else m.masked_fill_(~valid, 0.0)  # never write the user's mask
    return m, valid


def _dropout_probs(
    q: Tensor, k: Tensor, keep: Tensor | None, add: Tensor | None, c: _Chunk, spec: Spec, col: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(softmax probabilities before dropout, ``keep / (1 - p)`` per element, the rows that have a key or None) of
    one dropout chunk; q/k already in the work dtype (fp32 for half inputs), the results in it too."""
    m, valid = _additive_mask(keep, add, q.dtype, -math.inf)
    s = torch.matmul(q * spec.scale, k.transpose(-2, -1))
    if m is not None:
        s.add_(m)
    return torch.softmax(s, dim=-1), _keep_scale(spec, c, q.shape[1], col, q.dtype), valid


def _keep_scale(spec: Spec, c: _Chunk, H: int, col: Tensor, dtype: torch.dtype) -> Tensor:
    """``keep / (1 - p)`` of the chunk's elements, ``(b1-b0, H, r1-r0, Lk)`` in ``dtype``."""
    dev = col.device
    b = torch.arange(c.b0, c.b1, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    i = torch.arange(c.r0, c.r1, device=dev).view(1, 1, -1, 1)
    row_keys = _dropout.row_keys(spec.seed, b, h, i)
    return _dropout.keep_scale_from_keys(row_keys, col, spec.dropout_p, dtype)


def _dropout_chunk(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, add: Tensor | None, c: _Chunk, spec: Spec, col: Tensor
) -> Tensor:
    """Explicit attention with dropout: ``(P * keep / (1 - p)) @ V``, rows without a key zeroed."""
    probs, keep_scale, valid = _dropout_probs(q, k, keep, add, c, spec, col)
    out = torch.matmul(probs.mul_(keep_scale), v)  # multiply (not masked_fill) so NaN still propagates
    return out if valid is None else out.mul_(valid.to(out.dtype))


def _dropout_chunk_backward(
    g: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, c: _Chunk, spec: Spec, col: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one dropout chunk, all in the work dtype, from the chunk's output gradient ``g`` and output.

    With ``O = P~ V``, ``P~ = P * z``, ``z = keep / (1 - p)``: ``dV = P~^T dO``; ``dP = z * (dO V^T)``;
    ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``; ``dQ = scale dS K``, ``dK = scale dS^T Q``. One score
    matmul is recomputed (not the ``P V`` one autograd would redo), nothing L x L is kept between the passes."""
    keep, add = _chunk_masks(spec, c, k.shape[2], q.device)
    probs, keep_scale, valid = _dropout_probs(q, k, keep, add, c, spec, col)
    if valid is not None:
        # Rows without a key return 0 whatever their probabilities: no gradient flows through them.
        g = g * valid.to(g.dtype)
    d = (g * out).sum(-1, keepdim=True)
    dv = torch.matmul(probs.mul(keep_scale).transpose(-2, -1), g)
    ds = torch.matmul(g, v.transpose(-2, -1)).mul_(keep_scale).sub_(d).mul_(probs)
    dq = torch.matmul(ds, k).mul_(spec.scale)
    dk = torch.matmul(ds.transpose(-2, -1), q).mul_(spec.scale)
    return dq, dk, dv


def _attend(q: Tensor, k: Tensor, v: Tensor, c: _Chunk, spec: Spec, col: Tensor | None) -> Tensor:
    keep, add = _chunk_masks(spec, c, k.shape[2], q.device)
    if spec.dropout_p > 0:
        return _dropout_chunk(q, k, v, keep, add, c, spec, col)
    return _sdpa_chunk(q, k, v, keep, add, c, spec.scale)


def _operand_format(dtype: torch.dtype, spec: Spec) -> tuple[torch.dtype, torch.memory_format]:
    """(work dtype, memory format) of a chunk's q/k/v/grad. The dropout path's own matmuls want contiguous operands
    (a transposed (B, L, H, D) view would be copied again by every matmul it enters), made in the same pass as the
    dtype conversion; SDPA takes any strides."""
    if spec.dropout_p > 0:
        return _work_dtype(dtype), torch.contiguous_format
    return dtype, torch.preserve_format


def _col_terms(Lk: int, spec: Spec, device: torch.device) -> Tensor | None:
    if spec.dropout_p == 0:
        return None
    return _dropout.col_terms(torch.arange(Lk, device=device))


def attend(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> Tensor:
    """Output ``(B, H, Lq, Dv)`` in q's dtype, laid out as :func:`out_heads_inner` says."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    out_shape = (B, H, Lq, v.shape[-1])
    if q.numel() == 0 or v.shape[-1] == 0 or Lk == 0:
        return _new_out(q, out_shape).zero_()  # no keys: every row is fully excluded -> 0
    work, fmt = _operand_format(q.dtype, spec)
    col = _col_terms(Lk, spec, q.device)
    # no_grad: nothing here is differentiated (backward recomputes chunk by chunk), so record no graph.
    with _no_autocast(q.device), torch.no_grad():
        chunks = list(_chunks(B, H, Lq, Lk, spec))
        if len(chunks) == 1:
            operands = (t.to(work, memory_format=fmt) for t in (q, k, v))
            return _as_out(q, _attend(*operands, chunks[0], spec, col).to(q.dtype))
        out = _new_out(q, out_shape)
        kw = vw = None
        for c in chunks:
            if c.r0 == 0:  # new batch block: convert its K/V once
                kw, vw = (t[c.b0 : c.b1].to(work, memory_format=fmt) for t in (k, v))
            qc = q[c.b0 : c.b1, :, c.r0 : c.r1].to(work, memory_format=fmt)
            out[c.b0 : c.b1, :, c.r0 : c.r1] = _attend(qc, kw, vw, c, spec, col)
        return out


def attend_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, spec: Spec
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), laid out heads inner, in the inputs' dtype, chunk by chunk: explicit for dropout (from the
    forward's ``out``, required then), else by recomputing the chunk's SDPA under autograd."""
    dq, dk, dv = (_heads_inner_zeros(t, t.shape) for t in (q, k, v))
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq, dk, dv
    dropout = spec.dropout_p > 0
    work, fmt = _operand_format(q.dtype, spec)
    acc_dtype = _work_dtype(q.dtype)  # dK/dV summed over chunks in fp32 for half inputs
    col = _col_terms(Lk, spec, q.device)
    chunks = list(_chunks(B, H, Lq, Lk, spec))
    grad_mode = torch.no_grad() if dropout else torch.enable_grad()
    recording = contextlib.nullcontext() if dropout else _autograd_dispatch()
    with _no_autocast(q.device), recording, grad_mode:
        kl = vl = dk_acc = dv_acc = None
        for n, c in enumerate(chunks):
            if c.r0 == 0:
                kl = k[c.b0 : c.b1].detach().to(work, memory_format=fmt).requires_grad_(not dropout)
                vl = v[c.b0 : c.b1].detach().to(work, memory_format=fmt).requires_grad_(not dropout)
                dk_acc = dv_acc = None
            rows = (slice(c.b0, c.b1), slice(None), slice(c.r0, c.r1))
            ql = q[rows].detach().to(work, memory_format=fmt)
            g = grad[rows].to(work, memory_format=fmt)
            if dropout:
                gq, gk, gv = _dropout_chunk_backward(g, out[rows].to(work), ql, kl, vl, c, spec, col)
            else:
                ql.requires_grad_()
                o = _attend(ql, kl, vl, c, spec, col)
                gq, gk, gv = torch.autograd.grad(o, (ql, kl, vl), g, allow_unused=True, materialize_grads=True)
            dq[rows] = gq
            dk_acc = gk.to(acc_dtype) if dk_acc is None else dk_acc.add_(gk)
            dv_acc = gv.to(acc_dtype) if dv_acc is None else dv_acc.add_(gv)
            if n + 1 == len(chunks) or chunks[n + 1].r0 == 0:  # batch block finished
                dk[c.b0 : c.b1] = dk_acc
                dv[c.b0 : c.b1] = dv_acc
    return dq, dk, dv


def _empty_lse(q: Tensor) -> Tensor:
    return q.new_empty(0, dtype=torch.float32)


class _MaskCache(threading.local):
    """The last whole-input mask conversion of this thread (see :func:`_whole_input_mask`)."""

    key: tuple | None = None
    value: tuple | None = None


_mask_cache = _MaskCache()


def _mask_identity(mask: Tensor | None) -> tuple:
    """What identifies a mask's contents between calls: the tensor itself (held weakly) and its version counter,
    which every in-place edit bumps. Inference tensors have no version counter: never reused."""
    if mask is None:
        return (None, 0)
    if mask.is_inference():
        return (object(), 0)  # equal to nothing
    return (weakref.ref(mask), mask._version)


def _is_identified(identity: tuple, mask: Tensor | None) -> bool:
    """Whether ``mask`` is the tensor :func:`_mask_identity` gave ``identity`` for, unmodified since. Creates no
    weak reference: this runs on every call (the cache hit is the common case)."""
    ref, version = identity
    if mask is None:
        return ref is None
    # An inference tensor was never given a weak reference (see _mask_identity), so it never matches here.
    if not isinstance(ref, weakref.ref) or ref() is not mask:
        return False
    return mask._version == version


def _whole_input_mask(q: Tensor, spec: Spec, Lk: int) -> tuple[Tensor | None, Tensor | None, bool]:
    """(SDPA's additive mask, the rows that have a key, whether every row has one) for the whole-input plan.

    A Transformer hands the same padding mask to every layer, forward and backward: the conversion (a few small
    ops, whose fixed cost on a CPU is what this plan otherwise adds to SDPA) is done once per mask and dtype and
    reused while the mask tensors are alive and unmodified (identity and version counter)."""
    if spec.attn_mask is None and spec.key_mask is None:
        return None, None, False
    cached = _mask_cache.key
    if (
        cached is not None
        and cached[2] == q.dtype
        and cached[4] == Lk
        and cached[3] == q.device
        and _is_identified(cached[0], spec.attn_mask)
        and _is_identified(cached[1], spec.key_mask)
    ):
        return _mask_cache.value
    key = (_mask_identity(spec.attn_mask), _mask_identity(spec.key_mask), q.dtype, q.device, Lk)
    B, Lq = q.shape[0], q.shape[2]
    # Ordinary tensors even inside inference_mode: a later training call may reuse them, and autograd saves the
    # mask of the kernel it records (eager_flash).
    with torch.inference_mode(False):
        m, valid = _sdpa_mask(q, *_chunk_masks(spec, _Chunk(0, B, 0, Lq, spec.is_causal), Lk, q.device))
    value = (m, valid, _nothing_to_change(valid, True))
    _mask_cache.key, _mask_cache.value = key, value
    return value


def _flash_cpu_forward(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> tuple[Tensor, Tensor]:
    """The whole-input plan through the CPU flash kernel itself: (out laid out heads inner, its row log-sum-exp)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or v.shape[-1] == 0 or Lk == 0:
        return _new_out(q, (B, H, Lq, v.shape[-1])).zero_(), q.new_zeros((B, H, Lq), dtype=torch.float32)
    with _no_autocast(q.device), torch.no_grad():
        m, valid, all_valid = _whole_input_mask(q, spec, Lk)
        raw, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, spec.is_causal, attn_mask=m, scale=spec.scale
        )
        # The kernel's output has q's layout (checked, not assumed): finish it in place.
        out = _as_out(q, raw)
        if not all_valid:  # all_valid: a mask leaves every row a key, known without another pass
            out = _sdpa_finish(out, q, valid, inplace=True)
        return out, lse.contiguous()


def eager_flash(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_mask: Tensor | None, is_causal: bool, scale: float
) -> Tensor | None:
    """The whole-input plan of an eager call without dropout, as PyTorch's own differentiable flash kernel on a CPU:
    ``out``, or None where that would not give exactly what the op gives (then the op runs).

    Same kernel, same arguments (the converted mask included) as :func:`_flash_cpu_forward` and
    :func:`_flash_cpu_backward`, so the same bits forward and backward; but recorded by autograd as the kernel's
    own node instead of the op's custom Function, whose forward and backward cost ~100 us of Python each per call
    (measured): on a CPU that is what kept this plan 5-10% slower than SDPA itself. Taken only where no finishing
    pass is needed: every query row has a key (mask), or no query row holds a NaN (no mask; the kernel would return
    0 there). The caller checks the call is eager on plain tensors under ``auto`` (compiled code, dispatch modes and
    an explicit backend run the op). ``out`` has the layout the kernel gives (SDPA's).
    """
    if q.device.type != "cpu" or torch.is_autocast_enabled("cpu"):  # autocast: the op, which turns it off inside
        return None
    if not saves_lse(q, attn_mask, key_mask, 0.0, is_causal, scale) or q.numel() == 0 or k.shape[2] == 0:
        return None
    # No gradient can flow into the masks (bool, or a float mask the wrapper checked needs none): no no_grad needed.
    m, valid, all_valid = _whole_input_mask(q, Spec(attn_mask, key_mask, None, 0.0, is_causal, scale), k.shape[2])
    if valid is None and _may_hold_nan(q):
        return None
    if valid is not None and not all_valid:
        return None
    return _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=m, scale=scale)[0]


def eager_dropout(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor,
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> Tensor | None:
    """An eager call with dropout on a CPU as PyTorch's own differentiable ops: ``out`` (contiguous), or None
    where the op must run (not a CPU, autocast on, empty input, or more than one chunk).

    The forward is the op's own dropout path, same operations in the same order (so the same bits, the same keep
    mask from ``seed``); autograd records it and saves the probabilities and the keep factor, as SDPA's math path
    saves its own. Backward is then autograd's C++ nodes, with nothing recomputed and no Python: against the op's
    explicit backward, which recomputes the scores, the softmax and the hash, fwd+bwd went from 0.85x to 1.5x of
    stock SDPA with dropout at B16 H2 L64 D64 (measured). Only for a single-chunk input: what autograd keeps
    between the passes (~3 L x L tensors) then stays within the chunk budget the op works in.
    """
    if q.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or v.shape[-1] == 0 or Lk == 0:
        return None
    spec = Spec(attn_mask, key_mask, seed, dropout_p, is_causal, scale)
    chunks = list(_chunks(B, H, Lq, Lk, spec))
    if len(chunks) != 1:
        return None
    c = chunks[0]
    work = _work_dtype(q.dtype)
    with torch.no_grad():  # the masks and the keep factor take no gradient
        keep, add = _chunk_masks(spec, c, Lk, q.device)
        m, valid = _additive_mask(keep, add, work, -math.inf)
        keep_scale = _keep_scale(spec, c, H, _col_terms(Lk, spec, q.device), work)
    ql, kl, vl = (t.to(work, memory_format=torch.contiguous_format) for t in (q, k, v))
    s = torch.matmul(ql * scale, kl.transpose(-2, -1))
    if m is not None:
        s = s.add_(m)  # matmul's backward does not read its output: in place is safe under autograd
    probs = torch.softmax(s, dim=-1)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = torch.matmul(probs * keep_scale, vl)  # softmax's backward reads probs: not in place
    else:  # no graph: the op's in-place steps (a fresh L x L buffer costs its page faults on a CPU)
        out = torch.matmul(probs.mul_(keep_scale), vl)
    if valid is not None and not _nothing_to_change(valid, True):
        out = out * valid.to(out.dtype)  # rows without a key: 0, and no gradient through them
    return out.to(q.dtype)


def _flash_cpu_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, spec: Spec
) -> tuple[Tensor, Tensor, Tensor]:
    """The flash kernel's backward on the saved output and log-sum-exp. ``out`` is the finished output (rows
    without a key zeroed, NaN rows restored): those rows get a zero gradient here, exactly as autograd gives
    ``_sdpa_finish``'s input, so what the kernel saw there does not matter."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return tuple(_heads_inner_zeros(t, t.shape) for t in (q, k, v))
    with _no_autocast(q.device), torch.no_grad():
        m, valid, all_valid = _whole_input_mask(q, spec, Lk)
        g = grad.to(q.dtype)
        if not all_valid:
            g = _sdpa_finish_backward(g, q, valid)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, spec.is_causal, attn_mask=m, scale=spec.scale
        )
        return grads  # already heads inner: the kernel's own layout


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
    """Backend entry point for ``ptfast::attention``: ``(out, lse)``, ``lse`` empty unless :func:`saves_lse`."""
    spec = Spec(attn_mask, key_mask, seed, dropout_p, is_causal, scale)
    if saves_lse(q, attn_mask, key_mask, dropout_p, is_causal, scale):
        return _flash_cpu_forward(q, k, v, spec)
    return attend(q, k, v, spec), _empty_lse(q)


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
    """Backend entry point for ``ptfast::attention_backward``: the flash kernel's backward on the saved ``out`` and
    ``lse`` where forward saved them (:func:`saves_lse`; the op passes an empty ``lse`` when another backend ran the
    forward), else per-chunk recomputation."""
    spec = Spec(attn_mask, key_mask, seed, dropout_p, is_causal, scale)
    if lse.numel() > 0 and saves_lse(q, attn_mask, key_mask, dropout_p, is_causal, scale):
        return _flash_cpu_backward(grad, q, k, v, out, lse, spec)
    return attend_backward(grad, q, k, v, out, spec)
