"""``ptfast.attention_varlen`` on the triton backend under TRITON_INTERPRET=1 (CPU tensors).

Packed sequences (empty ones included, total_q != total_k both ways, sequences with queries but no keys and keys
but no queries) against the float64 oracle run sequence by sequence: fp32 tightly, dropout included (the oracle
regenerates the exact hash mask with positions counted within each sequence); fp16 by the low-precision rule
against PyTorch's own fp16 SDPA per sequence. Also: tiles that straddle sequence boundaries (forced small
blocks), forward and backward under different block configs, the atomic dQ mode, equality with the padded
triton op plus a ``key_mask`` under the same seed, empty and non-contiguous inputs, bad ``cu_seqlens`` values with
checks off, and the refusals with ``auto`` falling back to torch.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles import attention as oracle
from tests.test_attention_varlen import cu_of, sdpa_per_sequence

pytestmark = pytest.mark.interpreter

# The backend under test. Flip to "torch" only to validate the test logic itself, never in a commit.
BACKEND = "triton"

H = 3
LENS_Q = [5, 0, 17, 1, 9]
LENS_K = {
    "same": LENS_Q,
    "k-longer": [12, 6, 29, 3, 9],  # sequence 1: keys but no queries
    "k-shorter": [3, 2, 11, 0, 4],  # sequence 3: a query but no keys -> zeros
}


def blocks(forward=None, backward=None):
    """Force the triton kernels' block sizes for the duration of the block (None = the default config)."""
    if forward is None and backward is None:
        return contextlib.nullcontext()
    from ptfast.backends.triton import attention_config

    return attention_config.use_blocks(forward=forward, backward=backward)


def packed(lens_q, lens_k, dtype=torch.float32, d=24):
    q = torch.randn(sum(lens_q), H, d, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), H, d, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), H, d, dtype=dtype, requires_grad=True)
    return q, k, v


def seed_words(seed: int) -> tuple[int, int]:
    """Seed torch and return the two dropout seed words the functional wrapper will draw next."""
    torch.manual_seed(seed)
    drawn = tuple(torch.randint(0, 2**31, (2,), dtype=torch.int64).tolist())
    torch.manual_seed(seed)
    return drawn


