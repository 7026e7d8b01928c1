"""Backend selection for every ptfast op.

One place decides which implementation (``torch``, ``triton`` or ``cuda``) runs an op:

* the requested backend comes from ``use_backend(...)`` (per thread, innermost wins), else from the
  ``PTFAST_BACKEND`` environment variable, else ``"auto"``;
* each op module hands ``choose`` a table ``{backend name: implementation module}``; every implementation
  module exposes ``supports(**meta) -> str | None`` (``None`` = can run, else the reason it refuses);
* ``auto`` walks the op's preference order and falls back to ``torch``; an explicitly requested backend that
  refuses raises :class:`BackendNotSupportedError` with its reason, never a silent fallback.

The chosen name is passed to the ``torch.library`` op as a plain string argument, so the forward's choice is
baked into the autograd graph and reused by backward (which autograd runs on another thread), and
``torch.compile`` guards on the thread-local setting.

``record(op, backend, phase)`` is called by the op implementations themselves when they really run, and
``ptfast.testing.record_dispatch()`` lets tests assert which implementation ran.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
CHOICES: tuple[str, ...] = (*BACKENDS, "auto")

_tls = threading.local()


class BackendNotSupportedError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs (the message says why)."""


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


def choose(op: str, impls: Mapping[str, BackendImpl], auto_order: tuple[str, ...], **meta: object) -> str:
    """Pick the backend for one call of ``op``; ``meta`` is what the backends' ``supports`` look at."""
    requested = requested_backend()
    if requested == "auto":
        for name in auto_order:
            if impls[name].supports(**meta) is None:
                return name
        return "torch"
    reason = impls[requested].supports(**meta)
    if reason is not None:
        raise BackendNotSupportedError(f"ptfast.{op}: backend {requested!r} cannot run these inputs: {reason}")
    return requested


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
            _recorders.remove(events)


def constant_while_compiling(fn):
    """Mark an environment probe (is triton importable? is the extension built? GPU capability?) so that
    ``torch.compile`` calls it once while tracing and bakes its answer into the graph instead of tracing into
    imports and device queries, which would break ``fullgraph=True``.

    Same effect as ``torch.compiler.assume_constant_result``, which however imports ``torch._dynamo`` (and with
    it triton) when applied; ``import ptfast`` must stay light, so the mark is set directly
    (tests/test_dispatch.py checks that torch still uses this mark).
    """
    fn._dynamo_marked_constant = True
    return fn
