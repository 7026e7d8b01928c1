"""Block sizes of the Triton attention kernels: committed per-GPU tables, a heuristic, and test/tuning hooks.

No autotuning at run time: every process (and every DDP rank) on the same GPU model picks the same kernels, and
nothing is measured during CUDA-graph capture or tracing. The tables are keyed by the shared-memory class of the
GPU (the limit that decides which tiles fit):

* ``90``: H100/H200 (sm_90, 227 KiB of shared memory per block);
* ``80``: A100 (sm_80, 163 KiB);
* ``89``: L4, RTX 40xx, A10/RTX 30xx (sm_89/sm_86, 99 KiB) — also the fallback for any other GPU.

and within a table by (bytes per element of q, padded head dim). Every entry is registered with the
compile-for-target check (``ptfast.backends.triton.attention_kernels``), which compiles it for its GPU class and
fails when it needs more shared memory than that class has.

This module does not import triton, so ``supports()`` and the tables are usable without it.

Hooks (process-global, not per thread: autograd runs backward on another thread):

* :func:`use_blocks` forces block sizes (tests use it to check that forward and backward agree across tilings);
* :func:`use_atomic_dq` (or ``PTFAST_ATTENTION_ATOMIC_DQ=1``) turns on the opt-in backward that accumulates dQ
  with fp32 atomics inside the dK/dV kernel: one kernel fewer, but the summation order (so the last bits of dQ)
  varies run to run. The default backward is deterministic (bitwise reproducible run to run and across processes).
  With the atomic mode on, ``torch.use_deterministic_algorithms(True)`` refuses it with PyTorch's usual error
  when the backward runs (``warn_only=True``: PyTorch's usual warning, and it runs).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ptfast.backends.triton import GPU_CLASSES, device_class, gpu_class  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Blocks:
    """One kernel launch configuration."""

    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelBlocks:
    forward: Blocks
    backward_kv: Blocks  # dK/dV kernel: one program per key block, loops over query blocks
    backward_q: Blocks  # dQ kernel: one program per query block, loops over key blocks
    # The forward with dropout, where it needs narrower key tiles: the keep-mask hash of a score tile is live
    # next to the accumulator, and at head dim 128 the wide tile spills (FlashAttention-2 narrows it the same way).
    forward_dropout: Blocks | None = None

    def forward_for(self, dropout: bool) -> Blocks:
        """The forward's launch configuration, with or without dropout."""
        return self.forward_dropout if dropout and self.forward_dropout is not None else self.forward


MAX_HEAD_DIM = 256
HEAD_DIM_BUCKETS = (64, 128, 256)  # head dims up to 64 share a config (their tiles are smaller still)

# (bytes per element, head-dim bucket) -> configs. Forward: FlashAttention-2 style 128 x 64 tiles for half
# types where registers allow; backward: narrow query tiles against wide key tiles for dK/dV and the reverse
# for dQ (each program keeps its accumulator in registers). The half-precision entries of sm_80 and sm_90 for
# head dims 64 and 128 are the hot variants: their warps per tile (8 where 4 spilled: half the accumulator
# rows per thread) were chosen so that they compile without a register spill on Triton 3.6 through 3.9.
_B = Blocks
TABLES: dict[int, dict[tuple[int, int], KernelBlocks]] = {
    90: {
        (2, 64): KernelBlocks(_B(128, 64, 8, 3), _B(32, 128, 8, 3), _B(128, 32, 4, 3)),
        (2, 128): KernelBlocks(_B(128, 64, 8, 3), _B(32, 128, 8, 2), _B(128, 32, 8, 2), _B(128, 32, 8, 3)),
        (2, 256): KernelBlocks(_B(64, 32, 4, 2), _B(32, 64, 8, 2), _B(64, 32, 8, 2)),
        (4, 64): KernelBlocks(_B(64, 64, 4, 2), _B(32, 64, 4, 2), _B(64, 32, 4, 2)),
        (4, 128): KernelBlocks(_B(64, 32, 4, 2), _B(32, 64, 8, 2), _B(64, 32, 8, 2)),
        (4, 256): KernelBlocks(_B(32, 32, 4, 2), _B(16, 32, 8, 1), _B(32, 16, 8, 1)),
    },
    80: {
        (2, 64): KernelBlocks(_B(128, 64, 8, 3), _B(32, 128, 8, 2), _B(128, 32, 8, 2)),
        (2, 128): KernelBlocks(_B(128, 64, 8, 2), _B(32, 64, 8, 2), _B(64, 32, 8, 2), _B(128, 32, 8, 2)),
        (2, 256): KernelBlocks(_B(64, 32, 4, 2), _B(16, 64, 8, 1), _B(64, 16, 8, 1)),
        (4, 64): KernelBlocks(_B(64, 64, 4, 2), _B(32, 64, 4, 2), _B(64, 32, 4, 2)),
        (4, 128): KernelBlocks(_B(64, 32, 4, 2), _B(32, 32, 8, 2), _B(32, 32, 8, 2)),
        (4, 256): KernelBlocks(_B(32, 32, 4, 1), _B(16, 32, 8, 1), _B(32, 16, 8, 1)),
    },
    89: {
        (2, 64): KernelBlocks(_B(128, 64, 4, 2), _B(32, 64, 4, 2), _B(64, 32, 4, 2)),
        (2, 128): KernelBlocks(_B(64, 64, 4, 2), _B(32, 64, 8, 1), _B(64, 32, 8, 1)),
        (2, 256): KernelBlocks(_B(64, 32, 4, 1), _B(16, 32, 8, 1), _B(32, 16, 8, 1)),
        (4, 64): KernelBlocks(_B(64, 32, 4, 2), _B(32, 32, 4, 2), _B(32, 32, 4, 2)),
        (4, 128): KernelBlocks(_B(32, 32, 4, 2), _B(16, 32, 4, 1), _B(32, 16, 4, 1)),
        (4, 256): KernelBlocks(_B(32, 16, 4, 1), _B(16, 16, 4, 1), _B(16, 16, 4, 1)),
    },
}

