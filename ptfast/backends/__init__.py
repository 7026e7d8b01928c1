"""Backend implementations: ``torch`` (runs anywhere), ``triton`` and ``cuda`` (GPU kernels).

Each backend has one file per op; every such module exposes ``supports(**meta) -> str | None``.
:class:`Unimplemented` stands in for an op a backend has no kernel for yet, so ``auto`` skips it and an explicit
request says why it cannot run.
"""

from __future__ import annotations


class Unimplemented:
    """A backend slot with no kernel: refuses every input with a fixed reason."""

    def __init__(self, backend: str, op: str) -> None:
        self.reason = f"{backend}: no {op} kernel in this version of ptfast"

    def supports(self, **meta: object) -> str | None:
        return self.reason
