"""The CUDA backend: kernels from ``csrc/`` in the optional compiled extension ``ptfast._C``.

The extension is built by ``setup.py`` when CUDA is available (``pip install --no-build-isolation .``; the
``PTFAST_BUILD_CUDA`` environment variable forces or skips the build). Nothing here imports it at
``import ptfast`` time: :func:`extension` loads it on first use, and a missing or broken build only makes
this backend refuse inputs, with the reason, instead of breaking the package.

For CUDA tensors those refusals are :class:`~ptfast._dispatch.Fault` reasons (``auto`` warns once and runs the
next backend), as is a GPU older than sm_80; a kernel built for no architecture of this GPU ("no kernel image is
available", raised synchronously at launch) is a :class:`~ptfast._dispatch.KernelFault`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ptfast import _dispatch
from ptfast._compiling import probe_cache
from ptfast._dispatch import Fault, KernelFault

EXTENSION_MODULE = "ptfast._C"
INSTALL_HINT = "pip install --no-build-isolation . on a machine with nvcc and a CUDA build of torch"
MIN_CAPABILITY = (8, 0)


@probe_cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        # torch first: the extension links against torch's shared libraries, which importing torch loads.
        import torch  # noqa: F401

        return importlib.import_module(EXTENSION_MODULE), None
    except ModuleNotFoundError as exc:
        if exc.name == EXTENSION_MODULE:
            return None, f"cuda: extension {EXTENSION_MODULE} not built (install with {INSTALL_HINT})"
        return None, f"cuda: importing {EXTENSION_MODULE} failed ({type(exc).__name__}: {exc})"
    except Exception as exc:  # e.g. built against another torch (undefined symbol): report, do not crash
        return None, f"cuda: importing {EXTENSION_MODULE} failed ({type(exc).__name__}: {exc})"


def extension() -> ModuleType | None:
    """The imported ``ptfast._C`` module, or ``None`` when it is not built or does not load."""
    return _load()[0]


def extension_reason() -> str | None:
    """Why the extension cannot be loaded (``None`` if it loads)."""
    return _load()[1]


@probe_cache
def _capability_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        return Fault(f"cuda: GPU compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    return None


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the CUDA kernels cannot run on ``device`` (or in this process at all when ``device`` is None).

    ``None`` means they can. Never initializes CUDA for a non-CUDA ``device``.
    """
    if device is not None and device.type != "cuda":
        return f"cuda: tensors on {device.type} (the CUDA backend needs CUDA tensors)"
    reason = extension_reason()
    if reason is not None:
        return Fault(reason)
    if device is None:
        if not torch.cuda.is_available():
            return "cuda: no CUDA GPU visible"
        return _capability_reason(torch.cuda.current_device())
    return _capability_reason(device.index if device.index is not None else torch.cuda.current_device())


def classify_fault(exc: BaseException) -> KernelFault | None:
    """The extension's kernels were not built for this GPU: CUDA says so synchronously at the launch, before
    anything ran, so ``auto`` can fall back. Every other error propagates."""
    if isinstance(exc, KernelFault):
        return exc
    if "no kernel image is available" in str(exc):
        return KernelFault(f"cuda: {EXTENSION_MODULE} has no kernel built for this GPU ({exc})", kind="module-load",
                           kernel=EXTENSION_MODULE)  # fmt: skip
    return None


_dispatch.register_fault_classifier("cuda", classify_fault)
