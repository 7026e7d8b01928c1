"""The rest of the GPU test tier, in slices that each fit one device command, most valuable first.

``python tests/run.py --gpu`` is ~980 tests: far more than one 10-minute command on a machine that starts bare.
:data:`SLICES` cuts it into named pytest selections (run with ``bash scripts/gpu_run.sh tests-slice NAME``), in
the order a short GPU loan should spend them: what guards users first (faults and the verification gate, op
contracts, then the kernels training runs most: attention, masked-LM loss, the bf16 conv paths), then breadth.

Durations are estimates until a GPU has run them: seconds per test by slice, from the kind of work its tests do
(Triton compiles per new specialization, float64 oracles on the CPU, hypothesis examples). Every slice run writes
its per-test durations (``tier_durations.json`` in the results archive); :func:`plan` prefers measured durations
from ``benchmarks/results/<gpu>/tier_durations.json`` when committed. The budget per slice is 8 minutes.
:func:`check_coverage` proves the slices hold every GPU test exactly once (a CPU test runs it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLICE_BUDGET_S = 480


@dataclass(frozen=True)
class Slice:
    name: str
    args: tuple[str, ...]  # pytest selection (files and -k), always under -m gpu
    seconds_per_test: float  # estimate until measured
    why: str


SLICES: tuple[Slice, ...] = (
    Slice("contract", ("tests/test_gpu_faults.py", "tests/test_gpu_opcheck.py", "tests/test_attention.py",
                       "tests/test_concurrency.py", "tests/test_gpu_determinism.py"), 4.0,
          "fault fallback and the verification gate, op contracts (opcheck), determinism"),
    Slice("attention", ("tests/test_gpu_triton_attention.py",), 8.0,
          "Triton attention vs the float64 oracle: masks, dropout, varlen, CUDA graphs"),
    Slice("masked-lm", ("tests/test_gpu_triton_masked_lm_loss.py", "tests/test_gpu_torch_backend.py"), 4.0,
          "Triton masked-LM loss and the torch backend on CUDA"),
    Slice("conv-bf16", ("tests/test_gpu_conv_backends.py", "-k", "bf16"), 0.8,
          "conv backends in bf16 (what VGG training runs), VGG-16 layers, patched VGG"),
    Slice("conv-fp16", ("tests/test_gpu_conv_backends.py", "-k", "fp16 and not bf16"), 0.8,
          "conv backends in fp16"),
    Slice("conv-rest", ("tests/test_gpu_conv_backends.py", "-k", "not bf16 and not fp16"), 0.8,
          "conv backends in fp32, ties and argmax, int64 indexing, extension input checks"),
    Slice("resnet", ("tests/test_gpu_conv_resnet.py", "tests/test_gpu_add_relu.py"), 1.5,
          "ResNet convs (stride 2, 1x1, the 7x7 stem, residual) and add_relu on cuda/triton; patched ResNets, "
          "torchvision models"),
    Slice("stress", ("tests/test_gpu_numerical_stress.py", "tests/test_gpu_properties.py"), 2.0,
          "numerical stress (extreme values, long rows) and property-based tests"),
)  # fmt: skip


def collect(slice_: Slice, python: str = sys.executable) -> list[str]:
    """The test ids of one slice (collection only: runs anywhere, GPU tests are collected and skipped)."""
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "-m", "gpu", *slice_.args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def check_coverage(python: str = sys.executable) -> list[str]:
    """Problems with the slicing: a GPU test in no slice or in two (empty list: every test exactly once)."""
    everything = Slice("all", ("tests",), 0.0, "")
    with ThreadPoolExecutor(len(SLICES) + 1) as pool:  # the collections side by side (each mostly imports)
        *collected, all_tests = pool.map(lambda s: collect(s, python), (*SLICES, everything))
    seen: dict[str, str] = {}
    problems = []
    for s, tests in zip(SLICES, collected, strict=True):
        for test in tests:
            if test in seen:
                problems.append(f"{test} is in slices {seen[test]} and {s.name}")
            seen[test] = s.name
    problems += [f"{t} is in no slice" for t in all_tests if t not in seen]
    return problems


def _measured(results_dir: Path | None) -> dict[str, float]:
    if results_dir is None:
        return {}
    path = results_dir / "tier_durations.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def plan(python: str = sys.executable, results_dir: Path | None = None) -> list[dict[str, object]]:
    """One row per slice: how many tests, the estimated (or measured) seconds, and the command that runs it."""
    measured = _measured(results_dir)
    rows = []
    with ThreadPoolExecutor(len(SLICES)) as pool:  # one pytest collection per slice, side by side
        collected = list(pool.map(lambda s: collect(s, python), SLICES))
    for s, tests in zip(SLICES, collected, strict=True):
        known = [measured[t] for t in tests if t in measured]
        estimate = sum(known) + (len(tests) - len(known)) * s.seconds_per_test
        rows.append({
            "slice": s.name, "tests": len(tests), "seconds": round(estimate), "measured": len(known),
            "fits": estimate <= SLICE_BUDGET_S, "why": s.why,
            "command": f"bash scripts/gpu_run.sh tests-slice {s.name}",
        })  # fmt: skip
    return rows


def durations_from_junit(xml_text: str) -> dict[str, float]:
    """Per-test seconds from pytest's junit XML (``classname`` + ``name`` -> the test id)."""
    out = {}
    for m in re.finditer(r'<testcase classname="([^"]+)" name="([^"]+)"[^>]* time="([0-9.]+)"', xml_text):
        module, name, seconds = m.groups()
        path = module.replace(".", "/") + ".py"
        out[f"{path}::{name}"] = float(seconds)
    return out


def slice_args(name: str) -> tuple[str, ...]:
    for s in SLICES:
        if s.name == name:
            return s.args
    raise KeyError(f"no GPU test slice {name!r}; slices: {', '.join(s.name for s in SLICES)}")
