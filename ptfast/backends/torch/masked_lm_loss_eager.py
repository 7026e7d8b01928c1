"""Auto's CPU route of ``masked_lm_loss`` for ``reduction="mean"/"sum"`` (eager calls): the labelled rows
through one GEMM and an in-place log-softmax, and a backward that turns the kept log-probabilities into
``dloss/dlogits`` in place.

Stock PyTorch (``F.cross_entropy(F.linear(h[rows], W, b), targets)``) makes four buffers of the labelled rows'
logits per training step: the logits, the log-probabilities it keeps, and in backward the gradient of each (three
alive at once). :class:`LabelledRowsLoss` makes one: the log-softmax runs in place over the logits, and backward
exponentiates that same buffer into the softmax, subtracts the (smoothed) one-hot and scales it, then runs the
same three GEMMs as stock. On a CPU each of those buffers is a multi-megabyte allocation that glibc usually
returns to the kernel and page-faults in again the next step, so the saving is time as well as memory: at
BERT-base's head (E768, V30522, 4096 tokens, 15% labelled) fwd+bwd went from stock's 625 ms to 570 ms in fp32 and
from 360 ms to 300 ms in bf16 (measured on the 2-core CPU VM, consecutive steps; ``benchmarks.interleaved`` has
the ratios). At the small heads of that benchmark (2048 tokens, E128-256) it is at parity.

bf16 heads whose logits exceed the op's chunk budget go in chunks instead (:class:`LabelledRowsLossChunked`): at
BERT-base's head on 16384 tokens the op, which emulates a GPU's bf16 GEMM with fp32 GEMMs, took 2375 ms fwd+bwd
against stock's 1418 ms (measured).

The backward consumes the kept log-probabilities: a second backward through a retained graph recomputes them
from the saved GEMM inputs (same GEMM, same bits). Under ``create_graph=True`` backward differentiates stock's
own composition instead, so gradients of the gradients exist (a gradient penalty, say) and are stock's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ptfast.backends.torch import masked_lm_loss as chunked


def _log_probs(
    selected: Tensor, weight: Tensor, bias: Tensor | None, logits: Tensor | None = None, logp: Tensor | None = None
) -> Tensor:
    """Log-softmax of ``selected @ weight^T + bias`` in the accumulation dtype, formed in place over the logits:
    the GEMM in the inputs' dtype (``linear``'s own call, so the same bits), bf16 logits upcast once to fp32.
    ``logits`` / ``logp``: buffers to write into (a chunk loop reuses them), else fresh ones."""
    if logits is None:
        logits = selected.new_empty((selected.shape[0], weight.shape[0]))
    if bias is None:
        torch.mm(selected, weight.t(), out=logits)
    else:
        torch.addmm(bias, selected, weight.t(), out=logits)
    acc = chunked.acc_dtype(selected.dtype)
    if logits.dtype != acc:
        logits = logits.to(acc) if logp is None else logp.copy_(logits)
    return torch._log_softmax(logits, 1, False, out=logits)


def _loss(logp: Tensor, targets: Tensor, reduction: str, label_smoothing: float) -> Tensor:
    """``cross_entropy``'s value from its log-probabilities: (1 - eps) * nll + eps * mean over classes of -log p."""
    loss = F.nll_loss(logp, targets, reduction=reduction)
    if label_smoothing > 0:
        smooth = logp.sum(1)
        smooth = (smooth.mean() if reduction == "mean" else smooth.sum()) / -logp.shape[1]
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    return loss


def _dlogits_(logp: Tensor, targets: Tensor, eps: float, scale: Tensor | float) -> Tensor:
    """dloss/dlogits = (softmax - smoothed one-hot) * scale, formed in place over ``logp`` (the op's own
    subtraction of the targets, with every row's gradient ``scale``)."""
    dlogits = logp.exp_().mul_(scale)
    rows, vocab = dlogits.shape
    row_grad = torch.as_tensor(scale, dtype=dlogits.dtype).expand(rows)
    chunked._subtract_targets(dlogits, targets, row_grad, eps, vocab)
    return dlogits


def _without_autocast() -> contextlib.AbstractContextManager:
    """Autocast off for the explicit dtypes below (the context only where autocast is on: it costs microseconds)."""
    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else contextlib.nullcontext()


