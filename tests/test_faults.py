"""Fault handling, by injecting each fault: ``auto`` falls back to the torch backend with one FallbackWarning, an
explicitly chosen backend raises a clear error, and errors that are not faults (bad values, CUDA errors) propagate.

Faults injected here (CPU, no interpreter) and what each must produce:

* a ``supports()`` reason that is an environment fault (triton missing or broken, CUDA extension missing or
  broken, GPU older than sm_80, attention launch grid over 65535 (sequence, head) pairs);
* a :class:`ptfast.KernelFault` raised by a backend inside the op (forward, or backward after a good forward);
* Triton's own build errors (``CompilationError``, ``OutOfResources``, ``PTXASError``, a RuntimeError from inside
  Triton's compiler) and the errors that must never be taken for one (an illegal memory access, a ValueError).

The real kernels meet the same faults in ``tests/interpreter/test_triton_faults.py`` and ``test_gpu_faults.py``.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import ptfast
from ptfast import _dispatch
from ptfast.backends import cuda as cuda_backend
from ptfast.backends import triton as triton_backend
from ptfast.backends.torch import attention as torch_attention
from ptfast.backends.torch import conv as torch_conv
from ptfast.backends.torch import masked_lm_loss as torch_mlm
from ptfast.backends.triton import attention as triton_attention
from ptfast.backends.triton import conv as triton_conv
from ptfast.backends.triton import masked_lm_loss as triton_mlm
from ptfast.testing import known_faults, record_dispatch
from tests.helpers import assert_close64, fallback_warnings
from tests.oracles import attention as attention_oracle
from tests.oracles.conv import conv_relu_ref
from tests.oracles.masked_lm_loss import masked_lm_loss as mlm_oracle

pytestmark = pytest.mark.usefixtures("fresh_faults")


@pytest.fixture(autouse=True)
def _backends_take_cpu_tensors(monkeypatch) -> None:
    """The injected ``supports()`` answers stand in for a GPU machine's: ``auto`` must ask the Triton and CUDA
    backends about these CPU tensors, as it asks about CUDA tensors there (by default it knows no backend but torch
    runs a CPU tensor here, and does not ask)."""
    monkeypatch.setattr(_dispatch, "_cpu_backends", {"triton", "cuda"})


def _attention_inputs(seed: int = 0, shape=(2, 3, 7, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _attention_check(q, k, v, key_mask=None):
    out = ptfast.attention(q, k, v, key_mask=key_mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = attention_oracle.attention(q, k, v, key_mask=key_mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    assert_close64(out, ref, "out")
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert_close64(a, b, f"d{name}")


def _kernel_fault(*_args, **_kwargs):
    raise ptfast.KernelFault("triton: kernel _injected failed to build (injected)", kind="compile", kernel="_injected")


# --- supports() faults ------------------------------------------------------------------------------------


def test_fault_reason_warns_once_under_auto_and_is_an_error_when_explicit(monkeypatch) -> None:
    fault = _dispatch.Fault("triton: importing triton failed (ImportError: injected)")
    monkeypatch.setattr(triton_attention, "supports", lambda **meta: fault)
    q, k, v = _attention_inputs()
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _attention_check(q, k, v)
        _attention_check(q, k, v)
    messages = fallback_warnings(caught)
    assert len(messages) == 1, messages
    assert "backend 'triton' is skipped" in messages[0] and "ImportError: injected" in messages[0]
    assert {e[1] for e in events if e[0] == "attention"} == {"torch"}
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="ImportError: injected"):
        ptfast.attention(q, k, v)


def test_plain_refusal_is_silent_under_auto(monkeypatch) -> None:
    """A property of the inputs (not a fault) is skipped without a warning."""
    monkeypatch.setattr(triton_attention, "supports", lambda **meta: "triton: head_dim 320 > 256")
    q, k, v = _attention_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ptfast.attention(q, k, v)
    assert fallback_warnings(caught) == []


def test_one_warning_per_fault_across_ops() -> None:
    """The same fault met by several ops (or inputs) warns once: warnings are keyed by (backend, fault)."""
    impls = {"torch": torch_attention, "triton": _FakeImpl(_dispatch.Fault("triton: broken", key="k"))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in ("attention", "conv_relu", "attention"):
            assert _dispatch.choose(op, impls, ("triton", "torch")) == "torch"
    assert len(fallback_warnings(caught)) == 1


class _FakeImpl:
    def __init__(self, reason):
        self.reason = reason

    def supports(self, **meta):
        return self.reason


def test_triton_missing_or_broken_is_a_fault_for_cuda_tensors_only(monkeypatch) -> None:
    monkeypatch.setattr(triton_backend, "_import_reason", lambda: "triton: importing triton failed (OSError: x)")
    cuda_reason = triton_backend.device_reason(torch.device("cuda", 0))
    assert isinstance(cuda_reason, _dispatch.Fault) and "OSError: x" in cuda_reason
    cpu_reason = triton_backend.device_reason(torch.device("cpu"))
    assert cpu_reason is not None and not isinstance(cpu_reason, _dispatch.Fault)


def test_gpu_older_than_sm80_is_a_fault(monkeypatch) -> None:
    monkeypatch.setattr(triton_backend, "_import_reason", lambda: None)
    monkeypatch.setattr(triton_backend, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    triton_backend._capability_reason.cache_clear()
    cuda_backend._capability_reason.cache_clear()
    monkeypatch.setattr(cuda_backend, "_load", lambda: (object(), None))
    try:
        for reason in (
            triton_backend.device_reason(torch.device("cuda", 0)),
            cuda_backend.unavailable_reason(torch.device("cuda", 0)),
        ):
            assert isinstance(reason, _dispatch.Fault) and "7.5 < 8.0" in reason, reason
    finally:
        triton_backend._capability_reason.cache_clear()
        cuda_backend._capability_reason.cache_clear()


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ModuleNotFoundError("No module named 'ptfast._C'", name="ptfast._C"), "not built"),
        (ImportError("ptfast/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"), "undefined symbol"),
        (OSError("libcudart.so.13: cannot open shared object file"), "cannot open shared object"),
    ],
)
def test_missing_or_broken_cuda_extension_is_a_fault(monkeypatch, raised, expected) -> None:
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == cuda_backend.EXTENSION_MODULE:
            raise raised
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    cuda_backend._load.cache_clear()
    try:
        reason = cuda_backend.unavailable_reason(torch.device("cuda", 0))
        assert isinstance(reason, _dispatch.Fault) and expected in reason, reason
        assert cuda_backend.extension() is None
        # CPU tensors are outside the backend's coverage: a plain refusal, no warning.
        cpu = cuda_backend.unavailable_reason(torch.device("cpu"))
        assert cpu is not None and not isinstance(cpu, _dispatch.Fault)
    finally:
        cuda_backend._load.cache_clear()


def test_attention_grid_limit_is_a_fault_before_any_launch() -> None:
    """(sequence, head) pairs on the grid's second axis: over 65535 the backend refuses (a fault) without launching."""
    q = torch.empty(4096, 16, 1, 8, device="meta")
    reason = triton_attention.grid_reason(q.shape[0], q.shape[1])
    assert isinstance(reason, _dispatch.Fault) and "65536" in reason and "65535" in reason
    assert triton_attention.grid_reason(4095, 16) is None


