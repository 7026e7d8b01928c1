"""The Triton backend: shared availability checks (triton is optional and never imported by ``import ptfast``).

Triton kernels run on CUDA tensors of compute capability 8.0 or newer, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported (the test suite's interpreter tier).

Faults (see :mod:`ptfast._dispatch`): a missing or broken triton or a GPU older than sm_80 is a
:class:`~ptfast._dispatch.Fault` reason for CUDA tensors; a launch grid over the hardware limits is refused by
:func:`checked` before the launch; :func:`classify_fault` tells Triton's build errors (compile failure, ptxas
failure, more shared memory than the GPU has) from everything else, which propagates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ptfast import _dispatch
from ptfast._compiling import probe_cache
from ptfast._dispatch import Fault, KernelFault, constant_while_compiling

MIN_CAPABILITY = (8, 0)
# The per-GPU tables of block sizes are keyed by these shared-memory classes (see attention_config).
GPU_CLASSES = (80, 89, 90)


# TRITON_INTERPRET as this process set it, read once at import: Triton reads it when a kernel module is imported,
# so a later change would not take effect anyway; and ``auto`` asks on every call (an environment lookup each time
# is measurable per call on a CPU). A constant, not a cached function: see _compiling.probe_cache for why not
# functools.cache.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU tensors in this process (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETER


if interpreter_enabled():
    _dispatch.register_cpu_backend("triton")


@probe_cache
def _import_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton: the triton package is not installed (pip install 'ptfast[triton]')"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not take the torch backend down
        return f"triton: importing triton failed ({type(exc).__name__}: {exc})"
    return None


@probe_cache
def _capability_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        return Fault(
            f"triton: GPU compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            "(the kernels need sm_80 or newer)"
        )
    return None


def device_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (``None`` if they can).

    CPU tensors without the interpreter are outside the backend's coverage (a plain reason); a CUDA tensor that
    cannot use the kernels because triton is missing or broken, or the GPU is too old, is a :class:`Fault`.
    """
    if device.type == "cpu" and not interpreter_enabled():
        return "triton: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    if device.type not in ("cpu", "cuda"):
        return f"triton: device type {device.type!r} is not supported"
    reason = _import_reason()
    if reason is not None:
        return Fault(reason) if device.type == "cuda" else reason
    if device.type == "cuda":
        if interpreter_enabled():
            return "triton: TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return _capability_reason(device.index if device.index is not None else torch.cuda.current_device())
    return None


def usable_reason() -> str | None:
    """Whether this process can run Triton kernels at all (for env_report)."""
    reason = _import_reason()
    if reason is not None:
        return reason
    if interpreter_enabled():
        return None
    if not torch.cuda.is_available():
        return "triton: no CUDA GPU visible (and TRITON_INTERPRET is not set)"
    return _capability_reason(torch.cuda.current_device())


@constant_while_compiling
def device_reason_while_compiling(device: torch.device) -> str | None:
    """:func:`device_reason` for the backends' ``supports()``, which run inside torch.compile's trace: probed once
    while tracing and baked into the graph."""
    return device_reason(device)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s for the launch (nothing to do on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def alert_not_deterministic(caller: str) -> None:
    """An opt-in non-deterministic kernel is about to run: under ``torch.use_deterministic_algorithms(True)``
    raise PyTorch's usual error (with ``warn_only=True``, its usual warning, and the kernel runs), exactly as
    PyTorch's own non-deterministic ops do."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    try:
        from torch._prims_common import alert_not_deterministic as torch_alert
    except ImportError:  # private helper moved: same message and behaviour, written out
        torch_alert = None
    if torch_alert is not None:
        torch_alert(caller)
        return
    message = (
        f"{caller} does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings

        warnings.warn(message, stacklevel=2)
    else:
        raise RuntimeError(message)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot``'s ``input_precision``: fp32 follows PyTorch's matmul setting (tf32 only when it allows it);
    for half types the argument is moot."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def conv_dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """:func:`dot_precision` for convolutions, which follow cuDNN's switch (``torch.backends.cudnn.allow_tf32``,
    on by default) as PyTorch's own fp32 convolutions do."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def gpu_class(capability: tuple[int, int], shared_memory_optin: int | None = None) -> int:
    """The table a GPU uses: its own class for sm_80/sm_89/sm_90, else by how much shared memory it has."""
    major, minor = capability
    if (major, minor) == (8, 0):
        return 80
    if major == 9:
        return 90
    if major == 8:
        return 89
    # Newer or unknown GPUs: the largest table whose tiles fit in the device's opt-in shared memory.
    if shared_memory_optin is not None and shared_memory_optin >= 227 * 1024:
        return 90
    if shared_memory_optin is not None and shared_memory_optin >= 163 * 1024:
        return 80
    return 89


