"""Verified or off: which GPU kernels ``auto`` may pick, from the committed verification record.

A Triton or CUDA kernel that has never passed its tests on a GPU must not reach a user who did not ask for it. On
a CUDA device, ``auto`` picks a non-torch backend for an op only where the record (``ptfast/verified.json``,
package data, written by ``bash scripts/gpu_run.sh first-contact`` on a GPU and committed) has an entry for

    (GPU class, op, backend, shape class)

that says the backend **passed** its GPU correctness tests for that shape class's family and **measured faster**
than the torch backend at that shape class in the same run. Everywhere else ``auto`` runs the torch backend.
``PTFAST_ALLOW_UNVERIFIED=1`` (the one opt-in switch) lets ``auto`` pick unverified kernels too; an explicitly
chosen backend (``use_backend("triton")``, ``PTFAST_BACKEND=triton``) runs whether verified or not, as before.
CPU tensors are not gated (the Triton interpreter is a test mode, never picked by ``auto`` without it).

Shape classes are strings ``"<family>/<size>"``: the family names what selects a kernel specialization (dtype,
head dim bucket, masks, layout) and is what the GPU smoke test verifies; the size bucket is what the benchmarks
measure speed at. :func:`shape_class` builds them for every op. ``python -m ptfast.env_report`` prints the record;
:func:`build` makes one from a first-contact run's smoke and benchmark results (``benchmarks/first_contact.py``).

GPU classes are exact compute capabilities: ``sm80`` (A100), ``sm89`` (L4 / RTX 40xx), ``sm90`` (H100/H200); a GPU
that only shares a block table with a verified one (sm_86, a Blackwell part) is not verified by it. Under
``torch.compile`` the decision is made once while tracing (like the backend probes): set
``PTFAST_ALLOW_UNVERIFIED`` before the first compiled call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptfast._compiling import constant_while_compiling, probe_cache

__all__ = [
    "ALLOW_UNVERIFIED_ENV",
    "Entry",
    "Record",
    "auto_reason",
    "gpu_class_name",
    "load_record",
    "shape_class",
    "use_record",
]

RECORD_PATH = Path(__file__).with_name("verified.json")
ALLOW_UNVERIFIED_ENV = "PTFAST_ALLOW_UNVERIFIED"
SCHEMA = 1
PASSED = "passed"


@dataclass(frozen=True)
class Entry:
    """One verified (or refused) kernel: a backend of an op at a shape class on a GPU class, from one run."""

    gpu_class: str  # exact compute capability: "sm80" | "sm89" | "sm90" | ...
    op: str
    backend: str  # "triton" | "cuda"
    shape_class: str  # "<family>/<size>", see shape_class()
    tests: str  # "passed", or "failed: <why>" / "not run"
    speedup: float | None  # torch-backend time / this backend's time, median, same run; None: not measured
    run: str  # key into Record.runs
    spread: tuple[float, float] | None = None  # (min, max) of the speedup over repeats

    @property
    def family(self) -> str:
        return self.shape_class.rsplit("/", 1)[0]

    def verdict(self) -> str | None:
        """Why ``auto`` may not pick this entry's kernel (``None``: it may)."""
        if self.tests != PASSED:
            return f"GPU tests {self.tests}"
        if self.speedup is None:
            return "passed its GPU tests, speed not measured"
        if self.speedup <= 1.0:
            return f"passed its GPU tests, but {self.speedup:.3g}x the torch backend (slower)"
        return None