def test_checked_launch_refuses_grids_over_the_hardware_limits() -> None:
    launched = []

    class FakeKernel:
        __name__ = "_fake_kernel"

        def __getitem__(self, grid):
            return lambda *args: launched.append(grid)

    kernel = FakeKernel()
    triton_backend.checked(kernel, (2**31 - 1, 65535, 65535))(1)
    for grid in [(2**31, 1), (1, 65536), (1, 1, 65536)]:
        with pytest.raises(ptfast.KernelFault, match="_fake_kernel.*over the hardware limit") as err:
            triton_backend.checked(kernel, grid)
        assert err.value.kind == "launch-size"
    assert launched == [(2**31 - 1, 65535, 65535)]


# --- kernel faults inside the op --------------------------------------------------------------------------


def _pretend_triton_runs(monkeypatch, module, torch_module, fail_forward: bool, fail_backward: bool):
    """The triton backend module accepts every input and runs the torch implementation, except where told to
    raise a KernelFault (so the op's fault handling is exercised on a machine without Triton kernels). Returns
    the list of phases that reached the 'triton' implementation."""
    calls = []
    monkeypatch.setattr(module, "supports", lambda **meta: None)

    def forward(*args):
        calls.append("forward")
        return _kernel_fault() if fail_forward else torch_module.forward(*args)

    def backward(*args):
        calls.append("backward")
        return _kernel_fault() if fail_backward else torch_module.backward(*args)

    monkeypatch.setattr(module, "forward", forward)
    monkeypatch.setattr(module, "backward", backward)
    return calls


