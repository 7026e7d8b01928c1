"""Determinism of the triton backend under TRITON_INTERPRET=1 (CPU tensors, fp32, tiny odd shapes).

* Every op's default forward and backward is bitwise reproducible run to run and across fresh processes (the
  children get TRITON_INTERPRET=1 in their environment), dropout included.
* The default backward is the atomic-free one (dQ in its own kernel; the masked-LM loss's row-tile and
  vocabulary-tile kernels), and ``torch.use_deterministic_algorithms(True)`` runs it unchanged, silently.
* The opt-in atomic modes (attention's atomic dQ: ``use_atomic_dq`` / ``PTFAST_ATTENTION_ATOMIC_DQ=1``; the
  masked-LM loss's atomic backward: ``use_atomic_backward`` / ``PTFAST_MLM_ATOMIC=1``) run silently by default,
  are refused with PyTorch's usual error under deterministic mode when the backward runs, and with
  ``warn_only=True`` warn and run.
* No runtime autotuning: no kernel is an ``Autotuner`` (and none runs), and every launch uses the committed tiles.

The interpreter runs programs one after another, so it cannot show atomics changing bits run to run; which kernel
ran is checked by wrapping the kernels (``tests.determinism_workload.spy_kernels``). Bitwise atomics and realistic
sizes are checked on a GPU (tests/test_gpu_determinism.py).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import warnings
from collections.abc import Iterator

import pytest
import torch

import ptfast
from ptfast.testing import record_dispatch
from tests import determinism_workload as workload

pytestmark = pytest.mark.interpreter

DETERMINISM_ERROR = r"does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms"


@pytest.fixture(autouse=True)
def _restore_deterministic_mode() -> Iterator[None]:
    yield
    torch.use_deterministic_algorithms(False)


PRESET = "small"


def _assert_all_triton(events: list[tuple[str, str, str]]) -> None:
    ran = {(op, phase) for op, backend, phase in events if phase in ("forward", "backward")}
    assert ran == {(op, phase) for op in workload.OPS for phase in ("forward", "backward")}, events
    assert {backend for _, backend, _ in events} == {"triton"}, events


@pytest.fixture(scope="module")
def default_run() -> tuple[dict[str, str], list]:
    """The workload's digests and dispatch events, default settings."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("PTFAST_ATTENTION_ATOMIC_DQ", "PTFAST_MLM_ATOMIC"):
            mp.delenv(var, raising=False)
        return workload.run("triton", preset=PRESET)


@pytest.fixture(scope="module")
def spied_run() -> tuple[dict[str, str], list, list]:
    """A second default run with every kernel launch logged and Triton's autotuner made to fail if it runs:
    ``(digests, events, launches)``."""
    import triton.runtime.autotuner as autotuner

    def no_tuning(*args, **kwargs):
        raise AssertionError("an Autotuner ran")

    with pytest.MonkeyPatch.context() as mp:
        for var in ("PTFAST_ATTENTION_ATOMIC_DQ", "PTFAST_MLM_ATOMIC"):
            mp.delenv(var, raising=False)
        mp.setattr(autotuner.Autotuner, "run", no_tuning)
        launches = workload.spy_kernels(mp)
        digests, events = workload.run("triton", preset=PRESET)
    return digests, events, launches


def test_run_to_run_bitwise(default_run, spied_run) -> None:
    first, events = default_run
    _assert_all_triton(events)
    second, _, _ = spied_run
    assert [k for k in first if first[k] != second[k]] == []


def test_dropout_is_in_the_digests(default_run) -> None:
    reseeded, _ = workload.run("triton", preset=PRESET, ops=("attention",), dropout_seed=7)
    assert all(reseeded[k] != default_run[0][k] for k in reseeded), "dropout did not change the digests"


def test_across_processes(default_run) -> None:
    """A fresh interpreter process (TRITON_INTERPRET=1 in its environment) gives this process's bits."""
    (child,) = workload.run_children(1, "triton", "cpu", "float32", PRESET, interpret=True)
    _assert_all_triton([tuple(e) for e in child["events"]])
    assert [k for k in default_run[0] if child["digests"].get(k) != default_run[0][k]] == []


def _names(launches) -> set[str]:
    return {name for name, _, _ in launches}


def test_default_attention_backward_is_atomic_free(spied_run) -> None:
    launches = spied_run[2]
    dkdv = [kw for name, _, kw in launches if name == "_attn_bwd_dkdv"]
    assert len(dkdv) == 2 and not any(kw["ATOMIC_DQ"] for kw in dkdv)  # attention and attention_varlen
    assert sum(name == "_attn_bwd_dq" for name, _, _ in launches) == 2  # dQ in its own pass


def test_default_masked_lm_backward_is_atomic_free(spied_run) -> None:
    launches = spied_run[2]
    assert "_mlm_bwd" not in _names(launches), "the default backward ran the atomic kernel"
    assert {"_mlm_bwd_dh_deterministic", "_mlm_bwd_dw_deterministic"} <= _names(launches)


