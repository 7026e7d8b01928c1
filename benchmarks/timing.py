"""Careful timers: CUDA events with L2 hygiene, optional CUDA-graph replay, perf_counter on CPU.

Rules followed (DESIGN §5):

* The first call of a step (compilation, autotuning, lazy initialisation) happens before any timer starts; a
  warm-up loop follows, then a fixed-size timed loop whose repetition count comes from a time budget.
* On CUDA every repetition is bracketed by its own pair of events, so the result is a distribution (median
  and p20–p80 are reported, not a mean that one hiccup can move).
* The L2 cache never holds a repetition's inputs from the previous one: inputs that fit in L2 are rotated
  over several independent copies; larger inputs are preceded by a write of a buffer larger than L2. The
  flush runs outside the event pair, so it is not timed.
* ``torch.cuda.synchronize`` brackets every timed loop and the peak-memory measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.common import Step

# H100 has 50 MiB of L2, A100 40 MiB; used only when the device does not report its size.
_DEFAULT_L2 = 50 * 2**20


@dataclass
class Timing:
    """Samples of one measurement (milliseconds per step) and how they were taken."""

    method: str
    samples_ms: list[float]
    warmup_reps: int
    l2: str
    steps_per_sample: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        s = np.asarray(self.samples_ms, dtype=np.float64)
        p20, p25, p50, p75, p80 = np.percentile(s, [20, 25, 50, 75, 80])
        return {
            "method": self.method,
            "l2": self.l2,
            "reps": int(s.size),
            "warmup_reps": self.warmup_reps,
            "steps_per_sample": self.steps_per_sample,
            "median_ms": float(p50),
            "p20_ms": float(p20),
            "p80_ms": float(p80),
            "iqr_ms": float(p75 - p25),
            "min_ms": float(s.min()),
            "mean_ms": float(s.mean()),
            "samples_ms": [round(float(x), 6) for x in s],
            **self.extra,
        }


@dataclass(frozen=True)
class Budget:
    """How long to measure: warm-up at least ``warmup_reps`` and ``warmup_s``; then enough repetitions to
    fill ``measure_s``, clamped to [min_reps, max_reps]."""

    measure_s: float = 0.15
    min_reps: int = 10
    max_reps: int = 200
    warmup_reps: int = 3
    warmup_s: float = 0.03


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2)


def plan_rotation(input_bytes: int, l2_bytes: int, max_sets: int = 32) -> int:
    """How many independent input sets to rotate over: enough that the sets not in use span 2x L2 (so the
    set about to be used was evicted), or 1 when one set alone is larger than L2 (then flushing is used)."""
    if l2_bytes <= 0 or input_bytes <= 0 or input_bytes > l2_bytes:
        return 1
    return int(min(max_sets, max(2, math.ceil(2 * l2_bytes / input_bytes) + 1)))


class L2Flusher:
    """Evicts L2 by writing a buffer of twice its size (at least 256 MiB)."""

    def __init__(self, device: torch.device) -> None:
        n = max(256 * 2**20, 2 * l2_cache_bytes(device))
        self.buf = torch.empty(n // 4, dtype=torch.int32, device=device)
        self.nbytes = n

    def __call__(self) -> None:
        self.buf.fill_(1)  # a write: a plain read could leave dirty lines of the step's inputs resident


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup(steps: Sequence[Step], device: torch.device, budget: Budget) -> tuple[int, float]:
    """Run steps round robin until the warm-up minimums are met; return (reps, seconds per rep)."""
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    while n < budget.warmup_reps or time.perf_counter() - t0 < budget.warmup_s:
        steps[n % len(steps)]()
        n += 1
        if n >= budget.warmup_reps:
            _sync(device)  # the clock check above must see finished GPU work, not queued launches
    _sync(device)
    return n, (time.perf_counter() - t0) / max(n, 1)  # no warm-up asked for (--one-rep): 0 s per rep


def _rep_count(per_rep_s: float, budget: Budget) -> int:
    want = math.ceil(budget.measure_s / max(per_rep_s, 1e-7))
    return int(min(budget.max_reps, max(budget.min_reps, want)))


def time_steps(steps: Sequence[Step], device: torch.device, budget: Budget, flusher: L2Flusher | None = None) -> Timing:
    """Time eager steps: ``steps`` are the same computation on rotated input sets (use them round robin)."""
    warm, per_rep = _warmup(steps, device, budget)
    reps = _rep_count(per_rep, budget)
    rotation = f"rotate x{len(steps)}" if len(steps) > 1 else "single input set"
    if device.type != "cuda":
        samples = []
        for i in range(reps):
            t0 = time.perf_counter()
            steps[i % len(steps)]()
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing("cpu perf_counter per rep", samples, warm, "n/a (cpu)")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        if flusher is not None:
            flusher()
        starts[i].record()
        steps[i % len(steps)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    l2 = rotation + (f" + flush {flusher.nbytes >> 20} MiB" if flusher is not None else "")
    return Timing("cuda events per rep (eager)", samples, warm, l2)


def time_graph(steps: Sequence[Step], device: torch.device, budget: Budget, flusher: L2Flusher | None = None) -> Timing:
    """Capture one pass over all input sets into a CUDA graph and time its replays.

    One sample = one replay; it is divided by the number of steps in the graph so the result is per step.
    Capture follows PyTorch's recipe: warm up on a side stream first (lazy init must not be captured).
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            for step in steps:
                step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    replay_budget = Budget(budget.measure_s, budget.min_reps, budget.max_reps, budget.warmup_reps, 0.0)
    warm, per_rep = _warmup([graph.replay], device, replay_budget)
    reps = _rep_count(per_rep, budget)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        if flusher is not None:
            flusher()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    k = len(steps)
    samples = [s.elapsed_time(e) / k for s, e in zip(starts, ends, strict=True)]
    del graph
    l2 = (f"rotate x{k} inside the graph" if k > 1 else "single input set") + (
        f" + flush {flusher.nbytes >> 20} MiB" if flusher is not None else ""
    )
    return Timing("cuda graph replay, cuda events per replay", samples, warm, l2, steps_per_sample=k)


def memory_use(step: Step, device: torch.device) -> tuple[int | None, int | None]:
    """``(peak, kept)`` bytes of one step beyond what was allocated before it (inputs, caches, buffers).

    ``peak``: the most allocated at any point during the step. ``kept``: what is still allocated while the
    step's result is alive: for a training forward (mode ``fwd``) the output plus every activation autograd
    saved for backward. ``(None, None)`` on CPU, where PyTorch keeps no such counters.
    """
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    kept = torch.cuda.memory_allocated(device) - base
    del out
    return int(peak), int(kept)