@pytest.mark.parametrize(("fail_forward", "fail_backward"), [(True, False), (False, True)])
def test_attention_kernel_fault_falls_back_forward_and_backward(monkeypatch, fail_forward, fail_backward) -> None:
    calls = _pretend_triton_runs(monkeypatch, triton_attention, torch_attention, fail_forward, fail_backward)
    q, k, v = _attention_inputs(seed=3)
    key_mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) > 0.3
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _attention_check(q, k, v, key_mask)
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "_injected" in messages[0], messages
    expected = [("attention", "torch", "forward"), ("attention", "torch", "backward")]
    if fail_backward:  # forward ran on triton; backward fell back after the fault
        expected[0] = ("attention", "triton", "forward")
    assert events == expected
    assert len(known_faults()) == 1
    # Remembered: the next call of the same input class goes straight to torch (no new attempt, no new warning).
    calls.clear()
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        _attention_check(q, k, v, key_mask)
    assert calls == [] and fallback_warnings(caught) == []
    assert events == [("attention", "torch", "forward"), ("attention", "torch", "backward")]
    # Another input class (no key mask) is tried on triton again.
    calls.clear()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _attention_check(q, k, v)
    assert calls[0] == "forward"


def test_attention_kernel_fault_is_an_error_when_explicit(monkeypatch) -> None:
    _pretend_triton_runs(monkeypatch, triton_attention, torch_attention, True, False)
    q, k, v = _attention_inputs()
    with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault) as err:
        ptfast.attention(q, k, v)
    assert "ptfast.attention: backend 'triton' cannot run these inputs: triton: kernel _injected" in str(err.value)
    assert isinstance(err.value, ptfast.BackendNotSupportedError) and err.value.kind == "compile"
    assert known_faults() == {}  # explicit requests never change what auto does