# Under TRITON_INTERPRET (CPU) only correctness matters; small tiles make odd test lengths span several blocks.
INTERPRETER_BLOCKS = KernelBlocks(_B(32, 32, 4, 1), _B(32, 32, 4, 1), _B(32, 32, 4, 1))


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width (>= 16, ``tl.dot``'s minimum) a head dim is padded to inside the kernels."""
    return max(16, 1 << (head_dim - 1).bit_length())


def head_dim_bucket(head_dim: int) -> int:
    d = padded_head_dim(head_dim)
    return next(b for b in HEAD_DIM_BUCKETS if d <= b)


_lock = threading.Lock()
_forced: dict[str, Blocks | None] = {"forward": None, "backward": None}
_atomic_dq: list[bool | None] = [None]


def _forced_blocks(kind: str, base: Blocks) -> Blocks:
    forced = _forced[kind]
    return base if forced is None else forced


def blocks_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelBlocks:
    """The launch configuration for inputs on ``device`` of ``dtype`` with this head dim (no host sync)."""
    if device.type == "cuda":
        key = (dtype.itemsize, head_dim_bucket(head_dim))
        base = TABLES[device_class(device)][(min(key[0], 4), key[1])]
    else:
        base = INTERPRETER_BLOCKS
    return KernelBlocks(
        _forced_blocks("forward", base.forward),
        _forced_blocks("backward", base.backward_kv),
        _forced_blocks("backward", base.backward_q),
        None if base.forward_dropout is None else _forced_blocks("forward", base.forward_dropout),
    )


def _check_pair(name: str, pair: tuple[int, int]) -> Blocks:
    m, n = pair
    for v in (m, n):
        if v < 16 or v & (v - 1):
            raise ValueError(f"use_blocks: {name} block sizes must be powers of two >= 16, got {pair}")
    return Blocks(m, n, 4, 1)


@contextmanager
def use_blocks(forward: tuple[int, int] | None = None, backward: tuple[int, int] | None = None) -> Iterator[None]:
    """Force ``(BLOCK_M, BLOCK_N)`` for the forward and/or both backward kernels (process-wide)."""
    new = {
        "forward": _check_pair("forward", forward) if forward is not None else None,
        "backward": _check_pair("backward", backward) if backward is not None else None,
    }
    with _lock:
        old = dict(_forced)
        _forced.update({k: v for k, v in new.items() if v is not None})
    try:
        yield
    finally:
        with _lock:
            _forced.update(old)


@contextmanager
def use_atomic_dq(enabled: bool = True) -> Iterator[None]:
    """Turn the atomic-dQ backward on or off (process-wide), overriding ``PTFAST_ATTENTION_ATOMIC_DQ``."""
    with _lock:
        old = _atomic_dq[0]
        _atomic_dq[0] = bool(enabled)
    try:
        yield
    finally:
        with _lock:
            _atomic_dq[0] = old


def atomic_dq_enabled() -> bool:
    """Whether the atomic-dQ backward was asked for (``use_atomic_dq`` wins over ``PTFAST_ATTENTION_ATOMIC_DQ``)."""
    if _atomic_dq[0] is not None:
        return _atomic_dq[0]
    return os.environ.get("PTFAST_ATTENTION_ATOMIC_DQ", "0") not in ("", "0")


def backward_uses_atomic_dq() -> bool:
    """The backward's mode, checked when it runs: atomic dQ if asked for, refused under deterministic mode."""
    if not atomic_dq_enabled():
        return False
    from ptfast.backends.triton import alert_not_deterministic

    alert_not_deterministic("ptfast.attention backward with atomic dQ (use_atomic_dq / PTFAST_ATTENTION_ATOMIC_DQ)")
    return True
