"""``ptfast.masked_lm_loss`` / ``ptfast.nn.MaskedLMLoss`` on the torch backend against the float64 oracle.

Forward and gradients (hidden, weight, bias) for every reduction with random incoming gradients, label
smoothing, ignored rows (some, all, custom ignore_index), leading dims, zero rows, tied and frozen weights,
autocast, validation, backend dispatch, ``torch.compile`` and ``opcheck``. Sizes are odd on purpose.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.torch import masked_lm_loss as torch_mlm
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, rel_err
from tests.oracles import masked_lm_loss as oracle

REDUCTIONS = ("mean", "sum", "none")


# --- helpers ------------------------------------------------------------------------------------------------


def make_inputs(
    lead: tuple[int, ...] = (37,),
    emb: int = 24,
    vocab: int = 101,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    ignore_frac: float = 0.3,
    ignore_index: int = -100,
):
    """Fresh random leaves (hidden, weight, labels, bias) with roughly ``ignore_frac`` of the rows ignored."""
    hidden = torch.randn(*lead, emb, dtype=torch.float32).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, emb) / math.sqrt(emb) * 2.0).to(dtype).requires_grad_()
    b = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = ignore_index
    return hidden, weight, labels, b


def incoming_grad(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Random incoming gradient for ``none``; a scaled loss (x 3.7) otherwise."""
    if reduction == "none":
        return torch.randn(loss.shape, dtype=torch.float32).to(loss.dtype)
    return torch.tensor(3.7, dtype=loss.dtype)


def run(fn, hidden, weight, labels, bias, grad_out=None, **kw):
    """Loss and (dhidden, dweight, dbias) of ``fn`` (None where an input does not require grad)."""
    loss = fn(hidden, weight, labels, bias, **kw)
    if grad_out is None:
        grad_out = incoming_grad(loss, kw.get("reduction", "mean"))
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, grad_out, allow_unused=True) if inputs else ()
    it = iter(grads)
    out = [next(it) if t is not None and t.requires_grad else None for t in (hidden, weight, bias)]
    return loss.detach(), out, grad_out


def ptfast_fn(h, w, t, b, **kw):
    return ptfast.masked_lm_loss(h, w, t, b, **kw)


def torch_fn(h, w, t, b, **kw):
    """PyTorch's own op in the same dtype: the reference for the low-precision rule."""
    loss = F.cross_entropy(F.linear(h, w, b).reshape(-1, w.shape[0]), t.reshape(-1), **kw)
    return loss.reshape(t.shape) if kw.get("reduction") == "none" else loss


