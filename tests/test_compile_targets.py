"""CI compile-for-target checks, no GPU needed (marker ``compile_check``).

* every ``csrc/**/*.cu`` compiles with nvcc for sm_80 and sm_90a (``csrc/compile_check.py``);
* every registered Triton kernel config compiles for each of sm_80, sm_89 and sm_90 it is registered for
  (``python -m ptfast.backends.triton.compile_targets``; per-GPU-class table entries name their class), within
  that class's shared memory, and every registered (config, target) pair is in the output;
* every hot variant (BERT / unpadded BERT / causal / plain attention in fp16 and bf16 at head dims 64 and 128,
  every masked-LM and implicit-GEMM conv kernel) compiles for sm_80 and sm_90a with zero spill stores in Triton's
  own ``ptxas -v`` (under whichever Triton is installed: CI runs this file with its newest and with the GPU
  machine's 3.6), and on sm_90a its main GEMMs use ``wgmma``.

Both run as subprocesses: the Triton one must not see TRITON_INTERPRET, and neither should import triton or
initialize anything in the test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
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

    report = Path(tempfile.mkdtemp()) / "compile.json"
    proc = _run(["-m", "ptfast.backends.triton.compile_targets", "--arch", *ARCHS, "--json", str(report)], timeout=2400)
    out = proc.stdout + proc.stderr
    failures = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("FAIL"))
    assert proc.returncode == 0, (failures or out[-5000:])[-8000:]
    compiled = set(re.findall(r"^OK   sm_(\d+) (\S+):", proc.stdout, flags=re.MULTILINE))
    missing = sorted(expected - compiled)
    assert not missing, f"configs not compiled: {missing[:10]} ...\n{out[-3000:]}"
    _check_hot_variants(json.loads(report.read_text()))


HOT_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "masked_lm_loss_fwd", "conv_gemm_fwd",
               "conv_gemm_wgrad")  # fmt: skip


def _check_hot_variants(records: list[dict]) -> None:
    """The no-spill gate, read from the compile report: which hot variants exist, and that none spills."""
    hot = [r for r in records if r["hot"]]
    for kernel in HOT_KERNELS:
        for arch in (80, 90):
            assert any(r["kernel"].lstrip("_").startswith(_stem(kernel)) and r["arch"] == arch for r in hot), (
                kernel,
                arch,
            )
    for form in ("bert", "bert-unpad", "causal", "plain"):
        for dtype in ("fp16", "bf16"):
            for dim in (64, 128):
                for arch in (80, 90):
                    tag = f"[{form},{dtype},d{dim},sm{arch},"
                    got = [r for r in hot if tag in r["name"] and r["arch"] == arch]
                    assert len(got) == 3, f"hot attention {tag}: expected fwd, dK/dV and dQ, got {got}"
    spilling = [f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B" for r in hot if r["spill_stores"] != 0]
    assert not spilling, "hot variants that spill (or have no ptxas report):\n" + "\n".join(spilling)
    no_wgmma = [f"{r['name']} sm_{r['arch']}" for r in hot if r["arch"] == 90 and "delta" not in r["name"]
                and not r["wgmma"]]  # fmt: skip
    assert not no_wgmma, "sm_90 hot GEMM kernels without wgmma:\n" + "\n".join(no_wgmma)


def _stem(kernel: str) -> str:
    return {"attention_fwd": "attn_fwd", "attention_bwd_dkdv": "attn_bwd_dkdv", "attention_bwd_dq": "attn_bwd_dq",
            "masked_lm_loss_fwd": "mlm_fwd", "conv_gemm_fwd": "conv_gemm_fwd", "conv_gemm_wgrad": "conv_gemm_wgrad",
            }[kernel]  # fmt: skip


def test_launch_ints_compile_as_the_jit_specializes() -> None:
    """Unit strides become constants, multiples of 16 aligned, others stay plain ints; names must be int args."""
    from ptfast.backends.triton import compile_targets as ct

    class _Kernel:  # stands in for a JITFunction: registration is plain data
        arg_names = ["X", "stride_a", "stride_b", "n", "BLOCK"]
        __name__ = "_stand_in"

    sig = {"X": "*fp16", "stride_a": "i32", "stride_b": "i32", "n": "i32"}
    cfg = ct.KernelConfig("k", _Kernel, sig, {"BLOCK": 32}, launch_ints={"stride_a": 1, "stride_b": 48, "n": 7})
    constexprs, aligned = ct._specialized(cfg)
    assert constexprs == {"BLOCK": 32, "stride_a": 1}
    assert set(aligned) == {"stride_b"}
    assert ct._full_signature(cfg) == {"X": "*fp16", "stride_a": "constexpr", "stride_b": "i32", "n": "i32",
                                       "BLOCK": "constexpr"}  # fmt: skip
    with pytest.raises(ValueError, match="launch_ints names no integer argument"):
        ct.register("bad-launch-ints", _Kernel, sig, {"BLOCK": 32}, launch_ints={"X": 1})


def test_hot_variants_are_compiled_as_launched() -> None:
    """Every hot variant models its launch: the attention, masked-LM and conv launchers pass a unit innermost
    stride, so a hot config without one would be checked in a form no launch compiles (a subprocess: importing
    the kernel modules imports triton)."""
    if importlib.util.find_spec("triton") is None:
        _tool_missing("triton is not installed")
    script = (
        "from ptfast.backends.triton import compile_targets as ct\n"
        "hot = [c for c in ct.load_all() if c.hot]\n"
        "bad = [c.name for c in hot if 1 not in c.launch_ints.values()]\n"
        "print(len(hot), bad)\n"
    )
    proc = _run(["-c", script], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count, bad = proc.stdout.strip().split(" ", 1)
    assert int(count) > 100 and bad == "[]", proc.stdout