def check_varlen(lens_q, lens_k, *, dtype=torch.float32, d=24, is_causal=False, dropout_p=0.0, scale=None,
                 max_q=None, max_k=None, fwd_blocks=None, bwd_blocks=None, seed=4, inputs=None):  # fmt: skip
    """Forward + backward on BACKEND (asserted) against the per-sequence float64 oracle; returns (out, grads)."""
    q, k, v = inputs if inputs is not None else packed(lens_q, lens_k, dtype, d)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    max_q = max(lens_q, default=0) if max_q is None else max_q
    max_k = max(lens_k, default=0) if max_k is None else max_k
    drawn = seed_words(seed)
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        with blocks(forward=fwd_blocks):
            out = ptfast.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale)
        grad = torch.randn_like(out)
        with blocks(backward=bwd_blocks):
            grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention_varlen", BACKEND, ("forward", "backward"))
    assert not any(e[1] != BACKEND for e in events), f"another backend ran too: {events}"
    assert out.shape == q.shape and out.dtype == q.dtype
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    ref = oracle.attention_varlen(*leaves, cq, ck, is_causal, scale, dropout_p, drawn)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    if dtype == torch.float32:
        assert_close64(out, ref, "out")
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            assert_close64(g, r, f"d{name}")
    else:
        assert dropout_p == 0 and scale is None, "the fp16 yardstick has no dropout or custom scale"
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        tout = sdpa_per_sequence(tq, tk, tv, cq, ck, is_causal)
        tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
        assert_rule(out, tout, ref, "out")
        for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
            assert_rule(g, t, r, f"d{name}")
    # a sequence without keys gives exact zeros and zero dq; keys no query sees get zero dk/dv
    for b in range(len(lens_q)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_k[b] == 0:
            assert (out[sq] == 0).all() and (grads[0][sq] == 0).all(), f"sequence {b} has no keys"
        if lens_q[b] == 0:
            assert (grads[1][sk] == 0).all() and (grads[2][sk] == 0).all(), f"sequence {b} has no queries"
    return out, grads


CASES = [(torch.float32, 0.0), (torch.float32, 0.2), (torch.float16, 0.0)]


@pytest.mark.parametrize("dtype,dropout_p", CASES, ids=["fp32", "fp32-drop", "fp16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_k", list(LENS_K), ids=list(LENS_K))
def test_varlen_matches_oracle(dtype, dropout_p, is_causal, lens_k):
    check_varlen(LENS_Q, LENS_K[lens_k], dtype=dtype, is_causal=is_causal, dropout_p=dropout_p)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_varlen_tiles_straddle_sequences(is_causal):
    """Sequences longer than a tile and starting mid-tile; forward and backward under different block configs,
    with dropout: the mask must be the same in both passes."""
    lens_q, lens_k = [37, 0, 16, 1, 53], [29, 5, 16, 0, 61]
    check_varlen(lens_q, lens_k, is_causal=is_causal, dropout_p=0.25, fwd_blocks=(16, 16), bwd_blocks=(16, 32))
    if is_causal:
        check_varlen(lens_q, lens_k, is_causal=True, dropout_p=0.25, fwd_blocks=(32, 16), bwd_blocks=(64, 16))
    else:
        check_varlen(lens_q, lens_k, dtype=torch.float16, fwd_blocks=(16, 32), bwd_blocks=(16, 16))


def test_varlen_head_dim_scale_and_loose_max_seqlen():
    """A non-power-of-two head dim, a custom scale, and max_seqlen larger than every sequence."""
    check_varlen(LENS_Q, LENS_K["k-longer"], d=72, scale=0.29, is_causal=True, dropout_p=0.1, max_q=40, max_k=64)


def test_varlen_atomic_dq():
    from ptfast.backends.triton import attention_config

    with attention_config.use_atomic_dq(True):
        check_varlen([37, 0, 16, 1, 53], [29, 5, 16, 0, 61], is_causal=True, dropout_p=0.2, bwd_blocks=(16, 16))
        check_varlen(LENS_Q, LENS_K["k-shorter"], dtype=torch.float16)


def _pad(x, cu, max_len):
    """(total, H, D) -> (B, H, max_len, D), padding filled with random values (they must not matter)."""
    out = torch.randn(len(cu) - 1, max_len, *x.shape[1:], dtype=x.dtype)
    for b in range(len(cu) - 1):
        out[b, : cu[b + 1] - cu[b]] = x[cu[b] : cu[b + 1]]
    return out.transpose(1, 2)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_equals_padded_with_key_mask(is_causal, dropout_p):
    """Varlen and the padded op with a key_mask, both on triton, same seed: same values on the real tokens."""
    lens = [13, 0, 29, 7, 1]  # same lengths for q and k: the padded batch's rows are exactly the packed tokens
    q, k, v = packed(lens, lens)
    cu = cu_of(lens)
    cl, mx = cu.tolist(), max(lens)
    grad = torch.randn_like(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    key_mask = torch.arange(mx)[None, :] < torch.tensor(lens)[:, None]
    padded_qkv = [_pad(t, cl, mx) for t in leaves]  # before seeding: _pad draws random padding
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        torch.manual_seed(21)
        out = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, dropout_p, is_causal)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        torch.manual_seed(21)
        outp = ptfast.attention(*padded_qkv, None, dropout_p, is_causal, key_mask=key_mask)
        ref = torch.cat([outp[b, :, : lens[b]].transpose(0, 1) for b in range(len(lens))])
        ref_grads = torch.autograd.grad(ref, leaves, grad)
    assert_ran(events, "attention_varlen", BACKEND, ("forward", "backward"))
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_varlen_same_seed_same_output_and_fresh_draws():
    q, k, v = packed(LENS_Q, LENS_Q)
    cu, mx = cu_of(LENS_Q), max(LENS_Q)
    with ptfast.use_backend(BACKEND):
        torch.manual_seed(2)
        a = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, 0.3)
        b = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, 0.3)
        torch.manual_seed(2)
        a2 = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, 0.3)
    assert torch.equal(a, a2) and not torch.equal(a, b)


