"""Configuration of the Triton convolution: per-GPU block tables, the per-layer algorithm choice, and hooks.

Two decisions are made per call, both from committed data (no autotuning at run time: every process and every
DDP rank on one GPU model runs the same kernels, and nothing is timed during tracing or CUDA-graph capture):

* **Block sizes** of the implicit-GEMM kernel (:mod:`.implicit_gemm_kernels`): :data:`TABLES`, keyed by the GPU's
  shared-memory class (80: A100, 89: 99 KiB parts and the fallback, 90: H100/H200; see
  :func:`ptfast.backends.triton.gpu_class`) and within a class by (bytes per element, Cout bucket). Every entry
  is registered with the compile-for-target check for its own class.
* **Algorithms** for each GEMM of a layer (:class:`Algos`): the forward as the fused implicit GEMM or as cuDNN
  followed by the fused epilogue kernel; the input gradient (dgrad) as the Triton implicit GEMM or cuDNN; the
  weight gradient (wgrad) as a Triton split-row GEMM or cuDNN. :data:`LAYER_ALGOS` holds per-GPU,
  per-layer-shape exceptions to :data:`DEFAULT_ALGOS`; an entry may only come from a side-by-side measurement
  on that GPU class (``python -m benchmarks.run --op conv_relu --op conv_relu_pool`` reports every algorithm).
  No GPU has run these kernels yet, so the table holds no entries and every layer takes the default.

This module does not import triton. Hooks (process-global, not per thread: autograd runs backward on another
thread): :func:`use_blocks` forces block sizes, :func:`use_algos` (or ``PTFAST_CONV_FORWARD`` =
``implicit_gemm`` / ``cudnn``, ``PTFAST_CONV_DGRAD`` and ``PTFAST_CONV_WGRAD`` = ``triton`` / ``cudnn``) forces
algorithms.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ptfast.backends.triton import GPU_CLASSES, device_class


@dataclass(frozen=True)
class ConvBlocks:
    """One launch configuration of the implicit-GEMM kernel (BLOCK_M rows = output pixels, BLOCK_N = Cout)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Algos:
    forward: str  # "implicit_gemm": fused Triton GEMM + epilogue; "cudnn": cuDNN conv, then the epilogue kernel
    dgrad: str  # "triton": the implicit-GEMM kernel on the flipped weight; "cudnn": convolution_backward
    wgrad: str  # "triton": split-row GEMM kernel, deterministic; "cudnn": convolution_backward


FORWARD_ALGOS = ("implicit_gemm", "cudnn")
DGRAD_ALGOS = ("triton", "cudnn")
WGRAD_ALGOS = ("triton", "cudnn")
DEFAULT_ALGOS = Algos(forward="implicit_gemm", dgrad="cudnn", wgrad="cudnn")
# NCHW activations: a K chunk of the implicit GEMM (consecutive channels) is H*W elements apart in memory, so
# every A load is a gather; cuDNN transposes internally. The implicit GEMM is for channels_last.
NCHW_ALGOS = Algos(forward="cudnn", dgrad="cudnn", wgrad="cudnn")

# GPU class -> (bytes per element, Cin, Cout, conv-output height) -> Algos for channels_last activations.
# Filled from measurements only.
LAYER_ALGOS: dict[int, dict[tuple[int, int, int, int], Algos]] = {c: {} for c in GPU_CLASSES}

GROUP_M = 8
COUT_BUCKETS = (64, 128)  # Cout <= 64 (VGG's first block) takes narrower column tiles

# Tiles of a plain Triton GEMM sized to each class's shared memory: A and B stages of
# (BLOCK_M + BLOCK_N) * BLOCK_K elements, plus the epilogue's tile re-layout after the loop. Untimed. The half
# entries of sm_80 and sm_90 are hot variants (no register spill on Triton 3.6 through 3.9): sm_80's 64-channel
# entry runs 8 warps because with 4 the RGB stem's flat K walk (per-element index math next to a 64-register
# accumulator) spilled.
_C = ConvBlocks
TABLES: dict[int, dict[tuple[int, int], ConvBlocks]] = {
    90: {
        (2, 64): _C(128, 64, 64, 4, 4),
        (2, 128): _C(128, 128, 64, 8, 3),
        (4, 64): _C(128, 64, 32, 4, 3),
        (4, 128): _C(128, 128, 32, 8, 3),
    },
    80: {
        (2, 64): _C(128, 64, 64, 8, 3),
        (2, 128): _C(128, 128, 64, 8, 3),
        (4, 64): _C(128, 64, 32, 4, 3),
        (4, 128): _C(128, 128, 32, 8, 2),
    },
    89: {
        (2, 64): _C(128, 64, 32, 4, 3),
        (2, 128): _C(128, 128, 32, 8, 2),
        (4, 64): _C(64, 64, 32, 4, 2),
        (4, 128): _C(64, 128, 16, 4, 2),
    },
}

