"""Compile every ``csrc/**/*.cu`` with nvcc for each target architecture, without needing a GPU.

    python csrc/compile_check.py                       # sm_80 and sm_90a
    python csrc/compile_check.py --arch sm_80          # one architecture
    python csrc/compile_check.py --no-binding          # skip the (slow) torch binding syntax check

Prints one line per (file, arch) with the result and ptxas's register / shared-memory report, and exits
non-zero if any compile fails. Warnings are errors (``--Werror all-warnings``) so they cannot creep in.

The torch binding (``csrc/*.cpp``) is additionally syntax-checked with the host C++ compiler against the
installed torch's headers plus the CUDA toolkit's headers. A CPU-only torch wheel lacks one generated CUDA
header (``c10/cuda/impl/cuda_cmake_macros.h``); this script then supplies a one-line stand-in in a temporary
directory (the check is ``-fsyntax-only``: nothing is linked). The binding check is skipped, with a message,
when torch or a host compiler is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent
DEFAULT_ARCHS = ("sm_80", "sm_90a")
# The binding is compiled as C++20 by torch >= 2.13's cpp_extension (C++17 on older ones); C++20 parses both.
CXX_STD = "c++20"


@dataclass
class Result:
    label: str
    ok: bool
    detail: str


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else nvcc's grandparent."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c)
    return None


def find_nvcc() -> str | None:
    home = find_cuda_home()
    if home is not None and (home / "bin" / "nvcc").is_file():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _ptxas_summary(text: str) -> str:
    """Registers / shared memory per kernel from ``-Xptxas -v`` output, condensed to one short string."""
    regs = sorted({int(m) for m in re.findall(r"Used (\d+) registers", text)})
    smem = sorted({int(m) for m in re.findall(r"(\d+) bytes smem", text)})
    parts = []
    if regs:
        parts.append(f"regs {regs[0]}-{regs[-1]}" if len(regs) > 1 else f"regs {regs[0]}")
    parts.append(f"smem max {smem[-1]} B" if smem else "smem 0 B")
    return ", ".join(parts)


def compile_cu(nvcc: str, src: Path, arch: str, outdir: Path) -> Result:
    label = f"{src.relative_to(CSRC)} [{arch}]"
    compute = arch.replace("sm_", "compute_")
    out = outdir / f"{src.stem}.{arch}.o"
    cmd = [
        nvcc, "-std=c++17", "-O3", "-c", str(src), "-o", str(out),
        f"-gencode=arch={compute},code={arch}",
        "-I", str(CSRC), "--Werror", "all-warnings", "-Xptxas", "-v",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return Result(label, False, text.strip() or f"nvcc exited {proc.returncode}")
    return Result(label, True, _ptxas_summary(text))


def check_binding(src: Path, cuda_home: Path | None, stub_dir: Path) -> Result:
    label = f"{src.relative_to(CSRC)} [host syntax check]"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return Result(label, True, "SKIPPED: no host C++ compiler (g++ / c++ / $CXX)")
    if cuda_home is None:
        return Result(label, True, "SKIPPED: CUDA headers not found (set CUDA_HOME)")
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # torch is optional for this script
        return Result(label, True, f"SKIPPED: torch not importable ({type(exc).__name__}: {exc})")
    torch_includes = cpp_extension.include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in torch_includes):
        macros = stub_dir / "c10/cuda/impl/cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True, exist_ok=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [stub_dir, *torch_includes, sysconfig.get_paths()["include"], cuda_home / "include"]
    cmd = [cxx, f"-std={CXX_STD}", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-I", str(CSRC)]  # fmt: skip
    for inc in includes:
        cmd += ["-isystem", str(inc)]  # system includes: third-party headers' warnings are not ours
    cmd.append(str(src))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return Result(label, False, (proc.stdout + proc.stderr).strip())
    return Result(label, True, "syntax OK against torch + CUDA headers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="e.g. sm_80 sm_90a")
    parser.add_argument("--no-binding", action="store_true", help="skip the torch binding syntax check")
    args = parser.parse_args(argv)
    bad = [a for a in args.arch if not re.fullmatch(r"sm_\d+a?", a)]
    if bad:
        parser.error(f"--arch takes values like sm_80 or sm_90a, got {bad}")
    nvcc = find_nvcc()
    if nvcc is None:
        print("FAIL: nvcc not found (put it on PATH or set CUDA_HOME)")
        return 1
    sources = sorted(CSRC.rglob("*.cu"))
    if not sources:
        print(f"FAIL: no .cu files under {CSRC}")
        return 1
    bindings = [] if args.no_binding else sorted(CSRC.glob("*.cpp"))
    print(f"nvcc: {nvcc}")
    with tempfile.TemporaryDirectory(prefix="ptfast_compile_check_") as tmp:
        outdir = Path(tmp)
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(compile_cu, nvcc, src, arch, outdir) for src in sources for arch in args.arch]
            futures += [pool.submit(check_binding, src, find_cuda_home(), outdir / "stub") for src in bindings]
            results = [f.result() for f in futures]
    failed = 0
    for r in results:
        status = "OK  " if r.ok else "FAIL"
        failed += not r.ok
        first, _, rest = r.detail.partition("\n")
        print(f"{status} {r.label}: {first}")
        if rest:
            print("     " + rest.replace("\n", "\n     "))
    print(f"{len(results) - failed}/{len(results)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