@pytest.mark.parametrize("fail", ["forward", "backward"])
def test_masked_lm_loss_kernel_fault_falls_back(monkeypatch, fail) -> None:
    _pretend_triton_runs(monkeypatch, triton_mlm, torch_mlm, fail == "forward", fail == "backward")
    g = torch.Generator().manual_seed(5)
    h = torch.randn(13, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(21, 9, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 21, (13,), generator=g)
    labels[::3] = -100
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        loss = ptfast.masked_lm_loss(h, w, labels, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, (h, w))
    assert len(fallback_warnings(caught)) == 1
    assert ("masked_lm_loss", "torch", "backward") in events
    ref = mlm_oracle(h, w, labels, label_smoothing=0.1)
    assert_close64(loss, ref, "loss")
    for a, b in zip(grads, torch.autograd.grad(ref, (h, w)), strict=True):
        assert_close64(a, b, "grad")
    with ptfast.use_backend("triton"), pytest.raises(ptfast.KernelFault, match="masked_lm_loss"):
        torch.autograd.grad(ptfast.masked_lm_loss(h, w, labels), (h, w))


@pytest.mark.parametrize("pool", [False, True])
def test_conv_kernel_fault_falls_back(monkeypatch, pool) -> None:
    _pretend_triton_runs(monkeypatch, triton_conv, torch_conv, True, False)
    monkeypatch.setattr(ptfast.ops.conv, "_AUTO_ORDER", ("triton", "torch"))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    op = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = op(x, w)
        grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert len(fallback_warnings(caught)) == 1
    name = "conv_relu_pool" if pool else "conv_relu"
    assert (name, "torch", "forward") in events and (name, "triton", "forward") not in events
    ref = conv_relu_ref(x, w, None, 1, pool)
    assert_close64(out, ref, "out")
    for a, b in zip(grads, torch.autograd.grad(ref, (x, w), torch.ones_like(ref)), strict=True):
        assert_close64(a, b, "grad")


def test_kernel_fault_falls_back_inside_a_compiled_graph(monkeypatch) -> None:
    """torch.compile bakes auto's choice ('auto:triton') into the graph; the fault at run time still falls back."""
    _pretend_triton_runs(monkeypatch, triton_attention, torch_attention, True, False)
    q, k, v = _attention_inputs(seed=8)
    compiled = torch.compile(lambda q, k, v: ptfast.attention(q, k, v), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, record_dispatch() as events:
        warnings.simplefilter("always")
        out = compiled(q, k, v)
    assert len(fallback_warnings(caught)) == 1
    assert ("attention", "torch", "forward") in events
    assert_close64(out, attention_oracle.attention(q, k, v), "out")


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug in the caller's values"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_errors_that_are_not_faults_propagate_under_auto(monkeypatch, error) -> None:
    monkeypatch.setattr(triton_attention, "supports", lambda **meta: None)

    def forward(*args):
        raise error

    monkeypatch.setattr(triton_attention, "forward", forward)
    q, k, v = _attention_inputs()
    with pytest.raises(type(error), match=str(error)[:20]):
        ptfast.attention(q, k, v)
    assert known_faults() == {}


# --- Triton's build errors are recognised; CUDA errors are not -----------------------------------------------


def test_triton_build_errors_are_classified() -> None:
    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    out_of_smem = triton_backend.classify_fault(OutOfResources(262144, 232448, "shared memory"))
    assert out_of_smem is not None and out_of_smem.kind == "resources" and "shared memory" in str(out_of_smem)
    compile_error = triton_backend.classify_fault(CompilationError("def k(): pass", None, "injected"))
    assert compile_error is not None and compile_error.kind == "compile"
    for not_a_fault in (
        ValueError("bad label"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("something else entirely"),
    ):
        assert triton_backend.classify_fault(not_a_fault) is None


def _raise_from(filename: str, message: str) -> RuntimeError:
    scope: dict = {}
    exec(compile(f"def build():\n    raise RuntimeError({message!r})\n", filename, "exec"), scope)  # noqa: S102
    try:
        scope["build"]()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_runtime_errors_from_tritons_compiler_are_build_faults() -> None:
    """An MLIR pass failure or a module that will not load surfaces as a RuntimeError from Triton's compiler: a
    fault; the same words from anywhere else are not; a poisoned context seen while loading is not either."""
    pytest.importorskip("triton")
    site = "/site-packages/triton/compiler/compiler.py"
    fault = triton_backend.classify_fault(_raise_from(site, "PassManager::run failed"))
    assert fault is not None and fault.kind == "compile"
    load = triton_backend.classify_fault(_raise_from(site, "Triton Error [CUDA]: no kernel image is available"))
    assert load is not None and load.kind == "module-load"
    sticky = _raise_from(site, "Triton Error [CUDA]: an illegal memory access was encountered")
    assert triton_backend.classify_fault(sticky) is None
    assert triton_backend.classify_fault(_raise_from("/elsewhere/user_code.py", "PassManager::run failed")) is None
