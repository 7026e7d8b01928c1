"""Masked-LM loss (vocabulary projection + cross-entropy) on PyTorch's own ops, without the full logits.

Rows are processed in chunks whose logits (in the accumulation dtype: fp32, or fp64 for fp64 inputs) stay under
:data:`CHUNK_BYTES`; every step works in place on that one buffer, so peak memory is one chunk plus the fp32
``dweight`` accumulator, whatever the number of rows.

The GEMMs run in hidden's dtype (the "compute dtype": the autocast dtype under autocast; emulated exactly by
fp32 GEMMs on CPU, see :class:`_Gemm`); ``weight`` is cast to it once per call, ``bias`` is added in fp32.
Under autocast the caller passes the fp32 parameters, so dweight and dbias go from their fp32 accumulators to
fp32 gradients without a round trip through bf16.

* Forward, per chunk: logits = h_c @ W^T in the compute dtype, read in fp32 (the GEMM writes fp32 directly,
  never rounding the logits to bf16, on CUDA and CPU; elsewhere its output is upcast), + bias in fp32, then an
  in-place log-sum-exp, the target logit and, with label smoothing, the mean logit. Returns the per-row loss and
  the per-row log-sum-exp in two parts, the row max ``m`` and ``log(sum exp(z - m))`` (which lets backward form
  the softmax without another reduction, and without the rounding of ``m + log(...)`` at the logits' magnitude).
* Backward, per chunk: recompute the logits (a 4th GEMM instead of keeping N x V values alive), form
  ``grad_logits = (softmax - smoothed one-hot) * grad_row`` in fp32 (the softmax from the saved parts:
  ``exp((z - m) - log_sum)``), then ``dh_c = grad_logits @ W``,
  ``dW += grad_logits^T @ h_c`` (fp32 accumulator), ``db += column sums`` (fp32).

* Forward with gradients (:func:`forward_with_grads`, for ``reduction="mean"/"sum"``, where the incoming
  gradient is one scalar for every row): the forward's own softmax becomes ``dloss/dlogits`` for a unit incoming
  gradient, and ``dh``, ``dW`` and ``db`` are formed right there; backward only scales them. Three GEMMs instead of
  four and one exp pass instead of two, no logits kept (the saved gradients are hidden- and weight-sized), and
  what plain PyTorch's gathered ``linear`` + ``cross_entropy`` costs on a CPU (measured: the recomputation left
  the op 0.73x of it fwd+bwd). ``reduction="none"`` has a gradient per row, which cannot be factored out of
  ``dW``: it keeps the recomputing backward. Without any gradient to form, the loss comes from PyTorch's own
  ``cross_entropy`` on each chunk's logits (its fused log-softmax).

Ignored rows cost no matrix work: the valid rows are gathered first (``nonzero``: one host sync, acceptable for
this fallback in eager mode and inside compiled graphs, where the op is opaque). While a CUDA stream is capturing
a graph a sync is illegal, so the chunks then run over every row and ignored rows are masked out instead.

A "valid" row has ``0 <= label < V`` and ``label != ignore_index``. Out-of-range labels only reach this code
when value checks are off (``PTFAST_CHECKS=0``, ``torch.compile``, graph capture); they are treated exactly
like ``ignore_index`` (loss 0, no gradient, not counted by ``reduction="mean"``) so nothing is indexed out
of bounds.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

#: Budget for one chunk's logits in the accumulation dtype. A chunk's peak is about this (plus a half-size copy
#: of the GEMM operand / output for fp16/bf16). On a GPU 128 MiB is ~1100 rows at vocab 30522: GEMMs large
#: enough to run at full speed, with few enough chunks that launch overhead does not matter.
CHUNK_BYTES = 128 * 2**20

# Whether ``torch.mm(a, b, out_dtype=torch.float32)`` (fp16/bf16 inputs on CUDA, torch >= 2.8) works here. It is
# tried once and remembered, so a build without it silently uses "GEMM in the input dtype, then upcast".
_mm_out_dtype_ok: dict[str, bool] = {}


def supports(**meta: object) -> str | None:
    return None  # everything the functional API's validation admits


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp, loss and accumulated gradients: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_rows(labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Bool mask of rows that contribute: label in ``[0, vocab)`` and not ``ignore_index``."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def rows_per_chunk(vocab: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (max(vocab, 1) * dtype.itemsize))


def can_compact(t: Tensor) -> bool:
    """Row compaction needs a host sync (``nonzero``), which is illegal while a CUDA stream captures a graph."""
    # Only ask about capture for CUDA tensors: asking otherwise could initialize CUDA.
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _mm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` (GEMM in a/b's dtype) with the result in ``acc``, unrounded where the platform allows it."""
    if a.dtype == acc:
        return torch.mm(a, b)
    key = a.device.type
    if a.is_cuda and _mm_out_dtype_ok.get(key, True):
        try:
            return torch.mm(a, b, out_dtype=acc)  # cuBLAS accumulates in fp32 and writes fp32
        except (RuntimeError, TypeError):  # overload missing in this build: remember and fall back
            _mm_out_dtype_ok[key] = False
    return torch.mm(a, b).to(acc)