def test_deterministic_mode_runs_the_default_unchanged_and_silently(default_run) -> None:
    torch.use_deterministic_algorithms(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*determinis.*")
        strict, events = workload.run("triton", preset=PRESET)
    _assert_all_triton(events)
    assert [k for k in default_run[0] if strict[k] != default_run[0][k]] == []


def test_no_autotuner_and_launches_use_the_committed_tiles(spied_run) -> None:
    import triton.runtime.autotuner as autotuner

    import ptfast.backends.triton as triton_pkg

    tuned = []
    for info in pkgutil.iter_modules(triton_pkg.__path__):
        module = importlib.import_module(f"ptfast.backends.triton.{info.name}")
        tuned += [f"{info.name}.{a}" for a, o in vars(module).items() if isinstance(o, autotuner.Autotuner)]
    assert tuned == [], f"autotuned kernels: {tuned}"
    expected = workload.committed_configs(torch.device("cpu"), torch.float32)
    checked = set()
    for name, _, kwargs in spied_run[2]:
        if name in expected:
            assert workload.launch_config(name, kwargs) == expected[name], (name, kwargs)
            checked.add(name)
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_mlm_fwd", "_conv_gemm_fwd"} <= checked, checked


# --- opt-in atomic modes ------------------------------------------------------------------------------------------


def _atomic_dq():
    from ptfast.backends.triton import attention_config

    return attention_config.use_atomic_dq(True)


def _atomic_mlm():
    from ptfast.backends.triton import masked_lm_loss

    return masked_lm_loss.use_atomic_backward()


# mode -> (op, how it is switched on: a context-manager factory, or an environment variable)
MODES = {
    "attention-hook": ("attention", _atomic_dq),
    "attention-env": ("attention", "PTFAST_ATTENTION_ATOMIC_DQ"),
    "varlen-hook": ("attention_varlen", _atomic_dq),
    "mlm-hook": ("masked_lm_loss", _atomic_mlm),
    "mlm-env": ("masked_lm_loss", "PTFAST_MLM_ATOMIC"),
}


@contextlib.contextmanager
def _mode(name: str, monkeypatch) -> Iterator[str]:
    op, switch = MODES[name]
    for var in ("PTFAST_ATTENTION_ATOMIC_DQ", "PTFAST_MLM_ATOMIC"):
        monkeypatch.delenv(var, raising=False)
    if isinstance(switch, str):
        monkeypatch.setenv(switch, "1")
        yield op
    else:
        with switch():
            yield op


def _ran_atomic(op: str, launches) -> bool:
    if op == "masked_lm_loss":
        return "_mlm_bwd" in _names(launches) and "_mlm_bwd_dh_deterministic" not in _names(launches)
    dkdv = [kw for name, _, kw in launches if name == "_attn_bwd_dkdv"]
    return bool(dkdv) and all(kw["ATOMIC_DQ"] for kw in dkdv) and "_attn_bwd_dq" not in _names(launches)


def _forward(op: str):
    inp = workload._Inputs(77, torch.device("cpu"), torch.float32)
    with ptfast.use_backend("triton"):
        out, leaves = workload._BUILDERS[op](workload.PRESETS["micro"], inp, 0.1)
    return out, leaves, inp.randn(*out.shape, grad=False)


def _reference_grads(op: str) -> list[torch.Tensor]:
    torch.manual_seed(3)
    out, leaves, upstream = _forward(op)
    return list(torch.autograd.grad(out, leaves, upstream))


SWITCHES = sorted(m for m in MODES if m != "varlen-hook")  # varlen shares the padded op's launcher


@pytest.mark.parametrize("mode", SWITCHES)
def test_atomic_mode_runs_silently_by_default(mode, monkeypatch) -> None:
    ref = _reference_grads(MODES[mode][0])
    launches = workload.spy_kernels(monkeypatch)
    with _mode(mode, monkeypatch) as op, warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _reference_grads(op)
    assert _ran_atomic(op, launches), launches
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_atomic_mode_is_refused_under_deterministic_mode(mode, monkeypatch) -> None:
    with _mode(mode, monkeypatch) as op:
        torch.manual_seed(3)
        torch.use_deterministic_algorithms(True)
        with record_dispatch() as events:
            out, leaves, upstream = _forward(op)  # the forward is the same in every mode: it runs
            with pytest.raises(RuntimeError, match=DETERMINISM_ERROR):
                torch.autograd.grad(out, leaves, upstream)
    assert (op, "triton", "forward") in events


@pytest.mark.parametrize("mode", SWITCHES)
def test_atomic_mode_warns_and_runs_with_warn_only(mode, monkeypatch) -> None:
    ref = _reference_grads(MODES[mode][0])
    launches = workload.spy_kernels(monkeypatch)
    with _mode(mode, monkeypatch) as op:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match=DETERMINISM_ERROR):
            got = _reference_grads(op)
    assert _ran_atomic(op, launches), launches
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
