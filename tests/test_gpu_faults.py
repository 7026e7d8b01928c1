"""Faults injected on a real GPU: under ``auto`` the op runs on the torch backend (or the next backend in its
order) with one FallbackWarning and the right answer; an explicit backend raises a clear error.

Faults injected:

* a configuration needing more shared memory than the GPU has (forced 256 x 256 fp32 attention tiles): Triton's
  ``OutOfResources`` at the first launch;
* a kernel that does not compile (a block size that is not a power of two in this GPU's table);
* a GPU reported as sm_75;
* a broken CUDA extension (its import fails);
* a launch grid over the hardware limit (4096 sequences x 16 heads);
* bad values (labels out of range, decreasing ``cu_seqlens``): refused by the value checks before any launch,
  and the CUDA context is still usable afterwards (an asynchronous device fault would have poisoned it).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import ptfast
from ptfast import verification
from ptfast.backends import cuda as cuda_backend
from ptfast.backends import triton as triton_backend
from ptfast.backends.triton import attention_config
from ptfast.testing import known_faults, record_dispatch
from tests.helpers import assert_rule, fallback_warnings
from tests.oracles import attention as attention_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_faults")]


@pytest.fixture(autouse=True)
def _unverified_kernels_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests are about auto's fallback from kernels it picked; without a verification record for this GPU,
    # auto would not pick them at all (ptfast.verification).
    monkeypatch.setenv(verification.ALLOW_UNVERIFIED_ENV, "1")


def test_auto_without_a_record_runs_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(verification.ALLOW_UNVERIFIED_ENV)
    q, k, v = _qkv((2, 3, 129, 64), torch.bfloat16, seed=3)
    x = torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.bfloat16)
    with verification.use_record(verification.Record()), record_dispatch() as events:
        ptfast.attention(q, k, v).sum().backward()
        ptfast.conv_relu_pool(x, w)
    assert {backend for _, backend, _ in events} == {"torch"}, events
    with verification.use_record(verification.Record()), ptfast.use_backend("triton"), record_dispatch() as events:
        ptfast.attention(q, k, v)  # an explicit backend is not gated
    assert events == [("attention", "triton", "forward")]


def _qkv(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, device="cuda", generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _check_attention_against_oracle(q, k, v):
    out = ptfast.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_oracle.attention(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    same = [t.detach().requires_grad_() for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(*same)
    sdpa_grads = torch.autograd.grad(sdpa, same, torch.ones_like(sdpa))
    assert_rule(out, sdpa, ref, "out")
    for name, a, s, r in zip("qkv", grads, sdpa_grads, ref_grads, strict=True):
        assert_rule(a, s, r, f"d{name}")


def test_config_over_shared_memory_falls_back() -> None:
    q, k, v = _qkv((2, 3, 300, 128), torch.float32, seed=1)
    with attention_config.use_blocks(forward=(256, 256)):
        with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
            warnings.simplefilter("always")
            _check_attention_against_oracle(q, k, v)
        messages = fallback_warnings(caught)
        assert len(messages) == 1 and "_attn_fwd" in messages[0], messages
        assert ("attention", "torch", "forward") in events
        with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault, match="_attn_fwd") as err:
            ptfast.attention(q, k, v)
        assert err.value.kind in ("resources", "compile")


def test_kernel_that_does_not_compile_falls_back(monkeypatch) -> None:
    device = torch.device("cuda")
    table = attention_config.TABLES[triton_backend.device_class(device)]
    key = (2, attention_config.head_dim_bucket(64))
    base = table[key]
    bad = attention_config.Blocks(48, 48, 4, 1)  # not a power of two: tl.arange refuses it at compile time
    monkeypatch.setitem(table, key, attention_config.KernelBlocks(bad, base.backward_kv, base.backward_q))
    q, k, v = _qkv((2, 3, 77, 64), torch.bfloat16, seed=2)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _check_attention_against_oracle(q, k, v)
        _check_attention_against_oracle(q, k, v)
    assert len(fallback_warnings(caught)) == 1
    assert {e[1] for e in events} == {"torch"}
    assert len(known_faults()) == 1
    with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault, match="_attn_fwd"):
        ptfast.attention(q, k, v)


def test_gpu_older_than_sm80_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    triton_backend._capability_reason.cache_clear()
    cuda_backend._capability_reason.cache_clear()
    try:
        q, k, v = _qkv((2, 3, 33, 64), torch.float16, seed=3)
        with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
            warnings.simplefilter("always")
            _check_attention_against_oracle(q, k, v)
            x = torch.randn(2, 8, 15, 15, device="cuda", dtype=torch.float16)
            ptfast.conv_relu(x, torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float16))
        messages = fallback_warnings(caught)
        assert any("backend 'triton'" in m and "7.5 < 8.0" in m for m in messages), messages
        assert len(messages) <= 2  # one per backend (triton, cuda), not one per call or op
        assert {e[1] for e in events} == {"torch"}
        with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="7.5 < 8.0"):
            ptfast.attention(q, k, v)
    finally:
        triton_backend._capability_reason.cache_clear()
        cuda_backend._capability_reason.cache_clear()


def test_broken_cuda_extension_falls_back_to_the_next_backend(monkeypatch) -> None:
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == cuda_backend.EXTENSION_MODULE:
            raise ImportError("ptfast/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa (injected)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    cuda_backend._load.cache_clear()
    try:
        x = torch.randn(2, 16, 15, 15, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.bfloat16) / 12
        with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
            warnings.simplefilter("always")
            out = ptfast.conv_relu(x, w)
            ptfast.conv_relu(x, w)
        messages = fallback_warnings(caught)
        assert len(messages) == 1 and "undefined symbol" in messages[0], messages
        assert {e[:2] for e in events if e[2] == "forward"} == {("conv_relu", "triton")}
        ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), padding=1))
        torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)
        with ptfast.use_backend("cuda"), pytest.raises(ptfast.BackendNotSupportedError, match="undefined symbol"):
            ptfast.conv_relu(x, w)
    finally:
        cuda_backend._load.cache_clear()


def test_launch_grid_over_the_limit_falls_back() -> None:
    q, k, v = (t.detach() for t in _qkv((4096, 16, 32, 64), torch.bfloat16, seed=4))
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="65535"):
        ptfast.attention(q, k, v)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = ptfast.attention(q, k, v)
    assert len(fallback_warnings(caught)) == 1
    assert events == [("attention", "torch", "forward")]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_bad_values_are_refused_before_any_launch_and_the_context_survives() -> None:
    h = torch.randn(9, 32, device="cuda")
    w = torch.randn(50, 32, device="cuda")
    labels = torch.tensor([1, 2, 3, 50, -100, 4, 5, 6, 7], device="cuda")  # 50 is out of range
    with pytest.raises(ValueError, match="label"):
        ptfast.masked_lm_loss(h, w, labels)
    q = torch.randn(10, 2, 16, device="cuda")
    bad_cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="non-decreasing"):
        ptfast.attention_varlen(q, q, q, bad_cu, bad_cu, 6, 6)
    # Nothing was launched with the bad values: the context is healthy and the next ops run.
    labels[3] = 49
    loss = ptfast.masked_lm_loss(h, w, labels)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
