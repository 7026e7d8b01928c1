"""masked_lm_loss on the triton backend under TRITON_INTERPRET=1 (CPU tensors), against the float64 oracle.

fp32 must match the oracle tightly; fp16 follows the low-precision rule of docs/design.md §5 against PyTorch's own
fp16 ``linear`` + ``cross_entropy``. Sizes are odd and not multiples of the kernel's tiles (16 rows x 32 vocab x
16 hidden under the interpreter). bf16 runs on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.triton import masked_lm_loss as triton_mlm
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles import masked_lm_loss as oracle

pytestmark = pytest.mark.interpreter


def _inputs(n, e, v, dtype, with_bias, keep_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, e, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, e, generator=g, dtype=torch.float64) / e**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > keep_frac] = -100
    return h, w, b, labels


def _run(h, w, b, labels, reduction, eps, grad_seed=1):
    leaves = [h, w] + ([b] if b is not None else [])
    with ptfast.use_backend("triton"), record_dispatch() as events:
        loss = ptfast.masked_lm_loss(h, w, labels, b, reduction=reduction, label_smoothing=eps)
        grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss.dtype)
        grads = torch.autograd.grad(loss, leaves, grad)
    assert_ran(events, "masked_lm_loss", "triton", ("forward", "backward"))
    return loss, grads, grad, leaves


def _oracle(leaves, labels, reduction, eps, grad):
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    b64 = l64[2] if len(l64) == 3 else None
    ref = oracle.masked_lm_loss(l64[0], l64[1], labels, b64, reduction=reduction, label_smoothing=eps)
    return ref, torch.autograd.grad(ref, l64, grad.double())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fp32_matches_oracle(reduction, eps, with_bias) -> None:
    h, w, b, labels = _inputs(37, 40, 101, torch.float32, with_bias, keep_frac=0.4)
    loss, grads, grad, leaves = _run(h, w, b, labels, reduction, eps)
    ref, ref_grads = _oracle(leaves, labels, reduction, eps, grad)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    assert_close64(loss, ref, "loss")
    for name, g, r in zip(("dhidden", "dweight", "dbias")[: len(grads)], grads, ref_grads, strict=True):
        assert_close64(g, r, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_follows_the_rule(reduction) -> None:
    h, w, b, labels = _inputs(45, 24, 77, torch.float16, True, keep_frac=0.5)
    loss, grads, grad, leaves = _run(h, w, b, labels, reduction, 0.1)
    ref, ref_grads = _oracle(leaves, labels, reduction, 0.1, grad)
    # PyTorch's own fp16 pipeline on the same inputs (fp16 logits, fp16 loss) is the yardstick.
    tl = [t.detach().requires_grad_() for t in leaves]
    theirs = F.cross_entropy(F.linear(tl[0], tl[1], tl[2]), labels, reduction=reduction, label_smoothing=0.1)
    their_grads = torch.autograd.grad(theirs, tl, grad)
    assert_rule(loss, theirs, ref, "loss")
    for name, g, t, r in zip(("dhidden", "dweight", "dbias"), grads, their_grads, ref_grads, strict=True):
        assert g.dtype == torch.float16
        assert_rule(g, t, r, name)


def test_ignored_rows_get_no_gradient_and_cost_nothing() -> None:
    h, w, b, labels = _inputs(29, 24, 53, torch.float32, True, keep_frac=0.3)
    loss, (dh, _, _), grad, leaves = _run(h, w, b, labels, "none", 0.0)
    ignored = labels == -100
    assert ignored.any() and (loss[ignored] == 0).all() and (dh[ignored] == 0).all()


def test_all_rows_ignored_matches_pytorch() -> None:
    h, w, b, labels = _inputs(9, 16, 33, torch.float32, True, keep_frac=0.4)
    labels[:] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grads, _, leaves = _run(h, w, b, labels, reduction, 0.0)
        ref = F.cross_entropy(F.linear(h, w, b), labels, reduction=reduction)
        assert torch.equal(torch.isnan(loss), torch.isnan(ref))
        assert all((g == 0).all() for g in grads)


def test_tied_weight_gradients_add_up() -> None:
    """The decoder weight tied to an embedding: both uses' gradients land on one parameter."""
    h, w, b, labels = _inputs(23, 32, 61, torch.float32, True, keep_frac=0.6)
    ids = torch.randint(0, 61, (23,))
    with ptfast.use_backend("triton"):
        hidden = h + w[ids]  # the embedding lookup of the same weight
        loss = ptfast.masked_lm_loss(hidden, w, labels, b)
        (gw,) = torch.autograd.grad(loss, [w])
    w64 = w.detach().double().requires_grad_()
    ref = oracle.masked_lm_loss(h.detach().double() + w64[ids], w64, labels, b.detach().double())
    (rw,) = torch.autograd.grad(ref, [w64])
    assert_close64(gw, rw, "tied dweight")


