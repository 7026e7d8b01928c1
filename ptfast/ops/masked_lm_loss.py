"""``ptfast.masked_lm_loss``: cross-entropy over a vocabulary projection without materializing the logits.

Registered ops (one definition each, all backends behind them):

* ``ptfast::masked_lm_loss(hidden, weight, labels, bias, ignore_index, label_smoothing, backend)
  -> (loss, row_max, log_sum)``: hidden ``(N, E)``, weight ``(V, E)``, labels ``(N,)`` int64, bias ``(V,)`` or
  None; ``loss`` is the per-row loss ``(N,)`` (0 at ignored rows); ``row_max`` ``m`` and ``log_sum``
  ``log(sum exp(z - m))``, each ``(N,)``, are the row log-sum-exp in two parts, saved for backward: kept apart so
  that the softmax ``exp((z - m) - log_sum)`` stays exact when the logits share a large offset. All fp32 (fp64
  for fp64 hidden). The GEMMs run in hidden's dtype; weight is cast to it inside the op and bias is added in fp32 (under
  autocast they arrive as the fp32 parameters).
* ``ptfast::masked_lm_loss_backward(grad, hidden, weight, labels, bias, row_max, log_sum, ignore_index,
  label_smoothing, need_dhidden, need_dweight, need_dbias, backend) -> (dhidden, dweight, dbias)``: ``grad`` is
  the incoming gradient of the per-row loss ``(N,)``; each gradient has its input's dtype (dweight and dbias are
  accumulated in fp32 first); gradients not asked for (or dbias without a bias) come back empty.
* ``ptfast::masked_lm_loss_sum_with_grads(hidden, weight, labels, bias, ignore_index, label_smoothing,
  need_dhidden, need_dweight, need_dbias, backend) -> (loss_sum, n_valid, dhidden, dweight, dbias)``: the summed
  loss (0-d) and the number of valid rows (0-d int64), with the gradients of ``loss_sum`` formed in the forward
  (accumulation dtype; empty where not asked for): three GEMMs instead of four, no logits kept. Used for
  ``reduction="mean"/"sum"`` whenever the torch backend runs, a gradient needed or not (see
  :mod:`ptfast.backends.torch.masked_lm_loss`); ``"none"``, whose gradient differs per row, and the other
  backends use the two ops above.
* ``ptfast::masked_lm_loss_sum_with_grads_backward(grad_sum, n_valid, dhidden, dweight, dbias, backend)
  -> (dhidden, dweight, dbias)``: those gradients times the incoming scalar (0 when no row is valid).

The functional wrapper flattens the leading dims, validates, applies the autocast policy, picks the backend and
does the reduction with plain torch ops on the per-row losses (``sum``, or ``sum / number of valid rows`` for
``mean``, with no host sync). So a scaled loss or ``reduction="none"`` reaches backward as a per-row gradient,
and an all-ignored ``mean`` is 0/0 = NaN with zero gradients, exactly like ``F.cross_entropy``.

Autocast: hidden is cast to the autocast dtype and the GEMMs run in it (like ``linear``); weight is cast inside
the op (per call, as autocast would) while the op keeps the fp32 parameter, so dweight and dbias go from fp32
accumulators straight to fp32 gradients without the round trip through bf16 that ``linear`` under autocast
makes. The log-sum-exp and the loss are fp32 and the returned loss is fp32 (like ``cross_entropy`` under
autocast). Outside autocast the loss has the inputs' dtype, and mixed input dtypes are an error.

On a CPU, ``auto`` runs eager ``mean`` / ``sum`` calls on the labelled rows only, with one logits buffer
(``backends/torch/masked_lm_loss_eager.py``: PyTorch's ``linear`` and an in-place log-softmax, a backward that
reuses that buffer); for bf16 that is stock's numerics (bf16 GEMMs, fp32 cross-entropy), within the low-precision
rule and twice the op's speed on a CPU with bf16 units. An explicit ``use_backend("torch")`` keeps the numerics
above.

Labels outside ``[0, V)`` that are not ``ignore_index`` raise ``ValueError`` when value checks run (eager by
default). When checks are off (``PTFAST_CHECKS=0``, ``torch.compile``, CUDA-graph capture) such rows are
treated exactly like ``ignore_index``: loss 0, no gradient, not counted by ``mean``; nothing reads out of bounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast import _dispatch, _eager, _validation, verification
from ptfast._eager import RegisteredOp
from ptfast.backends import Unimplemented
from ptfast.backends.torch import masked_lm_loss as torch_mlm
from ptfast.backends.torch import masked_lm_loss_eager
from ptfast.backends.triton import masked_lm_loss as triton_mlm

_OP = "masked_lm_loss"
_IMPLS = {
    "torch": torch_mlm,
    "triton": triton_mlm,
    "cuda": Unimplemented("cuda", _OP),
}
_AUTO_ORDER = ("cuda", "triton", "torch")
_REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fault_key(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """The input class a kernel fault is remembered for: what selects a kernel specialization, never a size."""
    return (hidden.device, hidden.dtype, weight.dtype, None if bias is None else bias.dtype, int(hidden.shape[-1]))


def _mlm_impl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _dispatch.run(
        _OP, "forward", backend, _IMPLS, _fault_key(hidden, weight, bias),
        lambda impl: impl.forward(hidden, weight, labels, bias, ignore_index, label_smoothing),
    )  # fmt: skip


MASKED_LM_LOSS = RegisteredOp("ptfast::masked_lm_loss", _mlm_impl)


@MASKED_LM_LOSS.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, backend):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)


def _mlm_backward_impl(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    row_max: Tensor,
    log_sum: Tensor,
    ignore_index: int,
    label_smoothing: float,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    need_dbias = need_dbias and bias is not None
    needs = (need_dhidden, need_dweight, need_dbias)
    dh, dw, db = _dispatch.run(
        _OP, "backward", backend, _IMPLS, _fault_key(hidden, weight, bias),
        lambda impl: impl.backward(
            grad, hidden, weight, labels, bias, row_max, log_sum, ignore_index, label_smoothing, needs
        ),
    )  # fmt: skip
    # Outputs of a custom op may not alias each other: every empty placeholder is its own tensor.
    return (
        dh if need_dhidden else hidden.new_empty(0),
        dw if need_dweight else weight.new_empty(0),
        db if need_dbias else weight.new_empty(0),
    )


MASKED_LM_LOSS_BACKWARD = RegisteredOp("ptfast::masked_lm_loss_backward", _mlm_backward_impl)


@MASKED_LM_LOSS_BACKWARD.register_fake
def _(
    grad,
    hidden,
    weight,
    labels,
    bias,
    row_max,
    log_sum,
    ignore_index,
    label_smoothing,
    need_dhidden,
    need_dweight,
    need_dbias,
    backend,
):
    need_dbias = need_dbias and bias is not None
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    db = torch.empty_like(bias) if need_dbias else weight.new_empty(0)
    return dh, dw, db


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, bias, ignore_index, label_smoothing, backend = inputs
    _loss, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    # Backward recomputes each chunk's logits, so it needs hidden and weight whichever of them is frozen.
    ctx.save_for_backward(hidden, weight, labels, bias, row_max, log_sum)
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend


def _backward(ctx, grad_loss, _grad_row_max, _grad_log_sum):
    hidden, weight, labels, bias, row_max, log_sum = ctx.saved_tensors
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    dh, dw, db = MASKED_LM_LOSS_BACKWARD(
        grad_loss,
        hidden,
        weight,
        labels,
        bias,
        row_max,
        log_sum,
        ctx.ignore_index,
        ctx.label_smoothing,
        need_dh,
        need_dw,
        need_db,
        ctx.backend,
    )
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None, None, None, None)


MASKED_LM_LOSS.register_autograd(_backward, setup_context=_setup_context)


def _mlm_sum_with_grads_impl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dhidden, need_dweight, need_dbias and bias is not None)
    loss_sum, n_valid, dh, dw, db = _dispatch.run(
        _OP, "forward", backend, _IMPLS, _fault_key(hidden, weight, bias),
        lambda impl: impl.forward_with_grads(hidden, weight, labels, bias, ignore_index, label_smoothing, needs),
    )  # fmt: skip
    # Outputs of a custom op may not alias each other: every empty placeholder is its own tensor.
    empty = (hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0))
    return loss_sum, n_valid, *(g if g is not None else e for g, e in zip((dh, dw, db), empty, strict=True))


MASKED_LM_LOSS_SUM_WITH_GRADS = RegisteredOp("ptfast::masked_lm_loss_sum_with_grads", _mlm_sum_with_grads_impl)


@MASKED_LM_LOSS_SUM_WITH_GRADS.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, need_dhidden, need_dweight, need_dbias, backend):
    acc = _acc_dtype(hidden.dtype)
    need_dbias = need_dbias and bias is not None
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((), dtype=torch.int64),
        hidden.new_empty(hidden.shape, dtype=acc) if need_dhidden else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=acc) if need_dweight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=acc) if need_dbias else weight.new_empty(0),
    )


def _scale_grads_impl(
    grad_sum: Tensor, n_valid: Tensor, dhidden: Tensor, dweight: Tensor, dbias: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _dispatch.run(
        _OP, "backward", backend, _IMPLS, _fault_key(dhidden, dweight, dbias if dbias.numel() else None),
        lambda impl: impl.scale_grads(grad_sum, n_valid, (dhidden, dweight, dbias)),
    )  # fmt: skip


MASKED_LM_LOSS_SUM_WITH_GRADS_BACKWARD = RegisteredOp(
    "ptfast::masked_lm_loss_sum_with_grads_backward", _scale_grads_impl
)


@MASKED_LM_LOSS_SUM_WITH_GRADS_BACKWARD.register_fake
def _(grad_sum, n_valid, dhidden, dweight, dbias, backend):
    return torch.empty_like(dhidden), torch.empty_like(dweight), torch.empty_like(dbias)


def _sum_with_grads_setup_context(ctx, inputs, output) -> None:
    hidden, weight, _labels, bias = inputs[:4]
    _loss_sum, n_valid, dh, dw, db = output
    ctx.mark_non_differentiable(n_valid, dh, dw, db)
    ctx.save_for_backward(n_valid, dh, dw, db)
    ctx.backend = inputs[-1]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.shapes = (hidden.shape, weight.shape, None if bias is None else bias.shape)


def _sum_with_grads_backward(ctx, grad_sum, *_unused):
    n_valid, dh, dw, db = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    for needed, saved, shape, name in zip(need, (dh, dw, db), ctx.shapes, ("hidden", "weight", "bias"), strict=True):
        if needed and saved.shape != shape:  # the wrapper asked for fewer gradients than autograd now needs
            raise RuntimeError(f"ptfast.{_OP}: a gradient for {name} is needed but was not formed in the forward")
    scaled = MASKED_LM_LOSS_SUM_WITH_GRADS_BACKWARD(grad_sum, n_valid, dh, dw, db, ctx.backend)
    grads = [g.to(dtype) if needed else None for needed, g, dtype in zip(need, scaled, ctx.dtypes, strict=True)]
    return grads[0], grads[1], None, grads[2], None, None, None, None, None, None


MASKED_LM_LOSS_SUM_WITH_GRADS.register_autograd(_sum_with_grads_backward, setup_context=_sum_with_grads_setup_context)


def _validate(
    hidden: object,
    weight: object,
    labels: object,
    bias: object,
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
) -> None:
    op = _OP
    hidden = _validation.check_tensor(op, "hidden", hidden, dtypes=_validation.FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"ptfast.{op}: hidden must have at least 1 dimension (..., E), got a 0-d tensor")
    weight = _validation.check_tensor(op, "weight", weight, ndim=2, dtypes=_validation.FLOAT_DTYPES)
    labels = _validation.check_tensor(op, "labels", labels, dtypes=(torch.int64,))
    if bias is not None:
        bias = _validation.check_tensor(op, "bias", bias, ndim=1, dtypes=_validation.FLOAT_DTYPES)
    vocab, emb = weight.shape
    if vocab < 1:
        raise ValueError(
            f"ptfast.{op}: weight must have at least one row (vocabulary entry), got shape {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != emb:
        raise ValueError(
            f"ptfast.{op}: hidden has {hidden.shape[-1]} features (last dim) but weight "
            f"{tuple(weight.shape)} expects {emb}"
        )
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"ptfast.{op}: bias has {bias.shape[0]} entries but weight has {vocab} rows (vocab)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"ptfast.{op}: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    _validation.check_same_device(op, hidden=hidden, weight=weight, labels=labels, bias=bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ptfast.{op}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"ptfast.{op}: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"ptfast.{op}: label_smoothing must be a float, got {label_smoothing!r}")
    # No math.isfinite: under torch.compile(dynamic=True) the value may be a symbolic float; the comparisons
    # already reject NaN and inf.
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"ptfast.{op}: label_smoothing must be in [0, 1], got {label_smoothing!r}")


def _needed_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) autograd will ask a gradient for. Under functorch transforms
    (``torch.func.grad``, ``vmap``) requires_grad does not say it: nothing is formed in the forward there."""
    if not torch.is_grad_enabled() or _eager.transforms_active():
        return (False, False, False)
    return (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)


