"""Unpadded execution of Hugging Face BERT encoders: padding removed once, every layer on the real tokens only.

What this module holds:

* :func:`pack` / :class:`Packed`: the real tokens of a padded ``(B, S)`` batch (``attention_mask`` True / 1) as
  one packed row, with the ``cu_seqlens`` / ``max_seqlen`` of :func:`ptfast.attention_varlen`. Exactly one host
  sync (the number of real tokens, which sizes everything after it).
* :func:`packed_encoder`: runs a ``BertModel`` on the packed row: the embeddings on the real tokens only (each
  keeps its original position id and token type, so the result equals the padded model's on real tokens), the
  encoder layers with ``attention_mask=None`` and the padding-free keyword arguments ``cu_seq_lens_q/k`` /
  ``max_length_q/k``, which the ``"ptfast"`` attention function turns into :func:`ptfast.attention_varlen`
  calls. Dense layers, LayerNorms, dropout and attention all skip the padding: with lengths uniform in
  [L/4, L] that is ~40% of the encoder's work.
* :class:`UnpaddedBertForward`: the ``forward`` :func:`patch_model` puts on a ``BertModel`` *instance* (the
  module, its parameters and state_dict keys are untouched). It returns the stock output types with
  ``last_hidden_state`` (and ``hidden_states``) scattered back to ``(B, S, E)``, zeros at padded positions, and
  the pooler applied to that, so every head (sequence / token classification, QA, ...) works unchanged. The
  patched masked-LM forward (:mod:`ptfast.integrations.bert_mlm`) uses :func:`packed_encoder` directly and
  never scatters: its head runs on the masked real tokens of the packed row.

Equal to the stock padded model at every real token (outputs, losses and gradients, up to rounding) because a
padded key contributes nothing to a real query and every other op is row-wise. They differ only at padded
positions, whose stock values depend on the padding and mean nothing: the unpadded output holds 0 there. The
pooler reads position 0; with right padding (BERT's convention) that is a real token and the pooled output is
the stock one.

When the stock forward runs instead (nothing to unpad or nothing ptfast can unpad): no ``attention_mask``, a
mask that is not ``(B, S)``, a decoder / cross-attention / KV cache, inputs that are already padding-free
(``cu_seq_lens_*`` given), ``output_attentions=True``, or an ``attn_implementation`` other than ``"ptfast"``
(another attention function would ignore the sequence boundaries of the packed row).

Under ``torch.compile`` the token count is data-dependent: the unpad step breaks the graph (the layers are
compiled as their own graph, with a dynamic token dimension). ``fullgraph=True`` needs ``unpad=False``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptfast.integrations.transformers import PADDING_FREE_KWARGS

__all__ = ["Packed", "UnpaddedBertForward", "pack", "packed_encoder", "patch_model", "unpad_reason"]


def pop_return_dict(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """transformers' ``can_return_tuple``: the ``return_dict`` keyword if not None, else ``config.return_dict``.
    Shared by the patched forwards here and in :mod:`ptfast.integrations.bert_mlm` (which imports this module)."""
    default = getattr(getattr(model, "config", None), "return_dict", True)
    passed = kwargs.pop("return_dict", None)
    return bool(default if passed is None else passed)


@dataclass
class Packed:
    """The real tokens of a padded batch as one packed row."""

    indices: Tensor  # (T,) int64: flat positions (b * S + s) of the real tokens, in order
    cu_seqlens: Tensor  # (B + 1,) int32: sequence b is packed tokens cu_seqlens[b]:cu_seqlens[b + 1]
    max_seqlen: int  # the longest sequence
    batch: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]

    def gather(self, t: Tensor | None) -> Tensor | None:
        """``t`` ``(B, S, ...)`` (or broadcastable ``(1, S, ...)``) -> ``(1, T, ...)``: its real tokens."""
        if t is None:
            return None
        t = t.expand(self.batch, self.seq_len, *t.shape[2:])
        return t.reshape(self.batch * self.seq_len, *t.shape[2:]).index_select(0, self.indices).unsqueeze(0)

    def scatter(self, packed: Tensor) -> Tensor:
        """``(1, T, ...)`` -> ``(B, S, ...)`` with zeros at the padded positions (autograd-safe)."""
        rows = packed[0]
        out = rows.new_zeros(self.batch * self.seq_len, *rows.shape[1:])
        return out.index_copy(0, self.indices, rows).view(self.batch, self.seq_len, *rows.shape[1:])

    def first_tokens(self, packed: Tensor, mask: Tensor) -> Tensor:
        """``(B, 1, E)``: each sequence's position-0 state from the packed ``(1, T, E)`` row (0 where it is
        padding), what a pooler reads from the padded output."""
        rows = packed.reshape(self.total, packed.shape[-1])
        if self.total == 0:
            return rows.new_zeros(self.batch, 1, rows.shape[-1])
        # Position 0 of sequence b, when real, is its first packed token.
        first = rows.index_select(0, self.cu_seqlens[:-1].long().clamp(max=self.total - 1))
        return torch.where(mask[:, :1].to(first.device, torch.bool), first, 0.0).unsqueeze(1)


def pack(attention_mask: Tensor) -> Packed:
    """Where the real tokens of ``attention_mask`` ``(B, S)`` (nonzero = real) are, with one host sync."""
    mask = attention_mask.bool()
    batch, seq_len = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if batch == 0:
        return Packed(mask.new_zeros(0, dtype=torch.long), cu_seqlens, 0, 0, seq_len)
    # One sync for both numbers; nonzero_static then needs none.
    total, max_seqlen = torch.stack([lengths.sum(), lengths.max()]).tolist()
    indices = torch.nonzero_static(mask.reshape(-1), size=total).squeeze(1)
    return Packed(indices, cu_seqlens, int(max_seqlen), batch, seq_len)


def unpad_reason(bert: nn.Module, attention_mask: object, kwargs: dict[str, Any]) -> str | None:
    """Why these inputs run the stock padded forward (None: they can run unpadded)."""
    config = bert.config
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        return "no (B, S) attention_mask"
    if getattr(config, "_attn_implementation", None) != "ptfast":
        return f"attn_implementation={config._attn_implementation!r} (the packed row needs 'ptfast')"
    if config.is_decoder or kwargs.get("encoder_hidden_states") is not None:
        return "decoder / cross-attention"
    # transformers 5.25 renamed past_key_values to cache (the old name still accepted, with a deprecation warning).
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None or kwargs.get("use_cache"):
        return "KV cache"
    if any(kwargs.get(k) is not None for k in PADDING_FREE_KWARGS):
        return "already padding-free (cu_seq_lens_* given)"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


def packed_encoder(
    bert: nn.Module,
    packed: Packed,
    input_ids: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The stock ``BertModel`` forward on the packed real tokens: a ``BaseModelOutputWithPooling...`` whose
    ``last_hidden_state`` / ``hidden_states`` are ``(1, T, E)`` (its ``pooler_output`` is meaningless: it pooled
    the packed row; use :meth:`Packed.first_tokens`)."""
    seq_len = packed.seq_len
    device = (input_ids if input_ids is not None else inputs_embeds).device
    if position_ids is None:  # what the embeddings would use: 0..S-1 in every row, padding or not
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
    if token_type_ids is None:
        token_type_ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    cu = packed.cu_seqlens.to(device)
    return type(bert).forward(
        bert,
        input_ids=packed.gather(input_ids),
        attention_mask=None,
        token_type_ids=packed.gather(token_type_ids),
        position_ids=packed.gather(position_ids),
        inputs_embeds=packed.gather(inputs_embeds),
        return_dict=True,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=packed.max_seqlen,
        max_length_k=packed.max_seqlen,
        **kwargs,
    )