def test_varlen_empty_and_non_contiguous_inputs():
    """No sequences, only empty sequences, q/k/v sliced from one packed (total, 3, H, D) tensor, head-major storage."""
    with ptfast.use_backend(BACKEND):
        q, k, v = packed([], [])
        assert ptfast.attention_varlen(q, k, v, cu_of([]), cu_of([]), 0, 0).shape == (0, H, 24)
        q, k, v = packed([0, 0], [0, 0])
        assert ptfast.attention_varlen(q, k, v, cu_of([0, 0]), cu_of([0, 0]), 0, 0).shape == (0, H, 24)
    lens = [9, 0, 8, 3]
    qkv = torch.randn(sum(lens), 3, H, 40)
    q, k, v = (qkv[:, i].requires_grad_() for i in range(3))
    assert not q.is_contiguous()
    check_varlen(lens, lens, d=40, is_causal=True, dropout_p=0.15, inputs=(q, k, v))
    q, k, v = (torch.randn(H, 17, 24).transpose(0, 1).requires_grad_() for _ in range(3))  # (H, total, D) storage
    check_varlen([9, 8], [9, 8], is_causal=True, inputs=(q, k, v))


def test_varlen_bad_values_without_checks_do_not_crash(monkeypatch):
    """With value checks off, bad cu_seqlens must not make the kernels crash or read/write out of bounds."""
    monkeypatch.setenv("PTFAST_CHECKS", "0")
    q, k, v = packed([5, 6], [5, 6])
    with ptfast.use_backend(BACKEND):
        for cu in ([0, 9, 4], [3, 5, 40], [0, 11, 11], [-7, 2, 11]):
            cu_t = torch.tensor(cu, dtype=torch.int32)
            out = ptfast.attention_varlen(q, k, v, cu_t, cu_t, 2, 0, dropout_p=0.1, is_causal=True)
            out.sum().backward()
            assert out.shape == q.shape


def test_varlen_auto_runs_triton_under_the_interpreter():
    q, k, v = packed(LENS_Q, LENS_Q)
    cu, mx = cu_of(LENS_Q), max(LENS_Q)
    with record_dispatch() as events:
        ptfast.attention_varlen(q, k, v, cu, cu, mx, mx).sum().backward()
    assert_ran(events, "attention_varlen", BACKEND, ("forward", "backward"))


@pytest.mark.parametrize(
    "dtype,d,match",
    [(torch.bfloat16, 24, "bfloat16"), (torch.float64, 24, "float64"), (torch.float32, 320, "256")],
    ids=["bf16-cpu", "fp64", "d320"],
)
def test_varlen_refusals_and_auto_fallback(dtype, d, match):
    lens = [4, 0, 7]
    q, k, v = packed(lens, lens, dtype, d)
    cu, mx = cu_of(lens), max(lens)
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match=match):
        ptfast.attention_varlen(q, k, v, cu, cu, mx, mx)
    with record_dispatch() as events:
        out = ptfast.attention_varlen(q, k, v, cu, cu, mx, mx, is_causal=True)
    assert_ran(events, "attention_varlen", "torch")
    assert ("attention_varlen", "triton", "forward") not in events
    ref = oracle.attention_varlen(q.double(), k.double(), v.double(), cu.tolist(), cu.tolist(), True)
    assert_close64(out, ref, "auto fallback", tol=1e-2 if dtype == torch.bfloat16 else None)
