"""Shared types of the benchmark harness: options, cases, providers and op specs.

An *op spec* (one module per op family under ``benchmarks/ops/``) says which shapes to run, how to build
random inputs, how many FLOPs / bytes a shape is worth and which *providers* (ptfast backends, PyTorch
baselines, third-party kernels) compete. A provider turns one input set into a zero-argument *step*; the
runner only ever times steps, so every provider is measured by the same code.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Timed modes. ``fwd`` is a training forward (inputs require grad, so autograd state is saved);
#: ``fwd+bwd`` adds the backward to the inputs; ``infer`` is a forward under ``torch.no_grad``.
MODES: tuple[str, ...] = ("fwd", "fwd+bwd", "infer")
DEFAULT_MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
#: The mode of whole-model training-step ops (``OpSpec.modes = (TRAIN_MODE,)``): forward + backward + optimizer
#: step, all inside the provider's step. Not a ``--modes`` choice: such an op always runs its own modes.
TRAIN_MODE = "train"

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
    #: "tflops", "gbps" or "items" (``items_label``/s): the number plotted.
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
    #: The modes this op is timed in when not the usual ones (e.g. ``(TRAIN_MODE,)`` for a whole training step,
    #: which ``make_step`` cannot express); ``--modes`` then does not apply to it. None: ``--modes``.
    modes: tuple[str, ...] | None = None
    #: Useful items one step processes (real tokens, images): the report adds an ``<items_label>/s`` column.
    items: Callable[[Case], float] | None = None
    items_label: str = "items"
    #: Shown in the report's method section: what one timed step of this op does, when not the generic text.
    step_doc: str = ""
    #: Extra entries for the results' metadata (e.g. which implementation of a model was built), shown in the report.
    metadata: Callable[[Options], dict[str, Any]] | None = None
    #: --check-backends tolerance on fwd+bwd gradients by dtype, where the run's generic bound does not fit the op
    #: (e.g. a max-pool: bf16 ties decided differently by two correct kernels move whole gradients).
    grads_check_tol: dict[Any, float] = field(default_factory=dict)


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


# --- whole-model training steps (TRAIN_MODE) -----------------------------------------------------------------
#
# A training-step provider owns a copy of the op's initial model and an optimizer. The runner builds one step per
# rotated input set (several only for small models on CUDA); those steps share the provider's model and optimizer
# and differ only in the batch, so the model is copied once per provider, and only the latest provider's copy is
# kept alive (its weights, gradients and optimizer state would otherwise pile up over a case's providers).


def train_autocast(opts: Options) -> contextlib.AbstractContextManager[None]:
    """Mixed precision as trainers run it: fp32 parameters, the forward under ``torch.autocast`` in the run dtype
    (bf16 by default) on CUDA; plain fp32 on CPU or with ``--dtype fp32``."""
    if not opts.cuda or opts.dtype == torch.float32:
        return contextlib.nullcontext()
    if opts.dtype == torch.float16:
        raise Skip("fp16 training needs a GradScaler, which this step does not model: use --dtype bf16 or fp32")
    return torch.autocast("cuda", dtype=opts.dtype)


@contextlib.contextmanager
def no_dropout(model: nn.Module) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` at p=0 (Hugging Face attention reads its dropout module's p too)."""
    mods = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    old = [m.p for m in mods]
    for m in mods:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(mods, old, strict=True):
            m.p = p


_initial: dict[tuple[Any, ...], tuple[int, nn.Module]] = {}
_tokens = itertools.count()


def initial_model(key: tuple[Any, ...], make: Callable[[], nn.Module]) -> tuple[int, nn.Module]:
    """``(token, model)``: the case's initial model, built once and shared by all its input sets (one cached)."""
    if key not in _initial:
        _initial.clear()
        _initial[key] = (next(_tokens), make())
    return _initial[key]


@dataclass
class TrainState:
    """One provider's copy of the model, the loss function of one input set, its optimizer, and the loss of a
    dropout-free forward at the initial weights (the value compared across providers; None: not checked)."""

    model: nn.Module
    loss: Callable[[Inputs], Tensor]
    optimizer: torch.optim.Optimizer
    check: Tensor | None = None


_train_states: dict[tuple[Any, ...], TrainState] = {}


def train_state(key: tuple[Any, ...], make: Callable[[], TrainState]) -> TrainState:
    """The state for ``key`` (provider, initial-model token), made on first use; any other state is freed first."""
    if key not in _train_states:
        _train_states.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _train_states[key] = make()
    return _train_states[key]


@contextlib.contextmanager
def training_op(cudnn_benchmark_on: bool = False) -> Iterator[None]:
    """``OpSpec.setup`` of training-step ops: optional ``cudnn.benchmark``, and on exit the cached initial model and
    the last provider's model, gradients and optimizer state are freed (so later ops do not run beside them)."""
    with cudnn_benchmark(True) if cudnn_benchmark_on else contextlib.nullcontext():
        try:
            yield
        finally:
            _initial.clear()
            _train_states.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def train_step(
    state: TrainState, inputs: Inputs, context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Step:
    """forward (under ``context()``: autocast, backend) -> ``loss.backward()`` -> ``optimizer.step()`` ->
    ``optimizer.zero_grad(set_to_none=True)``. Returns ``(loss, check)``; gradients are freed at the end, so the
    runner's peak memory (measured from before the step) counts them with the activations."""

    def step() -> tuple[Tensor, Tensor | None]:
        with context():
            loss = state.loss(inputs)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), state.check

    return step


def train_check(case: Case, inputs: Inputs, out: Any) -> Tensor | None:
    """``Provider.canonical`` of training steps: the dropout-free initial loss the step carries."""
    return out[1]


def dropout_free_loss(
    model: nn.Module,
    loss: Callable[[Inputs], Tensor],
    inputs: Inputs,
    context: Callable[[], contextlib.AbstractContextManager[Any]],
) -> Tensor:
    """The loss of one training-mode forward with every dropout at p=0 (no update): comparable across providers
    whose dropout random streams differ."""
    with no_dropout(model), torch.no_grad(), context():
        return loss(inputs).detach().float().reshape(1)
