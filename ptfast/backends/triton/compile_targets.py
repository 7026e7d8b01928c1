"""Registry of Triton kernel configurations, and a CLI that compiles them for GPU targets without a GPU.

    python -m ptfast.backends.triton.compile_targets --arch 80 89 90  # compile every registered config
    python -m ptfast.backends.triton.compile_targets --list           # list names and their targets
    python -m ptfast.backends.triton.compile_targets --only attention_fwd --jobs 2

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
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
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
) -> KernelConfig:
    """Add one configuration; raises ``ValueError`` on a name registered twice with different contents.

    ``archs``: for a configuration taken from a per-GPU table, the compute capabilities it is launched on
    (``(89,)`` for the 99 KiB-shared-memory class); it is compiled for those targets only.
    """
    cfg = KernelConfig(
        name, kernel, dict(signature), dict(constexprs), num_warps, num_stages, tuple(divisible_by_16),
        tuple(archs) if archs is not None else None,
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
    return {n: "constexpr" if n in cfg.constexprs else cfg.signature[n] for n in names}


def _cuobjdump() -> str | None:
    """cuobjdump reads a cubin's register count offline; triton ships one next to its ptxas."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except Exception:  # only used for an optional report column
        pass
    return shutil.which("cuobjdump")


def _registers(cubin: bytes | None) -> str:
    tool = _cuobjdump()
    if not cubin or tool is None:
        return "regs n/a"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)", proc.stdout)
    return f"regs {m.group(1)}" if m else "regs n/a"


def compile_config(cfg: KernelConfig, arch: int) -> CompileReport:
    """Compile one configuration for ``GPUTarget("cuda", arch, 32)``; no GPU needed."""
    start = time.perf_counter()
    try:
        # Imported here so that registering (and `import ptfast`) never needs triton. These names exist with
        # these signatures in triton 3.3 through 3.9: ASTSource(fn, signature, constexprs, attrs), where
        # constexprs and attrs are keyed by argument-index tuples, and compile(src, target=, options=).
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        names = list(cfg.kernel.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.divisible_by_16}
        constexprs = {(names.index(k),): v for k, v in cfg.constexprs.items()}
        src = ASTSource(cfg.kernel, _full_signature(cfg), constexprs, attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        shared = int(getattr(compiled.metadata, "shared", 0))
        limit = SHARED_MEMORY_LIMIT.get(arch)
        detail = f"shared {shared} B, {_registers(compiled.asm.get('cubin'))}"
        if limit is not None and shared > limit:
            return CompileReport(cfg, arch, False, f"{detail} > limit {limit} B", time.perf_counter() - start)
        return CompileReport(cfg, arch, True, detail, time.perf_counter() - start)
    except Exception as exc:  # report every failure, keep compiling the rest
        msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
        return CompileReport(cfg, arch, False, msg[:2000], time.perf_counter() - start)


def _targets(cfg: KernelConfig, requested: list[int]) -> list[int]:
    return [a for a in requested if cfg.archs is None or a in cfg.archs]


def _compile_job(job: tuple[str, int]) -> tuple[str, int, bool, str, float]:
    # Plain data back from a worker process (a JITFunction does not pickle).
    name, arch = job
    r = compile_config(_REGISTRY[name], arch)
    return name, arch, r.ok, r.detail, r.seconds


def _report(result: tuple[str, int, bool, str, float]) -> CompileReport:
    name, arch, ok, detail, seconds = result
    return CompileReport(_REGISTRY[name], arch, ok, detail, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every registered Triton kernel config for GPU targets.")
    parser.add_argument("--arch", nargs="+", type=int, default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--list", action="store_true", help="only list the registered configurations")
    parser.add_argument("--only", default="", help="only configs whose name contains this text")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("FAIL: unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU target")
        return 2
    configs = [c for c in load_all() if args.only in c.name]
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
    failed = 0
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers inherit the registry filled by load_all().
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            reports = pool.map(_compile_job, jobs)
            for r in reports:
                failed += _print_report(_report(r))
    else:
        for job in jobs:
            failed += _print_report(_report(_compile_job(job)))
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"{len(jobs) - failed}/{len(jobs)} compiled ({len(configs)} configs for {archs})")
    return 1 if failed else 0


def _print_report(r: CompileReport) -> int:
    status = "OK  " if r.ok else "FAIL"
    print(f"{status} sm_{r.arch} {r.config.name}: {r.detail} ({r.seconds:.1f} s)", flush=True)
    return 0 if r.ok else 1


if __name__ == "__main__":
    # Run as `python -m`, this file is the module `__main__`, a different object from the
    # `ptfast.backends.triton.compile_targets` the kernel modules register into: use that one's registry.
    from ptfast.backends.triton.compile_targets import main as _main

    sys.exit(_main())
