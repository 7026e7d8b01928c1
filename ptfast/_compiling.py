"""The mark that makes ``torch.compile`` treat an environment probe as a constant (the bottom of the import graph:
``ptfast._dispatch``, ``ptfast.verification`` and the backends import it; it imports nothing of ptfast)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def constant_while_compiling(fn: F) -> F:
    """Mark an environment probe (is triton importable? is the extension built? GPU capability?) so that
    ``torch.compile`` calls it once while tracing and bakes its answer into the graph instead of tracing into
    imports and device queries, which would break ``fullgraph=True``.

    Same effect as ``torch.compiler.assume_constant_result``, which however imports ``torch._dynamo`` (and with
    it triton) when applied; ``import ptfast`` must stay light, so the mark is set directly
    (tests/test_dispatch.py checks that torch still uses this mark).
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
