"""The two memory layouts of a ``(B, H, L, D)`` attention tensor, defined once for the op and its backends.

"Heads inner" is the layout of a Transformer's transposed projections, ``(B, L, H, D)`` in memory, and what SDPA's
kernels return for them; the other is plain contiguous ``(B, H, L, D)``. The op's fake kernels promise these exact
strides (compiled code reads outputs with them), so the op and the backends must compute them the same way.
"""

from __future__ import annotations

from torch import Tensor


def strides(shape: tuple[int, ...], heads_inner: bool) -> tuple[int, int, int, int]:
    """The strides ``torch.empty`` gives the layout (a 0 size counts as 1 for the dims outside it)."""
    _, H, L, D = shape
    H, L, D = max(H, 1), max(L, 1), max(D, 1)
    return (L * H * D, D, H * D, 1) if heads_inner else (H * L * D, L * D, D, 1)


def new_empty(like: Tensor, shape: tuple[int, ...], heads_inner: bool) -> Tensor:
    """An uninitialized tensor in the layout (empty_strided, not a transposed view: autograd refuses in-place
    edits of a custom op's output that is a view)."""
    return like.new_empty_strided(tuple(shape), strides(shape, heads_inner))
