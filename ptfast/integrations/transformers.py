"""Hugging Face ``transformers`` integration: ``attn_implementation="ptfast"``.

Usage::

    import ptfast.integrations.transformers as ptfast_hf

    ptfast_hf.register()  # once per process (idempotent)
    model = BertForMaskedLM.from_pretrained(path, attn_implementation="ptfast")
    # or, for a model that is already built: model.set_attn_implementation("ptfast")

What this module holds:

* :func:`register` adds two things to transformers under one name (default ``"ptfast"``):
  :func:`attention_forward` to ``transformers.AttentionInterface`` and :func:`create_mask` to
  ``transformers.masking_utils.AttentionMaskInterface``. Both are needed: a model looks its mask builder up by
  the same name, and when the name is missing there, transformers silently passes ``attention_mask=None`` to
  the attention function, so padding would be ignored.
* :func:`create_mask` (:mod:`ptfast.integrations.transformers_mask`) delegates to transformers' own mask
  builders: a plain bidirectional (BERT encoder) or causal pattern gets the flash-attention builder's ``(B, Lk)``
  bool key mask (True = real token) or ``None`` when nothing is padded, which maps onto
  ``ptfast.attention(key_mask=...)``; sequences packed into one row get ``None`` (their boundaries come from
  ``cu_seq_lens_*`` or ``position_ids``); any other pattern gets the SDPA builder's 4-D bool mask.
* :func:`attention_forward` is the attention function, with transformers' calling convention:
  ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)``, q/k/v
  ``(B, H, S, D)`` (non-contiguous views are fine), returning ``((B, S, H, D), None)``.

Facts about transformers 5.x this relies on (checked on 5.17 and 5.25; 4.x picks attention classes per model
and is not supported):

* BERT's self-attention calls the function with ``dropout=0.0 if not self.training else self.dropout.p`` and
  ``scaling=head_dim ** -0.5``, plus whatever keyword arguments reached the model: in practice
  ``encoder_hidden_states`` (always, usually None), ``position_ids`` (None unless given), and the output flags
  ``output_hidden_states`` / ``output_attentions`` when set, ``num_items_in_batch`` from the Trainer, and the
  padding-free kwargs ``cu_seq_lens_q/k``, ``max_length_q/k`` (and ``seq_idx``) from
  ``DataCollatorWithFlattening``. ``dropout`` is honoured as given (like transformers' SDPA function), so
  training-mode dropout happens inside the ptfast kernel and is reproducible under ``torch.manual_seed``.
* Causality is decided like transformers' SDPA function: the ``is_causal`` kwarg if given, else
  ``module.is_causal`` (default True; BERT sets it from ``config.is_decoder``). With a 4-D mask the mask already
  holds the pattern and no causal flag is added. With a key mask (or none) and as many queries as keys,
  ``is_causal`` goes to ptfast, which combines it with ``key_mask`` (top-left aligned, any padding). With fewer
  queries than keys (decoding with a KV cache) the causal diagonal is aligned bottom-right, like flash attention:
  one query attends to every key; several queries get an explicit ``(Lq, Lk)`` bool mask.
* Padding-free batches: ``cu_seq_lens_q/k`` (+ ``max_length_q/k``, int or tensor; derived from the
  ``cu_seq_lens`` when missing) route to :func:`ptfast.attention_varlen` on ``(total, H, D)`` views. Without
  them, a batch of one whose ``position_ids`` restart (several sequences packed into one row, e.g. by
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=False)``) is detected, as transformers' flash path
  does, and also runs varlen, with a sequence starting at every position that is not its predecessor + 1; that
  costs one host sync per layer, so passing ``cu_seq_lens_*`` is faster. A packed row that also carries a
  padding mask is refused. ``position_ids`` of batches larger than one are not read (transformers treats only a
  batch of one as packed).
* Grouped-query attention (fewer key/value heads than query heads) repeats the key/value heads.
* Keyword arguments are never silently ignored: those in :data:`HARMLESS_KWARGS` do not affect attention;
  ``sliding_window`` is accepted when a 4-D mask carries the window or no key is farther away than the window;
  ``deterministic=False`` (ModernBERT's flash option) only permits a nondeterministic backward, ``True`` raises;
  ``output_attentions=True`` raises (ptfast never materializes attention weights; use ``"eager"`` for that);
  any other keyword argument that is not None (``softcap``, ``s_aux``, ``head_mask``, ``position_bias``, a
  paged ``cache``, ...) raises :class:`NotImplementedError` naming it.
* Not supported: static KV caches (keys beyond the tokens seen so far). They are refused with a clear error
  when a padding mask shows the mismatch, but cannot be detected without one.

The backend is ptfast's usual choice (``ptfast.use_backend(...)``, ``PTFAST_BACKEND``, or auto).
``import ptfast.integrations.transformers`` does not import transformers; :func:`register` does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ptfast.integrations.transformers_interfaces import transformers_interfaces
from ptfast.integrations.transformers_mask import create_mask, packed_sequence_base

# The ops module, not ``ptfast`` itself: this module may be imported while ``ptfast/__init__`` is still running
# (e.g. by ``ptfast.patching``).
from ptfast.ops.attention import attention, attention_varlen

__all__ = [
    "DEFAULT_NAME",
    "HARMLESS_KWARGS",
    "attention_forward",
    "create_mask",
    "is_registered",
    "packed_sequence_base",
    "register",
]

DEFAULT_NAME = "ptfast"

#: Keyword arguments transformers models pass to attention functions that cannot change the result, and why.
HARMLESS_KWARGS: Mapping[str, str] = MappingProxyType(
    {
        "encoder_hidden_states": "BERT-family attention forwards it; key/value were already projected from it",
        "output_hidden_states": "selects which hidden states the model returns",
        "num_items_in_batch": "loss normalization under gradient accumulation (Trainer)",
        "output_router_logits": "mixture-of-experts bookkeeping",
        "return_dict": "output container format",
        "use_cache": "KV-cache bookkeeping; the cached keys/values arrive as key/value",
    }
)

PADDING_FREE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# --- importing and registering ----------------------------------------------------------------------------


def register(name: str = DEFAULT_NAME) -> None:
    """Make ``attn_implementation=name`` (default ``"ptfast"``) available to transformers models.

    Registers :func:`attention_forward` with ``transformers.AttentionInterface`` and :func:`create_mask` with
    ``transformers.masking_utils.AttentionMaskInterface`` under the same name, process-wide. Idempotent: calling
    it again re-registers the same two functions.

    Raises:
        ImportError: transformers is missing or older than 5.0.
        RuntimeError: the installed transformers lacks the interfaces this integration uses.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"ptfast.integrations.transformers.register: name must be a non-empty str, got {name!r}")
    attention_interface, masking_utils = transformers_interfaces()
    attention_interface.register(name, attention_forward)
    masking_utils.AttentionMaskInterface.register(name, create_mask)