def test_autocast_keeps_fp32_weight_uncopied() -> None:
    """Under CPU autocast (fp16) hidden is cast; the fp32 weight and bias are read as they are."""
    h, w, b, labels = _inputs(31, 24, 45, torch.float32, True, keep_frac=0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, grads, grad, leaves = _run(h, w, b, labels, "mean", 0.0)
    assert loss.dtype == torch.float32 and grads[1].dtype == torch.float32
    ref, ref_grads = _oracle([h.detach().half().float(), w, b], labels, "mean", 0.0, grad)
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())


def test_refuses_bf16_on_cpu_and_fp64() -> None:
    for dtype in (torch.bfloat16, torch.float64):
        h, w, b, labels = _inputs(5, 16, 17, dtype, False, keep_frac=1.0)
        with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="triton"):
            ptfast.masked_lm_loss(h, w, labels)


def test_default_backward_is_bitwise_reproducible_and_exact() -> None:
    """The default (atomic-free) backward: same bits twice, oracle-exact."""
    h, w, b, labels = _inputs(41, 24, 70, torch.float32, True, keep_frac=0.6, seed=5)
    first = _run(h, w, b, labels, "none", 0.1)
    second = _run(h, w, b, labels, "none", 0.1)
    for a, c in zip(first[1], second[1], strict=True):
        assert torch.equal(a, c)
    ref, ref_grads = _oracle(first[3], labels, "none", 0.1, first[2])
    for name, g, r in zip(("dhidden", "dweight", "dbias"), first[1], ref_grads, strict=True):
        assert_close64(g, r, name)


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_partial_gradients(needs, atomic) -> None:
    """Only the gradients asked for, by the default kernels and by the opt-in atomic one."""
    h, w, b, labels = _inputs(19, 16, 45, torch.float32, True, keep_frac=0.7, seed=6)
    leaves = [t for t, need in zip((h, w, b), needs, strict=True) if need]
    with ptfast.use_backend("triton"), triton_mlm.use_atomic_backward(atomic):
        loss = ptfast.masked_lm_loss(h, w, labels, b)
        grads = torch.autograd.grad(loss, leaves)
    l64 = [t.detach().double().requires_grad_(need) for t, need in zip((h, w, b), needs, strict=True)]
    ref = oracle.masked_lm_loss(l64[0], l64[1], labels, l64[2])
    ref_grads = torch.autograd.grad(ref, [t for t in l64 if t.requires_grad])
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close64(g, r, "partial gradient")


def test_atomic_backward_is_refused_under_deterministic_algorithms() -> None:
    """The opt-in atomic backward meets PyTorch's usual refusal when the backward runs; the default runs."""
    h, w, b, labels = _inputs(9, 16, 21, torch.float32, True, keep_frac=0.7, seed=7)
    torch.use_deterministic_algorithms(True)
    try:
        _run(h, w, b, labels, "mean", 0.0)  # default backward: deterministic, allowed
        with triton_mlm.use_atomic_backward(), pytest.raises(RuntimeError, match="deterministic implementation"):
            _run(h, w, b, labels, "mean", 0.0)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(("n", "v"), [(1, 5), (70, 257), (33, 31)])
def test_vocabulary_splits_and_odd_sizes(n, v) -> None:
    """Vocabularies of one tile or many (the forward splits them over programs and combines the partials)."""
    h, w, b, labels = _inputs(n, 24, v, torch.float32, True, keep_frac=0.7, seed=3)
    labels[0] = v - 1  # the last vocabulary entry, in the last (partial) tile
    loss, grads, grad, leaves = _run(h, w, b, labels, "none", 0.1)
    ref, ref_grads = _oracle(leaves, labels, "none", 0.1, grad)
    assert_close64(loss, ref, "loss")
    for name, g, r in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert_close64(g, r, name)
