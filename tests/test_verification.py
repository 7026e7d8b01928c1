"""Verified or off (``ptfast.verification``): the decision ``auto`` makes on a CUDA device, with fake records.

No GPU is needed: the decision takes a ``torch.device("cuda", 0)`` and the GPU class is patched, so what is
tested is the policy: an entry must exist for (GPU class, op, backend, shape class), its family must have passed
the GPU tests, and it must have measured faster than the torch backend; the opt-in switch admits the rest;
explicit backends are never gated; CPU devices are never gated. Also: how a first-contact run's results become
a record, the shape classes of real op calls, the committed record, and env_report's section.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptfast
from ptfast import _dispatch, verification
from ptfast.testing import record_dispatch
from ptfast.verification import Entry, Record

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda", 0)
CLASS = "bf16/d64/dropout+key_mask/L512"


@pytest.fixture(autouse=True)
def _fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(verification.ALLOW_UNVERIFIED_ENV, raising=False)
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    monkeypatch.setattr(verification, "_class_of_index", lambda index: "sm90")


def _entry(**kw) -> Entry:
    base = dict(gpu_class="sm90", op="attention", backend="triton", shape_class=CLASS, tests="passed",
                speedup=1.7, run="r1", spread=(1.6, 1.8))  # fmt: skip
    return Entry(**{**base, **kw})


def _record(*entries: Entry) -> Record:
    return Record({"r1": {"device": "NVIDIA H200", "date": "2026-12-03", "commit": "abc1234"}}, list(entries))


def test_no_record_means_torch_on_a_gpu() -> None:
    with verification.use_record(Record()):
        reason = verification.auto_reason("attention", "triton", CUDA, CLASS)
    assert reason is not None and "not verified" in reason and "sm90" in reason


@pytest.mark.parametrize(
    "entry, allowed, why",
    [
        (_entry(), True, None),
        (_entry(tests="failed: max error 3e-2 > bound"), False, "GPU tests failed"),
        (_entry(tests="not run"), False, "not run"),
        (_entry(speedup=0.93), False, "slower"),
        (_entry(speedup=1.0), False, "slower"),
        (_entry(speedup=None), False, "not measured"),
        (_entry(gpu_class="sm80"), False, "not verified"),  # verified on another GPU class
        (_entry(shape_class="bf16/d64/dropout+key_mask/L2048"), False, "not verified"),  # another size
        (_entry(backend="cuda"), False, "not verified"),
    ],
)
def test_decision(entry: Entry, allowed: bool, why: str | None) -> None:
    with verification.use_record(_record(entry)):
        reason = verification.auto_reason("attention", "triton", CUDA, CLASS)
    assert (reason is None) == allowed, reason
    if why is not None:
        assert why in reason


def test_opt_in_switch_and_cpu_are_not_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    with verification.use_record(Record()):
        assert verification.auto_reason("attention", "triton", torch.device("cpu"), CLASS) is None
        monkeypatch.setenv(verification.ALLOW_UNVERIFIED_ENV, "1")
        assert verification.auto_reason("attention", "triton", CUDA, CLASS) is None
        monkeypatch.setenv(verification.ALLOW_UNVERIFIED_ENV, "0")
        assert verification.auto_reason("attention", "triton", CUDA, CLASS) is not None


class _Impl:
    """A backend that supports everything (the gate, not supports(), is under test)."""

    def supports(self, **meta: object) -> str | None:
        return None


IMPLS = {"torch": _Impl(), "triton": _Impl(), "cuda": _Impl()}


def _choose(shape_class: str = CLASS) -> str:
    return _dispatch.choose("attention", IMPLS, ("cuda", "triton", "torch"), device=CUDA, shape_class=shape_class)


def test_choose_walks_auto_order_through_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    with verification.use_record(Record()):
        assert _choose() == "torch"
        with ptfast.use_backend("triton"):  # explicit: not gated
            assert _choose() == "triton"
        monkeypatch.setenv("PTFAST_BACKEND", "cuda")
        assert _choose() == "cuda"
        monkeypatch.delenv("PTFAST_BACKEND")
        monkeypatch.setenv(verification.ALLOW_UNVERIFIED_ENV, "1")
        assert _choose() == "auto:cuda"
        monkeypatch.delenv(verification.ALLOW_UNVERIFIED_ENV)
    with verification.use_record(_record(_entry())):
        # cuda comes first in auto's order but is not verified: the verified triton kernel runs
        assert _choose() == "auto:triton"
        assert _choose("bf16/d64/dropout+key_mask/L128") == "torch"
    with verification.use_record(_record(_entry(), _entry(backend="cuda", speedup=2.0))):
        assert _choose() == "auto:cuda"


def test_real_ops_on_cpu_are_untouched_by_the_gate() -> None:
    q = torch.randn(2, 3, 17, 16)
    with verification.use_record(Record()), record_dispatch() as events:
        ptfast.attention(q, q, q)
    assert events == [("attention", "torch", "forward")]


def test_shape_classes_of_op_calls() -> None:
    c = verification.attention_class
    assert c(torch.bfloat16, 64, 128, attn_mask=False, key_mask=True, dropout=True, causal=False) == (
        "bf16/d64/dropout+key_mask/L128"
    )
    assert c(torch.float16, 80, 129, attn_mask=False, key_mask=False, dropout=False, causal=True) == (
        "fp16/d128/causal/L512"
    )
    assert c(torch.float16, 64, 9000, attn_mask=True, key_mask=False, dropout=False, causal=False).endswith(
        "/attn_mask/L16384"
    )
    assert c(torch.bfloat16, 64, 100, attn_mask=False, key_mask=False, dropout=True, causal=False, varlen=True) == (
        "bf16/d64/dropout+varlen/L128"
    )
    assert verification.masked_lm_loss_class(torch.bfloat16, 768) == "bf16/E1024"
    assert verification.conv_class(torch.float16, True, (128, 64, 3, 3), True) == (
        "fp16/channels_last/k3x3/pool/cout128"
    )
    got = verification.shape_class(
        "conv_relu", dtype=torch.float32, channels_last=False, weight_shape=(513, 3, 3, 3), pool=False
    )
    assert got == "fp32/nchw/k3x3/nopool/cout1024"


def test_build_from_smoke_and_bench_rows() -> None:
    fam = CLASS.rsplit("/", 1)[0]
    smoke = [
        {"gpu_class": "sm90", "op": "attention", "backend": "triton", "family": fam, "passed": True},
        {"gpu_class": "sm90", "op": "attention", "backend": "cuda", "family": fam, "passed": True},
        {"gpu_class": "sm90", "op": "masked_lm_loss", "backend": "triton", "family": "bf16", "passed": False,
         "error": "dW error 0.2 > bound 0.01"},
    ]  # fmt: skip
    bench = [
        {"gpu_class": "sm90", "op": "attention", "backend": "triton", "shape_class": CLASS, "speedup": 1.4,
         "spread": [1.3, 1.5], "checked": True},
        {"gpu_class": "sm90", "op": "attention", "backend": "triton", "shape_class": fam + "/L128", "speedup": 0.8,
         "checked": True},
        {"gpu_class": "sm90", "op": "masked_lm_loss", "backend": "triton", "shape_class": "bf16/E1024",
         "speedup": 3.0, "checked": True},
        {"gpu_class": "sm90", "op": "conv_relu", "backend": "cuda", "shape_class": "fp16/nchw/k3x3/nopool/cout64",
         "speedup": 1.2, "checked": True},
        {"gpu_class": "sm90", "op": "attention", "backend": "cuda", "shape_class": CLASS, "speedup": 9.0,
         "checked": False},
    ]  # fmt: skip
    old = _entry(gpu_class="sm80", run="r0")
    base = Record({"r0": {"device": "A100"}}, [old, _entry(run="r0", speedup=0.5)])
    record = verification.build(smoke, bench, "r1", {"device": "NVIDIA H200"}, base)
    assert set(record.runs) == {"r0", "r1"}
    by_key = {(e.op, e.backend, e.shape_class, e.gpu_class): e for e in record.entries}
    assert by_key[("attention", "triton", CLASS, "sm80")] == old  # other GPU classes are kept
    new = by_key[("attention", "triton", CLASS, "sm90")]  # the new run replaces the old entry of this class
    assert new.run == "r1" and new.verdict() is None and new.spread == (1.3, 1.5)
    assert "slower" in by_key[("attention", "triton", fam + "/L128", "sm90")].verdict()
    assert "dW error" in by_key[("masked_lm_loss", "triton", "bf16/E1024", "sm90")].verdict()
    assert by_key[("conv_relu", "cuda", "fp16/nchw/k3x3/nopool/cout64", "sm90")].tests == "not run"
    assert "did not match" in by_key[("attention", "cuda", CLASS, "sm90")].verdict()
    # round trip through JSON, and the decision reads it
    again = Record.from_json(json.loads(json.dumps(record.to_json())))
    assert again.entries == record.entries
    with verification.use_record(again):
        assert verification.auto_reason("attention", "triton", CUDA, CLASS) is None
        assert verification.auto_reason("masked_lm_loss", "triton", CUDA, "bf16/E1024") is not None
    lines = verification.status_lines(again, "sm90")
    assert any("verified, faster" in line and "NVIDIA H200" in line for line in lines)


_DT = r"(bf16|fp16|fp32)"
_CLASS_FORMS = {
    "attention": _DT + r"/d\d+/[a-z_+]+/L\d+",
    "attention_varlen": _DT + r"/d\d+/[a-z_+]+/L\d+",
    "masked_lm_loss": _DT + r"/E\d+",
    "conv_relu": _DT + r"/(channels_last|nchw)/k\d+x\d+(/s\d+)?(/residual)?/(pool|nopool)/cout\d+",
    "conv_relu_pool": _DT + r"/(channels_last|nchw)/k\d+x\d+(/s\d+)?(/residual)?/(pool|nopool)/cout\d+",
    "add_relu": _DT + r"/(channels_last|nchw)/n\d+M",
}


def test_committed_record_is_valid() -> None:
    data = json.loads(verification.RECORD_PATH.read_text())
    record = Record.from_json(data)
    for e in record.entries:
        assert e.run in record.runs, e
        assert e.gpu_class.startswith("sm") and e.op in verification.SHAPE_CLASS_OPS, e
        # The form each op's class function writes (masked_lm_loss has only two parts: dtype and hidden size).
        assert re.fullmatch(_CLASS_FORMS[e.op], e.shape_class), e
        assert e.tests in ("passed", "not run") or e.tests.startswith("failed: "), e
    for run in record.runs.values():
        assert {"device", "gpu_class", "date", "commit", "torch", "triton"} <= set(run), run
    with pytest.raises(ValueError, match="schema"):
        Record.from_json({**data, "schema": 99})


def test_env_report_says_what_auto_may_pick() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "ptfast.env_report"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Verified or off" in proc.stdout
    if not Record.from_json(json.loads(verification.RECORD_PATH.read_text())).entries:
        assert "on a GPU, auto runs the torch backend for every op" in proc.stdout