def device_class(device: torch.device) -> int:
    """The GPU class (80, 89 or 90) of a CUDA device, for the per-GPU tables (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _class_of_index(index)


@probe_cache
def _class_of_index(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return gpu_class((props.major, props.minor), optin)


# --- faults just before a launch ----------------------------------------------------------------------------

# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def grid_reason(kernel: str, grid: tuple[int, ...]) -> str | None:
    """Why ``grid`` cannot be launched (``None`` if it can)."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if n > limit:
            return f"triton: kernel {kernel} needs {n} programs on grid axis {axis}, over the hardware limit {limit}"
    return None


def checked(kernel, grid: tuple[int, ...]):  # noqa: ANN001, ANN201 - a triton JITFunction and its launcher
    """``kernel[grid]`` after checking the grid against the hardware limits (a :class:`KernelFault` if over)."""
    if any(n > limit for n, limit in zip(grid, MAX_GRID, strict=False)):  # every launch: names only on a fault
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
        raise KernelFault(grid_reason(name, grid), kind="launch-size", kernel=name)
    return kernel[grid]


# Words of the CUDA errors that poison the context: seen while loading a module, they are not a build fault.
_STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "ECC",
)


def _triton_error_types() -> dict[str, tuple[type, ...]]:
    kinds: dict[str, tuple[type, ...]] = {}
    try:
        from triton.compiler.errors import CompilationError

        kinds["compile"] = (CompilationError,)
    except ImportError:
        pass
    try:
        from triton.runtime import errors

        kinds["resources"] = (errors.OutOfResources,)
        extra = tuple(getattr(errors, n) for n in ("PTXASError", "InterpreterError") if hasattr(errors, n))
        kinds["compile"] = kinds.get("compile", ()) + extra
    except ImportError:
        pass
    return kinds


def _raised_while_building(exc: BaseException) -> bool:
    """Whether the traceback passes through Triton's compiler or its backends (MLIR passes, ptxas, module load),
    which run before a kernel's first launch."""
    tb = exc.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/triton/compiler/" in path or "/triton/backends/" in path:
            return True
        tb = tb.tb_next
    return False


def _kernel_in_traceback(exc: BaseException) -> str:
    """The name of the Triton kernel being built when ``exc`` was raised (best effort, for the message): the
    innermost frame of Triton's launcher whose ``self`` is a jitted function."""
    name = "?"
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        fn = getattr(owner, "fn", None)
        if callable(fn) and "/triton/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            name = getattr(fn, "__name__", name)
        tb = tb.tb_next
    return name


def classify_fault(exc: BaseException) -> KernelFault | None:
    """A :class:`KernelFault` if ``exc`` is Triton failing to build or load a kernel (before its launch), else
    ``None`` (the exception is not a fault to fall back from: it propagates)."""
    if isinstance(exc, KernelFault):
        return exc
    if _import_reason() is not None:
        return None
    text = str(exc)
    if any(word in text for word in _STICKY_CUDA_ERRORS):
        return None  # the context is poisoned: a fallback would only hide where it happened
    kinds = _triton_error_types()
    kind = next((k for k, types in kinds.items() if isinstance(exc, types)), None)
    if kind is None and isinstance(exc, RuntimeError) and _raised_while_building(exc):
        kind = "module-load" if "Triton Error [CUDA]" in text else "compile"
    if kind is None:
        return None
    first_line = text.strip().splitlines()[-1] if text.strip() else ""
    where = _kernel_in_traceback(exc)
    return KernelFault(
        f"triton: kernel {where} failed to build before its launch ({type(exc).__name__}: {first_line})",
        kind=kind,
        kernel=where,
    )


_dispatch.register_fault_classifier("triton", classify_fault)
