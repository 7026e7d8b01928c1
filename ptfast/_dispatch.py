"""Backend selection for every ptfast op.

One place decides which implementation (``torch``, ``triton`` or ``cuda``) runs an op:

* the requested backend comes from ``use_backend(...)`` (per thread, innermost wins), else from the
  ``PTFAST_BACKEND`` environment variable, else ``"auto"``;
* each op module hands ``choose`` a table ``{backend name: implementation module}``; every implementation
  module exposes ``supports(**meta) -> str | None`` (``None`` = can run, else the reason it refuses);
* ``auto`` walks the op's preference order and falls back to ``torch``; an explicitly requested backend that
  refuses raises :class:`BackendNotSupportedError` with its reason, never a silent fallback; on a CPU tensor
  ``auto`` is ``torch`` at once unless a backend registered that it runs CPU tensors
  (:func:`register_cpu_backend`: Triton under ``TRITON_INTERPRET=1``);
* verified or off: on a CUDA device ``auto`` takes a Triton or CUDA kernel only where the committed verification
  record says it passed its GPU tests and measured faster than torch at that shape class
  (:mod:`ptfast.verification`; ``PTFAST_ALLOW_UNVERIFIED=1`` opts in to the rest). Explicit backends are not gated.

Faults (README, "Reliability"). A refusal is either a property of the inputs (fp64 for Triton, head dim 320):
``auto`` skips that backend silently; or an environment fault, a :class:`Fault` reason (triton or the CUDA
extension missing or broken, a GPU older than sm_80, a launch grid over the hardware's limits): ``auto`` skips it
with one :class:`FallbackWarning` per fault. Some faults only show when a kernel is built, just before its launch
(a Triton compile failure, a configuration needing more shared memory than the GPU has): the backend raises
:class:`KernelFault`, or :func:`run` recognises the backend's own build error. Under ``auto`` the op then runs on
``torch`` with one warning, and the fault is remembered for that op and input class, so later calls go straight to
``torch`` (forward and backward, which must agree); an explicit backend raises the :class:`KernelFault`.
What cannot be caught: an asynchronous device fault (an illegal address inside a running kernel) poisons the CUDA
context; no fallback is possible after it, which is why value checks run before any launch.

The chosen name is passed to the ``torch.library`` op as a plain string argument, so the forward's choice is
baked into the autograd graph and reused by backward (which autograd runs on another thread), and
``torch.compile`` guards on the thread-local setting.

``record(op, backend, phase)`` is called by the op implementations themselves when they really run, and
``ptfast.testing.record_dispatch()`` lets tests assert which implementation ran.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol, TypeVar

# Re-exported: the backends import the mark from here.
from ptfast._compiling import constant_while_compiling
from ptfast._eager import direct_call_allowed

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
CHOICES: tuple[str, ...] = (*BACKENDS, "auto")

_tls = threading.local()

# Backends that run kernels on CPU tensors in this process (Triton under its interpreter), registered by the backend
# when it is imported. Without one, ``auto`` on a CPU tensor is torch, known without asking each backend (a few
# microseconds of Python per call, on every call of every op).
_cpu_backends: set[str] = set()


def register_cpu_backend(name: str) -> None:
    """Backend ``name`` may run CPU tensors: ``auto`` asks its ``supports()`` for them too."""
    _cpu_backends.add(_check_name(name))


def auto_is_torch_on_cpu() -> bool:
    """Whether ``auto`` runs every CPU tensor on torch in this process (no backend registered for CPU tensors)."""
    return not _cpu_backends


class BackendNotSupportedError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs (the message says why)."""


class KernelFault(BackendNotSupportedError):
    """A backend's kernel cannot be built or launched here (does not compile, needs more shared memory than the GPU
    has, launch grid out of range). Raised before that kernel launches, so nothing on the device is corrupted.

    ``kind`` says which (``"compile"``, ``"resources"``, ``"launch-size"``, ``"module-load"``) and ``kernel``
    names the kernel.
    """

    def __init__(self, message: str, *, kind: str, kernel: str) -> None:
        super().__init__(message)
        self.kind, self.kernel = kind, kernel


class Fault(str):
    """A ``supports()`` reason that is a fault of the environment, not a property of the inputs: ``auto`` warns once
    when it skips a backend for it. ``key`` groups reasons that are one fault (one warning for all of them)."""

    key: str

    def __new__(cls, reason: str, key: str | None = None) -> Fault:
        self = super().__new__(cls, reason)
        self.key = reason if key is None else key
        return self


class FallbackWarning(UserWarning):
    """``auto`` skipped a faster backend because of a fault (see :class:`Fault` and :class:`KernelFault`)."""


class BackendImpl(Protocol):
    """What an op's backend module provides (forward/backward functions are op specific)."""

    def supports(self, **meta: object) -> str | None: ...


def _check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown ptfast backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


