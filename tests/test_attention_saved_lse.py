"""The torch backend's saved log-sum-exp on CPU (``ptfast.backends.torch.attention.saves_lse``).

For the whole-input plan the forward keeps the CPU flash kernel's log-sum-exp and backward runs that kernel's own
backward on the saved output instead of recomputing the forward. It must give the recomputation's gradients
exactly (rows without a key, NaN rows and the masks included), be used only where the op's fake kernel promises an
lse, and never read another backend's lse. The float64 oracle tests in test_attention.py cover the values.
"""

from __future__ import annotations

import math

import pytest
import torch

import ptfast
from ptfast.backends.torch import attention as torch_attention
from ptfast.ops import attention as attention_op
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran
from tests.test_attention import LK, LQ, B, H, key_mask_of, make_qkv

SCALE = 1 / math.sqrt(24)


def _masks(kind: str, dtype: torch.dtype):
    """(attn_mask, key_mask, is_causal) of one whole-input plan."""
    if kind == "none":
        return None, None, False
    if kind == "causal":
        return None, None, True
    km = key_mask_of("right")
    km[1] = False  # a batch element without any key: its rows are 0 with 0 gradient
    if kind == "key_mask":
        return None, km, False
    if kind == "bool_b11k":
        return km[:, None, None, :], None, False
    return torch.randn(B, 1, 1, LK, dtype=dtype), km, False  # float (B, 1, 1, Lk) and a key mask


KINDS = ["none", "causal", "key_mask", "bool_b11k", "float_and_key_mask"]


def _heads_inner(t: torch.Tensor) -> bool:
    """The torch backend's layout: (B, L, H, D) in memory, with exactly the strides torch.empty gives it."""
    b, h, n, d = t.shape
    return t.stride() == torch.empty(b, n, h, d).transpose(1, 2).stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_lse_backward_equals_recomputation(kind: str, dtype: torch.dtype) -> None:
    q, k, v = (t.detach() for t in make_qkv(dtype=dtype))
    if kind == "none":
        q[0, 1, 4, 7] = math.nan  # a NaN query row stays NaN, like SDPA's math
    attn_mask, key_mask, causal = _masks(kind, dtype)
    call = (q, attn_mask, key_mask, 0.0, causal, SCALE)
    assert torch_attention.saves_lse(*call)
    out, lse = torch_attention.forward(q, k, v, attn_mask, key_mask, None, 0.0, causal, SCALE)
    assert lse.shape == (B, H, LQ) and lse.dtype == torch.float32 and lse.is_contiguous() and out.is_contiguous()
    spec = torch_attention.Spec(attn_mask, key_mask, None, 0.0, causal, SCALE)
    torch.testing.assert_close(out, torch_attention.attend(q, k, v, spec), rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    saved = torch_attention.backward(grad, q, k, v, out, lse, attn_mask, key_mask, None, 0.0, causal, SCALE)
    empty = lse.new_empty(0)
    recomputed = torch_attention.backward(grad, q, k, v, out, empty, attn_mask, key_mask, None, 0.0, causal, SCALE)
    for a, b in zip(saved, recomputed, strict=True):
        assert _heads_inner(a) and a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    if kind in ("key_mask", "float_and_key_mask"):
        assert out[1].eq(0).all() and saved[0][1].eq(0).all()  # no key: 0 and 0 gradient, not NaN


@pytest.mark.parametrize(
    "call",
    [
        dict(dropout_p=0.1),  # explicit dropout math
        dict(attn_mask=torch.ones(B, 1, LQ, LK, dtype=torch.bool)),  # per-query mask: chunks
        dict(is_causal=True, key_mask=torch.ones(B, LK, dtype=torch.bool)),  # causal with a mask: chunks
        dict(dtype=torch.float64),  # the flash kernel's lse would not be fp32
        dict(scale=0.0),  # recomputed with the zero scale moved into q
    ],
    ids=["dropout", "per-query-mask", "causal+key_mask", "fp64", "scale0"],
)
def test_recomputation_where_nothing_is_saved(call: dict) -> None:
    dtype = call.pop("dtype", torch.float32)
    q, k, v = (t.detach() for t in make_qkv(dtype=dtype))
    args = dict(attn_mask=None, key_mask=None, dropout_p=0.0, is_causal=False, scale=SCALE) | call
    assert not torch_attention.saves_lse(q, *args.values())
    seed = torch.tensor([3, 4]) if args["dropout_p"] else None
    _, lse = torch_attention.forward(q, k, v, args["attn_mask"], args["key_mask"], seed, *list(args.values())[2:])
    assert lse.numel() == 0


def test_fake_kernel_promises_the_saved_lse_and_opcheck_passes() -> None:
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(lq=13, lk=11, d=24))
    km = key_mask_of("right", lk=11)
    for key_mask, causal in ((km, False), (None, True)):
        args = (q, k, v, None, key_mask, None, 0.0, causal, SCALE, "torch")
        torch.library.opcheck(torch.ops.ptfast.attention.default, args)
        out, lse = torch.ops.ptfast.attention(*args)
        assert lse.shape == (B, H, 13)
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
        torch.library.opcheck(torch.ops.ptfast.attention_backward.default, bwd_args)

        def fn(q, k, v, key_mask=key_mask, causal=causal):  # noqa: ANN001, ANN202
            return ptfast.attention(q, k, v, key_mask=key_mask, is_causal=causal)

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got, want = compiled(q, k, v), fn(q, k, v)
        torch.testing.assert_close(got, want)
        got_grads, want_grads = (torch.autograd.grad(o.sum(), (q, k, v)) for o in (got, want))
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_a_fallback_backend_never_reads_another_backends_lse() -> None:
    """Only the backend whose forward saved the lse reads it (Triton's is base 2, the torch backend's natural)."""
    lse = torch.randn(B, H, LQ)
    impls = attention_op._IMPLS
    assert attention_op._own_lse(impls, "torch", impls["torch"], lse) is lse
    assert attention_op._own_lse(impls, "auto:triton", impls["triton"], lse) is lse
    assert attention_op._own_lse(impls, "auto:triton", impls["torch"], lse).numel() == 0