def check_against_oracle(hidden, weight, labels, bias, tol=None, **kw):
    loss, grads, g = run(ptfast_fn, hidden, weight, labels, bias, **kw)
    ref_loss, *ref_grads = oracle.loss_and_grads(hidden, weight, labels, bias, grad_out=g, **kw)
    assert loss.dtype == hidden.dtype and loss.shape == ref_loss.shape
    assert_close64(loss, ref_loss, "loss", tol)
    for name, ours, ref, x in zip(
        ("dhidden", "dweight", "dbias"), grads, ref_grads, (hidden, weight, bias), strict=True
    ):
        if ours is not None:
            assert ours.dtype == x.dtype and ours.shape == x.shape
            assert_close64(ours, ref, name, tol)
    return loss, grads


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so the multi-chunk paths (and chunk boundaries) are exercised at small sizes."""
    monkeypatch.setattr(torch_mlm, "CHUNK_BYTES", 4096)


@pytest.fixture
def masked_mode(monkeypatch):
    """The no-compaction path that CUDA-graph capture uses (ignored rows masked instead of skipped)."""
    monkeypatch.setattr(torch_mlm, "can_compact", lambda t: False)


# --- the oracle itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.13])
def test_oracle_matches_pytorch_float64(reduction, eps):
    h, w, t, b = make_inputs(dtype=torch.float64)
    t[:3] = 5  # a custom ignore_index that is also a real class
    for ignore_index in (-100, 5):
        tt = t.masked_fill(t == -100, ignore_index)
        ours = oracle.masked_lm_loss(h, w, tt, b, ignore_index, reduction, eps)
        ref = F.cross_entropy(
            F.linear(h, w, b), tt, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
        )
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# --- fp32 / fp64 against the oracle -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_oracle(reduction, eps, bias, small_chunks):
    h, w, t, b = make_inputs(vocab=257, emb=40, bias=bias)
    check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("backend", ["auto", "torch"], ids=["auto_route", "op"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_default_chunk_size(reduction, backend):
    """One chunk: under auto on a CPU, mean / sum take the route of PyTorch's own ops (see
    test_masked_lm_loss_route.py); the explicit backend runs the op."""
    h, w, t, b = make_inputs(lead=(53,), vocab=101)
    with ptfast.use_backend(backend):
        check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=0.07)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_masked_mode_matches_oracle(reduction, eps, small_chunks, masked_mode):
    h, w, t, b = make_inputs(vocab=257, emb=40)
    check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp64_matches_oracle_tightly(reduction, small_chunks):
    h, w, t, b = make_inputs(dtype=torch.float64)
    check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=0.3)


def test_label_smoothing_one_and_no_ignored_rows():
    h, w, t, b = make_inputs(ignore_frac=0.0)
    check_against_oracle(h, w, t, b, reduction="mean", label_smoothing=1.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_three_d_hidden(reduction, small_chunks):
    h, w, t, b = make_inputs(lead=(3, 13), emb=40, vocab=257)
    loss, _ = check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        assert loss.shape == (3, 13)


def test_non_contiguous_inputs(small_chunks):
    """Views as models pass them: (L, B, E) transposed hidden, a weight stored as (E, V) and transposed."""
    base = torch.randn(13, 3, 40, requires_grad=True)
    w_t = (torch.randn(40, 101) / 3).requires_grad_()
    b = torch.randn(202, requires_grad=True)
    h, w, bias = base.transpose(0, 1), w_t.t(), b[::2]
    t = torch.randint(0, 101, (3, 13))
    t[:, ::4] = -100
    assert not (h.is_contiguous() or w.is_contiguous() or bias.is_contiguous())
    loss = ptfast.masked_lm_loss(h, w, t, bias, reduction="sum", label_smoothing=0.1)
    grads = torch.autograd.grad(loss * 3.7, (base, w_t, b))
    ref = oracle.masked_lm_loss(h, w, t, bias, -100, "sum", 0.1)
    ref_grads = torch.autograd.grad(ref * 3.7, (base, w_t, b))
    assert_close64(loss, ref, "loss")
    for name, x, r in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert_close64(x, r, name)


def test_one_d_hidden_single_row():
    h, w, _, b = make_inputs(lead=(), ignore_frac=0.0)
    t = torch.tensor(17)
    for reduction in REDUCTIONS:
        loss, _ = check_against_oracle(h, w, t, b, reduction=reduction)
        assert loss.shape == ()


@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index(ignore_index, reduction, small_chunks):
    h, w, t, b = make_inputs(ignore_index=ignore_index)
    t[:4] = 7  # with ignore_index=7 these rows are ignored although 7 is a real class
    check_against_oracle(h, w, t, b, reduction=reduction, ignore_index=ignore_index)
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=ignore_index, reduction=reduction)
    ours = ptfast.masked_lm_loss(h, w, t, b, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("compact", [True, False])
def test_all_rows_ignored_matches_pytorch(reduction, compact, monkeypatch):
    if not compact:
        monkeypatch.setattr(torch_mlm, "can_compact", lambda t: False)
    h, w, t, b = make_inputs(lead=(2, 11), ignore_frac=1.0)
    ours, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction, label_smoothing=0.1)
    ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(ours)
    for x, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(x, r)
        assert torch.count_nonzero(x) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
def test_zero_rows_matches_pytorch(reduction, lead):
    h, w, t, b = make_inputs(lead=lead)
    ours, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction)
    ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, equal_nan=True)
    for x, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(x, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_features_matches_pytorch(reduction):
    """E = 0: the logits are just the bias (or zeros)."""
    for bias in (True, False):
        h, w, t, b = make_inputs(lead=(2, 5), emb=0, bias=bias)
        ours, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction, label_smoothing=0.1)
        ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref)
        for x, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(x, r)


# --- gradients: tied, frozen, no-grad ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tied_weight_gradients_add_up(reduction):
    """The decoder weight is also the embedding table: its gradient is the sum of both uses."""
    vocab, emb = 101, 24
    w = (torch.randn(vocab, emb) / math.sqrt(emb) * 2).requires_grad_()
    proj = (torch.randn(emb, emb) / math.sqrt(emb)).requires_grad_()
    b = (torch.randn(vocab) * 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (3, 11))
    labels = torch.randint(0, vocab, (3, 11))
    labels[torch.rand(3, 11) < 0.4] = -100

    def model(w, proj, b, loss_fn):
        hidden = torch.tanh(F.embedding(ids, w) @ proj)
        return loss_fn(hidden, w, labels, b, reduction=reduction, label_smoothing=0.05)

    loss = model(w, proj, b, ptfast_fn)
    g = incoming_grad(loss, reduction)
    grads = torch.autograd.grad(loss, (w, proj, b), g)

    w64, p64, b64 = (x.detach().double().requires_grad_() for x in (w, proj, b))

    def oracle_fn(h, w, t, b, reduction, label_smoothing):
        return oracle.masked_lm_loss(h, w, t, b, -100, reduction, label_smoothing)

    ref_loss = model(w64, p64, b64, oracle_fn)
    ref_grads = torch.autograd.grad(ref_loss, (w64, p64, b64), g.double())
    assert_close64(loss, ref_loss, "loss")
    for name, x, r in zip(("weight (tied)", "proj", "bias"), grads, ref_grads, strict=True):
        assert_close64(x, r, name)


@pytest.fixture
def spy_needs(monkeypatch):
    """Records ``(torch backend function, needs)`` for every call that formed gradients: the recomputing backward
    (``reduction="none"``) or the forward with gradients (``"mean"`` / ``"sum"``). On the explicit torch backend:
    auto's CPU route runs PyTorch's own ops instead (test_masked_lm_loss_route.py)."""
    calls: list[tuple[str, tuple[bool, bool, bool]]] = []
    for name in ("backward", "forward_with_grads"):
        real = getattr(torch_mlm, name)

        def spy(*args, _real=real, _name=name):
            calls.append((_name, args[-1]))
            return _real(*args)

        monkeypatch.setattr(torch_mlm, name, spy)
    with ptfast.use_backend("torch"):
        yield calls


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("frozen", ["weight", "hidden", "weight+bias", "hidden+weight"])
def test_frozen_inputs(frozen, reduction, spy_needs, small_chunks):
    h, w, t, b = make_inputs()
    for name, x in (("hidden", h), ("weight", w), ("bias", b)):
        if name in frozen.split("+"):
            x.requires_grad_(False)
    loss, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction, label_smoothing=0.1)
    _, *ref_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, reduction=reduction, label_smoothing=0.1)
    for x, ours, ref, name in zip((h, w, b), grads, ref_grads, ("dhidden", "dweight", "dbias"), strict=True):
        if x.requires_grad:
            assert_close64(ours, ref, name)
        else:
            assert ours is None
    # No work for frozen inputs: only the gradients autograd needs are formed, in the forward for a summed loss.
    where = "forward_with_grads" if reduction == "sum" else "backward"
    assert spy_needs == [(where, (h.requires_grad, w.requires_grad, b.requires_grad))]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_only_gradient(spy_needs, reduction):
    h, w, t, b = make_inputs()
    h.requires_grad_(False)
    w.requires_grad_(False)
    loss, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction)
    _, _, _, ref_db = oracle.loss_and_grads(h, w, t, b, grad_out=g, reduction=reduction)
    assert_close64(grads[2], ref_db, "dbias")
    assert spy_needs == [("forward_with_grads" if reduction == "mean" else "backward", (False, False, True))]


def test_no_grad_mode_and_no_graph():
    h, w, t, b = make_inputs()
    with torch.no_grad():
        loss = ptfast.masked_lm_loss(h, w, t, b)
    assert loss.grad_fn is None
    assert_close64(loss, oracle.masked_lm_loss(h, w, t, b), "loss")
    loss = ptfast.masked_lm_loss(h.detach(), w.detach(), t, b.detach())
    assert not loss.requires_grad


@pytest.mark.parametrize("compact", [True, False], ids=["compacted", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_without_gradient_matches_oracle(reduction, eps, dtype, compact, small_chunks, monkeypatch):
    """No gradient to form (no_grad, or frozen inputs): mean / sum take the loss-only route (PyTorch's
    cross_entropy per chunk), none the per-row op; every chunk and both row modes against the oracle."""
    if not compact:
        monkeypatch.setattr(torch_mlm, "can_compact", lambda t: False)
    h, w, t, b = (x if x is None or x.dtype == torch.int64 else x.detach().to(dtype) for x in make_inputs())
    t[3] = -100
    with torch.no_grad():
        loss = ptfast.masked_lm_loss(h, w, t, b, reduction=reduction, label_smoothing=eps)
    assert_close64(loss, oracle.masked_lm_loss(h, w, t, b, -100, reduction, eps), "loss")
    frozen = ptfast.masked_lm_loss(h, w, t, b, reduction=reduction, label_smoothing=eps)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, loss, rtol=0, atol=0)


def test_second_backward_through_retained_graph():
    h, w, t, b = make_inputs()
    loss = ptfast.masked_lm_loss(h, w, t, b)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


# --- low precision and autocast -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_low_precision_rule(dtype, reduction, eps, small_chunks):
    h, w, t, b = make_inputs(vocab=257, emb=40, dtype=dtype)
    kw = dict(reduction=reduction, label_smoothing=eps)
    ours, grads, g = run(ptfast_fn, h, w, t, b, **kw)
    ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, **kw)
    oracle_loss, *oracle_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, **kw)
    assert ours.dtype == dtype
    assert_rule(ours, ref, oracle_loss, "loss")
    for name, x, r, o, p in zip(
        ("dhidden", "dweight", "dbias"), grads, ref_grads, oracle_grads, (h, w, b), strict=True
    ):
        assert x.dtype == p.dtype
        assert_rule(x, r, o, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_bf16_cpu(reduction, bias, small_chunks):
    """The op under CPU autocast (pinned: under ``auto`` a bf16 mean/sum takes the CPU route, whose numerics are
    stock's, tested in test_masked_lm_loss_route.py; the op's mean/sum must equal its own reduced per-row losses)."""
    h, w, t, b = make_inputs(vocab=257, emb=40, bias=bias)
    kw = dict(label_smoothing=0.1)
    g_rows = torch.randn(t.shape)
    g = g_rows if reduction == "none" else torch.tensor(3.7)
    with record_dispatch() as events, ptfast.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, grads, _ = run(ptfast_fn, h, w, t, b, grad_out=g, reduction=reduction, **kw)
        ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, reduction=reduction, **kw)
        rows, _, _ = run(ptfast_fn, h, w, t, b, grad_out=g_rows, reduction="none", **kw)
        ref_rows, _, _ = run(torch_fn, h, w, t, b, grad_out=g_rows, reduction="none", **kw)
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    assert ours.dtype == torch.float32 and ref.dtype == torch.float32
    oracle_loss, *oracle_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, reduction=reduction, **kw)
    # Per-row losses and all gradients (vectors) follow the low-precision rule against the fp64 oracle.
    assert_rule(rows, ref_rows, oracle.masked_lm_loss(h, w, t, b, -100, "none", 0.1), "per-row loss")
    for name, x, r, o, p in zip(
        ("dhidden", "dweight", "dbias"), grads, ref_grads, oracle_grads, (h, w, b), strict=True
    ):
        if p is None:
            continue
        assert x.dtype == p.dtype == torch.float32
        assert_rule(x, r, o, name)
    # A scalar loss is its per-row losses reduced in fp32 (checked tightly). The rule is not applied to the one
    # scalar: both sides share the bf16 rounding of hidden/weight and PyTorch adds a bf16 rounding of the logits
    # that can cancel part of the shared error by chance, so one scalar's error ratio is a coin toss.
    if reduction != "none":
        reduced = rows.double().sum() / ((t != -100).sum() if reduction == "mean" else 1)
        torch.testing.assert_close(ours.double(), reduced, rtol=1e-6, atol=1e-7)
        assert rel_err(ours, oracle_loss) < 2e-3


# --- validation ---------------------------------------------------------------------------------------------


def _bad_calls():
    h, w, t, b = (x.detach() for x in make_inputs(lead=(5,), emb=6, vocab=11))
    call = ptfast.masked_lm_loss
    return [
        ("hidden not a tensor", lambda: call(h.tolist(), w, t, b), TypeError, "hidden must be a torch.Tensor"),
        ("hidden int", lambda: call(h.long(), w, t, b), TypeError, "hidden must have dtype"),
        ("hidden 0-d", lambda: call(h[0, 0], w, t[0], b), ValueError, "at least 1 dimension"),
        ("weight 1-d", lambda: call(h, w[0], t, b), ValueError, "weight must have 2 dimensions"),
        ("weight int", lambda: call(h, w.long(), t, b), TypeError, "weight must have dtype"),
        ("empty vocab", lambda: call(h, w[:0], t, None), ValueError, "at least one row"),
        ("labels int32", lambda: call(h, w, t.int(), b), TypeError, "labels must have dtype"),
        ("labels float", lambda: call(h, w, t.float(), b), TypeError, "labels must have dtype"),
        ("labels shape", lambda: call(h, w, t[:4], b), ValueError, "labels must have shape"),
        ("labels rank", lambda: call(h, w, t.unsqueeze(0), b), ValueError, "labels must have shape"),
        ("E mismatch", lambda: call(h[:, :5], w, t, b), ValueError, "features"),
        ("bias length", lambda: call(h, w, t, b[:10]), ValueError, "bias has 10 entries"),
        ("bias 2-d", lambda: call(h, w, t, b.unsqueeze(0)), ValueError, "bias must have 1 dimensions"),
        ("bias int", lambda: call(h, w, t, b.long()), TypeError, "bias must have dtype"),
        ("weight device", lambda: call(h, w.to("meta"), t, b), ValueError, "weight is on meta"),
        ("labels device", lambda: call(h, w, t.to("meta"), b), ValueError, "labels is on meta"),
        ("reduction", lambda: call(h, w, t, b, reduction="avg"), ValueError, "reduction must be one of"),
        ("eps < 0", lambda: call(h, w, t, b, label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
        ("eps > 1", lambda: call(h, w, t, b, label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        ("eps nan", lambda: call(h, w, t, b, label_smoothing=float("nan")), ValueError, "label_smoothing"),
        ("eps str", lambda: call(h, w, t, b, label_smoothing="0.1"), TypeError, "label_smoothing must be"),
        ("ignore_index float", lambda: call(h, w, t, b, ignore_index=1.5), TypeError, "ignore_index"),
        ("mixed dtypes", lambda: call(h, w.double(), t, b), TypeError, "weight has dtype torch.float64"),
        ("mixed bias dtype", lambda: call(h, w, t, b.half()), TypeError, "bias has dtype torch.float16"),
        (
            "label too big",
            lambda: call(h, w, t.clamp(min=0).index_fill(0, torch.tensor([2]), 11), b),
            ValueError,
            "label 11 is out of range",
        ),
        (
            "label negative",
            lambda: call(h, w, t.clamp(min=0).index_fill(0, torch.tensor([3]), -7), b),
            ValueError,
            "label -7 is out of range",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_validation_errors(case):
    name, fn, exc, msg = _bad_calls()[case]
    with record_dispatch() as events, pytest.raises(exc, match=msg):
        fn()
    assert events == [], f"{name}: something ran before validation failed"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("compact", [True, False])
def test_checks_off_out_of_range_labels_are_ignored(reduction, compact, monkeypatch):
    """With value checks off, labels outside [0, V) behave exactly like ignore_index (no OOB access)."""
    monkeypatch.setenv("PTFAST_CHECKS", "0")
    if not compact:
        monkeypatch.setattr(torch_mlm, "can_compact", lambda t: False)
    h, w, t, b = make_inputs()
    vocab = w.shape[0]
    bad = t.clone()
    bad[0], bad[5], bad[9] = vocab, -7, vocab + 1000
    ours, grads, g = run(ptfast_fn, h, w, bad, b, reduction=reduction)
    expected_labels = bad.masked_fill((bad < 0) | (bad >= vocab), -100)
    ref, *ref_grads = oracle.loss_and_grads(h, w, expected_labels, b, grad_out=g, reduction=reduction)
    assert_close64(ours, ref, "loss")
    for name, x, r in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert_close64(x, r, name)


# --- dispatch -----------------------------------------------------------------------------------------------


def test_torch_backend_ran_forward_and_backward():
    h, w, t, b = make_inputs()
    for backend in ("auto", "torch"):
        with record_dispatch() as events, ptfast.use_backend(backend):
            ptfast.masked_lm_loss(h, w, t, b).backward()
        assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_explicit_unavailable_backend_raises(backend):
    h, w, t, b = make_inputs()
    with ptfast.use_backend(backend), pytest.raises(ptfast.BackendNotSupportedError, match=backend):
        ptfast.masked_lm_loss(h, w, t, b)


# --- module -------------------------------------------------------------------------------------------------


def test_module_matches_functional():
    h, w, t, b = make_inputs(lead=(2, 9))
    mod = ptfast.nn.MaskedLMLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1)
    assert list(mod.state_dict()) == [] and "reduction='sum'" in repr(mod)
    out = mod(h, w, t, b)
    ref = ptfast.masked_lm_loss(h, w, t, b, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_close64(mod(h, w, t), oracle.masked_lm_loss(h, w, t, None, -100, "sum", 0.1), "no bias")


# --- torch.compile and opcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph_matches_eager(reduction):
    torch._dynamo.reset()
    h, w, t, b = make_inputs(lead=(3, 7), vocab=101)
    t[0, :] = -100  # a fully ignored sequence too
    g = torch.randn(t.shape) if reduction == "none" else torch.tensor(3.7)

    def step(h, w, t, b):
        loss = ptfast.masked_lm_loss(h, w, t, b, reduction=reduction, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, (h, w, b), g)

    def fwd(h, w, t, b):
        return ptfast.masked_lm_loss(h, w, t, b, reduction=reduction, label_smoothing=0.1)

    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    with record_dispatch() as events:
        loss_c = compiled(h, w, t, b)
        grads_c = torch.autograd.grad(loss_c, (h, w, b), g)
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    loss_e, grads_e = step(h, w, t, b)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for x, y in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    ref = oracle.masked_lm_loss(h, w, t, b, -100, reduction, 0.1)
    assert_close64(loss_c, ref, "compiled loss")


def test_compile_all_ignored_mean_is_nan():
    torch._dynamo.reset()
    h, w, t, b = make_inputs(lead=(4,), ignore_frac=1.0)
    compiled = torch.compile(ptfast.masked_lm_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, t, b)
    assert torch.isnan(loss)
    (gh,) = torch.autograd.grad(loss, (h,))
    assert torch.count_nonzero(gh) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_and_backward(bias):
    h, w, t, b = make_inputs(vocab=31, emb=12, bias=bias)
    torch.library.opcheck(torch.ops.ptfast.masked_lm_loss.default, (h, w, t, b, -100, 0.1, "torch"))
    torch.library.opcheck(torch.ops.ptfast.masked_lm_loss.default, (h.detach(), w, t, b, 3, 0.0, "torch"))
    _, row_max, log_sum = torch.ops.ptfast.masked_lm_loss(
        h.detach(), w.detach(), t, None if b is None else b.detach(), -100, 0.1, "torch"
    )
    grad = torch.randn(h.shape[0])
    args = [h.detach(), w.detach(), t, None if b is None else b.detach(), row_max, log_sum, -100, 0.1]
    for needs in ((True, True, True), (True, False, False), (False, True, bias)):
        torch.library.opcheck(torch.ops.ptfast.masked_lm_loss_backward.default, (grad, *args, *needs, "torch"))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sum_with_grads(bias):
    """The forward-with-gradients op (reduction mean / sum) and its backward, gradients asked for or not."""
    h, w, t, b = make_inputs(vocab=31, emb=12, bias=bias)
    op = torch.ops.ptfast.masked_lm_loss_sum_with_grads.default
    for needs in ((True, True, bias), (True, False, False), (False, True, bias)):
        # Inputs require grad exactly where a gradient is asked for (the wrapper's contract with the op).
        h_, w_, b_ = (x if x is None else x.detach().requires_grad_(n) for x, n in zip((h, w, b), needs, strict=True))
        torch.library.opcheck(op, (h_, w_, t, b_, -100, 0.1, *needs, "torch"))
    _, n_valid, dh, dw, db = op(h.detach(), w.detach(), t, None if b is None else b.detach(), -100, 0.1, True,
                                True, bias, "torch")  # fmt: skip
    back = torch.ops.ptfast.masked_lm_loss_sum_with_grads_backward.default
    torch.library.opcheck(back, (torch.tensor(3.7), n_valid, dh, dw, db, "torch"))
    torch.library.opcheck(back, (torch.tensor(3.7), torch.tensor(0), dh, dw, db, "torch"))


# --- property test ------------------------------------------------------------------------------------------


def test_random_shapes_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=30)
    @hypothesis.given(
        n=st.integers(0, 29),
        emb=st.integers(1, 19),
        vocab=st.integers(1, 67),
        eps=st.sampled_from([0.0, 0.05, 0.5]),
        ignore=st.floats(0.0, 1.0),
        reduction=st.sampled_from(REDUCTIONS),
        bias=st.booleans(),
        chunk=st.sampled_from([64, 1000, torch_mlm.CHUNK_BYTES]),
        compact=st.booleans(),
    )
    def prop(n, emb, vocab, eps, ignore, reduction, bias, chunk, compact):
        real_chunk, real_compact = torch_mlm.CHUNK_BYTES, torch_mlm.can_compact
        torch_mlm.CHUNK_BYTES = chunk
        if not compact:
            torch_mlm.can_compact = lambda t: False
        try:
            h, w, t, b = make_inputs(lead=(n,), emb=emb, vocab=vocab, bias=bias, ignore_frac=ignore)
            loss, grads, g = run(ptfast_fn, h, w, t, b, reduction=reduction, label_smoothing=eps)
            ref, *ref_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, reduction=reduction, label_smoothing=eps)
            assert_close64(loss, ref, "loss")
            for name, x, r in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=True):
                if r is not None:
                    assert_close64(x, r, name)
        finally:
            torch_mlm.CHUNK_BYTES, torch_mlm.can_compact = real_chunk, real_compact

    prop()
