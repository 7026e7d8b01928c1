"""Test tiers and markers.

* ``gpu`` tests are skipped at collection when no CUDA GPU is visible.
* ``interpreter`` tests (under ``tests/interpreter/``) need ``TRITON_INTERPRET=1`` set before triton is
  imported, so they run in their own pytest process (``python tests/run.py`` does both processes).
* ``slow`` tests run only with ``--slow`` (or ``PTFAST_SLOW_TESTS=1``).
* Hypothesis runs derandomized, without deadline, with a fixed example count.
* ``--one-case-per-test`` keeps the first parametrization of each test function (CI's floor leg: a compatibility
  pass over every test function of the files it names, on the older Triton and transformers).
"""

from __future__ import annotations

import os

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("ptfast", derandomize=True, deadline=None, max_examples=25, print_blob=True)
    settings.load_profile("ptfast")
except ImportError:  # hypothesis is in the test extra; tests that use it import it themselves
    pass

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run the slow tier")
    parser.addoption(
        "--one-case-per-test", action="store_true", default=False,
        help="run only the first parametrization of each test function",
    )  # fmt: skip


def _has_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _first_case_per_test(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: set[tuple[str, str]] = set()
    kept, dropped = [], []
    for item in items:
        key = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        (dropped if key in seen else kept).append(item)
        seen.add(key)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--one-case-per-test"):
        _first_case_per_test(config, items)
    run_slow = config.getoption("--slow") or os.environ.get("PTFAST_SLOW_TESTS") == "1"
    gpu = _has_gpu()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow tier: run with --slow")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 in its own process (python tests/run.py)")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(skip_interp)


def pytest_ignore_collect(collection_path, config):  # noqa: ANN001
    # The interpreter directory imports triton with TRITON_INTERPRET set; never collect it in the main process
    # (importing triton there first would make the interpreter setting ineffective for that process).
    if "interpreter" in collection_path.parts and not INTERPRETER:
        return True
    return None


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_faults():
    """Forget remembered kernel faults and fallback warnings before and after the test (fault-injection tests)."""
    from ptfast.testing import reset_faults

    reset_faults()
    yield
    reset_faults()