def is_registered(name: str = DEFAULT_NAME) -> bool:
    """Whether both ptfast functions are registered under ``name`` (never imports transformers itself)."""
    if "transformers" not in sys.modules:
        return False  # nothing can have been registered without importing it
    try:
        attention_interface, masking_utils = transformers_interfaces()
    except (ImportError, RuntimeError):
        return False
    # A fresh instance has no local overrides, so lookups show the process-wide registrations.
    return (
        attention_interface().get(name) is attention_forward
        and masking_utils.AttentionMaskInterface().get(name) is create_mask
    )


# --- the attention function -------------------------------------------------------------------------------


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unsupported(name: str, value: object, why: str = "") -> NotImplementedError:
    return NotImplementedError(
        f"attn_implementation='ptfast' does not implement `{name}` (got {_describe(value)}){why}; "
        "use attn_implementation='sdpa' or 'eager' for this model or call"
    )


def _check_remaining_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Every keyword argument not handled explicitly must be known-harmless or None."""
    for name, value in kwargs.items():
        if name in HARMLESS_KWARGS or value is None:
            continue
        raise _unsupported(name, value)


def _match_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    hq, hk = query.shape[1], key.shape[1]
    if hk == hq:
        return key, value
    if hk == 0 or hq % hk != 0 or value.shape[1] != hk:
        raise ValueError(
            f"attn_implementation='ptfast': {hq} query heads cannot share {hk} key / {value.shape[1]} value heads"
        )
    n = hq // hk
    return key.repeat_interleave(n, dim=1), value.repeat_interleave(n, dim=1)


def _split_mask(mask: object, batch: int, kv_len: int) -> tuple[Tensor | None, Tensor | None]:
    """``(attn_mask, key_mask)`` for ptfast from what the mask builder (or the user) delivered."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise ValueError(
            f"attn_implementation='ptfast': unsupported attention_mask of type {type(mask).__name__} (expected None, "
            "a (B, Lk) key mask or a 4-D mask); was the model's mask built for another attn_implementation?"
        )
    if mask.dim() == 2:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(
                f"attn_implementation='ptfast': a 2-D attention_mask must be bool or integer (True/1 = real token), "
                f"got {mask.dtype}"
            )
        if tuple(mask.shape) != (batch, kv_len):
            raise ValueError(
                f"attn_implementation='ptfast': the 2-D key mask has shape {tuple(mask.shape)} but the keys need "
                f"(B, Lk) = {(batch, kv_len)}; static KV caches (keys longer than the mask) are not supported"
            )
        return None, mask if mask.dtype == torch.bool else mask != 0
    if mask.dim() == 4:
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise ValueError(
                f"attn_implementation='ptfast': a 4-D attention_mask must be bool (True = attend) or additive float, "
                f"got {mask.dtype}"
            )
        return mask, None
    raise ValueError(
        f"attn_implementation='ptfast': attention_mask of shape {tuple(mask.shape)} is neither a (B, Lk) key mask "
        "nor a 4-D (B|1, H|1, Lq, Lk) mask"
    )


