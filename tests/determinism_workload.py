"""The workload of the determinism tests: every ptfast op, forward and backward, on fixed inputs, digested.

:func:`run` builds each op's inputs from a seeded CPU generator (float64, then cast and moved, so they are the same
bits in every process and on every device), seeds torch's default generator right before each call (the attention
dropout seed is drawn from it), runs forward and backward with a fixed random upstream gradient and returns a
SHA-256 digest of the bytes (plus dtype, shape) of every output and gradient, and the dispatch events.

Used in-process by the test modules and as a script by their cross-process checks (each child prints one JSON
object)::

    python -m tests.determinism_workload --backend triton --device cuda --preset gpu --dtype bfloat16

Presets: ``tiny`` (odd sizes, torch backend on the CPU), ``small`` and ``micro`` (fewer tiles for the Triton
interpreter's determinism and concurrency checks) and ``gpu`` (realistic: BERT-base attention 8x12x128x64 with
padding and dropout, masked-LM loss 2048 rows x 768 x 30522, a VGG conv 64->64 at 56x56 channels_last).

Also here: :func:`spy_kernels` (which Triton kernels launched, with which tiles), :func:`committed_configs` (the
tiles the committed tables prescribe) and :func:`concurrent_first_use` (``--concurrent N``: threads racing
through the first calls in a fresh process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch

import ptfast
from ptfast.testing import record_dispatch

OPS = ("attention", "attention_varlen", "masked_lm_loss", "conv_relu", "conv_relu_pool")
CL = torch.channels_last
CF = torch.contiguous_format

PRESETS: dict[str, dict] = {
    "tiny": dict(
        attention=(2, 2, 37, 16),  # B, H, L, D
        key_lengths=(37, 23),  # real tokens per sequence (right padding)
        varlen=((13, 17, 1, 6), 2, 16),  # sequence lengths, H, D
        mlm=(45, 24, 101),  # rows, E, V
        conv=(2, 5, 7, 11, 9),  # N, Cin, Cout, H, W
        conv_format=CF,
        pool_format=CL,
        threads=2,
    ),
    "small": dict(  # the interpreter's determinism checks: several tiles per kernel, little work
        attention=(1, 2, 37, 16),
        key_lengths=(29,),
        varlen=((13, 35), 1, 16),
        mlm=(37, 24, 70),
        conv=(1, 3, 5, 9, 11),
        conv_format=CF,
        pool_format=CL,
        threads=2,
    ),
    "micro": dict(  # the interpreter's concurrency checks: a few tiles per kernel
        attention=(1, 2, 19, 16),
        key_lengths=(13,),
        varlen=((7, 12), 2, 16),
        mlm=(21, 16, 37),
        conv=(1, 3, 5, 7, 9),
        conv_format=CF,
        pool_format=CL,
        threads=None,
    ),
    "gpu": dict(
        attention=(8, 12, 128, 64),
        key_lengths=(128, 97, 64, 121, 33, 128, 80, 101),
        varlen=((128, 97, 64, 121, 33, 128, 80, 101), 12, 64),
        mlm=(2048, 768, 30522),
        conv=(8, 64, 64, 56, 56),
        conv_format=CL,
        pool_format=CL,
        threads=None,
    ),
}
DROPOUT_P = 0.1
MLM_LABELLED = 0.15


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and element bytes (in logical order: layout does not matter)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Inputs:
    """Seeded float64 draws on the CPU, cast to ``dtype`` and moved to ``device``."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype = device, dtype

    def randn(self, *shape, scale: float = 1.0, fmt=CF, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(self.dtype)
        t = t.to(self.device).contiguous(memory_format=fmt)
        return t.requires_grad_(grad)


def _attention(p: dict, inp: _Inputs, dropout_p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b, h, n, d = p["attention"]
    q, k, v = (inp.randn(b, h, n, d) for _ in range(3))
    key_mask = (torch.arange(n)[None, :] < torch.tensor(p["key_lengths"])[:, None]).to(inp.device)
    out = ptfast.attention(q, k, v, dropout_p=dropout_p, key_mask=key_mask)
    return out, [q, k, v]


def _varlen(p: dict, inp: _Inputs, dropout_p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    lengths, h, d = p["varlen"]
    total = sum(lengths)
    q, k, v = (inp.randn(total, h, d) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=inp.device)
    out = ptfast.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), dropout_p=dropout_p, is_causal=True)
    return out, [q, k, v]


def _mlm(p: dict, inp: _Inputs, dropout_p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    n, e, vocab = p["mlm"]
    hidden = inp.randn(n, e)
    weight = inp.randn(vocab, e, scale=e**-0.5)
    bias = inp.randn(vocab, scale=0.1)
    labels = torch.randint(0, vocab, (n,), generator=inp.gen)
    labels[torch.rand(n, generator=inp.gen) > MLM_LABELLED] = -100
    labels[0] = 3  # at least one labelled row whatever the draw
    loss = ptfast.masked_lm_loss(hidden, weight, labels.to(inp.device), bias, label_smoothing=0.1, reduction="none")
    return loss, [hidden, weight, bias]


def _conv(pool: bool) -> Callable:
    def run(p: dict, inp: _Inputs, dropout_p: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, cin, cout, h, w = p["conv"]
        x = inp.randn(n, cin, h, w, fmt=p["pool_format" if pool else "conv_format"])
        weight = inp.randn(cout, cin, 3, 3, scale=(9 * cin) ** -0.5)
        bias = inp.randn(cout, scale=0.1)
        fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
        return fn(x, weight, bias, padding=1), [x, weight, bias]

    return run


_BUILDERS = {
    "attention": _attention,
    "attention_varlen": _varlen,
    "masked_lm_loss": _mlm,
    "conv_relu": _conv(False),
    "conv_relu_pool": _conv(True),
}


def outputs(
    op: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    preset: str = "tiny",
    input_seed: int = 1234,
    dropout_p: float = DROPOUT_P,
) -> list[torch.Tensor]:
    """``[out, *grads]`` of one forward + backward of ``op`` (the grads of every input that has one).

    Draws the attention dropout seed from torch's default generator: seed it first (not thread-safe)."""
    inp = _Inputs(input_seed, torch.device(device), dtype)
    out, leaves = _BUILDERS[op](PRESETS[preset], inp, dropout_p)
    upstream = inp.randn(*out.shape, grad=False).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, upstream)
    return [out.detach(), *grads]


def run(
    backend: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    preset: str = "tiny",
    ops: tuple[str, ...] = OPS,
    input_seed: int = 1234,
    dropout_seed: int = 99,
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """``({"<op>.out" / "<op>.grad<i>": sha256}, dispatch events)`` of forward + backward of ``ops``."""
    digests: dict[str, str] = {}
    with _threads(PRESETS[preset]["threads"]), ptfast.use_backend(backend), record_dispatch() as events:
        for i, op in enumerate(ops):
            torch.manual_seed(dropout_seed + i)
            out, *grads = outputs(op, device, dtype, preset, input_seed + i)
            digests[f"{op}.out"] = digest(out)
            for j, g in enumerate(grads):
                digests[f"{op}.grad{j}"] = digest(g)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return digests, list(events)


def child_command(backend: str, device: str, dtype: str, preset: str, ops: tuple[str, ...] = OPS) -> list[str]:
    """The command line of a child process that prints this workload's digests as JSON."""
    return [
        sys.executable, "-m", "tests.determinism_workload", "--backend", backend, "--device", device,
        "--dtype", dtype, "--preset", preset, "--ops", ",".join(ops),
    ]  # fmt: skip


def run_children(
    count: int, backend: str, device: str, dtype: str, preset: str, ops: tuple[str, ...] = OPS, interpret: bool = False
) -> list[dict]:
    """Run the workload in ``count`` fresh processes at once; each one's ``{"digests", "events"}``.

    ``interpret``: with ``TRITON_INTERPRET=1`` (else without it, whatever this process has)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PTFAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = child_command(backend, device, dtype, preset, ops)
    procs = [
        subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"child {cmd} failed ({proc.returncode}):\n{err[-4000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- which Triton kernels ran, with which launch configuration (triton backend only) ------------------------------


def spy_kernels(monkeypatch) -> list[tuple[str, object, dict]]:  # noqa: ANN001 - pytest's MonkeyPatch
    """Log every Triton kernel launch ``kernel[grid](...)`` as ``(kernel name, grid, kwargs)`` (imports triton).

    Wraps ``KernelInterface.__getitem__``, the launch syntax of every jitted (or interpreted) kernel; calls of
    device functions from inside kernels do not pass there."""
    from triton.runtime.jit import KernelInterface

    log: list[tuple[str, object, dict]] = []
    original = KernelInterface.__getitem__

    def getitem(self, grid):  # noqa: ANN001, ANN202
        launch = original(self, grid)
        name = getattr(getattr(self, "fn", None), "__name__", type(self).__name__)

        def call(*args, **kwargs):
            log.append((name, grid, kwargs))
            return launch(*args, **kwargs)

        return call

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return log


def committed_configs(device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """``{kernel: (block sizes..., num_warps, num_stages)}`` read straight from the committed tables for the
    workload's layers (head dim <= 64; Cout <= 64), or the interpreter's fixed tiles on the CPU."""
    from ptfast.backends.triton import attention_config as ac
    from ptfast.backends.triton import conv_config as cc
    from ptfast.backends.triton import masked_lm_loss_kernels as mk

    elem = min(torch.empty((), dtype=dtype).element_size(), 4)
    if device.type == "cuda":
        cls = ac.device_class(device)
        attn, conv, mlm = ac.TABLES[cls][(elem, 64)], cc.TABLES[cls][(elem, 64)], mk.GPU_BLOCKS[elem]
        mlm_bwd = mk.GPU_BLOCKS_BACKWARD[elem]
    else:
        attn, conv, mlm = ac.INTERPRETER_BLOCKS, cc.INTERPRETER_BLOCKS, mk.INTERPRETER_BLOCKS
        mlm_bwd = mlm

    def mn(b) -> tuple:  # noqa: ANN001
        return (b.block_m, b.block_n, b.num_warps, b.num_stages)

    return {
        "_attn_fwd": mn(attn.forward),
        "_attn_bwd_dkdv": mn(attn.backward_kv),
        "_attn_bwd_dq": mn(attn.backward_q),
        "_mlm_fwd": tuple(mlm),
        "_mlm_bwd": tuple(mlm_bwd),
        "_mlm_bwd_dh_deterministic": tuple(mlm_bwd),
        "_mlm_bwd_dw_deterministic": tuple(mlm_bwd),
        "_conv_gemm_fwd": mn(conv),
    }


def launch_config(name: str, kwargs: dict) -> tuple:
    """The launch's configuration in :func:`committed_configs`' form."""
    keys = ("BLOCK_M", "BLOCK_V", "BLOCK_K") if name.startswith("_mlm") else ("BLOCK_M", "BLOCK_N")
    return (*(kwargs.get(k) for k in keys), kwargs.get("num_warps"), kwargs.get("num_stages"))


def _serialize_interpreter() -> None:
    """Run Triton-interpreter kernels one at a time: triton's interpreter keeps the program id of the running
    kernel in a process-global builder (and patches ``triton.language`` while a kernel runs), so two threads
    interpreting kernels at once corrupt each other. Everything around the kernel body still runs concurrently."""
    from triton.runtime import interpreter

    lock = threading.Lock()
    call = interpreter.GridExecutor.__call__  # one kernel launch (the AST rewrite, triton's "compile", is outside)

    def locked(self, *args, **kwargs):
        with lock:
            return call(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = locked


def concurrent_first_use(backend: str, device: str, preset: str, threads: int, ops: tuple[str, ...] = OPS) -> dict:
    """In this (fresh) process: ``threads`` threads, released together, make the first calls of ``ops`` (no
    dropout); then a serial run. ``{"ok", "errors", "mismatches"}``: every thread must equal the serial run."""
    barrier = threading.Barrier(threads)
    results: dict[int, dict[str, list[torch.Tensor]]] = {}
    errors: list[str] = []

    def job(i: int) -> None:
        try:
            barrier.wait(timeout=120)
            with ptfast.use_backend(backend):
                results[i] = {op: outputs(op, device, preset=preset, dropout_p=0.0) for op in ops}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"thread {i}: {exc!r}")

    pool = [threading.Thread(target=job, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    with ptfast.use_backend(backend), record_dispatch() as events:
        serial = {op: outputs(op, device, preset=preset, dropout_p=0.0) for op in ops}
    mismatches = [
        f"thread {i} {op}[{j}]"
        for i, res in results.items()
        for op in ops
        for j, (a, b) in enumerate(zip(res[op], serial[op], strict=True))
        if not torch.equal(a, b)
    ]
    ran = sorted({(op, b) for op, b, phase in events if phase in ("forward", "backward")})
    ok = not errors and not mismatches and len(results) == threads and ran == [(op, backend) for op in sorted(ops)]
    return {"ok": ok, "errors": errors, "mismatches": mismatches, "ran": ran}


def run_concurrent_child(
    threads: int, backend: str, device: str, preset: str, env: dict | None = None, interpret: bool = False
) -> dict:
    """:func:`concurrent_first_use` in a fresh process (under the interpreter: kernel bodies serialized)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PTFAST_BACKEND")}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
    child_env.update(env or {})
    if interpret:
        child_env["TRITON_INTERPRET"] = "1"
    cmd = [
        sys.executable, "-m", "tests.determinism_workload", "--backend", backend, "--device", device,
        "--preset", preset, "--concurrent", str(threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=child_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child {cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--concurrent", type=int, default=0, help="threads for the concurrent first-use check")
    args = parser.parse_args(argv)
    if args.concurrent:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            _serialize_interpreter()
        print(json.dumps(concurrent_first_use(args.backend, args.device, args.preset, args.concurrent)))
        return
    digests, events = run(
        args.backend, args.device, getattr(torch, args.dtype), args.preset, tuple(args.ops.split(","))
    )
    print(json.dumps({"digests": digests, "events": sorted(set(events))}))


if __name__ == "__main__":
    main()