class _Gemm:
    """The GEMMs of one call: operands in the compute dtype (hidden's), results read in the accumulation dtype.

    On CPU an fp16/bf16 GEMM is emulated by an fp32 GEMM on the fp16/bf16-rounded operands: exact products and
    fp32 sums, which is what a GPU's low-precision GEMM with fp32 output computes. The CPU fallback thus has the
    GPU path's numerics (and avoids slow low-precision GEMMs on CPUs without bf16 units).
    """

    def __init__(self, hidden: Tensor, weight: Tensor) -> None:
        self.dtype = hidden.dtype
        self.acc = acc_dtype(self.dtype)
        self.emulate = self.dtype != self.acc and hidden.device.type == "cpu"
        w = weight.to(self.dtype)  # once per call (under autocast: the cast autocast would make)
        self.weight = w.to(self.acc) if self.emulate else w

    def rows(self, h: Tensor) -> Tensor:
        """A chunk of hidden as a GEMM operand."""
        return h.to(self.acc) if self.emulate else h

    def operand(self, g: Tensor) -> Tensor:
        """fp32 gradient of the logits as a GEMM operand: rounded to the compute dtype, like the inputs.

        May reuse ``g``'s storage (emulation rounds in place: no second fp32 chunk-sized buffer)."""
        if self.emulate:
            return g.copy_(g.to(self.dtype))
        return g.to(self.dtype)

    def logits(self, h: Tensor, bias: Tensor | None) -> Tensor:
        """``h @ weight^T + bias`` as a fresh ``(n, V)`` tensor in ``acc`` (callers modify it in place)."""
        if bias is not None and h.dtype == self.acc and bias.dtype == self.acc:
            return torch.addmm(bias, h, self.weight.t())
        z = _mm_acc(h, self.weight.t(), self.acc)
        if bias is not None:
            z.add_(bias.to(self.acc))  # in fp32: the bias is never rounded to the compute dtype
        return z


class _Rows:
    """Which rows the chunks visit: the compacted valid rows (``index``), or all rows with a ``mask``."""

    def __init__(self, labels: Tensor, ignore_index: int, vocab: int) -> None:
        valid = valid_rows(labels, ignore_index, vocab)
        self.index: Tensor | None = None
        self.mask: Tensor | None = None
        if can_compact(labels):
            self.index = valid.nonzero().squeeze(1)
            self.count = int(self.index.numel())
        else:
            self.mask = valid
            self.count = labels.shape[0]
        # Ignored / out-of-range labels become class 0 so gathers stay in bounds; masked rows discard the result.
        self.labels = torch.where(valid, labels, torch.zeros_like(labels))

    def chunks(self, step: int) -> Iterator[tuple[Tensor | slice, Tensor, Tensor | None]]:
        """``(sel, labels_c, keep_c)`` per chunk: ``sel`` indexes rows (index tensor or slice), ``keep_c`` is the
        valid-row mask of a masked chunk, None when rows were compacted."""
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            if self.index is not None:
                sel = self.index[start:stop]
                yield sel, self.labels.index_select(0, sel), None
            else:
                sel = slice(start, stop)
                yield sel, self.labels[sel], self.mask[sel]


