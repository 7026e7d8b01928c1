"""``ptfast.attention`` / ``ptfast.attention_varlen``: scaled dot-product attention, padded or packed.

Registered ops (one definition each, all backends behind them):

* ``ptfast::attention(q, k, v, attn_mask, key_mask, seed, dropout_p, is_causal, scale, backend) -> (out, lse)``
  q ``(B, H, Lq, D)``, k/v ``(B, H, Lk, D)``; ``attn_mask`` None or bool/float 4-D broadcastable to
  ``(B, H, Lq, Lk)`` (the wrapper passes it with stride-0 dimensions narrowed to size 1); ``key_mask`` None or
  bool ``(B, Lk)``; ``seed`` None (no dropout) or int64 ``(2,)`` (see :mod:`ptfast._dropout`).
  ``out``: ``(B, H, Lq, D)`` in q's dtype, contiguous, or laid out as ``(B, Lq, H, D)`` in memory where the
  backend's ``out_heads_inner(q)`` says so (the layout of SDPA's kernels; the fake kernel promises the exact
  strides, and a fallback's result is copied into them). ``lse``: fp32 row log-sum-exp ``(B, H, Lq)`` for backends
  that save it (``SAVES_LSE`` in the backend module: True, or a function of the call's shapes), else an empty
  ``(0,)`` tensor.
* ``ptfast::attention_backward(grad, q, k, v, out, lse, attn_mask, key_mask, seed, dropout_p, is_causal, scale,
  backend) -> (dq, dk, dv)``, in the inputs' dtype; laid out as ``(B, L, H, D)`` in memory where the backend's
  ``GRADS_HEADS_INNER`` is True, else contiguous.
* ``ptfast::attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p,
  is_causal, scale, backend) -> (out, lse)``: q ``(total_q, H, D)``, k/v ``(total_k, H, D)``, out
  ``(total_q, H, D)``; ``lse`` ``(H, total_q)`` fp32 or empty.
* ``ptfast::attention_varlen_backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, seed, dropout_p, is_causal, scale, backend) -> (dq, dk, dv)``.

Autocast: q, k, v and a float ``attn_mask`` are cast to the autocast dtype in the functional wrappers; outside
autocast q, k and v must share one dtype. The dropout seed is drawn in the wrappers (graph-safe, reproducible
with ``torch.manual_seed``) and is an op input, so autograd saves it and backward regenerates the same mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ptfast import _attention_layout, _dispatch, _dropout, _validation, verification
from ptfast._eager import RegisteredOp
from ptfast.backends import Unimplemented
from ptfast.backends.torch import attention as torch_attention
from ptfast.backends.torch import attention_varlen as torch_attention_varlen
from ptfast.backends.triton import attention as triton_attention
from ptfast.backends.triton import attention_varlen as triton_attention_varlen

_IMPLS = {
    "torch": torch_attention,
    "triton": triton_attention,
    "cuda": Unimplemented("cuda", "attention"),
}
_VARLEN_IMPLS = {
    "torch": torch_attention_varlen,
    "triton": triton_attention_varlen,
    "cuda": Unimplemented("cuda", "attention_varlen"),
}
_AUTO_ORDER = ("cuda", "triton", "torch")


def _lse_shape(impls: dict, backend: str, shape: tuple, call: tuple = ()) -> tuple:
    """``shape`` if ``backend`` saves the log-sum-exp for this call, else ``(0,)``. ``SAVES_LSE`` is a bool, or a
    function of the call's ``(q, attn_mask, key_mask, dropout_p, is_causal, scale)`` that reads only shapes, dtypes
    and the device (the fake kernel evaluates it too)."""
    saves = getattr(impls[_dispatch.split(backend)[0]], "SAVES_LSE", False)
    if callable(saves):
        saves = saves(*call)
    return tuple(shape) if saves else (0,)


def _lse(impls: dict, backend: str, like: Tensor, shape: tuple, call: tuple = ()) -> Tensor:
    return like.new_empty(_lse_shape(impls, backend, shape, call), dtype=torch.float32)


def _promised_lse(impls: dict, backend: str, lse: Tensor, like: Tensor, shape: tuple, call: tuple = ()) -> Tensor:
    """The ``lse`` output in the shape the fake kernel promised for ``backend``. They differ only when ``auto``
    fell back to torch after a kernel fault; backward then falls back too and reads it only where its own
    ``SAVES_LSE`` says the forward saved one, which is then this lse."""
    promised = _lse_shape(impls, backend, shape, call)
    if tuple(lse.shape) == promised:
        return lse
    return like.new_full(promised, float("nan"), dtype=torch.float32)


def _heads_inner(impls: dict, backend: str, q: Tensor, what: str) -> bool:
    """Whether ``backend`` lays ``what`` ("out" or "grads") out as ``(B, L, H, D)`` in memory, the layout SDPA's
    kernels return (its ``out_heads_inner(q)`` / ``GRADS_HEADS_INNER``); otherwise contiguous ``(B, H, L, D)``.
    Reads q's strides only: the fake kernel evaluates it too, and compiled code passes q with the traced strides
    (custom ops need exact strides)."""
    impl = impls[_dispatch.split(backend)[0]]
    if what == "out":
        rule = getattr(impl, "out_heads_inner", None)
        return bool(rule(q)) if rule is not None else False
    return bool(getattr(impl, "GRADS_HEADS_INNER", False))


def _in_layout(t: Tensor, heads_inner: bool) -> Tensor:
    """``t`` in the layout the fake kernel promised (exact strides: compiled code relies on them); a copy only when
    ``auto`` fell back to another backend than the one the call was traced for."""
    if t.stride() == _attention_layout.strides(t.shape, heads_inner):
        return t
    return _attention_layout.new_empty(t, t.shape, heads_inner).copy_(t)


def _own_lse(impls: dict, backend: str, impl: object, lse: Tensor) -> Tensor:
    """``lse`` for the backward of the backend whose forward saved it; an empty one for a backend that backward
    falls back to (its own log-sum-exp would mean something else: Triton's is base 2)."""
    return lse if impl is impls[_dispatch.split(backend)[0]] else lse.new_empty(0)


def _fault_key(q: Tensor, v: Tensor, masks: tuple, dropout_p: float, is_causal: bool) -> tuple:
    """The input class a kernel fault is remembered for: what selects a kernel specialization, never a size."""
    return (q.device, q.dtype, int(q.shape[-1]), int(v.shape[-1]), *masks, dropout_p > 0, is_causal)


def _mask_kinds(attn_mask: Tensor | None, key_mask: Tensor | None) -> tuple:
    return (None if attn_mask is None else attn_mask.dtype, key_mask is not None)


# --- padded attention -------------------------------------------------------------------------------------


def _attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    key = _fault_key(q, v, _mask_kinds(attn_mask, key_mask), dropout_p, is_causal)
    out, lse = _dispatch.run(
        "attention", "forward", backend, _IMPLS, key,
        lambda impl: impl.forward(q, k, v, attn_mask, key_mask, seed, dropout_p, is_causal, scale),
    )  # fmt: skip
    call = (q, attn_mask, key_mask, dropout_p, is_causal, scale)
    out = _in_layout(out, _heads_inner(_IMPLS, backend, q, "out"))
    return out, _promised_lse(_IMPLS, backend, lse, q, q.shape[:3], call)


ATTENTION = RegisteredOp("ptfast::attention", _attention_impl)


@ATTENTION.register_fake
def _(q, k, v, attn_mask, key_mask, seed, dropout_p, is_causal, scale, backend):
    B, H, Lq, _ = q.shape
    call = (q, attn_mask, key_mask, dropout_p, is_causal, scale)
    out = _attention_layout.new_empty(q, (B, H, Lq, v.shape[-1]), _heads_inner(_IMPLS, backend, q, "out"))
    return out, _lse(_IMPLS, backend, q, (B, H, Lq), call)


def _attention_backward_impl(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    key = _fault_key(q, v, _mask_kinds(attn_mask, key_mask), dropout_p, is_causal)
    grads = _dispatch.run(
        "attention", "backward", backend, _IMPLS, key,
        lambda impl: impl.backward(
            grad, q, k, v, out, _own_lse(_IMPLS, backend, impl, lse), attn_mask, key_mask, seed, dropout_p,
            is_causal, scale,
        ),
    )  # fmt: skip
    heads_inner = _heads_inner(_IMPLS, backend, q, "grads")
    return tuple(_in_layout(g, heads_inner) for g in grads)


ATTENTION_BACKWARD = RegisteredOp("ptfast::attention_backward", _attention_backward_impl)


@ATTENTION_BACKWARD.register_fake
def _(grad, q, k, v, out, lse, attn_mask, key_mask, seed, dropout_p, is_causal, scale, backend):
    heads_inner = _heads_inner(_IMPLS, backend, q, "grads")
    return tuple(_attention_layout.new_empty(t, t.shape, heads_inner) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, key_mask, seed, dropout_p, is_causal, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.backend = dropout_p, is_causal, scale, backend


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, attn_mask, key_mask, seed = ctx.saved_tensors
    dq, dk, dv = ATTENTION_BACKWARD(
        grad_out, q, k, v, out, lse, attn_mask, key_mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None


ATTENTION.register_autograd(_backward, setup_context=_setup_context)


# --- packed (varlen) attention ----------------------------------------------------------------------------


def _attention_varlen_impl(
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
    backend: str,
) -> tuple[Tensor, Tensor]:
    out, lse = _dispatch.run(
        "attention_varlen", "forward", backend, _VARLEN_IMPLS, _fault_key(q, v, (), dropout_p, is_causal),
        lambda impl: impl.forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p, is_causal, scale
        ),
    )  # fmt: skip
    return out, _promised_lse(_VARLEN_IMPLS, backend, lse, q, (q.shape[1], q.shape[0]))


ATTENTION_VARLEN = RegisteredOp("ptfast::attention_varlen", _attention_varlen_impl)


@ATTENTION_VARLEN.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p, is_causal, scale, backend):
    total_q, H, _ = q.shape
    return q.new_empty((total_q, H, v.shape[-1])), _lse(_VARLEN_IMPLS, backend, q, (H, total_q))


def _attention_varlen_backward_impl(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _dispatch.run(
        "attention_varlen", "backward", backend, _VARLEN_IMPLS, _fault_key(q, v, (), dropout_p, is_causal),
        lambda impl: impl.backward(
            grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, dropout_p,
            is_causal, scale,
        ),
    )  # fmt: skip


ATTENTION_VARLEN_BACKWARD = RegisteredOp("ptfast::attention_varlen_backward", _attention_varlen_backward_impl)


@ATTENTION_VARLEN_BACKWARD.register_fake
def _(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, dropout_p, is_causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, seed, dropout_p, is_causal, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.max_q, ctx.max_k = max_q, max_k
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.backend = dropout_p, is_causal, scale, backend


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = ATTENTION_VARLEN_BACKWARD(
        grad_out, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, seed,
        ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.backend,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


ATTENTION_VARLEN.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# --- validation and input preparation ---------------------------------------------------------------------


def _check_options(op: str, dropout_p: object, is_causal: object, scale: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"ptfast.{op}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"ptfast.{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"ptfast.{op}: scale must be None or a finite number, got {scale!r}")


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    """Head-dim and key/value checks shared by both ops (``layout`` names the expected shapes)."""
    if q.shape[-1] == 0:
        raise ValueError(f"ptfast.{op}: head dim D must be at least 1, got query shape {tuple(q.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"ptfast.{op}: key head dim {k.shape[-1]} != query head dim {q.shape[-1]} "
            f"(query {tuple(q.shape)}, key {tuple(k.shape)}; layout {layout})"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"ptfast.{op}: value head dim {v.shape[-1]} != query head dim {q.shape[-1]}; a different value head "
            "dim is not supported"
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"ptfast.{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must match ({layout})")


def _check_tensors_and_options(
    op: str, query: object, key: object, value: object, ndim: int, dropout_p: object, is_causal: object, scale: object
) -> tuple[Tensor, Tensor, Tensor]:
    """Type/rank/dtype of q, k, v and the scalar options, shared by the padded and packed ops."""
    fl = _validation.FLOAT_DTYPES
    q = _validation.check_tensor(op, "query", query, ndim=ndim, dtypes=fl)
    k = _validation.check_tensor(op, "key", key, ndim=ndim, dtypes=fl)
    v = _validation.check_tensor(op, "value", value, ndim=ndim, dtypes=fl)
    _check_options(op, dropout_p, is_causal, scale)
    return q, k, v


def _check_attention(
    op: str,
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    key_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
) -> None:
    q, k, v = _check_tensors_and_options(op, query, key, value, 4, dropout_p, is_causal, scale)
    layout = "query (B, H, Lq, D), key/value (B, H, Lk, D)"
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"ptfast.{op}: key {tuple(k.shape)} must have query's batch and head dims {tuple(q.shape[:2])} "
            f"({layout}; grouped-query attention is not supported)"
        )
    _check_qkv(op, q, k, v, layout)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if attn_mask is not None:
        m = _validation.check_tensor(op, "attn_mask", attn_mask)
        if not (m.dtype == torch.bool or m.is_floating_point()):
            raise TypeError(
                f"ptfast.{op}: attn_mask must be bool (True = attend) or floating (added to the scores), got "
                f"{m.dtype}; convert a 0/1 integer mask with .bool()"
            )
        if m.is_floating_point() and m.requires_grad:
            raise ValueError(
                f"ptfast.{op}: a float attn_mask that requires grad is not supported (no gradient flows to the "
                "mask); pass attn_mask.detach() if that is intended"
            )
        target = (B, H, Lq, Lk)
        if m.dim() > 4 or any(s not in (1, t) for s, t in zip(reversed(m.shape), reversed(target), strict=False)):
            raise ValueError(
                f"ptfast.{op}: attn_mask of shape {tuple(m.shape)} is not broadcastable to (B, H, Lq, Lk) = {target}"
            )
    if key_mask is not None:
        km = _validation.check_tensor(op, "key_mask", key_mask)
        if km.dtype != torch.bool:
            raise TypeError(
                f"ptfast.{op}: key_mask must be bool (True = real token, Hugging Face's attention_mask "
                f"convention), got {km.dtype}; use key_mask.bool()"
            )
        if tuple(km.shape) != (B, Lk):
            raise ValueError(f"ptfast.{op}: key_mask must have shape (B, Lk) = {(B, Lk)}, got {tuple(km.shape)}")
    _validation.check_same_device(op, query=q, key=k, value=v, attn_mask=attn_mask, key_mask=key_mask)


def _check_max_seqlen(op: str, name: str, n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 0:
        raise ValueError(f"ptfast.{op}: {name} must be a Python int >= 0, got {n!r}")


def _check_cu_values(op: str, name: str, cu: Tensor, total: int, max_len: int) -> None:
    c = cu.detach().to("cpu", torch.int64)  # eager only: reading values syncs with the device
    lengths = c[1:] - c[:-1]
    if c[0].item() != 0:
        raise ValueError(f"ptfast.{op}: {name}[0] must be 0, got {c[0].item()}")
    if lengths.numel() and lengths.min().item() < 0:
        raise ValueError(f"ptfast.{op}: {name} must be non-decreasing, got {c.tolist()}")
    if c[-1].item() != total:
        raise ValueError(f"ptfast.{op}: {name}[-1] = {c[-1].item()} but the packed tensor has {total} tokens")
    if lengths.numel() and lengths.max().item() > max_len:
        which = "max_seqlen_q" if name.endswith("_q") else "max_seqlen_k"
        raise ValueError(f"ptfast.{op}: a sequence has {lengths.max().item()} tokens > {which} = {max_len}")


def _check_varlen(
    op: str,
    query: object,
    key: object,
    value: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
) -> None:
    q, k, v = _check_tensors_and_options(op, query, key, value, 3, dropout_p, is_causal, scale)
    layout = "query (total_q, H, D), key/value (total_k, H, D)"
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"ptfast.{op}: key has {k.shape[1]} heads but query has {q.shape[1]} ({layout})")
    _check_qkv(op, q, k, v, layout)
    cus = {}
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        cu = _validation.check_tensor(op, name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.numel() < 1:
            raise ValueError(f"ptfast.{op}: {name} must have B + 1 >= 1 entries, got shape {tuple(cu.shape)}")
        cus[name] = cu
    if cus["cu_seqlens_q"].numel() != cus["cu_seqlens_k"].numel():
        raise ValueError(
            f"ptfast.{op}: cu_seqlens_q has {cus['cu_seqlens_q'].numel()} entries but cu_seqlens_k has "
            f"{cus['cu_seqlens_k'].numel()} (both must be B + 1)"
        )
    _check_max_seqlen(op, "max_seqlen_q", max_seqlen_q)
    _check_max_seqlen(op, "max_seqlen_k", max_seqlen_k)
    _validation.check_same_device(op, query=q, key=k, value=v, **cus)
    if _validation.value_checks_enabled(q, *cus.values()):
        _check_cu_values(op, "cu_seqlens_q", cus["cu_seqlens_q"], q.shape[0], max_seqlen_q)
        _check_cu_values(op, "cu_seqlens_k", cus["cu_seqlens_k"], k.shape[0], max_seqlen_k)


def _compact_mask(mask: Tensor | None) -> Tensor | None:
    """The mask as a 4-D view whose stride-0 (expanded) dims are narrowed to size 1.

    Backends broadcast it chunk by chunk, so an ``expand``-ed mask is never materialized at full size.
    """
    if mask is None:
        return None
    mask = mask[(None,) * (4 - mask.dim())]
    for d in range(4):
        if mask.shape[d] > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return mask


def _cast_inputs(
    op: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Autocast policy: cast q/k/v and a float mask to the autocast dtype; else q/k/v must share a dtype."""
    cast = _validation.autocast_dtype(q.device)
    if cast is None:
        _validation.check_same_dtype(op, query=q, key=k, value=v)
        return q, k, v, mask
    if mask is not None and mask.is_floating_point():
        mask = mask.to(cast)  # compact already, so this never copies a broadcast
    return q.to(cast), k.to(cast), v.to(cast), mask


# --- functional API ---------------------------------------------------------------------------------------


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _seed(dropout_p: float, device: torch.device) -> Tensor | None:
    # Drawn here, outside the op, from torch's default generator: reproducible with manual_seed, traced by
    # torch.compile, and a fresh draw per CUDA-graph replay.
    return _dropout.draw_seed(device) if dropout_p > 0 else None


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention with the layout and semantics of ``F.scaled_dot_product_attention``.

    Args:
        query: ``(B, H, Lq, D)``, any strides; fp16, bf16, fp32 or fp64.
        key: ``(B, H, Lk, D)``.
        value: ``(B, H, Lk, D)`` (the value head dim must equal D).
        attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, H, Lq, Lk)``; an expanded
            (stride-0) mask is never materialized. A float mask must not require grad.
        dropout_p: probability in [0, 1] of dropping an attention weight (applied whenever > 0, like SDPA).
        is_causal: query row i attends keys j <= i (top-left aligned, like SDPA).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_mask: bool ``(B, Lk)``, True = real token (Hugging Face's ``attention_mask`` convention).

    All masks combine (bool masks by AND, a float mask is added). Rows whose every key is excluded return 0
    with zero gradient.

    Returns:
        ``(B, H, Lq, D)`` in the inputs' dtype (the autocast dtype under ``torch.autocast``).
    """
    op = "attention"
    _check_attention(op, query, key, value, attn_mask, key_mask, dropout_p, is_causal, scale)
    query, key, value, mask = _cast_inputs(op, query, key, value, _compact_mask(attn_mask))
    scale_f = _scale(scale, query.shape[-1])
    # The verification gate's shape class matters only on CUDA (it gates auto there): no work elsewhere.
    shape_class = verification.attention_class(
        query.dtype, int(query.shape[-1]), int(key.shape[2]), attn_mask=mask is not None,
        key_mask=key_mask is not None, dropout=dropout_p > 0, causal=bool(is_causal),
    ) if query.is_cuda else None  # fmt: skip
    requested = _dispatch.requested_backend()
    backend = _dispatch.choose(
        op, _IMPLS, _AUTO_ORDER, lambda: _fault_key(query, value, _mask_kinds(mask, key_mask), dropout_p, is_causal),
        device=query.device, shape_class=shape_class, requested=requested, q=query, k=key, v=value,
        attn_mask=mask, key_mask=key_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale_f,
    )  # fmt: skip
    seed = _seed(dropout_p, query.device)  # drawn once whichever path runs: the same keep mask either way
    if _dispatch.autograd_route_applies(backend, query.device, (query, key, value, mask, key_mask), requested):
        # auto's CPU routes around the op's own Python: PyTorch's own differentiable ops, recorded by autograd
        # (the flash kernel without dropout, the op's dropout math with it).
        if seed is None:
            out = torch_attention.eager_flash(query, key, value, mask, key_mask, bool(is_causal), scale_f)
        else:
            out = torch_attention.eager_dropout(
                query, key, value, mask, key_mask, seed, float(dropout_p), bool(is_causal), scale_f
            )
        if out is not None:  # None: the op runs (see eager_flash, eager_dropout)
            _dispatch.record_autograd_route(op, out)
            return out
    out, _ = ATTENTION(query, key, value, mask, key_mask, seed, float(dropout_p), bool(is_causal), scale_f, backend)
    return out


def attention_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention over packed (unpadded) sequences: sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.

    Args:
        query: ``(total_q, H, D)``, any strides; fp16, bf16, fp32 or fp64.
        key: ``(total_k, H, D)``.
        value: ``(total_k, H, D)``.
        cu_seqlens_q: int32 ``(B + 1,)``, cumulative query lengths starting at 0.
        cu_seqlens_k: int32 ``(B + 1,)``, cumulative key lengths starting at 0.
        max_seqlen_q: Python int >= every query length.
        max_seqlen_k: Python int >= every key length.
        dropout_p, scale: as :func:`attention`; dropout positions are counted within each sequence, so the
            result equals the padded batch with a ``key_mask`` under the same seed.
        is_causal: within each sequence, query i attends keys j <= i (top-left aligned).

    Returns:
        ``(total_q, H, D)``; tokens of a sequence without keys get 0.
    """
    op = "attention_varlen"
    _check_varlen(
        op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale
    )
    query, key, value, _ = _cast_inputs(op, query, key, value, None)
    scale_f = _scale(scale, query.shape[-1])
    shape_class = verification.attention_class(
        query.dtype, int(query.shape[-1]), int(max_seqlen_k), attn_mask=False, key_mask=False,
        dropout=dropout_p > 0, causal=bool(is_causal), varlen=True,
    ) if query.is_cuda else None  # fmt: skip
    backend = _dispatch.choose(
        op, _VARLEN_IMPLS, _AUTO_ORDER, _fault_key(query, value, (), dropout_p, is_causal),
        device=query.device, shape_class=shape_class, q=query, k=key,
        v=value, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale_f,
    )  # fmt: skip
    seed = _seed(dropout_p, query.device)
    out, _ = ATTENTION_VARLEN(
        query, key, value, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seed,
        float(dropout_p), bool(is_causal), scale_f, backend,
    )  # fmt: skip
    return out
