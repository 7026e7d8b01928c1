"""Determinism of the torch backend: forward and backward of every op are bitwise reproducible, run to run in one
process and across fresh processes, dropout included (same torch seed -> same bits).

The workload (:mod:`tests.determinism_workload`) hashes the bytes of every output and gradient of attention
(key padding + dropout), attention_varlen (causal + dropout), masked_lm_loss (bias, label smoothing, ignored rows),
conv_relu (NCHW) and conv_relu_pool (channels_last). The triton backend's counterpart runs under the interpreter
(tests/interpreter/test_triton_determinism.py) and on a GPU (tests/test_gpu_determinism.py).
"""

from __future__ import annotations

import warnings

import torch

from tests import determinism_workload as workload

DROPOUT_OPS = ("attention", "attention_varlen")


def _expected_events(backend: str) -> set[tuple[str, str, str]]:
    return {(op, backend, phase) for op in workload.OPS for phase in ("forward", "backward")}


def _keys(op: str) -> list[str]:
    return [f"{op}.out", f"{op}.grad0", f"{op}.grad1", f"{op}.grad2"]


def test_every_op_is_bitwise_reproducible_run_to_run() -> None:
    first, events = workload.run("torch")
    second, _ = workload.run("torch")
    assert set(events) == _expected_events("torch"), events
    assert sorted(first) == sorted(k for op in workload.OPS for k in _keys(op))
    diff = [k for k in first if first[k] != second[k]]
    assert not diff, f"not bitwise reproducible run to run: {diff}"


def test_digests_follow_the_dropout_seed_and_the_inputs() -> None:
    """The check above can fail: the digests see every bit of every output, and dropout really is in the workload
    (another torch seed changes exactly the dropout ops; other inputs change everything)."""
    base, _ = workload.run("torch")
    reseeded, _ = workload.run("torch", dropout_seed=7)
    changed = {k for k in base if base[k] != reseeded[k]}
    assert changed == {k for op in DROPOUT_OPS for k in _keys(op)}, sorted(changed)
    other_inputs, _ = workload.run("torch", input_seed=4321)
    assert all(base[k] != other_inputs[k] for k in base)
    # One flipped low bit is a different digest.
    t = torch.randn(7, 5, dtype=torch.float32)
    flipped = t.clone()
    flipped.view(torch.int32)[3, 2] ^= 1
    assert workload.digest(t) == workload.digest(t.clone()) != workload.digest(flipped)
    assert workload.digest(t) != workload.digest(t.to(torch.float64))


def test_bitwise_identical_across_fresh_processes() -> None:
    """Two fresh interpreters (started at once) and this process produce the same bits for every op."""
    here, _ = workload.run("torch")
    children = workload.run_children(2, "torch", "cpu", "float32", "tiny")
    for child in children:
        assert {tuple(e) for e in child["events"]} == _expected_events("torch")
        diff = [k for k in here if child["digests"].get(k) != here[k]]
        assert not diff, f"differs from this process: {diff}"


def test_deterministic_mode_runs_the_default_path_unchanged() -> None:
    """Under torch.use_deterministic_algorithms(True) (errors, not warnings) every op runs forward and backward with
    no error or warning about determinism, and gives the very bits of the default run."""
    default, _ = workload.run("torch")
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*determinis.*")
            strict, events = workload.run("torch")
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(events) == _expected_events("torch")
    assert strict == default
