"""Faults injected into the real Triton kernels (under TRITON_INTERPRET=1): under ``auto`` each op falls back to
the torch backend with one FallbackWarning and still matches the float64 oracle (forward and gradients, also when
only the backward's kernel fails after a Triton forward); an explicit ``use_backend("triton")`` raises a
``KernelFault`` / ``BackendNotSupportedError`` naming the kernel and the cause.

Faults injected:

* a kernel that does not build: a block size that is not a power of two (the interpreter's equivalent of a
  Triton compile error) in the attention forward, or in its backward only;
* Triton's ``OutOfResources`` (a configuration needing more shared memory than the GPU has), raised by the
  masked-LM-loss backward kernel's launcher;
* ``PTXASError`` from the implicit-GEMM convolution kernel;
* launch grids over the hardware limit: 4096 sequences x 16 heads (padded and packed attention).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ptfast
from ptfast.backends.torch import attention as torch_attention
from ptfast.backends.triton import attention as triton_attention
from ptfast.backends.triton import (
    attention_config,
    attention_kernels,
    conv_config,
    implicit_gemm_kernels,
    masked_lm_loss_kernels,
)
from ptfast.testing import known_faults, record_dispatch
from tests.helpers import assert_close64, fallback_warnings
from tests.oracles import attention as attention_oracle
from tests.oracles.conv import conv_relu_ref
from tests.oracles.masked_lm_loss import masked_lm_loss as mlm_oracle

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("fresh_faults")]


def _attention_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 13, 16, generator=g, requires_grad=True) for _ in range(3))
    key_mask = torch.rand(2, 13, generator=g) > 0.3
    key_mask[:, 0] = True
    return q, k, v, key_mask


def _attention_run_and_check(q, k, v, key_mask):
    out = ptfast.attention(q, k, v, key_mask=key_mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_oracle.attention(*leaves, key_mask=key_mask)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert_close64(out, ref, "out")
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert_close64(a, b, f"d{name}")


def _bad_blocks(forward: bool, backward: bool) -> attention_config.KernelBlocks:
    base, bad = attention_config.INTERPRETER_BLOCKS, attention_config.Blocks(48, 48, 4, 1)
    return attention_config.KernelBlocks(
        bad if forward else base.forward, bad if backward else base.backward_kv, bad if backward else base.backward_q
    )


def test_attention_forward_build_failure(monkeypatch) -> None:
    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCKS", _bad_blocks(True, False))
    q, k, v, key_mask = _attention_case()
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _attention_run_and_check(q, k, v, key_mask)
        _attention_run_and_check(q, k, v, key_mask)  # remembered: straight to torch, no second warning
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "_attn_fwd" in messages[0] and "power of 2" in messages[0], messages
    assert {e[1] for e in events} == {"torch"}
    with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault, match="kernel _attn_fwd failed to build"):
        ptfast.attention(q, k, v, key_mask=key_mask)


def test_attention_backward_build_failure_after_a_triton_forward(monkeypatch) -> None:
    """The forward ran on Triton (its lse saved); the backward's kernel fails to build: the torch backward runs on
    the same saved tensors and gives the oracle's gradients; later calls run on torch from the start."""
    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCKS", _bad_blocks(False, True))
    q, k, v, key_mask = _attention_case(seed=1)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _attention_run_and_check(q, k, v, key_mask)
    assert len(fallback_warnings(caught)) == 1
    assert events == [("attention", "triton", "forward"), ("attention", "torch", "backward")]
    with record_dispatch() as events:
        _attention_run_and_check(q, k, v, key_mask)
    assert events == [("attention", "torch", "forward"), ("attention", "torch", "backward")]
    assert len(known_faults()) == 1


def test_masked_lm_loss_out_of_shared_memory_in_backward(monkeypatch) -> None:
    from triton.runtime.errors import OutOfResources

    def out_of_smem(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(masked_lm_loss_kernels._mlm_bwd_dh_deterministic, "run", out_of_smem)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    w = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (23,), generator=g)
    labels[::4] = -100
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        loss = ptfast.masked_lm_loss(h, w, labels, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, (h, w))
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "OutOfResources" in messages[0] and "shared memory" in messages[0], messages
    assert events == [("masked_lm_loss", "triton", "forward"), ("masked_lm_loss", "torch", "backward")]
    leaves = [t.detach().double().requires_grad_() for t in (h, w)]
    ref = mlm_oracle(*leaves, labels, label_smoothing=0.1)
    assert_close64(loss, ref, "loss")
    for a, b in zip(grads, torch.autograd.grad(ref, leaves), strict=True):
        assert_close64(a, b, "grad")
    with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault, match="OutOfResources"):
        torch.autograd.grad(ptfast.masked_lm_loss(h, w, labels), (h, w))


