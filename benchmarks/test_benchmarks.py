"""pytest-benchmark entry: a few representative cases per op on whatever device is present.

    pytest benchmarks/test_benchmarks.py --benchmark-only            # small shapes on CPU, GPU defaults on CUDA
    pytest benchmarks/test_benchmarks.py --benchmark-only -k attention

Not part of the default test run (the repo's ``testpaths`` is ``tests``). The runner (``python -m
benchmarks.run``) is the tool for real measurements (L2 hygiene, CUDA graphs, reports); this file gives
pytest-benchmark's statistics and comparison features (``--benchmark-compare``) on the same specs and steps.
On CUDA every timed call ends with ``torch.cuda.synchronize`` so pytest-benchmark's wall clock sees the GPU work.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.common import Options, Skip  # noqa: E402
from benchmarks.ops import load  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"

# (op, provider, index of the case in the spec's list, mode). On CPU the --quick shapes are used.
CASES: list[tuple[str, str, int, str]] = [
    ("attention", "ptfast[auto]", 0, "fwd"),
    ("attention", "sdpa[math]" if ON_CPU else "sdpa[efficient]", 0, "fwd"),
    ("attention", "ptfast[auto]", 0, "fwd+bwd"),
    ("masked_lm_loss", "ptfast[auto]", 0, "fwd+bwd"),
    ("masked_lm_loss", "hf-all-tokens", 0, "fwd+bwd"),
    ("conv_relu", "ptfast[auto]", 1, "fwd"),
    ("conv_relu", "eager", 1, "fwd"),
    ("conv_relu_pool", "ptfast[auto]", 0, "fwd+bwd"),
    ("conv_relu_pool", "eager", 0, "fwd+bwd"),
    ("resnet50_frozen_step", "ptfast", 0, "train"),
    ("resnet50_frozen_step", "eager", 0, "train"),
    ("resnet18_train_step", "ptfast", 0, "train"),
    ("resnet18_train_step", "eager", 0, "train"),
]


def _options() -> Options:
    # No torch.compile here: compile time would dominate a pytest session.
    return Options(device=DEVICE, quick=ON_CPU, compile=False)


def _step(op: str, provider: str, index: int, mode: str) -> Any:
    opts = _options()
    spec = load(op)
    case = spec.cases(opts)[index]
    prov = next(p for p in spec.providers(opts) if p.name == provider)
    inputs = spec.make_inputs(case, opts, 0)
    try:
        step = prov.build(case, inputs, mode)
        step()  # first call outside the timing (lazy init, autotuning)
    except (Skip, NotImplementedError, ImportError) as e:
        pytest.skip(f"{provider}: {e}")
    except RuntimeError as e:  # BackendNotSupportedError is a RuntimeError; SDPA refusals too
        pytest.skip(f"{provider}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}")
    if DEVICE.type == "cuda":

        def synced() -> None:
            step()
            torch.cuda.synchronize()

        return synced
    return step


@pytest.mark.parametrize(("op", "provider", "index", "mode"), CASES, ids=[f"{o}-{p}-{m}" for o, p, _, m in CASES])
def test_op(benchmark: Any, op: str, provider: str, index: int, mode: str) -> None:
    step = _step(op, provider, index, mode)
    benchmark.group = f"{op} {mode}"
    rounds = 5 if ON_CPU else 30
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
