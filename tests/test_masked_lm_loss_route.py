"""Auto's CPU route of ``ptfast.masked_lm_loss`` (``backends/torch/masked_lm_loss_eager.py``).

Under ``auto``, an eager CPU call with ``reduction="mean"/"sum"`` runs the labelled rows through PyTorch's own
``linear`` and an in-place log-softmax, with ``LabelledRowsLoss``'s backward (not the op's). It must meet the
float64 oracle like the op, forward and every gradient (of every order), with and without a graph (bf16, plain
or under autocast: the low-precision rule, with the op's output dtypes); check the labels as the op does; and
step aside (the op runs) wherever the op's contract or memory bound would differ.
"""

from __future__ import annotations

import pytest
import torch

import ptfast
from ptfast.backends.torch import masked_lm_loss as torch_mlm
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, autograd_node_names, rel_err
from tests.oracles import masked_lm_loss as oracle
from tests.test_masked_lm_loss import check_against_oracle, make_inputs, run, torch_fn


def _loss(h, w, t, b, **kw):
    return ptfast.masked_lm_loss(h, w, t, b, **kw)


def _took_route(loss: torch.Tensor) -> bool:
    return loss.grad_fn is not None and "LabelledRowsLossBackward" in autograd_node_names(loss.grad_fn)


def _ran_the_op(loss: torch.Tensor) -> bool:
    """The op's own Function somewhere in the graph (the wrapper's reduction and reshape may sit on top of it)."""
    return any(name.endswith("_eagerBackward") for name in autograd_node_names(loss.grad_fn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.13])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_route_matches_oracle(reduction, eps, bias, dtype):
    h, w, t, b = make_inputs(lead=(3, 19), emb=40, vocab=257, bias=bias, dtype=dtype)
    with record_dispatch() as events:
        loss, _ = check_against_oracle(h, w, t, b, reduction=reduction, label_smoothing=eps)
    assert _took_route(_loss(h, w, t, b, reduction=reduction, label_smoothing=eps))
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))


@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_route_custom_ignore_index_and_frozen_weight(ignore_index):
    h, w, t, b = make_inputs(ignore_index=ignore_index)
    t[:4] = 7  # ignored when ignore_index is 7, although 7 is a real class
    w.requires_grad_(False)
    check_against_oracle(h, w, t, b, reduction="sum", ignore_index=ignore_index, label_smoothing=0.05)
    assert _took_route(_loss(h, w, t, b, reduction="sum", ignore_index=ignore_index))


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_route_without_a_graph_matches_oracle(reduction, eps):
    """No gradient to form: the log-softmax runs in place over the logits; same loss as the oracle."""
    h, w, t, b = (x if x is None or x.dtype == torch.int64 else x.detach() for x in make_inputs(vocab=211))
    want = oracle.masked_lm_loss(h, w, t, b, -100, reduction, eps)
    with torch.no_grad():
        assert_close64(_loss(h, w, t, b, reduction=reduction, label_smoothing=eps), want, "loss")
    assert_close64(_loss(h, w, t, b, reduction=reduction, label_smoothing=eps), want, "loss")  # frozen inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("eps", [0.0, 0.11])