def _check_sliding_window(window: object, kv_len: int, mask_holds_it: bool) -> None:
    # With a 4-D mask the window is part of the mask (transformers' SDPA mask builder puts it there, and
    # transformers' SDPA function ignores the kwarg too). Without one it only matters when some key is at least
    # `window` positions away from a query, which needs more than `window` keys.
    if window is None or mask_holds_it:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise _unsupported("sliding_window", window)
    if kv_len > window:
        raise _unsupported("sliding_window", window, f" with {kv_len} keys (more than the window)")


def _max_len(given: object, cu: Tensor) -> int:
    if given is None:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0  # host sync, as for any tensor length
    return int(given)  # a tensor max length costs a host sync here, as in transformers' flash path


def _packed_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_q: object,
    cu_k: object,
    max_q: object,
    max_k: object,
    dropout: float,
    is_causal: bool,
    scale: float | None,
) -> Tensor:
    """Padding-free batch: the ``B * S`` tokens of q/k/v are sequences laid end to end. Returns ``(B, S, H, D)``."""
    if not isinstance(cu_q, Tensor) or not isinstance(cu_k, Tensor):
        raise ValueError(
            "attn_implementation='ptfast': padding-free attention needs both cu_seq_lens_q and cu_seq_lens_k as "
            f"tensors (got {_describe(cu_q)} and {_describe(cu_k)})"
        )
    same = cu_q is cu_k
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_k.to(device=query.device, dtype=torch.int32)
    if is_causal and not same and not torch.equal(cu_q, cu_k):
        # ptfast aligns the causal diagonal top-left within each sequence; flash attention aligns it bottom-right.
        # The two agree only when every sequence has as many queries as keys.
        raise NotImplementedError(
            "attn_implementation='ptfast': causal padding-free attention with cu_seq_lens_q != cu_seq_lens_k"
        )
    B, H, Sq, D = query.shape
    Sk = key.shape[2]
    # (B, H, S, D) -> (B * S, H, D); a view for B == 1, which is what padding-free collators produce.
    q = query.transpose(1, 2).reshape(B * Sq, H, D)
    k = key.transpose(1, 2).reshape(B * Sk, H, D)
    v = value.transpose(1, 2).reshape(B * Sk, H, value.shape[-1])
    out = attention_varlen(
        q, k, v, cu_q, cu_k, _max_len(max_q, cu_q), _max_len(max_k, cu_k),
        dropout_p=dropout, is_causal=is_causal, scale=scale,
    )  # fmt: skip
    return out.view(B, Sq, H, out.shape[-1])


def _cu_seqlens_from_position_ids(position_ids: object, length: int, device: torch.device) -> Tensor | None:
    """``cu_seqlens`` of the sequences packed into one row (positions restart), or None if it holds one sequence.

    A sequence starts wherever a position is not its predecessor + 1 (so packed sequences may start at any
    offset, e.g. RoBERTa's padding_idx + 1). Reading the positions is one host sync.
    """
    if not isinstance(position_ids, Tensor) or position_ids.numel() != length or position_ids.dim() > 2:
        raise _unsupported(
            "position_ids", position_ids, f" (expected shape (1, {length}) to tell whether sequences are packed)"
        )
    p = position_ids.detach().reshape(-1).to("cpu", torch.int64)
    starts_new = torch.ones(length, dtype=torch.bool)
    starts_new[1:] = p[1:] != p[:-1] + 1
    starts = starts_new.nonzero().flatten()
    if starts.numel() <= 1:
        return None
    cu = torch.cat([starts, torch.tensor([length])])
    return cu.to(device=device, dtype=torch.int32)


