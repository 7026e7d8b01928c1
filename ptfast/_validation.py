"""Input checks shared by the functional API.

Metadata checks (rank, dtype, device, shape) always run, in Python, before any kernel. Checks that read tensor
*values* (label range, ``cu_seqlens``) run only in eager mode: they are skipped while ``torch.compile`` traces,
during CUDA-graph capture, and when ``PTFAST_CHECKS=0``. Kernels never index out of bounds even then.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """True when checks that read tensor values may run (eager, not capturing, not disabled)."""
    if os.environ.get("PTFAST_CHECKS", "1").strip() == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        # Only ask about capture for CUDA tensors: asking otherwise could initialize CUDA.
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> torch.Tensor:
    """Type, rank and dtype of one argument; returns it typed as a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ptfast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"ptfast.{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        if not isinstance(dtypes, tuple):
            dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"ptfast.{op}: {name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    first_name = first = device = None
    for n, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first, device = n, t, t.device
        elif t.device != device:
            raise ValueError(f"ptfast.{op}: {n} is on {t.device} but {first_name} is on {device}")


def check_same_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    """Mixed floating dtypes are an error outside autocast (the wrapper casts under autocast first)."""
    first_name = first = None
    for n, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = n, t
        elif t.dtype != first.dtype:
            raise TypeError(
                f"ptfast.{op}: {n} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "cast them to one dtype or run under torch.autocast"
            )


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