def test_route_second_backward_through_a_retained_graph(eps, dtype):
    """The first backward turns the kept log-probabilities into dloss/dlogits in place; a second backward through
    the retained graph recomputes them, so both give the same gradients (the oracle's, by the rule for bf16)."""
    h, w, t, b = (x if x.dtype == torch.int64 else x.detach().to(dtype).requires_grad_() for x in make_inputs())
    loss = _loss(h, w, t, b, reduction="sum", label_smoothing=eps)
    assert _took_route(loss)
    g = torch.tensor(0.7, dtype=loss.dtype)
    first = torch.autograd.grad(loss, (h, w, b), g, retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b), g)
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    if dtype == torch.float32:
        _, *want = oracle.loss_and_grads(h, w, t, b, grad_out=g, reduction="sum", label_smoothing=eps)
        for name, x, r in zip(("dhidden", "dweight", "dbias"), second, want, strict=True):
            assert_close64(x, r, name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_route_double_backward_matches_oracle(reduction):
    """Under create_graph=True the route's backward is differentiable: a gradient penalty on dhidden gets the
    oracle's second derivatives (never a softmax taken as a constant)."""
    h, w, t, b = make_inputs(emb=24, vocab=131)

    def penalty(h, w, b, loss_fn):
        loss = loss_fn(h, w, t, b, reduction=reduction, label_smoothing=0.07)
        (dh,) = torch.autograd.grad(loss, h, create_graph=True)
        return loss, torch.autograd.grad(loss + (dh * dh).sum(), (h, w, b))

    loss, grads = penalty(h, w, b, _loss)
    assert _took_route(loss)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    _, want = penalty(h64, w64, b64, lambda h, w, t, b, **kw: oracle.masked_lm_loss(h, w, t, b, **kw))
    for name, x, r in zip(("dhidden", "dweight", "dbias"), grads, want, strict=True):
        assert_close64(x, r, name)


def test_route_only_the_needed_gradients():
    """A frozen encoder (hidden without grad) and a frozen bias: only dweight is formed, and it is the oracle's."""
    h, w, t, b = make_inputs(emb=36, vocab=193)
    h, b = h.detach(), b.detach()
    loss = _loss(h, w, t, b, label_smoothing=0.05)
    assert _took_route(loss)
    (dw,) = torch.autograd.grad(loss, w, torch.tensor(1.3))
    _, _, want, _ = oracle.loss_and_grads(h, w, t, b, grad_out=torch.tensor(1.3), label_smoothing=0.05)
    assert_close64(dw, want, "dweight")


@pytest.mark.parametrize("eps", [0.0, 0.09])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_bf16_route_in_chunks_beyond_the_budget(autocast, reduction, eps, monkeypatch):
    """bf16 logits over the chunk budget: the rows go in chunks with their gradients formed in the forward
    (LabelledRowsLossChunked), every gradient within the low-precision rule against PyTorch's own op; a retained
    graph gives the same gradients twice; without a graph the loss alone."""
    monkeypatch.setattr(torch_mlm, "CHUNK_BYTES", 331 * 4 * 5)  # 5 rows per chunk: 11 chunks, a ragged last one
    h, w, t, b = make_inputs(lead=(5, 23), emb=48, vocab=331)
    assert (t != -100).sum() > 50
    if not autocast:
        h, w, b = (x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b))
    kw = dict(reduction=reduction, label_smoothing=eps)
    g = torch.tensor(1.3)
    with record_dispatch() as events, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _loss(h, w, t, b, **kw)
        assert "LabelledRowsLossChunkedBackward" in autograd_node_names(loss.grad_fn)
        ours, grads, _ = run(_loss, h, w, t, b, grad_out=g, **kw)
        ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, **kw)
        again = torch.autograd.grad(loss, (h, w, b), g, retain_graph=True)
        for a, c in zip(again, torch.autograd.grad(loss, (h, w, b), g), strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        with torch.no_grad():
            frozen = _loss(h, w, t, b, **kw)
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    assert ours.dtype == frozen.dtype == (torch.float32 if autocast else torch.bfloat16)
    oracle_loss, *oracle_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, **kw)
    for name, x, r, o, p in zip(
        ("dhidden", "dweight", "dbias"), grads, ref_grads, oracle_grads, (h, w, b), strict=True
    ):
        assert x.dtype == p.dtype
        assert_rule(x, r, o, name)
    assert rel_err(ours, oracle_loss) < 4e-3 and rel_err(frozen, oracle_loss) < 4e-3


def test_bf16_route_in_chunks_double_backward(monkeypatch):
    """create_graph=True through the chunked route differentiates stock's composition: the penalty's gradients
    are within the rule of PyTorch's own op doing the same."""
    monkeypatch.setattr(torch_mlm, "CHUNK_BYTES", 131 * 4 * 7)
    h, w, t, b = (x.detach().to(torch.bfloat16).requires_grad_() if x.is_floating_point() else x
                  for x in make_inputs(emb=24, vocab=131))  # fmt: skip

    def penalty(h, w, b, loss_fn):
        loss = loss_fn(h, w, t, b)
        (dh,) = torch.autograd.grad(loss, h, create_graph=True)
        return loss, torch.autograd.grad(loss + (dh.float() ** 2).sum(), (h, w, b))

    loss, grads = penalty(h, w, b, _loss)
    assert "LabelledRowsLossChunkedBackward" in autograd_node_names(loss.grad_fn)
    _, ref = penalty(h, w, b, torch_fn)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    _, want = penalty(h64, w64, b64, lambda h, w, t, b: oracle.masked_lm_loss(h, w, t, b))
    for name, x, r, o in zip(("dhidden", "dweight", "dbias"), grads, ref, want, strict=True):
        assert_rule(x, r, o, name)