def requested_backend() -> str:
    """The backend asked for on this thread: innermost ``use_backend``, else ``PTFAST_BACKEND``, else auto."""
    stack = getattr(_tls, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("PTFAST_BACKEND", "").strip().lower()
    return _check_name(env) if env else "auto"


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on backend ``name`` (``torch``, ``triton``, ``cuda`` or ``auto``).

    The setting is per thread. An explicit backend that cannot run an input raises
    :class:`BackendNotSupportedError` instead of falling back.
    """
    _check_name(name)
    stack = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


AUTO_PREFIX = "auto:"
T = TypeVar("T")


def choose(
    op: str,
    impls: Mapping[str, BackendImpl],
    auto_order: tuple[str, ...],
    fault_key: tuple | Callable[[], tuple] = (),
    *,
    device: object = None,
    shape_class: str | None = None,
    requested: str | None = None,
    **meta: object,
) -> str:
    """Pick the backend for one call of ``op``; ``meta`` is what the backends' ``supports`` look at.

    Returns the backend name for an explicit request, and ``"auto:<name>"`` when ``auto`` picked a backend other
    than torch (:func:`run` may then still fall back to torch on a :class:`KernelFault`). ``fault_key`` is the
    input class a kernel fault is remembered for (the op's dtype, head dim, ...; see :func:`run`). On a CUDA
    ``device``, ``auto`` also needs the verification record to vouch for the backend at ``shape_class``
    (:mod:`ptfast.verification`); an explicit request does not.

    ``fault_key`` may be a function returning it (computed only when a backend other than torch could run);
    ``requested``: :func:`requested_backend`'s answer when the caller already has it (one lookup per call).
    """
    if requested is None:
        requested = requested_backend()
    if requested == "auto":
        if getattr(device, "type", None) == "cpu" and auto_is_torch_on_cpu():
            return "torch"  # (no backend's refusal of a CPU tensor is a fault: no warning is skipped)
        for name in auto_order:
            if name == "torch":
                return "torch"
            reason = impls[name].supports(**meta)
            if reason is None:
                if callable(fault_key):
                    fault_key = fault_key()
                reason = known_fault(op, name, fault_key)
                if reason is None and device is not None:
                    reason = _unverified_reason(op, name, device, shape_class)
                if reason is None:
                    return AUTO_PREFIX + name
            elif isinstance(reason, Fault):
                warn_fallback(op, name, reason.key, reason, "the next backend in auto's order runs instead")
        return "torch"
    reason = impls[requested].supports(**meta)
    if reason is not None:
        raise BackendNotSupportedError(f"ptfast.{op}: backend {requested!r} cannot run these inputs: {reason}")
    return requested


def _unverified_reason(op: str, backend: str, device: object, shape_class: str | None) -> str | None:
    # Imported on first use: the record is read only when a CUDA call asks (ptfast.verification sits below this
    # module and never imports it).
    from ptfast.verification import auto_reason

    return auto_reason(op, backend, device, shape_class)


def split(backend: str) -> tuple[str, bool]:
    """``(backend name, whether a kernel fault may fall back to torch)`` from :func:`choose`'s answer."""
    if backend.startswith(AUTO_PREFIX):
        return backend[len(AUTO_PREFIX) :], True
    return backend, False


def run(
    op: str,
    phase: str,
    backend: str,
    impls: Mapping[str, BackendImpl],
    fault_key: tuple,
    call: Callable[[BackendImpl], T],
) -> T:
    """Run ``call(impl)`` on the backend :func:`choose` picked (inside the op, forward or backward) and record it.

    A :class:`KernelFault` (or a build error the backend's classifier recognises) under ``auto`` is remembered for
    ``(op, backend, fault_key)``, warned about once, and the call runs on torch; later forward and backward calls
    of that input class go straight to torch. An explicitly chosen backend raises the fault. Anything else (wrong
    values, a CUDA error) propagates untouched.
    """
    name, may_fall_back = split(backend)
    if not (may_fall_back and known_fault(op, name, fault_key) is not None):
        try:
            result = call(impls[name])
        except Exception as exc:
            fault = exc if isinstance(exc, KernelFault) else _classify(name, exc)
            if fault is None:
                raise
            if not may_fall_back:
                message = f"ptfast.{op}: backend {name!r} cannot run these inputs: {fault}"
                raise KernelFault(message, kind=fault.kind, kernel=fault.kernel) from exc
            _remember_fault(op, name, fault_key, fault)
        else:
            record(op, name, phase)
            return result
    result = call(impls["torch"])
    record(op, "torch", phase)
    return result


# --- faults: remembered per (op, backend, input class), warned about once ---------------------------------

_faults: dict[tuple[str, str, tuple], str] = {}
_warned: set[tuple[str, str]] = set()
_fault_lock = threading.Lock()
_classifiers: dict[str, Callable[[BaseException], KernelFault | None]] = {}


def register_fault_classifier(backend: str, classify: Callable[[BaseException], KernelFault | None]) -> None:
    """A backend package's way to say which of its exceptions are build/launch faults (e.g. Triton's
    ``CompilationError``, ``OutOfResources``) rather than errors to propagate."""
    _classifiers[backend] = classify


def _classify(backend: str, exc: BaseException) -> KernelFault | None:
    classify = _classifiers.get(backend)
    return classify(exc) if classify is not None else None


def explain(op: str, impls: Mapping[str, BackendImpl], **meta: object) -> dict[str, str | None]:
    """For each backend, ``None`` if it would run these inputs, else the reason it refuses."""
    return {name: impls[name].supports(**meta) for name in BACKENDS}


# --- what ran (for tests and debugging) -------------------------------------------------------------------

_recorders: list[list[tuple[str, str, str]]] = []
_rec_lock = threading.Lock()


def record(op: str, backend: str, phase: str) -> None:
    """Called by an implementation when it actually runs (phase: ``forward`` or ``backward``)."""
    if _recorders:
        with _rec_lock:
            for events in _recorders:
                events.append((op, backend, phase))


def autograd_route_applies(backend: str, device: object, tensors: tuple, requested: str | None = None) -> bool:
    """Whether ``auto``'s CPU route may run this call as the torch backend built from PyTorch's own
    differentiable ops (see :func:`record_autograd_route`): ``auto`` chose torch, the inputs are on a CPU, and the
    call is eager on plain tensors (not compiled, traced, under a dispatch mode or a functorch transform).
    ``requested``: the :func:`requested_backend` the call was dispatched under, when the caller has it."""
    return (
        backend == "torch"
        and getattr(device, "type", None) == "cpu"
        and (requested_backend() if requested is None else requested) == "auto"
        and direct_call_allowed(tensors)
    )


def record_autograd_route(op: str, out: object, *, backward: bool = True) -> None:
    """Record an eager route that ran the torch backend as PyTorch's own differentiable ops (no ptfast Function
    in the graph): its forward now and, when a :func:`record_dispatch` block is open and ``out`` needs a gradient,
    its backward through a hook on ``out``'s autograd node (so nothing but this bookkeeping runs in Python during
    backward, and only while recording). ``backward=False`` for an op whose backward is no backend's (add_relu:
    ReLU's own, which the op does not record either)."""
    record(op, "torch", "forward")
    grad_fn = getattr(out, "grad_fn", None)
    if backward and _recorders and grad_fn is not None:
        grad_fn.register_prehook(lambda grads: record(op, "torch", "backward"))


@contextmanager
def record_dispatch() -> Iterator[list[tuple[str, str, str]]]:
    """Collect ``(op, backend, phase)`` for every implementation that runs in this block (any thread)."""
    events: list[tuple[str, str, str]] = []
    with _rec_lock:
        _recorders.append(events)
    try:
        yield events
    finally:
        with _rec_lock:
            # By identity: two recorders' lists may be equal (both empty), and remove() compares by equality.
            _recorders[:] = [r for r in _recorders if r is not events]


# Under torch.compile these run once while tracing and their answer is baked into the graph: a fault found later
# is still caught by ``run`` inside the op at run time.


@constant_while_compiling
def known_fault(op: str, backend: str, fault_key: tuple) -> str | None:
    """The remembered kernel fault of ``backend`` for this op and input class (``None`` if there is none)."""
    with _fault_lock:
        return _faults.get((op, backend, fault_key))


@constant_while_compiling
def warn_fallback(op: str, backend: str, key: str, reason: str, then: str) -> None:
    """One :class:`FallbackWarning` per (backend, fault), whichever op meets it first."""
    with _fault_lock:
        if (backend, key) in _warned:
            return
        _warned.add((backend, key))
    warnings.warn(
        f"ptfast.{op}: backend {backend!r} is skipped, {then}: {reason} "
        f"(warned once; an explicit use_backend({backend!r}) raises this as an error)",
        FallbackWarning,
        stacklevel=3,
    )


def _remember_fault(op: str, backend: str, fault_key: tuple, fault: KernelFault) -> None:
    with _fault_lock:
        _faults[(op, backend, fault_key)] = str(fault)
    then = "the torch backend runs this and later calls of this input class"
    warn_fallback(op, backend, f"{fault.kind}:{fault.kernel}", str(fault), then)


def known_faults() -> dict[tuple[str, str, tuple], str]:
    """Every remembered kernel fault: ``{(op, backend, input class): reason}`` (for env_report and tests)."""
    with _fault_lock:
        return dict(_faults)


def reset_faults() -> None:
    """Forget remembered faults and warnings (tests; or after fixing the environment in a running process)."""
    with _fault_lock:
        _faults.clear()
        _warned.clear()