@pytest.mark.parametrize("pool", [False, True])
def test_conv_ptxas_failure(monkeypatch, pool) -> None:
    from triton.runtime.errors import PTXASError

    def ptxas_fails(*args, **kwargs):
        raise PTXASError("ptxas fatal: Memory allocation failure (injected)")

    monkeypatch.setattr(implicit_gemm_kernels._conv_gemm_fwd, "run", ptxas_fails)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(6, 5, 3, 3, generator=g) / 6).requires_grad_()
    b = torch.randn(6, generator=g, requires_grad=True)
    op = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    name = "conv_relu_pool" if pool else "conv_relu"
    assert conv_config.algos_for(x.device, x.dtype, 5, 6, 9).forward == "implicit_gemm"
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = op(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "PTXASError" in messages[0] and "_conv_gemm_fwd" in messages[0], messages
    assert (name, "torch", "forward") in events and (name, "triton", "forward") not in events
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = conv_relu_ref(*leaves, 1, pool)
    assert_close64(out, ref, "out")
    for a, r in zip(grads, torch.autograd.grad(ref, leaves, torch.ones_like(ref)), strict=True):
        assert_close64(a, r, "grad")


def test_attention_launch_grid_over_the_limit() -> None:
    """4096 x 16 = 65536 (sequence, head) pairs > 65535: refused before any launch (explicit: an error naming the
    limit; auto: torch with one warning, the right answer)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4096, 16, 3, 8, generator=g) for _ in range(3))
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="65536.*65535"):
        ptfast.attention(q, k, v)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = ptfast.attention(q, k, v)
        ptfast.attention(q[:, :, :2], k, v)  # a second oversized call: no second warning
    assert len(fallback_warnings(caught)) == 1
    assert {e[1] for e in events} == {"torch"}
    assert_close64(out, attention_oracle.attention(q.double(), k.double(), v.double()), "out")
    # A per-call refusal: nothing remembered, and inputs under the limit still go to Triton.
    assert known_faults() == {}
    with record_dispatch() as events:
        ptfast.attention(q[:5], k[:5], v[:5])
    assert events == [("attention", "triton", "forward")]
    assert triton_attention.supports(q=q[:4095]) is None


def test_varlen_launch_grid_over_the_limit() -> None:
    g = torch.Generator().manual_seed(5)
    seqs, heads = 4096, 16
    q, k, v = (torch.randn(seqs, heads, 8, generator=g) for _ in range(3))
    cu = torch.arange(seqs + 1, dtype=torch.int32)
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="65536"):
        ptfast.attention_varlen(q, k, v, cu, cu, 1, 1)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = ptfast.attention_varlen(q, k, v, cu, cu, 1, 1)
    assert len(fallback_warnings(caught)) == 1
    assert events == [("attention_varlen", "torch", "forward")]
    torch.testing.assert_close(out, v)  # one key per sequence: the output is that key's value


def test_build_failure_names_the_kernel_and_leaves_other_kernels_alone(monkeypatch) -> None:
    """A fault in the attention kernels leaves the masked-LM loss on Triton (faults are remembered per op)."""
    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCKS", _bad_blocks(True, True))
    q, k, v, key_mask = _attention_case(seed=6)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ptfast.attention(q, k, v, key_mask=key_mask)
    (key,) = known_faults()
    assert key[:2] == ("attention", "triton")
    h = torch.randn(5, 16)
    w = torch.randn(7, 16)
    with record_dispatch() as events:
        ptfast.masked_lm_loss(h, w, torch.tensor([1, 2, -100, 3, 6]))
    assert events == [("masked_lm_loss", "triton", "forward")]
    assert attention_kernels._attn_fwd is not None


def test_opcheck_while_falling_back(monkeypatch) -> None:
    """After a fault under auto the op's outputs still match its fake kernel (lse in the promised shape: the
    torch backend's own, or filled with NaN so that an accidental read could not pass unnoticed), so torch.compile
    sees the same op whichever implementation ran. opcheck's AOT-dispatch test compares outputs with NaN != NaN,
    so it is replaced by a compiled-vs-eager comparison of the attention output."""
    import math

    from torch.library import opcheck

    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCKS", _bad_blocks(True, True))
    q, k, v, key_mask = _attention_case(seed=7)
    args = (q, k, v, None, key_mask, None, 0.0, False, 1 / math.sqrt(16), "auto:triton")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opcheck(torch.ops.ptfast.attention.default, args, test_utils=checks)
        out, lse = torch.ops.ptfast.attention(*args)
        # The torch backend that ran instead saves its own lse on a CPU for this plan (then it is that lse; the
        # backward that falls back too recomputes, since only the backend that saved an lse reads it); where it
        # saves none, the promised shape is filled with NaN.
        own = torch_attention.forward(*args[:9])[1]
        assert lse.shape == q.shape[:3] and (torch.equal(lse, own) if own.numel() else bool(lse.isnan().all()))
        bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
        opcheck(torch.ops.ptfast.attention_backward.default, bwd)
        compiled = torch.compile(lambda *a: torch.ops.ptfast.attention(*a)[0], backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), out)
    assert known_faults()