def _take(t: Tensor, sel: Tensor | slice) -> Tensor:
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def _put(dst: Tensor, sel: Tensor | slice, src: Tensor) -> None:
    if isinstance(sel, slice):
        dst[sel] = src
    else:
        dst.index_copy_(0, sel, src)


def forward(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, row_max, log_sum)``, each ``(N,)`` in the accumulation dtype of hidden's dtype.

    hidden ``(N, E)``, weight ``(V, E)``, labels ``(N,)`` int64, bias ``(V,)`` or None. ``row_max`` ``m`` and
    ``log_sum`` ``log(sum exp(z - m))`` are the log-sum-exp's two parts. The loss is 0 at ignored rows; the parts
    there are 0 when rows were compacted and the row's own values when they were masked (they are only read back
    by :func:`backward`).
    """
    acc = acc_dtype(hidden.dtype)
    n_rows = hidden.shape[0]
    loss = hidden.new_zeros(n_rows, dtype=acc)
    row_max = hidden.new_zeros(n_rows, dtype=acc)
    log_sum = hidden.new_zeros(n_rows, dtype=acc)
    if n_rows > 0:
        _forward_chunks(hidden, weight, labels, bias, ignore_index, label_smoothing, loss, (row_max, log_sum), None)
    return loss, row_max, log_sum


def forward_with_grads(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(loss_sum, n_valid, dhidden, dweight, dbias)``: the summed loss (0-d, accumulation dtype), the number of
    valid rows (0-d int64), and the gradients of ``loss_sum`` for the entries of ``needs`` that are True (None for
    the others), each in the accumulation dtype: ``(N, E)``, ``(V, E)``, ``(V,)``. The gradient of a scaled sum is
    the scale times these (see the module docstring)."""
    need_dh, need_dw, need_db = needs
    acc = acc_dtype(hidden.dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    grads = _Grads(
        hidden.new_zeros(hidden.shape, dtype=acc) if need_dh else None,
        need_dw,
        torch.zeros(vocab, dtype=acc, device=weight.device) if need_db and bias is not None else None,
    )
    n_valid = valid_rows(labels, ignore_index, vocab).sum()
    loss_sum = hidden.new_zeros((), dtype=acc)
    if n_rows > 0:
        _forward_chunks(hidden, weight, labels, bias, ignore_index, label_smoothing, loss_sum, None, grads)
    return loss_sum, n_valid, grads.dh, grads.dweight(weight, acc), grads.db


def scale_grads(
    grad_sum: Tensor, n_valid: Tensor, grads: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients :func:`forward_with_grads` formed, times the incoming gradient of ``loss_sum`` (new tensors:
    the saved ones stay as they are for a second backward through a retained graph). With no valid row they are 0
    whatever arrives (inf for an all-ignored ``mean``, as ``F.cross_entropy`` gives)."""
    scale = torch.where(n_valid > 0, grad_sum, torch.zeros_like(grad_sum)).to(grads[0].dtype)
    return tuple(g * scale for g in grads)


class _Grads:
    """The gradients being accumulated over the chunks (None where not needed), in the accumulation dtype."""

    def __init__(self, dh: Tensor | None, need_dw: bool, db: Tensor | None) -> None:
        self.dh, self.db = dh, db
        self.need_dw = need_dw
        self.dw: Tensor | None = None  # the first chunk's GEMM makes it: no V x E zero fill, no read of zeros

    def nothing_needed(self) -> bool:
        return self.dh is None and not self.need_dw and self.db is None

    def dweight(self, weight: Tensor, acc: torch.dtype) -> Tensor | None:
        """The accumulated dweight (zeros if no chunk ran), or None if not needed."""
        if self.need_dw and self.dw is None:
            self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        return self.dw

    def add_chunk(self, box: list[Tensor], h_c: Tensor, sel: Tensor | slice, gemm: _Gemm) -> None:
        """Add one chunk's share, from ``box = [dloss/dlogits of the chunk]`` (fp32 ``(n, V)``), which it takes out
        of the box so that the chunk-sized buffer is freed as soon as it is spent (the caller holds no other
        reference)."""
        p = box.pop()
        if self.db is not None:
            self.db.add_(p.sum(0))
        if self.dh is None and not self.need_dw:
            return
        gz = gemm.operand(p)  # no copy for fp32
        del p  # one chunk-sized buffer alive at a time
        if self.dh is not None:
            _put(self.dh, sel, torch.mm(gz, gemm.weight).to(self.dh.dtype))
        if self.need_dw:
            acc = gemm.acc
            if self.dw is None:
                self.dw = _mm_acc(gz.t(), h_c, acc)
            elif gz.dtype == acc:
                self.dw.addmm_(gz.t(), h_c)
            else:
                self.dw.add_(_mm_acc(gz.t(), h_c, acc))


def _subtract_targets(p: Tensor, t_c: Tensor, g_c: Tensor, eps: float, vocab: int) -> None:
    """``p`` (``g * softmax``) becomes ``g * (softmax - smoothed one-hot)`` = dloss/dlogits, in place."""
    if eps > 0:
        p.sub_((eps / vocab) * g_c.unsqueeze(1))
    p.scatter_add_(1, t_c.unsqueeze(1), ((eps - 1.0) * g_c).unsqueeze(1))


def _put_loss(loss: Tensor, sel: Tensor | slice, loss_c: Tensor) -> None:
    if loss.dim() == 0:
        loss.add_(loss_c.sum())
    else:
        _put(loss, sel, loss_c)


def _forward_chunks(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    loss: Tensor,
    parts: tuple[Tensor, Tensor] | None,
    grads: _Grads | None,
) -> None:
    """The forward's chunk loop: fills ``loss`` (per row, or a 0-d sum it adds to) and either the log-sum-exp
    ``parts`` (row_max, log_sum) or, for a unit gradient of every valid row's loss, ``grads``."""
    acc = loss.dtype
    vocab = weight.shape[0]
    eps = float(label_smoothing)
    # The op may run inside torch.autocast (custom ops pass it through to the ops they call): the casts are
    # decided here, and fp32 arithmetic must not be re-cast to the autocast dtype.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        gemm = _Gemm(hidden, weight)
        rows = _Rows(labels, ignore_index, vocab)
        for sel, t_c, keep_c in rows.chunks(rows_per_chunk(vocab, acc)):
            h_c = gemm.rows(_take(hidden, sel))
            z = gemm.logits(h_c, bias)
            if parts is None and grads.nothing_needed():
                # The loss alone (a forward without a gradient; ``loss`` is then the 0-d sum): PyTorch's fused
                # log-softmax, two passes over the chunk instead of the four the log-sum-exp parts take (measured
                # 0.4-0.8x of the gathered linear + cross_entropy forward on a CPU before). Same formula, label
                # smoothing included. reduction="sum" with masked rows as ignore_index: PyTorch's CPU nll_loss
                # with reduction="none" costs ~3 ms at 307 rows where "sum" costs ~3 us (measured, torch 2.13).
                t_sum = t_c if keep_c is None else torch.where(keep_c, t_c, torch.full_like(t_c, -100))
                if eps == 0:
                    # log_softmax in place over the logits (exact, row by row): no second chunk-sized buffer,
                    # whose fresh pages cost more than the pass itself on a CPU (measured).
                    z = torch._log_softmax(z, 1, False, out=z)
                    loss.add_(F.nll_loss(z, t_sum, reduction="sum", ignore_index=-100))
                else:
                    loss.add_(F.cross_entropy(z, t_sum, reduction="sum", ignore_index=-100, label_smoothing=eps))
                del z
                continue
            target = z.gather(1, t_c.unsqueeze(1)).squeeze(1)
            m = z.amax(1)
            # A row whose logits are all -inf: shift by 0 (its lse is then -inf, its loss NaN). A row with a +inf
            # logit keeps m = +inf, so inf - inf makes its lse (and loss) NaN exactly like F.cross_entropy's
            # log_softmax; zeroing m there too would give lse = +inf and a loss of +inf instead of NaN.
            m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            # In place (no second chunk-sized temporary): shifted logits z - m, then log(sum(exp(z - m))).
            z.sub_(m.unsqueeze(1))
            mean_shifted = z.mean(1) if eps > 0 else None  # mean_j z_j - m
            s = z.exp_().sum(1)
            log_s = s.log()
            # -log p_t = lse - z_t and mean_j(-log p_j) = lse - mean_j z_j, so F.cross_entropy's
            # (1 - eps) * nll + eps * smooth is log_s + (1 - eps) * (m - z_t) - eps * (mean_j z_j - m). Formed from
            # shifted logits like log_softmax: lse itself, rounded at the logits' magnitude (an absolute error of
            # 5e-4 at |logits| ~ 1e4), never enters the loss.
            loss_c = log_s + (1.0 - eps) * (m - target)
            if mean_shifted is not None:
                loss_c = loss_c - eps * mean_shifted
            if keep_c is not None:
                # Masked rows keep their (finite) parts: backward's exp(z - m - log_s) then stays <= 1 there and
                # a zero row gradient zeroes it, instead of overflowing to inf * 0 = NaN.
                loss_c = torch.where(keep_c, loss_c, torch.zeros_like(loss_c))
            _put_loss(loss, sel, loss_c)
            if grads is None:
                del z  # free this chunk's logits before the next chunk allocates its own
                _put(parts[0], sel, m)
                _put(parts[1], sel, log_s)
                continue
            # The softmax from the exponentials already in z, times the unit gradient (0 at masked rows).
            if keep_c is None:
                g_c = torch.ones_like(s)
                z.div_(s.unsqueeze(1))
            else:  # where, not a product: an ignored row's sum may be 0 (0 * inf = NaN)
                g_c = keep_c.to(acc)
                z.mul_(torch.where(keep_c, s.reciprocal(), torch.zeros_like(s)).unsqueeze(1))
            _subtract_targets(z, t_c, g_c, eps, vocab)
            box = [z]
            del z
            grads.add_chunk(box, h_c, sel, gemm)


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
    """``(dhidden, dweight, dbias)`` for the entries of ``needs`` that are True (None for the others).

    ``grad`` is the incoming gradient of the per-row loss, ``(N,)`` (any strides, e.g. expanded). Rows that are
    not valid get no gradient whatever ``grad`` holds there (it is inf for an all-ignored ``mean``). Each gradient
    has its input's dtype; dweight and dbias are accumulated in fp32 first.
    """
    need_dh, need_dw, need_db = needs
    acc = acc_dtype(hidden.dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dh = torch.zeros_like(hidden) if need_dh else None
    db = torch.zeros(vocab, dtype=acc, device=weight.device) if need_db and bias is not None else None
    grads = _Grads(dh, need_dw, db)
    if n_rows > 0 and not grads.nothing_needed():
        eps = float(label_smoothing)
        grad = grad.to(acc)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            gemm = _Gemm(hidden, weight)
            rows = _Rows(labels, ignore_index, vocab)
            for sel, t_c, keep_c in rows.chunks(rows_per_chunk(vocab, acc)):
                h_c = gemm.rows(_take(hidden, sel))
                g_c = _take(grad, sel)
                if keep_c is not None:  # where, not multiply: grad may be inf at ignored rows
                    g_c = torch.where(keep_c, g_c, torch.zeros_like(g_c))
                # softmax = exp((z - m) - log_sum), in place on the recomputed fp32 logits. Two subtractions, not
                # one of m + log_sum: that sum is rounded at the logits' magnitude (5e-4 at |logits| ~ 1e4), which
                # would scale the whole row by exp(error) -- 50x PyTorch's error in dhidden when the logits share
                # a large offset -- while z - m is exact near the max.
                p = gemm.logits(h_c, bias).sub_(_take(row_max, sel).unsqueeze(1))
                p.sub_(_take(log_sum, sel).unsqueeze(1)).exp_()  # no second name for the chunk: `del p` frees it
                p.mul_(g_c.unsqueeze(1))  # g * softmax
                _subtract_targets(p, t_c, g_c, eps, vocab)
                box = [p]  # p is now dloss/dlogits of the chunk, in fp32
                del p
                grads.add_chunk(box, h_c, sel, gemm)
    return (
        dh,
        dw.to(weight.dtype) if (dw := grads.dweight(weight, acc)) is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
