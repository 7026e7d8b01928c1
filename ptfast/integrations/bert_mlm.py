"""Hugging Face BERT masked-LM head on ptfast: the head runs on masked rows only, then the fused loss.

What this module holds:

* :func:`patch_model`, called by :func:`ptfast.patch` for Hugging Face models. On a ``BertForMaskedLM`` or a
  ``BertForPreTraining`` (or a subclass that keeps their ``forward``) it puts a :class:`PatchedMLMForward` on the
  *instance* (``model.forward``); the class, the modules, the parameter objects and the state_dict keys are
  untouched, so checkpoints load and the decoder weight stays tied to the word embeddings. It also makes
  ``attn_implementation="ptfast"`` available and, by default, switches an ``"eager"`` / ``"sdpa"`` encoder to it.
* :func:`mlm_head_loss`, the building block: ``predictions.transform`` (dense, GELU, LayerNorm) on the masked
  rows only, then :func:`ptfast.masked_lm_loss` with ``predictions.decoder``'s weight and bias. Usable directly
  by a custom model whose head is a ``BertLMPredictionHead``-shaped module.

Behaviour of the patched ``forward`` (same signature and return types as the stock one):

* Training mode with ``labels`` (for ``BertForPreTraining``: with ``labels`` *and* ``next_sentence_label``, the
  only case where the stock model computes a loss): the encoder runs as usual, the head runs through
  :func:`mlm_head_loss`, and the output's ``logits`` (``prediction_logits``) is **None** because the full
  ``(B, S, V)`` logits are never formed. ``return_dict=False`` tuples drop the None as transformers does, so they
  read ``(loss, [seq_relationship_logits,] hidden_states..., attentions...)``.
* Eval mode, or no labels: the stock ``forward`` runs unchanged (full head on every token) and the logits are
  returned as before; a loss, when labels are given, is computed from those logits exactly as the stock model
  does (or as ``sum / num_items_in_batch``, see below).
* ``num_items_in_batch`` (passed by ``transformers.Trainer`` under gradient accumulation, because the model's
  ``forward`` takes ``**kwargs``) makes the masked-LM loss ``sum / num_items_in_batch``, like transformers'
  ``ForMaskedLMLoss``; without it the loss is the mean over masked tokens. The stock BERT models (5.17 to 5.23)
  ignore ``num_items_in_batch`` and always return the mean, although the Trainer then no longer divides by the
  number of accumulation steps; so with ``num_items_in_batch`` the patched loss is the correctly normalized one
  and differs from the stock value. The next-sentence loss of ``BertForPreTraining`` stays a per-batch mean,
  as in the stock model (``num_items_in_batch`` counts masked tokens, not sentence pairs).

Choosing the masked rows: in eager mode ``nonzero`` on ``labels != -100`` (one host sync) gives exactly the
masked rows. Under ``torch.compile`` shapes must be static and a sync is not allowed: the rows go through a
static budget of ``ceil(row_budget * B * S)`` rounded up to a multiple of 8 (the masked rows first, compacted on
the device, padded with ignored rows that cost the loss nothing). When more rows are masked than the budget
holds, ``torch.cond`` takes the other branch, which runs the transform on every row (the fused loss still skips
ignored rows): never a truncated loss. The all-rows form (exact, sync-free; the transform costs about E / V of
the decoder's FLOPs) is used instead of the ``torch.cond`` when ``row_budget`` is None, when the budget covers
every row, under CUDA-graph capture outside ``torch.compile`` (``torch.cond``'s eager form reads its predicate on
the host), and where dynamo cannot trace ``torch.cond``'s branches (torch 2.13): a hook anywhere in the
transform (or a global module hook), and ``torch.compile(dynamic=True)``. Dynamic sizes that automatic dynamic
shapes bring after a recompile keep the budget.

Hooks registered on ``cls``, ``cls.predictions`` or ``cls.predictions.decoder`` would not fire on the fused
path, so :func:`patch_model` leaves a model that has them alone; hooks added after patching are not seen on that
path. Hooks on ``cls.predictions.transform`` and below fire, on ``(rows, E)`` inputs.

Facts about transformers this relies on (5.17 and 5.23 have the same code here): ``BertForMaskedLM.forward``
and ``BertForPreTraining.forward`` compute the loss with ``CrossEntropyLoss()`` on ``prediction_scores.view(-1,
V)`` (mean over labels != -100; NaN when all are -100), are wrapped by ``can_return_tuple`` (``return_dict``
keyword, else ``config.return_dict``), and pass their ``**kwargs`` (``num_items_in_batch`` included) to the
encoder. The parameter names of both forwards are checked at patch time; a transformers whose forwards differ
is refused with an error instead of being patched on a guess.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptfast.integrations import bert_unpad, has_hooks
from ptfast.integrations.bert_unpad import pop_return_dict
from ptfast.ops.masked_lm_loss import masked_lm_loss

__all__ = ["DEFAULT_ROW_BUDGET", "PatchedMLMForward", "mlm_head_loss", "patch_model", "row_budget"]

#: Fraction of the tokens the static row budget holds under ``torch.compile`` (BERT masks ~15%).
DEFAULT_ROW_BUDGET = 0.2
IGNORE_INDEX = -100  # the label transformers' BERT losses ignore (CrossEntropyLoss's default)

# Parameter names of the stock forwards this module re-implements (transformers 5.17 - 5.23).
_EXPECTED_PARAMS = {
    "BertForMaskedLM": (
        "self", "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
        "encoder_hidden_states", "encoder_attention_mask", "labels", "kwargs",
    ),
    "BertForPreTraining": (
        "self", "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
        "next_sentence_label", "kwargs",
    ),
}  # fmt: skip

# Attention implementations that compute the same function as ptfast's (so switching changes no result).
_SWITCHABLE_ATTENTION = ("eager", "sdpa")


# --- the head and its loss --------------------------------------------------------------------------------


def _as_ratio(fraction: float | Fraction) -> Fraction:
    return fraction if isinstance(fraction, Fraction) else Fraction(fraction).limit_denominator(10_000)


def row_budget(n_rows: int, fraction: float | Fraction) -> int:
    """Static number of rows for ``n_rows`` tokens: ``ceil(fraction * n_rows)`` rounded up to 8, at most n_rows.

    Integer arithmetic on a rational approximation of ``fraction``, so it also works on symbolic sizes.
    """
    ratio = _as_ratio(fraction)
    need = (n_rows * ratio.numerator + ratio.denominator - 1) // ratio.denominator
    return min(n_rows, (need + 7) // 8 * 8)


def _check_budget(fraction: float | Fraction | None) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, Fraction)) or not 0 < fraction <= 1:
        raise ValueError(f"ptfast: mlm_row_budget must be a float in (0, 1] or None, got {fraction!r}")
    return float(fraction)


def _head_parts(predictions: nn.Module) -> tuple[nn.Module, Tensor, Tensor | None]:
    transform = getattr(predictions, "transform", None)
    decoder = getattr(predictions, "decoder", None)
    if not isinstance(transform, nn.Module) or not isinstance(decoder, nn.Linear):
        raise TypeError(
            "ptfast.mlm_head_loss: predictions must have a `transform` module and an nn.Linear `decoder` "
            f"(a BertLMPredictionHead), got {type(predictions).__name__}"
        )
    return transform, decoder.weight, decoder.bias


def _hooks_under(module: nn.Module) -> bool:
    """Whether a hook could run inside ``module`` (a hook with side effects cannot run inside ``torch.cond``)."""
    g = torch.nn.modules.module
    global_hooks = (
        g._global_forward_hooks,
        g._global_forward_pre_hooks,
        g._global_backward_hooks,
        g._global_backward_pre_hooks,
    )
    return any(global_hooks) or any(has_hooks(m) for m in module.modules())


def _static_rows_loss(
    transform: nn.Module, weight: Tensor, bias: Tensor | None, h: Tensor, y: Tensor, budget: int | None
) -> Tensor:
    """Sum of the per-token losses without a host sync and with static shapes (compile / graph capture)."""

    def all_rows(h: Tensor, y: Tensor) -> Tensor:
        # The fused loss skips ignored rows itself; only the transform runs on every row.
        return masked_lm_loss(transform(h), weight, y, bias, reduction="sum")

    n = h.shape[0]
    # Two things make dynamo fail inside torch.cond's branches (torch 2.13), and then take the exact all-rows
    # form: a side-effecting hook in the transform, and torch.compile(dynamic=True), which turns float module
    # attributes (LayerNorm's eps) into symbolic floats that the branches cannot lift. Dynamic sizes that
    # automatic dynamic shapes introduce after a recompile are fine.
    dynamic_everything = not getattr(torch._dynamo.config, "assume_static_by_default", True)
    if budget is None or budget >= n or dynamic_everything or _hooks_under(transform):
        return all_rows(h, y)
    valid = y != IGNORE_INDEX
    count = valid.sum()

    def budget_rows(h: Tensor, y: Tensor) -> Tensor:
        # Compact on the device: the k-th masked row goes to slot k; rows past the budget and unmasked rows
        # are written to a spare slot that is cut off. Unfilled slots read row 0 with an ignored label.
        pos = torch.cumsum(valid, 0) - 1
        dest = torch.where(valid & (pos < budget), pos, budget)
        src = torch.arange(n, device=h.device)
        index = torch.zeros(budget + 1, dtype=torch.long, device=h.device).scatter(0, dest, src)[:budget]
        filled = torch.arange(budget, device=h.device) < count
        y_sel = torch.where(filled, y.index_select(0, index), IGNORE_INDEX)
        return masked_lm_loss(transform(h.index_select(0, index)), weight, y_sel, bias, reduction="sum")

    if h.is_cuda and torch.cuda.is_current_stream_capturing():
        return all_rows(h, y)  # eager torch.cond would read its predicate on the host: illegal while capturing
    # Both branches are traced; at run time only one executes. Overflowing the budget costs the transform on
    # every row for that step instead of silently dropping masked tokens.
    return torch.cond(count <= budget, budget_rows, all_rows, (h, y))


def mlm_head_loss(
    predictions: nn.Module,
    sequence_output: Tensor,
    labels: Tensor,
    *,
    num_items_in_batch: Tensor | int | float | None = None,
    row_budget_fraction: float | Fraction | None = DEFAULT_ROW_BUDGET,
) -> Tensor:
    """Masked-LM loss of a BERT prediction head, running the head's transform only on masked rows.

    Equal (up to rounding) to ``CrossEntropyLoss()(predictions(sequence_output).view(-1, V), labels.view(-1))``,
    or with ``num_items_in_batch`` to the summed loss divided by it (transformers' ``ForMaskedLMLoss``).

    Args:
        predictions: a ``BertLMPredictionHead``-shaped module: ``transform`` (row-wise: dense, activation,
            LayerNorm) and an ``nn.Linear`` ``decoder`` (weight ``(V, E)``, usually tied to the word embeddings).
        sequence_output: ``(..., E)`` encoder output.
        labels: ``sequence_output.shape[:-1]`` int64; ``-100`` = not masked.
        num_items_in_batch: the Trainer's count of masked tokens over the accumulated batch (tensor or number).
        row_budget_fraction: static row budget under ``torch.compile`` (see the module docstring); None runs the
            transform on every row there. Eager mode always takes exactly the masked rows (one host sync).

    Returns:
        A scalar: the mean over masked tokens (NaN when none is masked, like the stock loss), or the sum divided
        by ``num_items_in_batch``.
    """
    transform, weight, bias = _head_parts(predictions)
    _check_budget(row_budget_fraction)
    h = sequence_output.reshape(-1, sequence_output.shape[-1])
    y = labels.reshape(-1).to(h.device)
    if y.shape[0] != h.shape[0]:
        raise ValueError(
            f"ptfast.mlm_head_loss: labels {tuple(labels.shape)} do not match sequence_output "
            f"{tuple(sequence_output.shape)} (expected labels of shape sequence_output.shape[:-1])"
        )
    static = torch.compiler.is_compiling() or (h.is_cuda and torch.cuda.is_current_stream_capturing())
    if static:
        budget = None if row_budget_fraction is None else row_budget(h.shape[0], row_budget_fraction)
        total = _static_rows_loss(transform, weight, bias, h, y, budget)
        count: Tensor | int = (y != IGNORE_INDEX).sum()
    else:
        index = (y != IGNORE_INDEX).nonzero().squeeze(1)  # the one host sync: how many rows are masked
        total = masked_lm_loss(
            transform(h.index_select(0, index)), weight, y.index_select(0, index), bias, reduction="sum"
        )
        count = index.shape[0]
    if num_items_in_batch is None:
        # Mean over masked tokens; 0 / 0 = NaN when nothing is masked, as CrossEntropyLoss gives.
        return total / count
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _loss_from_logits(logits: Tensor, labels: Tensor, vocab: int, num_items_in_batch: object) -> Tensor:
    """The stock masked-LM loss on full logits (``CrossEntropyLoss()``), or its sum over num_items_in_batch."""
    flat_logits, flat_labels = logits.view(-1, vocab), labels.view(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels)
    total = F.cross_entropy(flat_logits, flat_labels, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --- the patched forwards ---------------------------------------------------------------------------------


def _with_loss(output: Any, loss: Tensor) -> Any:
    # A fresh output object: assigning a field that was None would put it last in to_tuple()'s order.
    return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})


def _forward_masked_lm(
    model: nn.Module,
    budget: Fraction | None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """``BertForMaskedLM.forward`` with the fused head in training (see the module docstring)."""
    return_dict = pop_return_dict(model, kwargs)
    # Left in kwargs: the stock model also hands it to the encoder (whose attention functions ignore it).
    num_items = kwargs.get("num_items_in_batch")
    inputs = dict(
        attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
        inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
    )  # fmt: skip
    if labels is None or not model.training:
        out = type(model).forward(model, input_ids, **inputs, labels=None, return_dict=True, **kwargs)
        if labels is not None:
            out = _with_loss(out, _loss_from_logits(out.logits, labels, model.config.vocab_size, num_items))
    else:
        from transformers.modeling_outputs import MaskedLMOutput

        unpadded = _packed_bert(model.bert, input_ids, inputs, kwargs)
        if unpadded is not None:  # the head runs on the masked real tokens of the packed row: nothing scattered
            packed, enc = unpadded
            labels, hidden_states = packed.gather(labels.to(enc[0].device)), _scattered(packed, enc.hidden_states)
        else:
            enc = model.bert(input_ids, **inputs, return_dict=True, **kwargs)
            hidden_states = enc.hidden_states
        loss = mlm_head_loss(
            model.cls.predictions, enc[0], labels, num_items_in_batch=num_items, row_budget_fraction=budget
        )
        out = MaskedLMOutput(loss=loss, logits=None, hidden_states=hidden_states, attentions=enc.attentions)
    return out if return_dict else out.to_tuple()


def _forward_pretraining(
    model: nn.Module,
    budget: Fraction | None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    next_sentence_label: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """``BertForPreTraining.forward`` with the fused masked-LM head in training (see the module docstring)."""
    return_dict = pop_return_dict(model, kwargs)
    num_items = kwargs.get("num_items_in_batch")
    inputs = dict(
        attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
        inputs_embeds=inputs_embeds,
    )  # fmt: skip
    # The stock model computes a loss only when both label kinds are given.
    with_loss = labels is not None and next_sentence_label is not None
    if not with_loss or not model.training:
        out = type(model).forward(
            model, input_ids, **inputs, labels=None, next_sentence_label=None, return_dict=True, **kwargs
        )
        if with_loss:
            mlm = _loss_from_logits(out.prediction_logits, labels, model.config.vocab_size, num_items)
            nsp = F.cross_entropy(out.seq_relationship_logits.view(-1, 2), next_sentence_label.view(-1))
            out = _with_loss(out, mlm + nsp)
    else:
        from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

        unpadded = _packed_bert(model.bert, input_ids, inputs, kwargs)
        if unpadded is not None:
            packed, enc = unpadded
            sequence_output, hidden_states = enc[0], _scattered(packed, enc.hidden_states)
            labels = packed.gather(labels.to(sequence_output.device))
            pooled_output = model.bert.pooler(packed.first_tokens(sequence_output, inputs["attention_mask"]))
        else:
            enc = model.bert(input_ids, **inputs, return_dict=True, **kwargs)
            (sequence_output, pooled_output), hidden_states = enc[:2], enc.hidden_states
        mlm = mlm_head_loss(
            model.cls.predictions, sequence_output, labels, num_items_in_batch=num_items, row_budget_fraction=budget
        )
        nsp_logits = model.cls.seq_relationship(pooled_output)
        nsp = F.cross_entropy(nsp_logits.view(-1, 2), next_sentence_label.view(-1))
        out = BertForPreTrainingOutput(
            loss=mlm + nsp,
            prediction_logits=None,
            seq_relationship_logits=nsp_logits,
            hidden_states=hidden_states,
            attentions=enc.attentions,
        )
    return out if return_dict else out.to_tuple()


def _packed_bert(bert: nn.Module, input_ids: Tensor | None, inputs: dict[str, Any], kwargs: dict[str, Any]):
    """``(packed, encoder output on the packed row)`` when ``bert`` was unpadded by ``ptfast.patch(unpad=True)``
    and these inputs can run unpadded (:mod:`ptfast.integrations.bert_unpad`), else None."""
    unpadded = bert_unpad.unpadded_forward_of(bert)
    attention_mask = inputs.get("attention_mask")
    everything = {**inputs, **kwargs}
    if unpadded is None or not unpadded.can_unpad(attention_mask, everything):
        return None
    packed = bert_unpad.pack(attention_mask)
    rest = {k: v for k, v in inputs.items() if k != "attention_mask"}
    return packed, bert_unpad.packed_encoder(bert, packed, input_ids, **rest, **kwargs)


def _scattered(packed: Any, hidden_states: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
    return None if hidden_states is None else tuple(packed.scatter(h) for h in hidden_states)


_FORWARDS: dict[str, Callable[..., Any]] = {
    "BertForMaskedLM": _forward_masked_lm,
    "BertForPreTraining": _forward_pretraining,
}


class PatchedMLMForward:
    """The ``forward`` :func:`patch_model` puts on a model instance (``model.forward``).

    A callable object rather than a bound method so that ``copy.deepcopy`` and ``pickle`` keep it (a pickled
    bound method is looked up again by name on unpickling and would come back as the class's stock forward).
    ``inspect.signature`` reports the stock signature, which ``transformers.Trainer`` reads to keep dataset
    columns and to decide whether to pass ``num_items_in_batch``.

    Attributes:
        model: the patched model.
        kind: ``"BertForMaskedLM"`` or ``"BertForPreTraining"`` (which stock forward it stands in for).
        row_budget: fraction of tokens of the static row budget under ``torch.compile`` (None: all rows);
            may be changed.
    """

    def __init__(self, model: nn.Module, kind: str, row_budget: float | None) -> None:
        self.model = model
        self.kind = kind
        self.row_budget = row_budget
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))
        self.__doc__ = _FORWARDS[kind].__doc__

    @property
    def row_budget(self) -> float | None:
        return None if self._ratio is None else float(self._ratio)

    @row_budget.setter
    def row_budget(self, fraction: float | None) -> None:
        # Kept as a Fraction so the budget arithmetic stays in integers under torch.compile, where a float that
        # crosses a graph break may be traced as a symbolic float (always, with dynamic=True).
        fraction = _check_budget(fraction)
        self._ratio = None if fraction is None else _as_ratio(fraction)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _FORWARDS[self.kind](self.model, self._ratio, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<ptfast PatchedMLMForward of {type(self.model).__name__} (row_budget={self.row_budget})>"


# --- patching ---------------------------------------------------------------------------------------------


def _stock_kind(model: nn.Module) -> tuple[str | None, str]:
    """``(kind, "")`` for a model whose forward is a stock one this module re-implements, else ``(None, why)``."""
    import transformers

    for name in _FORWARDS:
        cls = getattr(transformers, name, None)
        if cls is None or not isinstance(model, cls):
            continue
        if type(model).forward is not cls.forward:
            return None, f"{type(model).__name__} overrides {name}.forward (its loss code is unknown to ptfast)"
        params = tuple(inspect.signature(cls.forward).parameters)
        if params != _EXPECTED_PARAMS[name]:
            raise RuntimeError(
                f"ptfast.patch: transformers {transformers.__version__}'s {name}.forward takes {params}, not the "
                f"{_EXPECTED_PARAMS[name]} ptfast's masked-LM patch was written against (transformers 5.17-5.23); "
                "call ptfast.patch(model, mlm=False) to leave the head alone"
            )
        return name, ""
    return None, "not a BertForMaskedLM / BertForPreTraining"


def _patch_head(model: nn.Module, row_budget_fraction: float | None, replaced: list[str], skipped: list[str]) -> None:
    current = model.__dict__.get("forward")
    if isinstance(current, PatchedMLMForward):
        current.row_budget = row_budget_fraction
        skipped.append(f"cls.predictions: already patched (row budget {row_budget_fraction})")
        return
    kind, why = _stock_kind(model)
    if kind is None:
        # Only worth a line for models that have a BERT masked-LM head at all.
        if _find_predictions(model) is not None:
            skipped.append(f"cls.predictions (masked-LM head): {why}")
        return
    if current is not None:
        skipped.append("cls.predictions (masked-LM head): the instance already has its own forward (a wrapper)")
        return
    predictions = _find_predictions(model)
    if predictions is None:
        skipped.append(f"{kind} head: no cls.predictions with a transform and an nn.Linear decoder")
        return
    hooked = [n for n, m in (("cls", model.cls), ("cls.predictions", predictions)) if has_hooks(m)]
    if has_hooks(predictions.decoder):
        hooked.append("cls.predictions.decoder")
    if hooked:
        skipped.append(f"cls.predictions (masked-LM head): hooks on {', '.join(hooked)} would not fire")
        return
    model.forward = PatchedMLMForward(model, kind, row_budget_fraction)
    replaced.append(
        f"cls.predictions ({kind}): training loss -> transform on masked rows + ptfast.masked_lm_loss "
        "(logits=None in training with labels)"
    )


def _find_predictions(model: nn.Module) -> nn.Module | None:
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if isinstance(getattr(predictions, "transform", None), nn.Module) and isinstance(
        getattr(predictions, "decoder", None), nn.Linear
    ):
        return predictions
    return None


def _switch_attention(model: nn.Module, replaced: list[str], skipped: list[str]) -> None:
    from ptfast.integrations.transformers import DEFAULT_NAME

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == DEFAULT_NAME:
        return
    if current not in _SWITCHABLE_ATTENTION:
        skipped.append(f"attention: attn_implementation={current!r} kept (ptfast replaces only eager / sdpa)")
        return
    # Decoders may run with static KV caches, which ptfast attention cannot always detect: leave them alone.
    generative = bool(getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False))
    can_generate = getattr(model, "can_generate", None)
    if generative or (callable(can_generate) and can_generate()):
        skipped.append(f"attention: attn_implementation={current!r} kept (decoder / generative model)")
        return
    try:
        model.set_attn_implementation(DEFAULT_NAME)
    except (ValueError, AttributeError) as e:
        skipped.append(f"attention: attn_implementation={current!r} kept ({e})")
        return
    if config._attn_implementation == DEFAULT_NAME:
        replaced.append(f"attention: attn_implementation {current!r} -> {DEFAULT_NAME!r}")
    else:
        skipped.append(f"attention: attn_implementation={current!r} kept (transformers refused to switch it)")


def patch_model(
    model: nn.Module,
    replaced: list[str],
    skipped: list[str],
    *,
    prefix: str = "",
    attention: bool = True,
    mlm: bool = True,
    row_budget_fraction: float | None = DEFAULT_ROW_BUDGET,
) -> None:
    """Patch a Hugging Face model in place (see the module docstring); appends to the report lists.

    Args:
        model: a ``transformers.PreTrainedModel``.
        replaced / skipped: the report's lines, appended to.
        prefix: the model's qualified name inside the module ``ptfast.patch`` was called on ("" or ending in ".").
        attention: switch ``attn_implementation`` from ``"eager"`` / ``"sdpa"`` to ``"ptfast"`` (same function,
            so the same results; dropout masks come from ptfast's generator). Decoders and generative models
            keep theirs. ``"ptfast"`` is registered with transformers either way.
        mlm: patch a ``BertForMaskedLM`` / ``BertForPreTraining`` head.
        row_budget_fraction: the static row budget under ``torch.compile``, a fraction of the tokens, or None.

    Raises:
        ImportError: transformers is older than 5.0 (from the attention registration).
        RuntimeError: the installed transformers' BERT forwards differ from the ones re-implemented here.
    """
    from ptfast.integrations import transformers as ptfast_hf

    row_budget_fraction = _check_budget(row_budget_fraction)
    ptfast_hf.register()
    done: list[str] = []
    kept: list[str] = []
    if attention:
        _switch_attention(model, done, kept)
    if mlm:
        _patch_head(model, row_budget_fraction, done, kept)
    replaced += [prefix + line for line in done]
    skipped += [prefix + line for line in kept]