# Rows reduced per step of the weight-gradient kernel, by bytes per element; its output tile is the table's
# (BLOCK_N of Cout) x (BLOCK_K of K).
WGRAD_BLOCK_M = {2: 64, 4: 32}

# Under TRITON_INTERPRET (CPU) only correctness matters: small tiles so odd test sizes span several tiles in M,
# N and K, and partial K chunks in the flat walk.
INTERPRETER_BLOCKS = _C(32, 16, 16, 4, 1)

_lock = threading.Lock()
_forced_blocks: list[ConvBlocks | None] = [None]
_forced_algos: dict[str, str | None] = {"forward": None, "dgrad": None, "wgrad": None}
_CHOICES = {"forward": FORWARD_ALGOS, "dgrad": DGRAD_ALGOS, "wgrad": WGRAD_ALGOS}


def flat_block_k(elem_size: int, interpreter: bool = False) -> int:
    """K chunk of the flat walk (small or odd Cin): 32 columns fit a 3x3x3 layer (27) in one chunk."""
    return 16 if interpreter else 32


def wgrad_block_m(device: torch.device, dtype: torch.dtype) -> int:
    """Rows reduced per step of the weight-gradient kernel (its GEMM's K)."""
    if device.type != "cuda":
        return INTERPRETER_BLOCKS.block_m
    return WGRAD_BLOCK_M[min(dtype.itemsize, 4)]


def cout_bucket(cout: int) -> int:
    return next((b for b in COUT_BUCKETS if cout <= b), COUT_BUCKETS[-1])


def blocks_for(device: torch.device, dtype: torch.dtype, cout: int) -> ConvBlocks:
    """The launch configuration for a conv on ``device`` in ``dtype`` with ``cout`` GEMM columns (no host sync)."""
    if _forced_blocks[0] is not None:
        return _forced_blocks[0]
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    elem = min(dtype.itemsize, 4)
    return TABLES[device_class(device)][(elem, cout_bucket(cout))]


def k_walk(cin: int, blocks: ConvBlocks, device: torch.device) -> tuple[bool, int]:
    """``(FLAT_K, BLOCK_K)``: the tap walk when Cin is a multiple of 16, with the largest power-of-two chunk
    (<= the table's) that divides Cin so no chunk is partial; the flat walk otherwise."""
    if cin % 16:
        return True, flat_block_k(0, interpreter=device.type != "cuda")
    block_k = blocks.block_k
    while cin % block_k:
        block_k //= 2
    return False, block_k


def algos_for(
    device: torch.device, dtype: torch.dtype, cin: int, cout: int, conv_h: int, *, channels_last: bool = True
) -> Algos:
    """The algorithms for one layer: forced (hook or environment), else the GPU's table entry for channels_last
    activations (:data:`NCHW_ALGOS` for NCHW ones), else the default."""
    base = DEFAULT_ALGOS if channels_last else NCHW_ALGOS
    if device.type == "cuda" and channels_last:
        elem = dtype.itemsize
        base = LAYER_ALGOS[device_class(device)].get((elem, cin, cout, conv_h), DEFAULT_ALGOS)
    chosen = {}
    for kind, choices in _CHOICES.items():
        env = f"PTFAST_CONV_{kind.upper()}"
        value = _forced_algos[kind] or os.environ.get(env) or getattr(base, kind)
        if value not in choices:
            raise ValueError(f"{env} must be one of {choices}, got {value!r}")
        chosen[kind] = value
    return Algos(**chosen)


@contextmanager
def use_algos(forward: str | None = None, dgrad: str | None = None, wgrad: str | None = None) -> Iterator[None]:
    """Force the forward (``"implicit_gemm"`` / ``"cudnn"``), dgrad and/or wgrad (``"triton"`` / ``"cudnn"``)
    algorithm of the triton conv backend (process-wide; overrides the tables and the environment)."""
    new = {"forward": forward, "dgrad": dgrad, "wgrad": wgrad}
    for kind, value in new.items():
        if value is not None and value not in _CHOICES[kind]:
            raise ValueError(f"use_algos: {kind} must be one of {_CHOICES[kind]}, got {value!r}")
    with _lock:
        old = dict(_forced_algos)
        _forced_algos.update({k: v for k, v in new.items() if v is not None})
    try:
        yield
    finally:
        with _lock:
            _forced_algos.update(old)


@contextmanager
def use_blocks(block_m: int, block_n: int, block_k: int) -> Iterator[None]:
    """Force the implicit-GEMM tile (process-wide): powers of two, ``block_m`` and the others >= 16."""
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"use_blocks: {name} must be a power of two >= 16, got {v}")
    with _lock:
        old = _forced_blocks[0]
        _forced_blocks[0] = ConvBlocks(block_m, block_n, block_k, 4, 1)
    try:
        yield
    finally:
        with _lock:
            _forced_blocks[0] = old