@pytest.mark.parametrize("nan_row", [False, True])
@pytest.mark.parametrize("kind", ["none", "key_mask_all_rows_valid", "key_mask"])
def test_skipped_finishing_passes_change_nothing(monkeypatch, kind: str, nan_row: bool) -> None:
    """On a CPU the finishing passes (zeroing rows without a key, restoring NaN rows) are skipped when a value check
    says they would change nothing; elsewhere they always run. Both give the same bits, in every case the check
    can answer either way."""
    q, k, v = (t.detach() for t in make_qkv())
    if nan_row:
        q[1, 2, 5, 3] = math.nan
    key_mask = None if kind == "none" else key_mask_of("right")
    if kind == "key_mask":
        key_mask[1] = False
    grad = torch.randn(B, H, LQ, 24, generator=torch.Generator().manual_seed(8))

    def run():
        out, lse = torch_attention.forward(q, k, v, None, key_mask, None, 0.0, False, SCALE)
        return (out, *torch_attention.backward(grad, q, k, v, out, lse, None, key_mask, None, 0.0, False, SCALE))

    skipped = run()
    monkeypatch.setattr(torch_attention, "_nothing_to_change", lambda rows, harmless: False)
    monkeypatch.setattr(torch_attention, "_mask_cache", torch_attention._MaskCache())  # its answer was cached
    always = run()
    for a, b in zip(skipped, always, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_mask_conversion_is_reused_only_while_the_mask_is_unchanged() -> None:
    """The whole-input plan converts a padding mask once and reuses it for later calls with the same, unmodified
    mask tensor (every layer of a Transformer, forward and backward). An in-place edit, another mask tensor or
    another dtype converts again: never a stale mask."""
    q, k, v = (t.detach() for t in make_qkv())
    key_mask = key_mask_of("right")
    call = (None, key_mask, None, 0.0, False, SCALE)
    first, _ = torch_attention.forward(q, k, v, *call)
    converted = torch_attention._mask_cache.value[0]
    again, _ = torch_attention.forward(q, k, v, *call)
    assert torch_attention._mask_cache.value[0] is converted  # reused, not rebuilt
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    key_mask[0, :3] = False  # in place: the version counter moves on
    edited, _ = torch_attention.forward(q, k, v, *call)
    assert torch_attention._mask_cache.value[0] is not converted
    spec = torch_attention.Spec(None, key_mask.clone(), None, 0.0, False, SCALE)
    torch.testing.assert_close(edited, torch_attention.attend(q, k, v, spec), rtol=0, atol=0)
    assert not torch.equal(edited, first)

    other = key_mask.clone()
    other[1, :5] = False
    fresh, _ = torch_attention.forward(q, k, v, None, other, None, 0.0, False, SCALE)
    spec = torch_attention.Spec(None, other.clone(), None, 0.0, False, SCALE)
    torch.testing.assert_close(fresh, torch_attention.attend(q, k, v, spec), rtol=0, atol=0)

    half = tuple(t.to(torch.float16) for t in (q, k, v))
    torch_attention.forward(*half, None, other, None, 0.0, False, SCALE)
    assert torch_attention._mask_cache.value[0].dtype == torch.float16

    with torch.inference_mode():
        frozen = other.clone()
        torch_attention.forward(q, k, v, None, frozen, None, 0.0, False, SCALE)
        before = torch_attention._mask_cache.value
        torch_attention.forward(q, k, v, None, frozen, None, 0.0, False, SCALE)
        assert torch_attention._mask_cache.value is not before  # no version counter: converted, not reused


def _route_masks(kind: str):
    """(attn_mask, key_mask, is_causal) of whole-input plans where every query row has a key."""
    if kind == "none":
        return None, None, False
    if kind == "causal":
        return None, None, True
    km = key_mask_of("right")
    if kind == "key_mask":
        return None, km, False
    if kind == "bool_b11k":
        return km[:, None, None, :], None, False
    return torch.randn(B, 1, 1, LK), km, False  # float (B, 1, 1, Lk) and a key mask


def _attention_and_grads(q, k, v, masks, grad):
    attn_mask, key_mask, causal = masks
    with record_dispatch() as events:
        out = ptfast.attention(q, k, v, attn_mask, is_causal=causal, key_mask=key_mask)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads, events


def _is_flash_node(out: torch.Tensor) -> bool:
    return "FlashAttentionForCpu" in type(out.grad_fn).__name__


@pytest.mark.parametrize("noncontig", [False, True], ids=["BHLD", "BLHD"])
@pytest.mark.parametrize("kind", ["none", "causal", "key_mask", "bool_b11k", "float_and_key_mask"])
def test_auto_runs_the_flash_kernel_as_its_own_autograd_node(kind: str, noncontig: bool) -> None:
    """Under ``auto`` an eager CPU call of the whole-input plan (no dropout) runs PyTorch's flash kernel under
    PyTorch's own autograd instead of the op's custom Function (whose Python cost ~100 us per call each way). Same
    kernel and arguments as the explicit torch backend: the same bits forward and backward, and recorded."""
    q, k, v = make_qkv(noncontig=noncontig)
    masks = _route_masks(kind)
    grad = torch.randn(B, H, LQ, 24, generator=torch.Generator().manual_seed(11))
    out, grads, events = _attention_and_grads(q, k, v, masks, grad)
    assert _is_flash_node(out)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    with ptfast.use_backend("torch"):
        want, want_grads, _ = _attention_and_grads(q, k, v, masks, grad)
    assert not _is_flash_node(want)  # the explicit backend runs the op
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_auto_runs_the_op_where_the_kernel_alone_would_differ() -> None:
    """The route is taken only where the kernel's result needs no finishing pass: a batch element without any key
    (its rows are 0, not what the kernel gives), a NaN query row without a mask (the kernel returns 0 there, the
    contract NaN), dropout, autocast, and calls that are not plain eager ones run the op."""
    q, k, v = make_qkv()
    grad = torch.randn(B, H, LQ, 24, generator=torch.Generator().manual_seed(12))
    km = key_mask_of("right")
    km[1] = False
    out, grads, _ = _attention_and_grads(q, k, v, (None, km, False), grad)
    assert not _is_flash_node(out) and out[1].abs().max() == 0 and grads[0][1].abs().max() == 0

    nan_q = q.detach().clone()
    nan_q[0, 1, 4, 7] = math.nan
    nan_q.requires_grad_()
    out = ptfast.attention(nan_q, k, v)
    assert not _is_flash_node(out) and out[0, 1, 4].isnan().all() and not out[0, 1, 5].isnan().any()

    assert not _is_flash_node(ptfast.attention(q, k, v, dropout_p=0.1, key_mask=key_mask_of("right")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _is_flash_node(ptfast.attention(q, k, v, key_mask=key_mask_of("right")))
    with torch.inference_mode():
        out = ptfast.attention(q, k, v, key_mask=key_mask_of("right"))  # no graph either way: same values
    torch.testing.assert_close(out, ptfast.attention(q, k, v, key_mask=key_mask_of("right")), rtol=0, atol=0)


def test_a_mask_converted_under_inference_mode_serves_a_training_call() -> None:
    """The converted mask is cached; made under inference_mode it would be an inference tensor, which autograd
    cannot save for the kernel's backward. It is made as an ordinary tensor."""
    q, k, v = make_qkv()
    key_mask = key_mask_of("right")
    with torch.inference_mode():
        ptfast.attention(q, k, v, key_mask=key_mask)
    out = ptfast.attention(q, k, v, key_mask=key_mask)
    assert _is_flash_node(out)
    torch.autograd.grad(out.sum(), (q, k, v))
