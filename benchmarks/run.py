"""Benchmark runner: times ptfast's backends and PyTorch baselines side by side, op by op.

    python -m benchmarks.run --all --device cuda                  # GPU defaults -> benchmarks/results/<gpu>/
    python -m benchmarks.run --op conv_relu --quick --device cpu --out /tmp/bench_smoke
    python -m benchmarks.run --list                               # ops, shapes and providers

Per op it writes ``<op>.json`` (raw samples + metadata), ``<op>.md`` and ``<op>.png``. A provider that cannot
run a shape (not implemented yet, backend refuses the input, library missing, out of memory) is recorded as
"skipped" with the reason; an unexpected exception is recorded as "error" with its traceback on stderr. The run
itself never stops for one provider.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import env, report
from benchmarks.common import (
    DEFAULT_MODES,
    MODES,
    TRAIN_MODE,
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    Skip,
    tensor_bytes,
)
from benchmarks.ops import REGISTRY, load
from benchmarks.timing import Budget, L2Flusher, l2_cache_bytes, memory_use, plan_rotation, time_graph, time_steps

ROOT = Path(__file__).resolve().parent.parent
#: Modes whose first output is compared across providers (the error column).
COMPARED_MODES = ("fwd", "infer", TRAIN_MODE)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", action="append", default=[], choices=list(REGISTRY), help="op to run (repeatable)")
    ap.add_argument("--all", action="store_true", help="run every op")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--full", action="store_true", help="long shape lists and every provider variant")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="default bf16 on CUDA, fp32 on CPU (a CPU's bf16 matmul units and kernels differ from model to model; "
        "CPU training runs fp32)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results directory (default benchmarks/results/<device>/ on "
        "CUDA; a temporary directory on CPU so CPU timings never land in the repo)",
    )
    ap.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="only these providers (fnmatch globs, e.g. 'ptfast*' 'sdpa*')",
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=list(DEFAULT_MODES),
        choices=list(MODES),
        help="modes of the per-op specs; training-step ops (bert_mlm_step, vgg16_train_step, resnet50_frozen_step, "
        "resnet18_train_step) always run their "
        f"own mode {TRAIN_MODE!r}",
    )
    ap.add_argument("--cuda-graphs", action="store_true", help="also time small shapes under CUDA-graph replay")
    comp = ap.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="run torch.compile providers (default on CUDA)",
    )
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--max-autotune", action="store_true", help="also torch.compile(mode='max-autotune')")
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True); results get a '-deterministic' suffix",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed repetitions per measurement (default 0.1 on CUDA, 0.05 on CPU)",
    )
    ap.add_argument(
        "--one-rep",
        action="store_true",
        help="one timed repetition, no warm-up: proves every step runs (the CPU rehearsal of first contact), "
        "measures nothing",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="wall-clock seconds for the whole run; later measurements are recorded as skipped",
    )
    ap.add_argument(
        "--cases", nargs="+", default=None, metavar="GLOB", help="only the shapes whose name matches (fnmatch globs)"
    )
    ap.add_argument(
        "--check-backends",
        action="store_true",
        help="check every ptfast provider 'name[backend]' against 'name[torch]': forward output and gradients "
        "(torch is seeded before each provider's first call, so ptfast's dropout masks agree across backends)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list ops, shapes and providers, then exit")
    args = ap.parse_args(argv)
    if not args.op and not args.all and not args.list:
        ap.error("give --op NAME (repeatable) or --all")
    return args


# --- classification of failures ------------------------------------------------------------------------------


def _ptfast_unsupported() -> tuple[type[BaseException], ...]:
    try:
        from ptfast import BackendNotSupportedError

        return (BackendNotSupportedError,)
    except Exception:  # noqa: BLE001 - a broken ptfast import is reported per provider, not here
        return ()


def classify(exc: BaseException, caught: list[warnings.WarningMessage]) -> tuple[str, str]:
    """(status, reason) for an exception raised while building or first running a provider."""
    msg = str(exc).strip() or exc.__class__.__name__
    first = msg.splitlines()[0][:300]
    if isinstance(exc, Skip):
        return "skipped", msg
    if isinstance(exc, _ptfast_unsupported()):
        return "skipped", first
    if isinstance(exc, NotImplementedError):
        return "skipped", f"not implemented: {first}" if str(exc).strip() else "not implemented (placeholder)"
    if isinstance(exc, ImportError):
        return "skipped", f"not importable: {first}"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "skipped", "out of memory"
    if isinstance(exc, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg):
        # SDPA explains why each backend refused in warnings; keep those (they are the useful part).
        why = []
        for w in caught:
            text = re.sub(r"\(Triggered internally at [^)]*\)", "", str(w.message))
            text = " ".join(text.split()).rstrip(".")
            if text and any(k in text.lower() for k in ("kernel", "attention", "support", "sdp")):
                why.append(text)
        why = list(dict.fromkeys(why))
        detail = " / ".join(why)[:500] if why else "PyTorch gave no reason (backend not built for this device?)"
        return "skipped", f"SDPA rejected the input: {detail}"
    if isinstance(exc, RuntimeError) and "deterministic" in msg:
        return "skipped", f"no deterministic implementation: {first}"
    return "error", f"{exc.__class__.__name__}: {first}"


@contextlib.contextmanager
def _dispatch_recorder() -> Iterator[list[tuple[str, str, str]]]:
    """ptfast's record of which backend really ran (absent in a broken/partial ptfast: then empty)."""
    try:
        from ptfast.testing import record_dispatch
    except Exception:  # noqa: BLE001
        yield []
        return
    with record_dispatch() as events:
        yield events