def _check_label_values(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """Eager-only value check (one host sync): every label is in ``[0, vocab)`` or equals ``ignore_index``."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        values = labels[bad]
        raise ValueError(
            f"ptfast.{_OP}: label {int(values[0])} is out of range for vocabulary size {vocab} "
            f"({values.numel()} bad label(s); valid labels are 0..{vocab - 1} or ignore_index={ignore_index})"
        )


def _checked_labelled_rows(labels: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(indices of the rows whose label is not ``ignore_index``, those labels), flat, after the same value check as
    :func:`_check_label_values`: one min/max over the gathered labels instead of a pass per condition over all of
    them (on a CPU the route needs the gathered rows anyway, and each small op costs several times its isolated
    time right after the big GEMMs of a training step, measured)."""
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    targets = flat.index_select(0, rows)
    if targets.numel():
        low, high = torch.aminmax(targets)
        if int(low) < 0 or int(high) >= vocab:
            _check_label_values(labels, ignore_index, vocab)  # raises, naming the bad labels
    return rows, targets


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ...)`` without materializing the full logits.

    Args:
        hidden: ``(..., E)`` float (fp16, bf16, fp32, fp64); any number of leading dims, which may be empty.
        weight: ``(V, E)``, the decoder / vocabulary projection (may be the tied word-embedding matrix: its
            gradient adds to the embedding's).
        labels: ``(...)`` int64 with shape ``hidden.shape[:-1]``; each in ``[0, V)`` or ``ignore_index``.
        bias: ``(V,)`` or None.
        ignore_index: label of rows that contribute nothing (no matrix work either).
        reduction: ``"mean"`` (over non-ignored rows; NaN when every row is ignored, like PyTorch), ``"sum"`` or
            ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``: loss = (1 - eps) * nll + eps * mean over classes of -log p.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``; ``labels.shape`` for ``"none"`` (0 at ignored rows). The dtype is the
        inputs' dtype, or fp32 under ``torch.autocast`` (where the matmuls run in the autocast dtype).

    Raises:
        TypeError / ValueError for bad arguments (checked before any work); ``ptfast.BackendNotSupportedError``
        when an explicitly requested backend cannot run the inputs.
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing)
    vocab = weight.shape[0]
    cast = _validation.autocast_dtype(hidden.device)
    if cast is not None:
        hidden = hidden.to(cast)  # weight and bias stay as they are: the op casts them (see module docstring)
        out_dtype = torch.float32
    else:
        _validation.check_same_dtype(_OP, hidden=hidden, weight=weight, bias=bias)
        out_dtype = hidden.dtype
    labelled = None  # (rows, their labels) for auto's CPU route, gathered while checking the labels
    if _validation.value_checks_enabled(labels):
        if reduction != "none" and hidden.device.type == "cpu":
            labelled = _checked_labelled_rows(labels, ignore_index, vocab)
        else:
            _check_label_values(labels, ignore_index, vocab)
    # The verification gate's shape class matters only on CUDA (it gates auto there): no work elsewhere.
    shape_class = verification.masked_lm_loss_class(hidden.dtype, int(hidden.shape[-1])) if hidden.is_cuda else None
    requested = _dispatch.requested_backend()
    backend = _dispatch.choose(
        _OP,
        _IMPLS,
        _AUTO_ORDER,
        lambda: _fault_key(hidden, weight, bias),
        device=hidden.device,
        shape_class=shape_class,
        requested=requested,
        hidden=hidden,
        weight=weight,
        labels=labels,
        bias=bias,
        label_smoothing=float(label_smoothing),
    )
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(flat_labels.shape[0], hidden.shape[-1])  # not -1: E may be 0
    if labelled is not None and _dispatch.autograd_route_applies(
        backend, hidden.device, (hidden, weight, labels, bias), requested
    ):
        # auto's CPU route around the op's own Python (see masked_lm_loss_eager).
        loss = masked_lm_loss_eager.eager_loss(flat_hidden, weight, *labelled, bias, reduction, float(label_smoothing))
        if loss is not None:
            _dispatch.record_autograd_route(_OP, loss)
            return loss
    needs = _needed_grads(hidden, weight, bias)
    if reduction != "none" and backend == "torch":  # gradients (if any) formed in the forward
        total, n_valid, *_grads = MASKED_LM_LOSS_SUM_WITH_GRADS(
            flat_hidden, weight, flat_labels, bias, ignore_index, float(label_smoothing), *needs, backend
        )
        if reduction == "mean":
            total = total / n_valid.to(total.dtype)  # 0/0 = NaN when every row is ignored, like PyTorch
        return total.to(out_dtype)
    loss, _row_max, _log_sum = MASKED_LM_LOSS(
        flat_hidden, weight, flat_labels, bias, ignore_index, float(label_smoothing), backend
    )
    if reduction == "none":
        return loss.reshape(labels.shape).to(out_dtype)
    total = loss.sum()
    if reduction == "mean":
        # Divide by a device tensor (no .item()); rows with out-of-range labels count as ignored (see module doc).
        count = torch_mlm.valid_rows(flat_labels, ignore_index, vocab).sum()
        total = total / count.to(total.dtype)
    return total.to(out_dtype)