def _output_types():
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    return BaseModelOutputWithPoolingAndCrossAttentions


class UnpaddedBertForward:
    """The ``forward`` :func:`patch_model` puts on a ``BertModel`` instance (see the module docstring).

    A callable object (not a bound method) so ``copy.deepcopy`` and ``pickle`` keep it; ``inspect.signature``
    reports the stock signature.
    """

    def __init__(self, bert: nn.Module) -> None:
        self.bert = bert
        self.__signature__ = inspect.signature(type(bert).forward.__get__(bert))

    def can_unpad(self, attention_mask: object, kwargs: dict[str, Any]) -> bool:
        return unpad_reason(self.bert, attention_mask, kwargs) is None

    def __call__(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        bert = self.bert
        inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                      inputs_embeds=inputs_embeds)  # fmt: skip
        if not self.can_unpad(attention_mask, kwargs):
            return type(bert).forward(bert, attention_mask=attention_mask, **inputs, **kwargs)
        return_dict = pop_return_dict(bert, kwargs)
        packed = pack(attention_mask)
        out = packed_encoder(bert, packed, **inputs, **kwargs)
        sequence = packed.scatter(out.last_hidden_state)
        pooled = bert.pooler(sequence) if bert.pooler is not None else None
        hidden_states = out.hidden_states
        if hidden_states is not None:
            hidden_states = tuple(packed.scatter(h) for h in hidden_states)
        result = _output_types()(last_hidden_state=sequence, pooler_output=pooled, hidden_states=hidden_states)
        return result if return_dict else result.to_tuple()

    def __repr__(self) -> str:
        return f"<ptfast UnpaddedBertForward of {type(self.bert).__name__}>"


def unpadded_forward_of(bert: object) -> UnpaddedBertForward | None:
    forward = getattr(bert, "__dict__", {}).get("forward")
    return forward if isinstance(forward, UnpaddedBertForward) else None


def _bert_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    import transformers

    return [(name, m) for name, m in model.named_modules() if isinstance(m, transformers.BertModel)]


def patch_model(model: nn.Module, replaced: list[str], skipped: list[str], *, prefix: str = "") -> None:
    """Put an :class:`UnpaddedBertForward` on every ``BertModel`` inside the Hugging Face ``model``."""
    for name, bert in _bert_models(model):
        where = f"{prefix}{name + ': ' if name else ''}"
        if unpadded_forward_of(bert) is not None:
            skipped.append(f"{where}BertModel already unpadded")
            continue
        if bert.__dict__.get("forward") is not None:
            skipped.append(f"{where}BertModel not unpadded: the instance already has its own forward (a wrapper)")
            continue
        if type(bert).forward is not _stock_bert_forward():
            skipped.append(f"{where}BertModel not unpadded: {type(bert).__name__} overrides forward")
            continue
        config = bert.config
        if config.is_decoder or getattr(config, "add_cross_attention", False):
            skipped.append(f"{where}BertModel not unpadded: decoder / cross-attention")
            continue
        if getattr(config, "_attn_implementation", None) != "ptfast":
            skipped.append(
                f"{where}BertModel not unpadded: attn_implementation={config._attn_implementation!r} "
                "(unpadding needs 'ptfast': patch with attention=True)"
            )
            continue
        bert.forward = UnpaddedBertForward(bert)
        replaced.append(
            f"{where}BertModel: unpadded (padding removed before the embeddings; layers on real tokens; "
            "outputs scattered back with zeros at padding)"
        )


def _stock_bert_forward():
    import transformers

    return transformers.BertModel.forward
