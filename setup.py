"""Build hook for ptfast: adds the optional CUDA extension ``ptfast._C`` (``csrc/``) when it can be built.

All package metadata lives in pyproject.toml; this file only contributes ``ext_modules`` and ``cmdclass``.

    pip install --no-build-isolation .        # with the extension when CUDA is available (see below)
    pip install .                             # pure Python (pip's isolated build env has no torch)

``PTFAST_BUILD_CUDA`` chooses:

* unset (auto): build the extension when torch is importable, is a CUDA build (``torch.version.cuda``) and the
  CUDA toolkit (nvcc, found through ``CUDA_HOME`` or PATH) is present; otherwise say why and install pure
  Python. A compile error in auto mode is reported and the install continues without the extension.
* ``1``: build it, and fail loudly if that is impossible or the compile fails.
* ``0``: never build it.

torch is deliberately not a build requirement (pip would download the multi-GB CUDA wheel into an isolated
environment), hence ``--no-build-isolation`` to build against the torch already installed.

Target GPUs: ``TORCH_CUDA_ARCH_LIST`` as usual; when unset it defaults to ``"8.0;8.9;9.0+PTX"`` (A100, L4 /
RTX 40xx, H100 / H200: ptfast supports sm_80 and newer), not to the GPUs of the build machine, so a wheel
built on one machine runs on the others. Set e.g. ``TORCH_CUDA_ARCH_LIST="9.0"`` for a faster build.
``MAX_JOBS`` limits ninja's parallelism.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;8.9;9.0+PTX"
ENV = "PTFAST_BUILD_CUDA"


def _log(msg: str) -> None:
    print(f"ptfast setup: {msg}", file=sys.stderr, flush=True)


def _why_not_buildable() -> str | None:
    """Why the CUDA extension cannot be built here (``None`` if it can). Imports torch only if installed."""
    try:
        import torch
    except Exception as exc:
        return (
            f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); install torch "
            "first and use `pip install --no-build-isolation .` (pip's build isolation hides it)"
        )
    if not getattr(torch.version, "cuda", None):
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:
        return f"torch.utils.cpp_extension is not usable ({type(exc).__name__}: {exc})"
    if CUDA_HOME is None:
        return "the CUDA toolkit was not found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not nvcc.is_file():
        return f"nvcc not found at {nvcc} (CUDA_HOME={CUDA_HOME})"
    return None


def _extension_kwargs(optional: bool) -> dict[str, Any]:
    """``ext_modules`` / ``cmdclass`` for ``setup()``; torch is known to be importable when this runs."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    _log(f"building the CUDA extension ptfast._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    class PtfastBuildExtension(BuildExtension):
        """torch's BuildExtension (ninja when installed); in auto mode a failed compile is not fatal."""

        def build_extension(self, ext: Any) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not optional:
                    raise
                _log(
                    f"WARNING: building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it "
                    f"(the cuda backend will be unavailable). Set {ENV}=1 to make this an error."
                )

    # setuptools wants source paths relative to this file's directory (pip runs setup.py from there).
    csrc = Path("csrc")
    sources = [str(csrc / "ptfast_ext.cpp"), *sorted(str(p.relative_to(ROOT)) for p in (ROOT / csrc).rglob("*.cu"))]
    ext = CUDAExtension(
        name="ptfast._C",
        sources=sources,
        include_dirs=[str(ROOT / csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # warnings-as-errors: CI only (compile_check.py)
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": PtfastBuildExtension}}


def _setup_kwargs() -> dict[str, Any]:
    mode = os.environ.get(ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"ptfast setup: {ENV} must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        _log(f"{ENV}=0: installing without the CUDA extension")
        return {}
    reason = _why_not_buildable()
    if reason is not None:
        if mode == "1":
            raise SystemExit(f"ptfast setup: {ENV}=1 but the CUDA extension cannot be built: {reason}")
        _log(f"installing without the CUDA extension: {reason} (set {ENV}=1 to require it)")
        return {}
    if shutil.which("ninja") is None:
        _log("ninja not found: the extension builds without it, slowly (pip install ninja)")
    return _extension_kwargs(optional=mode != "1")


setup(**_setup_kwargs())
