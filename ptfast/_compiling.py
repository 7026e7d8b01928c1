"""How the environment probes meet ``torch.compile``: the mark that makes it treat a probe as a constant, and the
cache the probes keep their answers in (the bottom of the import graph: ``ptfast._dispatch``,
``ptfast.verification`` and the backends import it; it imports nothing of ptfast)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

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


class ProbeCacheInfo(NamedTuple):
    currsize: int


def probe_cache(fn: F) -> F:
    """``functools.cache`` for an environment probe (is triton importable? the extension? the GPU's capability?):
    the answer per argument tuple, computed once, with ``cache_clear()`` / ``cache_info().currsize`` as there.

    Not ``functools.cache`` itself: where an explicitly requested backend refuses the inputs under
    ``torch.compile`` without ``fullgraph``, the graph breaks and dynamo compiles each Python frame it then meets,
    probes included; it traces through an ``lru_cache`` wrapper with a warning about possible silent
    incorrectness, next to ptfast's own error. A plain dict it traces silently. Two threads that miss at once
    may both compute the answer (probes are idempotent); one is kept.
    """
    answers: dict[tuple, object] = {}

    @functools.wraps(fn)
    def probe(*args: object) -> object:
        if args in answers:
            return answers[args]
        return answers.setdefault(args, fn(*args))

    probe.cache_clear = answers.clear  # type: ignore[attr-defined]
    probe.cache_info = lambda: ProbeCacheInfo(len(answers))  # type: ignore[attr-defined]
    return probe  # type: ignore[return-value]
