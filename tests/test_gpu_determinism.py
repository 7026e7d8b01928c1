"""Determinism of the triton backend on a GPU at realistic sizes, bf16 and fp32.

Sizes (``tests.determinism_workload.PRESETS["gpu"]``): BERT-base attention 8x12x128x64 with key padding and
dropout 0.1; varlen attention over the same 8 lengths, causal, dropout; masked-LM loss with 2048 rows, E=768,
V=30522 (15% labelled, bias, label smoothing); conv_relu and conv_relu_pool 64->64 at 56x56, channels_last, whose
default backward runs cuDNN's dgrad and wgrad (the per-layer algorithm table).

* The default forward and backward of every op are bitwise identical over 3 runs, and in two fresh processes.
* The default backward kernels are the atomic-free ones, launched with the committed per-GPU tiles (no autotune).
* ``torch.use_deterministic_algorithms(True)`` runs the defaults silently (attention and the masked-LM loss give
  the very same bits); the opt-in atomic modes are refused there with PyTorch's usual error, and with
  ``warn_only=True`` warn and run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

import ptfast
from tests import determinism_workload as workload

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]
DETERMINISM_ERROR = r"does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms"
ENV_SWITCHES = (
    "PTFAST_ATTENTION_ATOMIC_DQ", "PTFAST_MLM_ATOMIC", "PTFAST_CONV_FORWARD", "PTFAST_CONV_DGRAD", "PTFAST_CONV_WGRAD",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _defaults(monkeypatch) -> Iterator[None]:
    for var in ENV_SWITCHES:
        monkeypatch.delenv(var, raising=False)
    yield
    torch.use_deterministic_algorithms(False)


def _check_events(events, dtype: torch.dtype) -> None:
    from ptfast.backends.triton import conv_config

    assert {backend for _, backend, _ in events} == {"triton"}, events
    for op in workload.OPS:
        assert {(op, "forward"), (op, "backward")} <= {(o, p) for o, _, p in events}, (op, events)
    n, cin, cout, h, _ = workload.PRESETS["gpu"]["conv"]
    algos = conv_config.algos_for(torch.device("cuda"), dtype, cin, cout, h, channels_last=True)
    for op in ("conv_relu", "conv_relu_pool"):
        phases = {p for o, _, p in events if o == op and ":" in p}
        assert phases == {f"forward:{algos.forward}", f"dgrad:{algos.dgrad}", f"wgrad:{algos.wgrad}"}, (op, phases)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_three_runs_are_bitwise_identical(dtype, monkeypatch) -> None:
    launches = workload.spy_kernels(monkeypatch)
    runs = [workload.run("triton", "cuda", dtype, "gpu") for _ in range(3)]
    first, events = runs[0]
    _check_events(events, dtype)
    for i, (digests, _) in enumerate(runs[1:], 2):
        assert [k for k in first if digests[k] != first[k]] == [], f"run {i} differs"
    names = {name for name, _, _ in launches}
    assert "_attn_bwd_dq" in names and not any(kw.get("ATOMIC_DQ") for n, _, kw in launches if n == "_attn_bwd_dkdv")
    assert "_mlm_bwd" not in names and "_mlm_bwd_dh_deterministic" in names
    expected = workload.committed_configs(torch.device("cuda"), dtype)
    checked = set()
    for name, _, kwargs in launches:
        if name in expected:
            assert workload.launch_config(name, kwargs) == expected[name], (name, kwargs)
            checked.add(name)
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_mlm_fwd"} <= checked, checked


def test_digests_follow_the_dropout_seed() -> None:
    base, _ = workload.run("triton", "cuda", torch.bfloat16, "gpu", ops=("attention", "attention_varlen"))
    other, _ = workload.run(
        "triton", "cuda", torch.bfloat16, "gpu", ops=("attention", "attention_varlen"), dropout_seed=5
    )
    assert all(base[k] != other[k] for k in base)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_identical_across_processes(dtype) -> None:
    here, _ = workload.run("triton", "cuda", dtype, "gpu")
    name = str(dtype).removeprefix("torch.")
    for child in workload.run_children(2, "triton", "cuda", name, "gpu"):
        _check_events([tuple(e) for e in child["events"]], dtype)
        assert [k for k in here if child["digests"].get(k) != here[k]] == []


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_mode_runs_the_defaults_silently(dtype) -> None:
    default, _ = workload.run("triton", "cuda", dtype, "gpu")
    torch.use_deterministic_algorithms(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*determinis.*")
        strict, events = workload.run("triton", "cuda", dtype, "gpu")
    _check_events(events, dtype)
    # cuDNN may pick other (deterministic) algorithms for the conv backward here; the ptfast kernels must not change.
    same = [k for k in default if not k.startswith("conv_relu")]
    assert [k for k in same if strict[k] != default[k]] == []


def _atomic(op: str) -> contextlib.AbstractContextManager:
    if op == "masked_lm_loss":
        from ptfast.backends.triton import masked_lm_loss

        return masked_lm_loss.use_atomic_backward()
    from ptfast.backends.triton import attention_config

    return attention_config.use_atomic_dq(True)


def _forward(op: str, dtype: torch.dtype):
    torch.manual_seed(3)
    inp = workload._Inputs(77, torch.device("cuda"), dtype)
    with ptfast.use_backend("triton"):
        out, leaves = workload._BUILDERS[op](workload.PRESETS["gpu"], inp, 0.1)
    return out, leaves, inp.randn(*out.shape, grad=False).to(out.dtype)


@pytest.mark.parametrize("op", ["attention", "attention_varlen", "masked_lm_loss"])
def test_atomic_modes_are_refused_under_deterministic_mode(op) -> None:
    out, leaves, upstream = _forward(op, torch.bfloat16)
    ref = torch.autograd.grad(out, leaves, upstream)
    with _atomic(op):
        torch.use_deterministic_algorithms(True)
        out, leaves, upstream = _forward(op, torch.bfloat16)
        with pytest.raises(RuntimeError, match=DETERMINISM_ERROR):
            torch.autograd.grad(out, leaves, upstream)
        torch.use_deterministic_algorithms(True, warn_only=True)
        out, leaves, upstream = _forward(op, torch.bfloat16)
        with pytest.warns(UserWarning, match=DETERMINISM_ERROR):
            got = torch.autograd.grad(out, leaves, upstream)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