def test_route_checks_labels_before_any_matrix_work():
    h, w, t, b = make_inputs()
    t[5] = w.shape[0]
    with record_dispatch() as events, pytest.raises(ValueError, match=f"label {w.shape[0]} is out of range"):
        _loss(h, w, t, b)
    t[5] = -3
    with pytest.raises(ValueError, match="label -3 is out of range"):
        _loss(h, w, t, b, reduction="sum")
    assert events == []


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_bf16_route_follows_the_low_precision_rule(autocast, reduction, eps, bias):
    """bf16 inputs, or fp32 parameters under CPU autocast to bf16: stock's numerics (bf16 GEMMs, fp32
    cross-entropy), so every gradient meets the rule against PyTorch's own op in the same setting; the loss has
    the op's dtype (bf16, fp32 under autocast) and the gradients their inputs' dtypes."""
    h, w, t, b = make_inputs(lead=(5, 23), emb=48, vocab=331, bias=bias)
    if not autocast:
        h, w, b = (x if x is None else x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b))
    kw = dict(reduction=reduction, label_smoothing=eps)
    g = torch.tensor(1.7)
    with record_dispatch() as events, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _loss(h, w, t, b, **kw)
        assert _took_route(loss)
        ours, grads, _ = run(_loss, h, w, t, b, grad_out=g, **kw)
        ref, ref_grads, _ = run(torch_fn, h, w, t, b, grad_out=g, **kw)
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    assert ours.dtype == (torch.float32 if autocast else torch.bfloat16)
    oracle_loss, *oracle_grads = oracle.loss_and_grads(h, w, t, b, grad_out=g, **kw)
    for name, x, r, o, p in zip(
        ("dhidden", "dweight", "dbias"), grads, ref_grads, oracle_grads, (h, w, b), strict=True
    ):
        if p is None:
            continue
        assert x.dtype == p.dtype
        assert_rule(x, r, o, name)
    # One scalar: its error against the oracle is a coin toss between two bf16 roundings (see the autocast test
    # in test_masked_lm_loss.py), so it gets a bound at bf16's resolution instead of the ratio.
    assert rel_err(ours, oracle_loss) < 4e-3


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_bf16_route_without_a_graph(autocast):
    h, w, t, b = (x if x.dtype == torch.int64 else x.detach() for x in make_inputs(vocab=211))
    if not autocast:
        h, w, b = (x.to(torch.bfloat16) for x in (h, w, b))
    want = oracle.masked_lm_loss(h, w, t, b, -100, "mean", 0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = _loss(h, w, t, b, label_smoothing=0.1)
        ref = torch_fn(h, w, t, b, label_smoothing=0.1)
    assert got.dtype == (torch.float32 if autocast else torch.bfloat16)
    assert rel_err(got, want) < 4e-3 and rel_err(ref, want) < 4e-3


def test_route_steps_aside_where_the_op_must_run(monkeypatch):
    """reduction="none", every row ignored, fp16 (plain or autocast), logits over the chunk budget, value checks
    off and an explicit backend run the op."""
    h, w, t, b = make_inputs()
    assert _took_route(_loss(h, w, t, b))
    assert _ran_the_op(_loss(h, w, t, b, reduction="none"))
    ignored = torch.full_like(t, -100)
    assert _ran_the_op(_loss(h, w, ignored, b)) and torch.isnan(_loss(h, w, ignored, b))
    half = [x.detach().to(torch.float16).requires_grad_() for x in (h, w, b)]
    assert _ran_the_op(_loss(half[0], half[1], t, half[2]))
    with torch.autocast("cpu", dtype=torch.float16):
        assert _ran_the_op(_loss(h, w, t, b))
    bf16 = [x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    assert _took_route(_loss(bf16[0], bf16[1], t, bf16[2]))
    with ptfast.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _ran_the_op(_loss(h, w, t, b))
    with ptfast.use_backend("torch"):
        assert _ran_the_op(_loss(h, w, t, b))
    monkeypatch.setenv("PTFAST_CHECKS", "0")
    assert _ran_the_op(_loss(h, w, t, b))
    monkeypatch.delenv("PTFAST_CHECKS")
    monkeypatch.setattr(torch_mlm, "CHUNK_BYTES", 4096)
    loss, grads, g = run(_loss, h, w, t, b)
    _, *ref = oracle.loss_and_grads(h, w, t, b, grad_out=g)
    assert _ran_the_op(_loss(h, w, t, b))
    for name, x, r in zip(("dhidden", "dweight", "dbias"), grads, ref, strict=True):
        assert_close64(x, r, name)
