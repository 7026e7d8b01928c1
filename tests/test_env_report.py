"""``python -m ptfast.env_report`` runs in a fresh process, exits 0 and covers every backend and op."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ptfast._dispatch import BACKENDS
from ptfast.env_report import OP_TABLES

ROOT = Path(__file__).resolve().parent.parent
OPS = ("conv_relu", "conv_relu_pool", "attention", "attention_varlen", "masked_lm_loss", "add_relu")


def test_env_report_lists_every_backend_and_op() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "ptfast.env_report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for label in ("Python", "torch", "numpy", "triton", "transformers", "torchvision", "CUDA extension"):
        assert any(line.startswith(label) for line in lines), f"no {label!r} line in:\n{proc.stdout}"
    backends_at = lines.index("Backends (can they run in this process?)")
    ops_at = lines.index("Ops (which backends implement them)")
    for name in BACKENDS:
        assert any(line.split()[:1] == [name] for line in lines[backends_at:ops_at]), proc.stdout
    assert set(OPS) <= set(OP_TABLES)
    op_lines = [line.strip() for line in lines[ops_at + 1 :]]
    for op in OPS:
        start = op_lines.index(op)
        block = op_lines[start + 1 : start + 1 + len(BACKENDS)]
        for name in BACKENDS:
            entry = next((line for line in block if line.split()[:1] == [name]), None)
            assert entry is not None, f"{op}: no {name} line in:\n{proc.stdout}"
            assert "implemented" in entry, f"{op}/{name}: {entry}"
