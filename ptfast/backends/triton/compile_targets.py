"""Registry of Triton kernel configurations, and a CLI that compiles them for GPU targets without a GPU.

    python -m ptfast.backends.triton.compile_targets --arch 80 89 90  # compile every registered config
    python -m ptfast.backends.triton.compile_targets --list           # list names and their targets
    python -m ptfast.backends.triton.compile_targets --only attention_fwd --jobs 2
    python -m ptfast.backends.triton.compile_targets --hot --arch 80 90 --json hot.json  # the no-spill gate

CI runs the first form on a machine without a GPU (``tests/test_compile_targets.py``): every configuration a
launcher can pick must compile for sm_80 and sm_90, so a kernel change that breaks one target (or a config that
needs more shared memory than the target has) fails there instead of on a user's GPU.

How a kernel module takes part (every later Triton kernel should do the same):

1. Keep the configurations the launcher picks from in one module-level table, and at import time call
   :func:`register` once per (config x dtype x other specialization) the launcher can use, built from that same
   table so the two cannot drift apart. ``signature`` gives the Triton type of every *runtime* argument
   (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``, ...); ``constexprs`` the value
   of every ``tl.constexpr`` parameter. Every kernel parameter must appear in exactly one of the two.
   ``divisible_by_16`` names the arguments the JIT would see as multiples of 16 (pointers from torch's
   allocator are 16-byte aligned), so the check compiles what a launch on ordinary sizes compiles.
2. Add the module's import path to :data:`KERNEL_MODULES` (the CLI imports exactly those modules).

Registration is plain data, so a kernel module stays importable without a GPU; compiling imports triton only
inside :func:`compile_config`. The JIT also specializes integer arguments on their values (``1``, ``i64``
beyond 2^31), which the registered signatures need not enumerate: the check is about the kernel code and
its resource use on each target, not about every specialization.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every module that registers Triton kernel configurations (imported by load_all / the CLI).
KERNEL_MODULES: tuple[str, ...] = (
    "ptfast.backends.triton.bias_relu",
    "ptfast.backends.triton.bias_relu_pool",
    "ptfast.backends.triton.attention_kernels",
    "ptfast.backends.triton.masked_lm_loss_kernels",
    "ptfast.backends.triton.implicit_gemm_kernels",
)

DEFAULT_ARCHS: tuple[int, ...] = (80, 89, 90)

# Opt-in shared memory per block (bytes) of the smallest GPU of each compute capability ptfast supports; a
# config above the limit compiles but could never launch there, so the check reports it as a failure.
SHARED_MEMORY_LIMIT: dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class KernelConfig:
    """One compilable specialization of a ``@triton.jit`` kernel."""

    name: str  # unique, e.g. "bias_relu[fp16,nchw,bias,16x64,w4]"
    kernel: Any  # the triton JITFunction
    signature: Mapping[str, str]  # runtime argument name -> Triton type string
    constexprs: Mapping[str, object]  # tl.constexpr parameter name -> value
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = field(default=())
    archs: tuple[int, ...] | None = None  # the GPU classes a per-GPU table entry is for; None: every target
    hot: bool = False  # a variant training runs all the time: must compile without register spills
    # Integer arguments' values at a typical launch. The JIT specializes an int equal to 1 into a constant and
    # marks a multiple of 16 as such; the check does the same, so it compiles what that launch compiles.
    launch_ints: Mapping[str, int] = field(default_factory=dict)


_REGISTRY: dict[str, KernelConfig] = {}


def register(
    name: str,
    kernel: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: tuple[str, ...] = (),
    archs: tuple[int, ...] | None = None,
    hot: bool = False,
    launch_ints: Mapping[str, int] | None = None,
) -> KernelConfig:
    """Add one configuration; raises ``ValueError`` on a name registered twice with different contents.

    ``archs``: for a configuration taken from a per-GPU table, the compute capabilities it is launched on
    (``(89,)`` for the 99 KiB-shared-memory class); it is compiled for those targets only.
    ``hot``: a variant on the training hot path (BERT / causal / plain attention, every masked-LM and implicit-GEMM
    conv kernel): the check fails when ptxas reports any spill store for it.
    ``launch_ints``: values of integer arguments (strides, sizes) at the launch the config stands for; those
    equal to 1 are compiled as constants and multiples of 16 as aligned, as the JIT specializes them.
    """
    ints = dict(launch_ints or {})
    bad = [n for n in ints if signature.get(n) not in ("i32", "i64")]
    if bad:
        raise ValueError(f"Triton kernel config {name!r}: launch_ints names no integer argument: {bad}")
    cfg = KernelConfig(
        name, kernel, dict(signature), dict(constexprs), num_warps, num_stages, tuple(divisible_by_16),
        tuple(archs) if archs is not None else None, hot, ints,
    )  # fmt: skip
    old = _REGISTRY.get(name)
    if old is not None and old != cfg:
        raise ValueError(f"Triton kernel config {name!r} registered twice with different contents")
    _REGISTRY[name] = cfg
    return cfg


def registered() -> list[KernelConfig]:
    """The configurations registered so far (by the modules imported so far), in registration order."""
    return list(_REGISTRY.values())


def load_all() -> list[KernelConfig]:
    """Import every module in :data:`KERNEL_MODULES` (which registers its configs) and return the registry."""
    for module in KERNEL_MODULES:
        importlib.import_module(module)
    return registered()


@dataclass
class CompileReport:
    config: KernelConfig
    arch: int
    ok: bool
    detail: str  # resources on success, the error on failure
    seconds: float
    resources: dict[str, Any] = field(default_factory=dict)  # see _resources (empty on a failed compile)


# ptxas -v, as Triton's JIT runs it ("ptxas info" / "ptxas-blackwell info" lines): registers and spills.
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _resources(compiled: Any, ptxas_log: str, arch: int) -> dict[str, Any]:
    """Registers, spills (from Triton's own ``ptxas -v``), shared memory and which tensor-core instructions the
    PTX uses: ``wgmma`` (sm_90a's warpgroup MMA, what the main GEMMs must use on Hopper) or ``mma`` (mma.sync)."""
    regs = _PTXAS_REGS.search(ptxas_log)
    spills = _PTXAS_SPILLS.search(ptxas_log)
    ptx = compiled.asm.get("ptx", "") or ""
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared": int(getattr(compiled.metadata, "shared", 0)),
        "wgmma": ptx.count("wgmma.mma_async") if arch >= 90 else None,
        "mma": ptx.count("mma.sync"),
    }


def _describe(res: dict[str, Any]) -> str:
    def n(key: str) -> str:
        return "?" if res.get(key) is None else str(res[key])

    text = f"shared {res['shared']} B, regs {n('registers')}, spill stores {n('spill_stores')} B"
    text += f", loads {n('spill_loads')} B, mma.sync {res['mma']}"
    if res.get("wgmma") is not None:
        text += f", wgmma {res['wgmma']}"
    return text


def _full_signature(cfg: KernelConfig) -> dict[str, str]:
    """Triton's ASTSource wants every parameter in the signature, constexprs typed "constexpr"."""
    names = list(cfg.kernel.arg_names)
    unknown = (set(cfg.signature) | set(cfg.constexprs)) - set(names)
    if unknown:
        raise ValueError(f"{cfg.name}: not parameters of {cfg.kernel.__name__}: {sorted(unknown)}")
    both = set(cfg.signature) & set(cfg.constexprs)
    if both:
        raise ValueError(f"{cfg.name}: in both signature and constexprs: {sorted(both)}")
    missing = [n for n in names if n not in cfg.signature and n not in cfg.constexprs]
    if missing:
        raise ValueError(f"{cfg.name}: parameters with no type or constexpr value: {missing}")
    ones = {n for n, v in cfg.launch_ints.items() if v == 1}
    return {n: "constexpr" if n in cfg.constexprs or n in ones else cfg.signature[n] for n in names}


def _specialized(cfg: KernelConfig) -> tuple[dict[str, object], tuple[str, ...]]:
    """(constexpr values, arguments divisible by 16) as the JIT specializes the config's launch (ints equal to 1
    become constants; multiples of 16, pointers from torch's allocator included, are marked aligned)."""
    constexprs = {**cfg.constexprs, **{n: 1 for n, v in cfg.launch_ints.items() if v == 1}}
    aligned = cfg.divisible_by_16 + tuple(n for n, v in cfg.launch_ints.items() if v != 1 and v % 16 == 0)
    return constexprs, aligned


def compile_config(cfg: KernelConfig, arch: int) -> CompileReport:
    """Compile one configuration for ``GPUTarget("cuda", arch, 32)``; no GPU needed.

    Registers and spills come from the log of the ``ptxas -v`` Triton itself runs; a kernel loaded from Triton's
    cache runs no ptxas, so the CLI compiles into a fresh cache directory. A hot configuration fails on any spill
    store, or when the log is missing.
    """
    start = time.perf_counter()
    try:
        # Imported here so that registering (and `import ptfast`) never needs triton. These names exist with
        # these signatures in triton 3.3 through 3.9: ASTSource(fn, signature, constexprs, attrs), where
        # constexprs and attrs are keyed by argument-index tuples, and compile(src, target=, options=).
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        names = list(cfg.kernel.arg_names)
        constexpr_values, aligned = _specialized(cfg)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        constexprs = {(names.index(k),): v for k, v in constexpr_values.items()}
        src = ASTSource(cfg.kernel, _full_signature(cfg), constexprs, attrs)
        log = io.StringIO()
        with _ptxas_log_to(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
        res = _resources(compiled, log.getvalue(), arch)
        detail = _describe(res)
        limit = SHARED_MEMORY_LIMIT.get(arch)
        seconds = time.perf_counter() - start
        if limit is not None and res["shared"] > limit:
            return CompileReport(cfg, arch, False, f"{detail} > limit {limit} B", seconds, res)
        if cfg.hot and res["spill_stores"] is None:
            return CompileReport(cfg, arch, False, f"{detail}: hot config without a ptxas log", seconds, res)
        if cfg.hot and res["spill_stores"] > 0:
            return CompileReport(cfg, arch, False, f"{detail}: hot config spills", seconds, res)
        return CompileReport(cfg, arch, True, detail, seconds, res)
    except Exception as exc:  # report every failure, keep compiling the rest
        msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
        return CompileReport(cfg, arch, False, msg[:2000], time.perf_counter() - start)


@contextlib.contextmanager
def _ptxas_log_to(sink: io.StringIO) -> Iterator[None]:
    """Have Triton print its ptxas log (knobs.nvidia.dump_ptxas_log, triton >= 3.4) into ``sink``."""
    from triton import knobs

    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        knobs.nvidia.dump_ptxas_log = old


def _targets(cfg: KernelConfig, requested: list[int]) -> list[int]:
    return [a for a in requested if cfg.archs is None or a in cfg.archs]


def _compile_job(job: tuple[str, int]) -> tuple[str, int, bool, str, float, dict[str, Any]]:
    # Plain data back from a worker process (a JITFunction does not pickle).
    name, arch = job
    r = compile_config(_REGISTRY[name], arch)
    return name, arch, r.ok, r.detail, r.seconds, r.resources


def _report(result: tuple[str, int, bool, str, float, dict[str, Any]]) -> CompileReport:
    name, arch, ok, detail, seconds, resources = result
    return CompileReport(_REGISTRY[name], arch, ok, detail, seconds, resources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every registered Triton kernel config for GPU targets.")
    parser.add_argument("--arch", nargs="+", type=int, default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--list", action="store_true", help="only list the registered configurations")
    parser.add_argument("--only", default="", help="only configs whose name contains this text")
    parser.add_argument("--hot", action="store_true", help="only the hot variants (which must not spill)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    parser.add_argument("--json", default="", help="also write every report (resources included) to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("FAIL: unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU target")
        return 2
    configs = [c for c in load_all() if args.only in c.name and (c.hot or not args.hot)]
    if args.list:
        # One line per config: its name, then the targets it is compiled for.
        for cfg in configs:
            print(f"{cfg.name} {','.join(f'sm_{a}' for a in _targets(cfg, args.arch))}")
        print(f"{len(configs)} configs registered")
        return 0
    if not configs:
        print("FAIL: no Triton kernel configs registered")
        return 1
    jobs = [(cfg.name, arch) for arch in args.arch for cfg in configs if arch in _targets(cfg, args.arch)]
    # A fresh cache: a kernel Triton finds in its cache is not run through ptxas, which leaves no register report.
    with tempfile.TemporaryDirectory(prefix="ptfast-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        reports = list(_run_jobs(jobs, args.jobs))
    failed = sum(not r.ok for r in reports)
    hot = [r for r in reports if r.config.hot]
    spilling = [r for r in hot if r.resources.get("spill_stores")]
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"{len(jobs) - failed}/{len(jobs)} compiled ({len(configs)} configs for {archs}); "
          f"hot variants: {len(hot)} compiled, {len(spilling)} spill")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([report_record(r) for r in reports], indent=1) + "\n")
    return 1 if failed else 0


def _run_jobs(jobs: list[tuple[str, int]], n_jobs: int) -> Iterator[CompileReport]:
    if n_jobs > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers inherit the registry filled by load_all().
        with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for r in pool.map(_compile_job, jobs):
                yield _print_report(_report(r))
    else:
        for job in jobs:
            yield _print_report(_report(_compile_job(job)))


def report_record(r: CompileReport) -> dict[str, Any]:
    """One report as plain data (the --json file, read by ``benchmarks/static_kernels.py``)."""
    cfg = r.config
    return {
        "name": cfg.name, "kernel": cfg.kernel.__name__, "arch": r.arch, "hot": cfg.hot, "ok": r.ok,
        "detail": r.detail, "seconds": round(r.seconds, 2), "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages, **r.resources,
    }  # fmt: skip


def _print_report(r: CompileReport) -> CompileReport:
    status = "OK  " if r.ok else "FAIL"
    print(f"{status} sm_{r.arch} {r.config.name}: {r.detail} ({r.seconds:.1f} s)", flush=True)
    return r


if __name__ == "__main__":
    # Run as `python -m`, this file is the module `__main__`, a different object from the
    # `ptfast.backends.triton.compile_targets` the kernel modules register into: use that one's registry.
    from ptfast.backends.triton.compile_targets import main as _main

    sys.exit(_main())
