"""Shared types of the benchmark harness: options, cases, providers and op specs.

An *op spec* (one module per op family under ``benchmarks/ops/``) says which shapes to run, how to build
random inputs, how many FLOPs / bytes a shape is worth and which *providers* (ptfast backends, PyTorch
baselines, third-party kernels) compete. A provider turns one input set into a zero-argument *step*; the
runner only ever times steps, so every provider is measured by the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Timed modes. ``fwd`` is a training forward (inputs require grad, so autograd state is saved);
#: ``fwd+bwd`` adds the backward to the inputs; ``infer`` is a forward under ``torch.no_grad``.
MODES: tuple[str, ...] = ("fwd", "fwd+bwd", "infer")
DEFAULT_MODES: tuple[str, ...] = ("fwd", "fwd+bwd")

Inputs = dict[str, Any]
Step = Callable[[], object]


class Skip(Exception):
    """A provider cannot run a case; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Options:
    """Run-wide settings every spec sees (from the command line)."""

    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    quick: bool = False
    full: bool = False
    compile: bool = True
    max_autotune: bool = False
    cuda_graphs: bool = False
    deterministic: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One shape of an op. ``params`` must be JSON-serialisable (it is written to the results)."""

    name: str
    params: dict[str, Any]
    #: Small enough that launch overhead matters: also timed under a CUDA graph when --cuda-graphs is given.
    graph: bool = False


@dataclass
class Provider:
    """One competitor. ``build(case, inputs, mode)`` returns the step to time or raises (see ``run.py``
    for which exceptions count as "skipped")."""

    name: str
    kind: str  # "ptfast", "pytorch" or "external"
    description: str
    build: Callable[[Case, Inputs, str], Step]
    #: Maps a forward output to the form the spec compares across providers (e.g. packed real tokens).
    canonical: Callable[[Case, Inputs, Any], Tensor] | None = None


@dataclass
class OpSpec:
    """Everything the runner needs to benchmark one op."""

    name: str
    title: str
    cases: Callable[[Options], list[Case]]
    make_inputs: Callable[[Case, Options, int], Inputs]
    providers: Callable[[Options], list[Provider]]
    flops: Callable[[Case, str], float | None]
    baseline: str
    bytes_moved: Callable[[Case, str], float | None] | None = None
    #: "tflops" or "gbps": the number plotted.
    metric: str = "tflops"
    #: Derived rows: name -> providers it picks the fastest successful one from (e.g. "sdpa[best]").
    best_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Providers whose forward output is the reference for the error column, in order of preference.
    reference: tuple[str, ...] = ()
    #: Context entered around the whole op (e.g. ``cudnn.benchmark = True``).
    setup: Callable[[Options], contextlib.AbstractContextManager[None]] | None = None
    #: Free-form lines for the report (e.g. published numbers of baselines that cannot run here).
    notes: list[str] = field(default_factory=list)
    #: Shown in the report: what each case parameter means.
    case_doc: str = ""


def make_step(forward: Callable[[], Any], leaves: Sequence[Tensor], mode: str, grad: Tensor | None) -> Step:
    """Wrap a forward into the step for ``mode``.

    The backward uses ``torch.autograd.grad`` rather than ``.backward()`` so no ``.grad`` accumulates between
    repetitions (an accumulation would add a kernel per leaf that the op does not need).
    """
    if mode == "fwd":
        return forward
    if mode == "infer":

        def infer() -> Any:
            with torch.no_grad():
                return forward()

        return infer
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}")
    leaves = [t for t in leaves if t is not None and t.requires_grad]

    def step() -> Any:
        out = forward()
        return torch.autograd.grad(out, leaves, grad_outputs=grad)

    return step


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` so random inputs are created where they live (no host copy)."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Sequence[int], opts: Options, g: torch.Generator, scale: float = 1.0, **kw: Any) -> Tensor:
    """Normal random tensor in the run dtype (never zeros: hygiene rule 1)."""
    t = torch.randn(tuple(shape), device=opts.device, dtype=torch.float32, generator=g)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(opts.dtype, **kw)


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in an input set (for L2 rotation planning); views count their base once."""
    seen: set[int] = set()
    total = 0

    def visit(x: Any) -> None:
        nonlocal total
        if isinstance(x, Tensor):
            if x.is_nested:
                return
            storage = x.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(obj)
    return total


def import_ptfast() -> Any:
    """Import ptfast lazily so a broken op module shows up as a skipped provider, not a crashed run."""
    import ptfast

    return ptfast


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """Turn on cuDNN's per-shape algorithm search for an op (restored afterwards)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


_compiled: dict[tuple[int, str], Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any], mode: str | None = None) -> Callable[..., Any]:
    """``torch.compile(fn, mode=mode, dynamic=False)``, built once per (function, mode).

    ``dynamic=False``: each benchmarked shape gets its own static-shape graph, as it would in a model whose
    layer shapes never change (the default ``dynamic=None`` would switch to dynamic shapes after the second
    shape and benchmark a different kernel).
    """
    key = (id(fn), mode or "default")
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, mode=mode, dynamic=False)
    return _compiled[key]


def require_compile(opts: Options) -> None:
    if not opts.compile:
        raise Skip("torch.compile providers are off (default on CPU; pass --compile)")
