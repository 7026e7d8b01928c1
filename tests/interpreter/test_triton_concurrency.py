"""Concurrency with the triton backend under TRITON_INTERPRET=1 (CPU tensors, fp32, tiny shapes).

* A thread on the triton backend and threads on the torch backend run every op at the same time: each thread's
  dispatch shows its own backend and its results equal a serial run bit for bit.
* Concurrent first use in a fresh process: 3 threads released together make the first calls of every op on the
  triton backend (lazy imports of the kernel modules, the interpreter's kernel rewrite, ptfast's caches and
  tables), then a serial run: identical results, no exception.

triton 3.9's interpreter keeps the running kernel's program id in a process-global builder and patches
``triton.language`` while a kernel runs, so two threads *interpreting kernels* at the same moment corrupt each
other (seen here: ``ValueError('x >= grid_dim[0]')``). That is the interpreter, not ptfast: the first-use check
serializes the kernel bodies only (``tests.determinism_workload._serialize_interpreter``) and everything around
them runs concurrently; on a GPU the same check runs unserialized (tests/test_concurrency.py, marked gpu).
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch

import ptfast
from ptfast import _dispatch
from tests import determinism_workload as workload

pytestmark = pytest.mark.interpreter

PRESET = "micro"


def test_triton_and_torch_threads_at_the_same_time(monkeypatch) -> None:
    by_thread: dict[str, set] = defaultdict(set)
    original = _dispatch.record

    def record(op: str, backend: str, phase: str) -> None:
        by_thread[threading.current_thread().name].add((op, backend, phase))
        original(op, backend, phase)

    monkeypatch.setattr(_dispatch, "record", record)

    def serial(backend: str) -> dict[str, list[torch.Tensor]]:
        with ptfast.use_backend(backend):
            return {op: workload.outputs(op, preset=PRESET, dropout_p=0.0) for op in workload.OPS}

    ref = {"triton": serial("triton"), "torch": serial("torch")}
    by_thread.clear()
    jobs = {"triton": "triton", "torch-1": "torch", "torch-2": "torch"}
    barrier = threading.Barrier(len(jobs))
    results: dict[str, dict] = {}
    errors: list[str] = []

    def job(name: str) -> None:
        try:
            barrier.wait(timeout=60)
            results[name] = serial(jobs[name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=job, args=(n,), name=n) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for name, backend in jobs.items():
        for op in workload.OPS:
            for i, (a, b) in enumerate(zip(results[name][op], ref[backend][op], strict=True)):
                assert torch.equal(a, b), f"{name} {op}[{i}] differs from the serial run"
        ran = {(op, b, p) for op, b, p in by_thread[name] if p in ("forward", "backward")}
        assert ran == {(op, backend, p) for op in workload.OPS for p in ("forward", "backward")}, (name, ran)


def test_concurrent_first_use_in_a_fresh_process() -> None:
    result = workload.run_concurrent_child(threads=3, backend="triton", device="cpu", preset=PRESET, interpret=True)
    assert result["ok"], result
