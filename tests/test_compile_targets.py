"""CI compile-for-target checks, no GPU needed (marker ``compile_check``).

* every ``csrc/**/*.cu`` compiles with nvcc for sm_80 and sm_90a (``csrc/compile_check.py``);
* every registered Triton kernel config compiles for each of sm_80, sm_89 and sm_90 it is registered for
  (``python -m ptfast.backends.triton.compile_targets``; per-GPU-class table entries name their class), within
  that class's shared memory, and every registered (config, target) pair is in the output.

Both run as subprocesses: the Triton one must not see TRITON_INTERPRET, and neither should import triton or
initialize anything in the test process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compile_check

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "89", "90")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _tool_missing(reason: str) -> None:
    """Skip where the toolchain is absent, but fail in CI (PTFAST_REQUIRE_COMPILE_CHECKS=1): CI must compile."""
    if os.environ.get("PTFAST_REQUIRE_COMPILE_CHECKS") == "1":
        pytest.fail(f"{reason}, and PTFAST_REQUIRE_COMPILE_CHECKS=1 requires this check to run")
    pytest.skip(reason)


def _nvcc_available() -> bool:
    """The same lookup compile_check.py uses (CUDA_HOME / CUDA_PATH / /usr/local/cuda / PATH)."""
    spec = importlib.util.spec_from_file_location("_ptfast_compile_check", ROOT / "csrc" / "compile_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.find_nvcc() is not None


def test_csrc_compiles_with_nvcc_for_sm80_and_sm90a() -> None:
    if not _nvcc_available():
        _tool_missing("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    proc = _run(["csrc/compile_check.py", "--arch", "sm_80", "sm_90a"], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for cu in sorted((ROOT / "csrc").rglob("*.cu")):
        rel = cu.relative_to(ROOT / "csrc")
        for arch in ("sm_80", "sm_90a"):
            assert f"OK   {rel} [{arch}]" in out, f"{rel} [{arch}] missing from:\n{out}"


def test_triton_configs_compile_for_their_targets() -> None:
    if importlib.util.find_spec("triton") is None:
        _tool_missing("triton is not installed")
    listing = _run(["-m", "ptfast.backends.triton.compile_targets", "--list", "--arch", *ARCHS], timeout=300)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    lines = listing.stdout.splitlines()
    assert lines and lines[-1] == f"{len(lines) - 1} configs registered"
    expected = set()
    for line in lines[:-1]:  # "<name> sm_80,sm_90"
        name, targets = line.split(" ")
        expected |= {(t.removeprefix("sm_"), name) for t in targets.split(",")}
    names = {n for _, n in expected}
    assert any(n.startswith("bias_relu[") for n in names)
    for kernel in ("attention_fwd[", "attention_bwd_dkdv[", "attention_bwd_dq[", "attention_bwd_delta["):
        assert any(n.startswith(kernel) for n in names), kernel
    for arch in ARCHS:  # every GPU class has its attention and implicit-GEMM conv table entries
        assert any(a == arch and n.startswith("attention_fwd[") for a, n in expected), arch
        assert any(a == arch and n.startswith("conv_gemm_fwd[") for a, n in expected), arch
        assert any(a == arch and n.startswith("conv_gemm_wgrad[") for a, n in expected), arch

    proc = _run(["-m", "ptfast.backends.triton.compile_targets", "--arch", *ARCHS], timeout=2400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    compiled = set(re.findall(r"^OK   sm_(\d+) (\S+):", proc.stdout, flags=re.MULTILINE))
    missing = sorted(expected - compiled)
    assert not missing, f"configs not compiled: {missing[:10]} ...\n{out[-3000:]}"
