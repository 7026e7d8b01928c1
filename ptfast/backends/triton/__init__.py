"""The Triton backend: shared availability checks (triton is optional and never imported by ``import ptfast``).

Triton kernels run on CUDA tensors of compute capability 8.0 or newer, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported (the test suite's interpreter tier).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ptfast._dispatch import constant_while_compiling

MIN_CAPABILITY = (8, 0)
# The per-GPU tables of block sizes are keyed by these shared-memory classes (see attention_config).
GPU_CLASSES = (80, 89, 90)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _import_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton: the triton package is not installed (pip install 'ptfast[triton]')"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not take the torch backend down
        return f"triton: importing triton failed ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _capability_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        return f"triton: GPU compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return None


def device_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (``None`` if they can)."""
    reason = _import_reason()
    if reason is not None:
        return reason
    if device.type == "cuda":
        if interpreter_enabled():
            return "triton: TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return _capability_reason(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "triton: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    return f"triton: device type {device.type!r} is not supported"


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


@functools.cache
def _class_of_index(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return gpu_class((props.major, props.minor), optin)
