"""Run metadata recorded with every result: device, driver, library versions, date, commit, command line."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """``git rev-parse HEAD``; where the tree is a copy without ``.git`` (the lent GPU machine), the caller can
    pass the commit in ``PTFAST_GIT_COMMIT``; else "unknown"."""
    return _run(["git", "rev-parse", "HEAD"]) or os.environ.get("PTFAST_GIT_COMMIT", "").strip() or "unknown"


def git_dirty() -> bool | None:
    out = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    if out is None:
        # No output also means "clean"; tell that apart from "git unavailable".
        return False if _run(["git", "rev-parse", "--git-dir"]) else None
    return bool(out)


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_start() -> tuple[str, str]:
    """(UTC date and time, commit) at the start of a CPU run, for :func:`cpu_report_head`: a result file names
    the commit that was measured, read before the measurement."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), git_commit()


def cpu_report_head(title: str, module: str, started: str, commit: str, details: str) -> list[str]:
    """The opening lines of a CPU result file (``benchmarks.interleaved``, ``cpu_call_overhead``,
    ``cpu_head_memory``): title, machine, versions, date, commit, what each number is, and the command as it was
    given (every option that was set, so the file says how to make it again)."""
    import ptfast

    command = shlex.join(["python", "-m", module, *sys.argv[1:]])
    return [
        f"# {title}",
        "",
        f"**CPU run**: {cpu_name()} · torch {torch.__version__} · ptfast {ptfast.__version__} · "
        f"{torch.get_num_threads()} torch threads · date (UTC) {started} · commit `{commit}` · {details}",
        "",
        f"Command: `{command}`",
        "",
    ]


def write_report(lines: list[str], out: str | None) -> None:
    """Print a result file's text and, with ``out``, write it there."""
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)


def device_slug(device: torch.device) -> str:
    """Directory name of a device's results, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-x86-64``."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(platform.machine())


def collect(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Everything needed to reproduce or judge a result later."""
    ptfast_version = None
    try:
        import ptfast

        ptfast_version = getattr(ptfast, "__version__", None)
    except Exception:  # noqa: BLE001 - metadata must never fail the run
        pass
    meta: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.run", *argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ptfast": ptfast_version,
        "transformers": _version("transformers"),
        "torchvision": _version("torchvision"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("PTFAST_", "TORCHINDUCTOR_", "CUDA_VISIBLE"))},
        "torch_threads": torch.get_num_threads(),
        # How busy the machine was when the run started (1, 5, 15 minutes): CPU timings on a shared machine vary.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            device=torch.cuda.get_device_name(device),
            device_capability=f"sm_{props.major}{props.minor}",
            device_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]),
            gpu_clocks_mhz=_run(
                ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader", "-i", "0"]
            ),
        )
    else:
        meta.update(device=cpu_name(), driver=None, cpu_count=os.cpu_count())
    return meta