@dataclass
class Record:
    """The verification record: the runs it was measured in and one entry per (GPU class, op, backend, class)."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> device, versions, date, commit
    entries: list[Entry] = field(default_factory=list)

    def find(self, gpu_class: str, op: str, backend: str, shape_class: str) -> Entry | None:
        return self._index().get((gpu_class, op, backend, shape_class))

    def _index(self) -> dict[tuple[str, str, str, str], Entry]:
        # The newest run wins when two runs measured the same class (entries are appended in run order).
        return {(e.gpu_class, e.op, e.backend, e.shape_class): e for e in self.entries}

    def to_json(self) -> dict[str, Any]:
        entries = []
        for e in self.entries:
            d = asdict(e)
            d["spread"] = list(e.spread) if e.spread is not None else None
            entries.append(d)
        return {"schema": SCHEMA, "runs": self.runs, "entries": entries}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"verification record: schema {data.get('schema')!r}, expected {SCHEMA}")
        entries = []
        for d in data.get("entries", []):
            spread = d.get("spread")
            entries.append(Entry(**{**d, "spread": tuple(spread) if spread is not None else None}))
        return cls(dict(data.get("runs", {})), entries)


_lock = threading.Lock()
_override: list[Record | None] = [None]


@probe_cache
def _committed_record() -> Record:
    try:
        return Record.from_json(json.loads(RECORD_PATH.read_text()))
    except FileNotFoundError:
        return Record()


def load_record() -> Record:
    """The record ``auto`` decides by: the committed one, or the one :func:`use_record` put in place."""
    with _lock:
        override = _override[0]
    return override if override is not None else _committed_record()


@contextmanager
def use_record(record: Record | dict[str, Any] | str | Path) -> Iterator[Record]:
    """Decide by ``record`` (a :class:`Record`, its JSON data, or a path) inside this block, process-wide
    (tests; or trying a record a GPU run just wrote before committing it)."""
    if isinstance(record, (str, Path)):
        record = json.loads(Path(record).read_text())
    if isinstance(record, dict):
        record = Record.from_json(record)
    with _lock:
        old = _override[0]
        _override[0] = record
    try:
        yield record
    finally:
        with _lock:
            _override[0] = old


def allow_unverified() -> bool:
    """Whether the user opted in to unverified kernels under ``auto`` (``PTFAST_ALLOW_UNVERIFIED=1``)."""
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def gpu_class_name(capability: tuple[int, int]) -> str:
    """``"sm90"``: the exact compute capability. A record measured on an H200 says nothing about a GPU that only
    shares its block table (a Blackwell part uses the sm_90 tables but is another architecture)."""
    major, minor = capability
    return f"sm{major}{minor}"


@probe_cache
def _class_of_index(index: int) -> str:
    return gpu_class_name(torch.cuda.get_device_capability(index))


@constant_while_compiling
def auto_reason(op: str, backend: str, device: torch.device, shape_class: str | None) -> str | None:
    """Why ``auto`` must not pick ``backend`` for this call (``None``: it may). Only CUDA devices are gated."""
    if device.type != "cuda" or allow_unverified():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = _class_of_index(index)
    if shape_class is None:
        return f"{backend} is not verified for {op} on {gpu} (no shape class)"
    entry = load_record().find(gpu, op, backend, shape_class)
    if entry is None:
        return f"{backend} is not verified for {op} [{shape_class}] on {gpu}"
    verdict = entry.verdict()
    return None if verdict is None else f"{backend} for {op} [{shape_class}] on {gpu}: {verdict}"


# --- shape classes ----------------------------------------------------------------------------------------

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _bucket(value: int, edges: tuple[int, ...]) -> int:
    """The first edge >= value, or the last edge * 2 for anything larger ("beyond what was measured")."""
    for edge in edges:
        if value <= edge:
            return edge
    return edges[-1] * 2


LENGTH_EDGES = (128, 512, 2048, 8192)
HEAD_DIM_EDGES = (64, 128, 256)
HIDDEN_EDGES = (1024, 2048, 4096)
CHANNEL_EDGES = (64, 128, 256, 512)


def attention_class(
    dtype: torch.dtype, head_dim: int, kv_len: int, *, attn_mask: bool, key_mask: bool, dropout: bool,
    causal: bool, varlen: bool = False,
) -> str:  # fmt: skip
    """``"bf16/d64/dropout+key_mask/L512"``: dtype, head dim bucket, features (or ``plain``), key length bucket
    (``max_seqlen_k`` for packed sequences, which are always ``varlen``)."""
    features = [n for n, on in (("attn_mask", attn_mask), ("causal", causal), ("dropout", dropout),
                                ("key_mask", key_mask), ("varlen", varlen)) if on]  # fmt: skip
    form = "+".join(features) or "plain"
    dim, length = _bucket(head_dim, HEAD_DIM_EDGES), _bucket(kv_len, LENGTH_EDGES)
    return f"{_DTYPES.get(dtype, str(dtype))}/d{dim}/{form}/L{length}"


def masked_lm_loss_class(dtype: torch.dtype, hidden: int) -> str:
    """``"bf16/E1024"``: the matmul dtype and the hidden size bucket."""
    return f"{_DTYPES.get(dtype, str(dtype))}/E{_bucket(hidden, HIDDEN_EDGES)}"


def conv_class(
    dtype: torch.dtype,
    channels_last: bool,
    weight_shape: tuple[int, ...],
    pool: bool,
    *,
    stride: int = 1,
    residual: bool = False,
) -> str:
    """``"fp16/channels_last/k3x3/pool/cout128"``: dtype, layout, kernel, pooled or not, output channel bucket;
    ``/s2`` and ``/residual`` are inserted after the kernel for strided convs and residual epilogues (other
    kernel specializations, verified separately)."""
    cout, _, kh, kw = (int(s) for s in weight_shape)
    layout = "channels_last" if channels_last else "nchw"
    tail = "pool" if pool else "nopool"
    extra = ("/s2" if stride != 1 else "") + ("/residual" if residual else "")
    bucket = _bucket(cout, CHANNEL_EDGES)
    return f"{_DTYPES.get(dtype, str(dtype))}/{layout}/k{kh}x{kw}{extra}/{tail}/cout{bucket}"


NUMEL_EDGES = (1 << 20, 1 << 23, 1 << 26)


def add_relu_class(dtype: torch.dtype, channels_last: bool, numel: int) -> str:
    """``"bf16/channels_last/n8M"``: dtype, layout, element count bucket (``n1M``, ``n8M``, ``n64M``, ``n128M``:
    Mi elements, the last for anything beyond 64 Mi)."""
    layout = "channels_last" if channels_last else "nchw"
    return f"{_DTYPES.get(dtype, str(dtype))}/{layout}/n{_bucket(numel, NUMEL_EDGES) >> 20}M"


SHAPE_CLASS_OPS = {
    "attention": attention_class,
    "attention_varlen": attention_class,
    "masked_lm_loss": masked_lm_loss_class,
    "conv_relu": conv_class,
    "conv_relu_pool": conv_class,
    "add_relu": add_relu_class,
}


def shape_class(op: str, **meta: Any) -> str:
    """The shape class of one call of ``op`` (the keyword arguments of the op's class function)."""
    return SHAPE_CLASS_OPS[op](**meta)


# --- report and build -----------------------------------------------------------------------------------


def status_lines(record: Record | None = None, gpu: str | None = None) -> list[str]:
    """One line per entry (of GPU class ``gpu``, or all): verified / not, faster or slower, from which run."""
    record = record if record is not None else load_record()
    lines = []
    for e in record.entries:
        if gpu is not None and e.gpu_class != gpu:
            continue
        verdict = e.verdict()
        state = "verified, faster" if verdict is None else f"not picked by auto: {verdict}"
        speed = f"{e.speedup:.3g}x" if e.speedup is not None else "n/a"
        run = record.runs.get(e.run, {})
        when = f"run {e.run} ({run.get('device', '?')}, {run.get('date', '?')}, commit {run.get('commit', '?')})"
        lines.append(f"{e.gpu_class} {e.op:<16} {e.backend:<6} {e.shape_class:<40} {speed:>7}  {state}; {when}")
    return lines


def build(smoke: list[dict[str, Any]], bench: list[dict[str, Any]], run_id: str, run: dict[str, Any],
          base: Record | None = None) -> Record:  # fmt: skip
    """A record from one first-contact run: ``smoke`` rows ``{gpu_class, op, backend, family, passed, error}``
    and ``bench`` rows ``{gpu_class, op, backend, shape_class, speedup, spread, checked}`` (``checked``: the
    benchmark's output matched the torch backend's). Every benchmarked class gets an entry: verified when its
    family passed every smoke case and its output check, refused otherwise (so env_report can say why).
    Entries of ``base`` for other classes (other GPUs, other runs) are kept."""
    failures: dict[tuple[str, str, str, str], str] = {}
    passed: set[tuple[str, str, str, str]] = set()
    for row in smoke:
        key = (row["gpu_class"], row["op"], row["backend"], row["family"])
        if row.get("passed"):
            passed.add(key)
        else:
            failures.setdefault(key, str(row.get("error") or "failed")[:200])
    record = Record(dict(base.runs) if base else {}, list(base.entries) if base else [])
    record.runs[run_id] = run
    fresh = []
    for row in bench:
        family = row["shape_class"].rsplit("/", 1)[0]
        key = (row["gpu_class"], row["op"], row["backend"], family)
        if key in failures:
            tests = f"failed: {failures[key]}"
        elif key not in passed:
            tests = "not run"
        elif not row.get("checked", False):
            tests = "failed: the benchmark's output did not match the torch backend's"
        else:
            tests = PASSED
        spread = row.get("spread")
        fresh.append(Entry(row["gpu_class"], row["op"], row["backend"], row["shape_class"], tests,
                           row.get("speedup"), run_id, tuple(spread) if spread else None))  # fmt: skip
    replaced = {(e.gpu_class, e.op, e.backend, e.shape_class) for e in fresh}
    record.entries = [e for e in record.entries if (e.gpu_class, e.op, e.backend, e.shape_class) not in replaced]
    record.entries += fresh
    return record
