"""The README's status table is the one ``python -m ptfast.status_table`` generates from the verification record,
and its cells say what the record says."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptfast import status_table
from ptfast.verification import Entry, Record

ROOT = Path(__file__).resolve().parent.parent
RUN = {"device": "NVIDIA H200", "date": "2026-12-04T13:17:19+00:00", "commit": "9795595aba09c8d0"}


def _entry(op: str, backend: str, shape: str, tests: str = "passed", speedup: float | None = 2.0) -> Entry:
    return Entry("sm90", op, backend, shape, tests, speedup, "run1")


def test_readme_table_is_generated_from_the_record() -> None:
    readme = (ROOT / "README.md").read_text()
    fresh = status_table.replace_block(readme, status_table.render())
    assert fresh == readme, "README.md's status table is stale: run python -m ptfast.status_table --write README.md"
    assert status_table.main(["--check", str(ROOT / "README.md")]) == 0


def test_every_op_and_backend_has_a_cell_and_the_results_link_exists() -> None:
    table = status_table.render()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(status_table.OPS)
    assert all(row.count(" | ") == 3 for row in rows), rows
    for link in [part.split(")")[0] for part in table.split("](")[1:]]:
        assert (ROOT / link).is_file(), f"the status table links to {link}, which does not exist"


def test_cells_follow_the_record() -> None:
    record = Record(
        {"run1": RUN},
        [
            _entry("attention", "triton", "bf16/d64/plain/L128"),
            _entry("attention", "triton", "bf16/d64/plain/L512"),
            _entry("conv_relu", "cuda", "a/1", speedup=1.2),
            _entry("conv_relu", "cuda", "a/2", speedup=0.8),
            _entry("conv_relu_pool", "cuda", "b/1", tests="failed: RuleFailure: dx"),
            _entry("add_relu", "triton", "c/1", speedup=0.7),
        ],
    )

    def cell(op: str, backend: str, kernel: bool = True) -> str:
        return status_table.cell(op, backend, record, kernel)

    assert cell("attention", "triton") == "Triton interpreter; **verified on sm90** (2 classes)"
    assert cell("conv_relu", "cuda") == (
        "compiles (nvcc); **verified on sm90** (1 of 2 classes; slower than torch at the rest)"
    )
    assert cell("conv_relu_pool", "cuda") == "compiles (nvcc); **failed GPU tests on sm90** (1 of 1 class)"
    assert (
        cell("add_relu", "triton") == "Triton interpreter; passed GPU tests on sm90, slower than torch (1 class): off"
    )
    assert cell("masked_lm_loss", "triton") == "Triton interpreter; not run on a GPU"
    assert cell("attention", "cuda", kernel=False) == "no kernel"
    assert cell("attention", "torch").startswith("tested on CPU")


def test_an_empty_record_claims_no_gpu_result() -> None:
    table = status_table.render(Record(), kernel=lambda op, backend: True)
    assert "sm" not in table.replace("sm_80/sm_90a", "")
    assert "No GPU run is recorded yet" in table


def test_newest_entry_per_class_wins() -> None:
    old = _entry("attention", "triton", "x/1", tests="failed: old")
    new = _entry("attention", "triton", "x/1")
    table = status_table.render(Record({"run1": RUN}, [old, new]), kernel=lambda op, backend: backend != "cuda")
    assert "**verified on sm90** (1 class)" in table and "failed" not in table


def test_the_markers_are_required() -> None:
    with pytest.raises(ValueError, match="markers"):
        status_table.replace_block("no table here", "x")