def attention_forward(
    module: nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention function registered with ``transformers.AttentionInterface`` (see the module docstring).

    Args:
        module: the calling attention module; ``module.is_causal`` is read when ``is_causal`` is not passed.
        query: ``(B, H, Sq, D)``.
        key: ``(B, Hk, Sk, D)``; ``Hk`` may divide ``H`` (grouped-query attention).
        value: ``(B, Hk, Sk, D)``.
        attention_mask: None, a ``(B, Sk)`` bool/int key mask (True/1 = real token), or a 4-D bool (True =
            attend) / additive float mask.
        scaling: softmax scale (default ``D ** -0.5``).
        dropout: attention dropout probability, applied whenever > 0 (transformers passes 0 in eval mode).
        **kwargs: ``is_causal``, ``position_ids``, the padding-free ``cu_seq_lens_q/k`` and ``max_length_q/k``,
            ``seq_idx``, ``sliding_window``, ``output_attentions``, ``deterministic`` and the
            :data:`HARMLESS_KWARGS`; anything else that is not None raises :class:`NotImplementedError`.

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``(B, Sq, H, D)``, contiguous.
    """
    is_causal_kw = kwargs.pop("is_causal", None)
    position_ids = kwargs.pop("position_ids", None)
    cu_q, cu_k, max_q, max_k = (kwargs.pop(n, None) for n in PADDING_FREE_KWARGS)
    seq_idx = kwargs.pop("seq_idx", None)
    sliding_window = kwargs.pop("sliding_window", None)
    output_attentions = kwargs.pop("output_attentions", None)
    # Flash-attention option (ModernBERT passes config.deterministic_flash_attn): False only permits a
    # nondeterministic backward, which changes nothing; True asks for a guarantee this function does not give.
    deterministic = kwargs.pop("deterministic", None)
    _check_remaining_kwargs(kwargs)
    if deterministic:
        raise _unsupported("deterministic", deterministic, " (no per-call determinism switch)")
    if output_attentions:
        raise _unsupported("output_attentions", output_attentions, " (ptfast never materializes the attention weights)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(
                f"attn_implementation='ptfast': {name} must be a 4-D (B, H, S, D) tensor, got {_describe(t)}"
            )
    dropout = float(dropout)
    # Like transformers' SDPA function: an explicit is_causal wins, else the module's flag (default causal).
    is_causal = bool(is_causal_kw if is_causal_kw is not None else getattr(module, "is_causal", True))
    key, value = _match_kv_heads(query, key, value)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]

    # 1. Padding-free batch described by the collator.
    if any(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        if attention_mask is not None:
            # A padding-free batch has no padding. A 4-D mask here is one the mask builder could not recognize
            # as the packing cu_seq_lens already describe (see transformers_mask): refuse rather than guess.
            raise ValueError(
                "attn_implementation='ptfast': got both a padding mask and cu_seq_lens_* (padding-free batch); "
                f"a padding-free batch has no padding, pass one or the other (mask: {_describe(attention_mask)})"
            )
        _check_sliding_window(sliding_window, int(max_k) if max_k is not None else Lk, False)
        out = _packed_forward(query, key, value, cu_q, cu_k, max_q, max_k, dropout, is_causal, scaling)
        return out, None

    if seq_idx is not None and position_ids is None:
        # seq_idx marks packed sequences too (for state-space layers); attention needs cu_seq_lens or positions.
        raise _unsupported("seq_idx", seq_idx, " without cu_seq_lens_* or position_ids")
    attn_mask, key_mask = _split_mask(attention_mask, B, Lk)
    _check_sliding_window(sliding_window, Lk, attn_mask is not None)

    # 2. Sequences packed into one row, told only by restarting position_ids (no mask: a 4-D mask would already
    #    separate them, and a key mask cannot).
    if position_ids is not None and attn_mask is None and B == 1 and Lq == Lk > 1:
        cu = _cu_seqlens_from_position_ids(position_ids, Lq, query.device)
        if cu is not None:
            if key_mask is not None:
                raise _unsupported(
                    "position_ids", position_ids, " (sequences packed into one row together with a padding mask)"
                )
            out = _packed_forward(query, key, value, cu, cu, None, None, dropout, is_causal, scaling)
            return out, None

    # 3. Padded batch. A 4-D mask already holds the causal pattern (transformers' SDPA convention).
    causal = is_causal and attn_mask is None
    if causal and Lq != Lk:
        # KV-cache decoding: the queries are the last Lq positions, so the diagonal is aligned bottom-right.
        if Lq > 1:
            attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)[None, None]
        causal = False  # a single query attends to every cached key
    out = attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal, scale=scaling, key_mask=key_mask
    )
    return out.transpose(1, 2).contiguous(), None