def _differentiable_grads(
    selected: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, grad: Tensor, ctx
) -> list[Tensor | None]:
    """The gradients wanted of (selected, weight, bias) through ``cross_entropy(linear(...))`` under autograd,
    themselves differentiable (the saved inputs still carry their graph)."""
    with _without_autocast():
        logits = F.linear(selected, weight, bias)
        logits = logits.to(chunked.acc_dtype(selected.dtype))
        loss = F.cross_entropy(logits, targets, reduction=ctx.reduction, label_smoothing=ctx.eps)
    inputs = (selected, weight, bias)
    wanted = [need and x is not None for x, need in zip(inputs, ctx.needs_input_grad[:3], strict=True)]
    grads = iter(
        torch.autograd.grad(loss, [x for x, w in zip(inputs, wanted, strict=True) if w], grad, create_graph=True)
    )
    return [next(grads) if w else None for w in wanted]


class LabelledRowsLoss(torch.autograd.Function):
    """``cross_entropy(linear(selected, weight, bias), targets)`` over labelled rows only, one logits buffer.

    selected ``(M, E)``, weight ``(V, E)``, bias ``(V,)`` or None, all in the GEMM dtype (fp32, fp64 or bf16;
    the caller casts under autocast, so autograd's casts carry the gradients back); targets ``(M,)`` in
    ``[0, V)``. Returns the 0-d loss in the accumulation dtype (fp32, fp64 for fp64).
    """

    @staticmethod
    def forward(
        ctx, selected: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, reduction: str, eps: float
    ) -> Tensor:
        with _without_autocast():
            logp = _log_probs(selected, weight, bias)
            loss = _loss(logp, targets, reduction, eps)
        ctx.save_for_backward(selected, weight, bias, targets)
        # Not a saved tensor: backward overwrites it (a saved tensor's version check would then refuse a second
        # backward, which recomputes it instead).
        ctx.logp = logp
        ctx.reduction, ctx.eps = reduction, eps
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        selected, weight, bias, targets = ctx.saved_tensors
        need_selected, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, stock's composition
            return (*_differentiable_grads(selected, weight, bias, targets, grad, ctx), None, None, None)
        logp, ctx.logp = ctx.logp, None
        with _without_autocast():
            if logp is None:  # a second backward through a retained graph: the first consumed the buffer
                logp = _log_probs(selected, weight, bias)
            rows = logp.shape[0]
            g = _dlogits_(logp, targets, ctx.eps, grad / rows if ctx.reduction == "mean" else grad)
            g = g.to(selected.dtype)  # bf16: the GEMMs' dtype, as stock's linear backward gets it
            d_selected = g.mm(weight) if need_selected else None
            d_weight = g.t().mm(selected) if need_weight else None
            d_bias = g.sum(0) if need_bias and bias is not None else None
        return d_selected, d_weight, d_bias, None, None, None


class LabelledRowsLossChunked(torch.autograd.Function):
    """:class:`LabelledRowsLoss` for bf16 heads whose labelled logits exceed the chunk budget: the rows go in
    chunks of ``chunk`` and each chunk's gradients are formed in the forward (the incoming gradient of a mean or
    sum is one scalar, so backward only scales them), so one chunk of logits is alive at a time, like the op.

    What differs from the op is the GEMM dtype: bf16 GEMMs with the logits rounded to bf16 (stock's numerics) where
    the op emulates a GPU's bf16 GEMM with fp32 output by fp32 GEMMs, 2.5x slower on a CPU with bf16 units. dweight
    and dbias are summed over chunks in fp32 and rounded once. Same arguments as :class:`LabelledRowsLoss`, plus
    ``chunk`` (rows per chunk).
    """

    @staticmethod
    def forward(
        ctx,
        selected: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        reduction: str,
        eps: float,
        chunk: int,
    ) -> Tensor:
        rows = selected.shape[0]
        need_selected, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        scale = 1.0 / rows if reduction == "mean" else 1.0
        total = torch.zeros((), dtype=torch.float32)
        d_selected = torch.empty_like(selected) if need_selected else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32) if need_bias else None
        # One set of chunk buffers, reused: glibc maps every allocation over 32 MiB afresh, page-faulting it in
        # each time (reuse took BERT-base's head on 16384 tokens from ~1450 to ~1380 ms fwd+bwd, measured).
        logits = torch.empty((min(chunk, rows), weight.shape[0]), dtype=selected.dtype)
        logp_buf = torch.empty(logits.shape, dtype=torch.float32)
        d_weight_part = torch.empty_like(weight) if need_weight else None
        with _without_autocast():
            for start in range(0, rows, chunk):
                part, t = selected[start : start + chunk], targets[start : start + chunk]
                z = logits[: part.shape[0]]
                logp = _log_probs(part, weight, bias, z, logp_buf[: part.shape[0]])
                total += _loss(logp, t, "sum", eps)
                if not (need_selected or need_weight or need_bias):
                    continue
                g = z.copy_(_dlogits_(logp, t, eps, scale))  # in the GEMMs' dtype, as stock's backward gets it
                if need_selected:
                    torch.mm(g, weight, out=d_selected[start : start + chunk])
                if need_weight:
                    d_weight += torch.mm(g.t(), part, out=d_weight_part)
                if need_bias:
                    d_bias += g.sum(0, dtype=torch.float32)
        ctx.save_for_backward(selected, weight, bias, targets, d_selected, d_weight, d_bias)
        ctx.reduction, ctx.eps = reduction, eps
        return total * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        selected, weight, bias, targets, d_selected, d_weight, d_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, stock's composition
            return (*_differentiable_grads(selected, weight, bias, targets, grad, ctx), None, None, None, None)
        out = []
        for d, x in ((d_selected, selected), (d_weight, weight), (d_bias, bias)):
            out.append(None if d is None else (d * grad).to(x.dtype))
        return (*out, None, None, None, None)