# --- one measurement -----------------------------------------------------------------------------------------


#: Seed set before every provider's first call under --check-backends (ptfast's dropout mask is a hash of a seed
#: drawn from torch's generator, so equal seeds give every ptfast backend the same mask).
CHECK_SEED = 1234
#: --check-backends tolerance on relative errors, by the run's dtype: a sanity bound that catches a wrong kernel,
#: not a precision rule (the GPU smoke test applies docs/design.md §5 against float64).
CHECK_TOL = {torch.float16: 3e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-10}
GRADS = "#grads"


def torch_twin(provider: str) -> str | None:
    """``ptfast-varlen[triton]`` -> ``ptfast-varlen[torch]``: the provider a ptfast backend is checked against."""
    m = re.fullmatch(r"(ptfast[^\[]*)\[[^\]]*\]", provider)
    twin = f"{m.group(1)}[torch]" if m else None
    return twin if twin != provider else None


def _flat_grads(out: Any) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return torch.cat([t.detach().reshape(-1).float() for t in out])
    return None


class Runner:
    def __init__(self, opts: Options, budget: Budget, deadline: float | None, check: bool = False) -> None:
        self.opts = opts
        self.budget = budget
        self.deadline = deadline
        self.check = check
        self.l2 = l2_cache_bytes(opts.device)
        self.flusher = L2Flusher(opts.device) if opts.cuda else None

    def sync(self) -> None:
        if self.opts.cuda:
            torch.cuda.synchronize(self.opts.device)

    def input_sets(self, spec: OpSpec, case: Case) -> tuple[list[Inputs], bool]:
        """Independent random input sets for L2 rotation, and whether an L2 flush is still needed."""
        first = spec.make_inputs(case, self.opts, 0)
        if not self.opts.cuda:
            return [first], False
        nbytes = tensor_bytes(first)
        n = plan_rotation(nbytes, self.l2)
        sets = [first] + [spec.make_inputs(case, self.opts, i) for i in range(1, n)]
        # Flush unless the sets not in use (n - 1 of them) span at least twice L2.
        return sets, (n - 1) * nbytes < 2 * self.l2

    def measure(
        self,
        spec: OpSpec,
        case: Case,
        prov: Provider,
        mode: str,
        sets: list[Inputs],
        flush: bool,
        outputs: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {"case": case.name, "provider": prov.name, "mode": mode, "status": "ok", "reason": None}
        if self.deadline is not None and time.monotonic() > self.deadline:
            rec.update(status="skipped", reason="time limit reached (--time-limit)")
            return rec
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                steps = [prov.build(case, s, mode) for s in sets]
                if self.check:
                    torch.manual_seed(CHECK_SEED)
                with _dispatch_recorder() as events:
                    out = steps[0]()  # untimed first call: compilation, autotuning, validation
                    self.sync()
                rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            rec["dispatch"] = sorted({f"{op}:{backend}:{phase}" for op, backend, phase in events})
            # With dropout only ptfast's providers are comparable, and only when seeded alike (--check-backends).
            comparable = not case.params.get("dropout") or (self.check and prov.kind == "ptfast")
            if mode in COMPARED_MODES and comparable:
                canon = prov.canonical(case, sets[0], out) if prov.canonical else out
                if isinstance(canon, torch.Tensor):
                    outputs.setdefault(prov.name, canon.detach())
            if self.check and mode == "fwd+bwd" and prov.kind == "ptfast":
                grads = _flat_grads(out)
                if grads is not None:
                    outputs.setdefault(prov.name + GRADS, grads)
            del out
            flusher = self.flusher if flush else None
            rec["timing"] = time_steps(steps, self.opts.device, self.budget, flusher).summary()
            if self.opts.cuda_graphs and case.graph and self.opts.cuda:
                try:
                    rec["graph_timing"] = time_graph(steps, self.opts.device, self.budget, flusher).summary()
                except Exception as e:  # noqa: BLE001 - a step that cannot be captured is a finding, not a crash
                    self.sync()
                    rec["graph_timing"] = {
                        "status": "skipped",
                        "reason": f"{e.__class__.__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}",
                    }
            rec["peak_mem_bytes"], rec["kept_mem_bytes"] = memory_use(steps[0], self.opts.device)
        except Exception as e:  # noqa: BLE001 - every failure becomes a row of the report
            status, reason = classify(e, caught)
            rec.update(status=status, reason=reason)
            if status == "error":
                print(f"--- {spec.name} / {case.name} / {prov.name} / {mode}: error", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
            rec.pop("timing", None)
            if self.opts.cuda:
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.opts.device)
                torch.cuda.empty_cache()
        return rec


def _throughput(rec: dict[str, Any], spec: OpSpec, case: Case) -> None:
    flops = spec.flops(case, rec["mode"] if rec["mode"] != "infer" else "fwd")
    nbytes = spec.bytes_moved(case, rec["mode"] if rec["mode"] != "infer" else "fwd") if spec.bytes_moved else None
    rec["flops"], rec["bytes"] = flops, nbytes
    items = spec.items(case) if spec.items else None
    if items:
        rec["items"] = items
    for key, timing in (("", rec.get("timing")), ("graph_", rec.get("graph_timing"))):
        if not timing or not timing.get("median_ms"):
            continue
        sec = timing["median_ms"] * 1e-3
        rec[f"{key}tflops"] = flops / sec / 1e12 if flops else None
        rec[f"{key}gbps"] = nbytes / sec / 1e9 if nbytes else None
        if items:
            rec[f"{key}items_per_s"] = items / sec


def _check(
    recs: list[dict[str, Any]], outputs: dict[str, torch.Tensor], tol: float, grads_tol: float | None = None
) -> None:
    """--check-backends: each ptfast provider's forward output (or, in fwd+bwd, its gradients) against its torch
    twin's, relative error within ``tol`` (CHECK_TOL of the run's dtype; ``grads_tol`` for gradients when the op
    sets one); the result goes to ``rec["check"]``."""
    for rec in recs:
        twin = torch_twin(rec["provider"])
        if twin is None or rec["status"] != "ok" or rec.get("derived_from"):
            continue
        key = GRADS if rec["mode"] == "fwd+bwd" else ""
        out, ref = outputs.get(rec["provider"] + key), outputs.get(twin + key)
        if out is None or ref is None:
            continue
        if out.shape != ref.shape:
            rec["check"] = {
                "against": twin,
                "passed": False,
                "reason": f"shape {tuple(out.shape)} vs {tuple(ref.shape)}",
            }
            continue
        ref64 = ref.double()
        err = (out.double() - ref64).norm().item() / (ref64.norm().item() or 1.0)
        bound = grads_tol if key and grads_tol is not None else tol
        rec["check"] = {"against": twin, "what": "grads" if key else "output", "rel_err": err, "tol": bound,
                        "passed": bool(err <= bound)}  # fmt: skip


def _finish_case(
    spec: OpSpec,
    case: Case,
    recs: list[dict[str, Any]],
    outputs: dict[str, torch.Tensor],
    check_tol: float = 0.0,
    grads_check_tol: float | None = None,
) -> None:
    """Derived best-of rows, throughput, speed-up vs the baseline and error vs the reference output (and the
    --check-backends checks, which compare only what was stored for them)."""
    _check(recs, outputs, check_tol, grads_check_tol)
    for rec in recs:
        if rec["status"] == "ok":
            _throughput(rec, spec, case)
    for mode in dict.fromkeys(r["mode"] for r in recs):
        in_mode = [r for r in recs if r["mode"] == mode]
        for derived, members in spec.best_of.items():
            ok = [r for r in in_mode if r["provider"] in members and r["status"] == "ok"]
            if ok:
                best = min(ok, key=lambda r: r["timing"]["median_ms"])
                row = {**best, "provider": derived, "derived_from": best["provider"]}
            else:
                row = {
                    "case": case.name,
                    "provider": derived,
                    "mode": mode,
                    "status": "skipped",
                    "reason": "no member accepted the input",
                }
            recs.append(row)
            in_mode.append(row)
        base = next((r for r in in_mode if r["provider"] == spec.baseline and r["status"] == "ok"), None)
        for r in in_mode:
            if r["status"] == "ok" and base is not None:
                r["speedup_vs_baseline"] = base["timing"]["median_ms"] / r["timing"]["median_ms"]
    ref_name = next((n for n in spec.reference if n in outputs), None)
    if ref_name is None:
        return
    ref = outputs[ref_name].float()
    denom = ref.norm().item() or 1.0
    for rec in recs:
        if rec["status"] != "ok" or rec.get("derived_from") or rec["mode"] not in COMPARED_MODES:
            continue
        out = outputs.get(rec["provider"])
        if out is not None and out.shape == ref.shape:
            rec["rel_err"] = (out.float() - ref).norm().item() / denom
            rec["rel_err_reference"] = ref_name
    for rec in recs:  # derived rows inherit their member's error
        if rec.get("derived_from"):
            member = next(
                (
                    r
                    for r in recs
                    if r["provider"] == rec["derived_from"] and r["mode"] == rec["mode"] and not r.get("derived_from")
                ),
                None,
            )
            if member is not None and "rel_err" in member:
                rec["rel_err"] = member["rel_err"]


def _select(providers: list[Provider], globs: list[str] | None) -> list[Provider]:
    if not globs:
        return providers
    # Exact names first: provider names contain brackets, which fnmatch reads as character classes.
    return [p for p in providers if any(p.name == g or fnmatch.fnmatchcase(p.name, g) for g in globs)]


def run_op(
    spec: OpSpec, runner: Runner, args: argparse.Namespace, meta: dict[str, Any], out_dir: Path, stem: str
) -> dict[str, Any]:
    opts = runner.opts
    cases = [c for c in spec.cases(opts) if not args.cases or any(fnmatch.fnmatchcase(c.name, g) for g in args.cases)]
    providers = _select(spec.providers(opts), args.providers)
    # A training-step op runs its own modes (spec.modes); every other op the --modes given.
    modes = list(spec.modes) if spec.modes else list(args.modes)
    result: dict[str, Any] = {
        "op": spec.name,
        "title": spec.title,
        "metric": spec.metric,
        "items_label": spec.items_label if spec.items else None,
        "step_doc": spec.step_doc,
        "baseline": spec.baseline,
        "best_of": {k: list(v) for k, v in spec.best_of.items()},
        "notes": spec.notes,
        "case_doc": spec.case_doc,
        "metadata": {**meta, **(spec.metadata(opts) if spec.metadata else {})},
        "options": {
            "device": str(opts.device),
            "dtype": str(opts.dtype).replace("torch.", ""),
            "quick": opts.quick,
            "full": opts.full,
            "compile": opts.compile,
            "max_autotune": opts.max_autotune,
            "cuda_graphs": opts.cuda_graphs,
            "deterministic": opts.deterministic,
            "modes": modes,
            "budget": runner.budget.__dict__,
        },
        "timing_method": report.METHOD_TEXT,
        "cases": [{"name": c.name, "params": c.params, "graph": c.graph} for c in cases],
        "providers": [{"name": p.name, "kind": p.kind, "description": p.description} for p in providers],
        "results": [],
    }
    setup = spec.setup(opts) if spec.setup else contextlib.nullcontext()
    with setup:
        for case in cases:
            log(f"[{spec.name}] {case.name}")
            recs: list[dict[str, Any]] = []
            outputs: dict[str, torch.Tensor] = {}
            try:
                sets, flush = runner.input_sets(spec, case)
            except Exception as e:  # noqa: BLE001
                status, reason = classify(e, [])
                reason = f"could not build inputs: {reason}"
                recs = [
                    {"case": case.name, "provider": p.name, "mode": m, "status": status, "reason": reason}
                    for m in modes
                    for p in providers
                ]
                log(f"  {reason}")
                sets = []
            for mode in modes if sets else []:
                for prov in providers:
                    rec = runner.measure(spec, case, prov, mode, sets, flush, outputs)
                    recs.append(rec)
                    log("  " + _line(rec))
            _finish_case(
                spec, case, recs, outputs, CHECK_TOL.get(opts.dtype, 3e-2), spec.grads_check_tol.get(opts.dtype)
            )
            for rec in recs:
                if rec.get("check") and not rec["check"]["passed"]:
                    log(f"  CHECK FAILED {rec['mode']} {rec['provider']} vs {rec['check']['against']}: {rec['check']}")
            result["results"].extend(recs)
            del sets, outputs
            gc.collect()
            if opts.cuda:
                torch.cuda.empty_cache()
            # Partial results survive a killed run (the GPU machine enforces a hard per-command limit).
            report.write(result, out_dir, stem, png=False)
    return result


def _line(rec: dict[str, Any]) -> str:
    head = f"{rec['mode']:<8} {rec['provider']:<22}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec['reason']}"
    t = rec["timing"]
    s = f"{head} {t['median_ms']:10.4f} ms  (p20-p80 {t['p20_ms']:.4f}-{t['p80_ms']:.4f}, n={t['reps']})"
    if rec.get("first_call_s", 0) > 2:
        s += f"  first call {rec['first_call_s']:.1f}s"
    g = rec.get("graph_timing")
    if g and g.get("median_ms"):
        s += f"  graph {g['median_ms']:.4f} ms"
    return s


def _list(opts: Options) -> None:
    for name in REGISTRY:
        spec = load(name)
        log(f"{name}: {spec.title}  (baseline {spec.baseline})")
        if spec.modes:
            log(f"  modes {', '.join(spec.modes)}")
        for c in spec.cases(opts):
            log(f"  shape {c.name}")
        for p in spec.providers(opts):
            log(f"  provider {p.name:<22} {p.description}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda asked for but no CUDA device is visible")
        return 2
    if args.deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.compile:
        # One code object is recompiled for every benchmarked shape; raise Dynamo's per-function limit so it
        # never silently falls back to eager part-way through a shape list.
        dynamo_config = importlib.import_module("torch._dynamo.config")
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(256, getattr(dynamo_config, knob)))
    opts = Options(
        device=device,
        dtype=DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")],
        quick=args.quick,
        full=args.full,
        compile=args.compile,
        max_autotune=args.max_autotune,
        cuda_graphs=args.cuda_graphs,
        deterministic=args.deterministic,
    )
    if args.list:
        _list(opts)
        return 0
    if args.one_rep:
        budget = Budget(measure_s=0.0, min_reps=1, max_reps=1, warmup_reps=0, warmup_s=0.0)
    elif args.budget is not None:
        budget = Budget(measure_s=args.budget)
    elif device.type == "cuda":
        budget = Budget(measure_s=0.1, min_reps=10, max_reps=100)
    else:
        budget = Budget(measure_s=0.05, min_reps=3, max_reps=50, warmup_reps=1, warmup_s=0.0)
    if args.out:
        out_dir = Path(args.out)
    elif device.type == "cuda":
        out_dir = ROOT / "benchmarks" / "results" / env.device_slug(device)
    else:
        out_dir = Path(tempfile.gettempdir()) / "ptfast-bench" / env.device_slug(device)
        log(f"CPU run without --out: writing to {out_dir} (CPU timings are never written into the repo)")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    ops = list(REGISTRY) if args.all else list(dict.fromkeys(args.op))
    meta = env.collect(device, argv)
    log(f"device {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · out {out_dir}")
    runner = Runner(opts, budget, deadline, args.check_backends)
    suffix = "-deterministic" if args.deterministic else ""
    failed = 0
    for name in ops:
        t0 = time.monotonic()
        try:
            spec = load(name)
        except Exception:  # noqa: BLE001 - a broken spec module must not stop the other ops
            print(f"--- could not load the spec of {name}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            failed += 1
            continue
        result = run_op(spec, runner, args, meta, out_dir, name + suffix)
        paths = report.write(result, out_dir, name + suffix, png=not args.no_plot)
        errors = sum(r["status"] == "error" for r in result["results"])
        ran = sum(r["status"] == "ok" for r in result["results"])
        log(
            f"[{name}] {ran} measurements, {errors} errors, {time.monotonic() - t0:.0f}s -> "
            + ", ".join(str(p) for p in paths)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