def eager_loss(
    hidden: Tensor,
    weight: Tensor,
    rows: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    reduction: str,
    label_smoothing: float,
) -> Tensor | None:
    """Auto's CPU route for ``reduction="mean"/"sum"``: the loss over the labelled rows (the gradients through
    :class:`LabelledRowsLoss`), or None where the op must run.

    hidden ``(N, E)``; ``rows`` the indices of the labelled rows and ``targets`` their labels, already checked to
    be in ``[0, V)`` (the caller takes this route only when value checks ran). The op itself forms the gradients
    in its forward with three GEMMs, as stock does; what it adds on a CPU is its Python (~150 us per call forward,
    ~100 us backward at small sizes) and a fresh V x E buffer for the scaled dweight, which made it 0.85-0.94x of
    stock fwd+bwd at BERT-base's vocabulary and 0.89-0.92x forward-only at the benchmark's (measured). Without a
    graph the log-softmax runs in place over the logits (one buffer where ``cross_entropy`` makes two). Taken with
    at least one labelled row (the op's all-ignored mean is NaN with zero gradients) and, in fp32 or fp64, only
    where the logits kept between the passes fit the op's chunk budget (the op's peak is one chunk of them; above
    it the op runs, at stock's speed). bf16 above the budget goes through :class:`LabelledRowsLossChunked`.

    bf16 (plain, or CPU autocast to bf16): the GEMMs run in bf16 as ``linear`` does and the cross-entropy in fp32
    on the upcast logits, which is stock's own numerics (within the low-precision rule by construction) at
    stock's speed or better. The op emulates a GPU's bf16 GEMM with fp32 output by fp32 GEMMs instead (logits
    never rounded to bf16, fp32 dweight without a bf16 round trip under autocast): 2x slower fwd+bwd on a CPU with
    bf16 units (measured, AMD EPYC with avx512_bf16: ptfast 32 ms against stock 15 ms); an explicit
    ``use_backend("torch")`` still runs it. fp16 keeps the op (fp16 logits could overflow where the op's cannot).
    """
    if hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return None
    autocast = torch.is_autocast_enabled("cpu")
    if autocast and hidden.dtype != torch.bfloat16:  # the wrapper cast hidden to the autocast dtype: fp16 here
        return None
    n_rows = rows.numel()
    chunk = chunked.rows_per_chunk(weight.shape[0], chunked.acc_dtype(hidden.dtype))
    if n_rows == 0 or (n_rows > chunk and hidden.dtype != torch.bfloat16):
        return None
    selected = hidden.index_select(0, rows)
    if autocast:  # what autocast's linear would run: bf16 copies, their casts differentiable back to fp32
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    if n_rows > chunk:
        loss = LabelledRowsLossChunked.apply(selected, weight, bias, targets, reduction, label_smoothing, chunk)
    elif torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        loss = LabelledRowsLoss.apply(selected, weight, bias, targets, reduction, label_smoothing)
    else:
        with _without_autocast():
            loss = _loss(_log_probs(selected, weight, bias), targets, reduction, label_smoothing)
    # The op's output dtype: the inputs' outside autocast, fp32 under it.
    return loss if autocast else loss.to(hidden.dtype)
