"""``python -m benchmarks.first_contact COMMAND``: the steps ``bash scripts/gpu_run.sh first-contact`` runs.

    smoke     --device D --out smoke.json [--jobs N] [--timeout S]   every family, each in its own process
    smoke-one NAME --device D --out row.json                          one family, in this process
    headline  --device D --out-dir DIR [--budget S]                   the headline benchmarks (benchmarks.run)
    record    --device D --smoke smoke.json --results DIR --out F [--package]   the verification record
    tier      [--results-dir DIR] [--check]                           the GPU test tier in slices, in order
    summary   --device D --smoke smoke.json --results DIR --record F --out first_contact.md

``--device cpu`` is the rehearsal: the Triton interpreter, fp16, tiny shapes; its record never reaches the package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.first_contact import headline, smoke, tier

ROOT = Path(__file__).resolve().parents[2]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: str, rows: list) -> None:
    """Whole or not at all (a write cut by the step's timeout must not leave half a file)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def cmd_smoke(args: argparse.Namespace) -> int:
    start = time.monotonic()
    rows = smoke.run_all(args.device, args.jobs, args.timeout, _log, on_rows=lambda done: _write_json(args.out, done))
    _write_json(args.out, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "skipped")}
    _log(f"[smoke] {counts} in {time.monotonic() - start:.0f} s -> {args.out}")
    return 1 if failed else 0


def cmd_smoke_one(args: argparse.Namespace) -> int:
    row = smoke.run_one(args.name, args.device)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


def cmd_headline(args: argparse.Namespace) -> int:
    cpu = args.device == "cpu"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    worst = 0
    deadline = time.monotonic() + args.budget if args.budget else None
    for inv in headline.plan(cpu):
        budget_left = None if deadline is None else deadline - time.monotonic()
        lim = headline.limits(inv, budget_left)
        if lim is None:
            _log(
                f"[headline] {inv.op}: not started, {budget_left:.0f} s of the headline budget left "
                f"(--budget {args.budget:.0f}; it needs half of its {inv.seconds} s + {headline.START_UP_S} s)"
            )
            worst = worst or 124
            continue
        seconds, timeout = lim
        cmd = headline.command(inv, cpu=cpu, out_dir=out_dir, python=sys.executable, seconds=seconds)
        env = dict(os.environ)
        if inv.unverified:
            env["PTFAST_ALLOW_UNVERIFIED"] = "1"
        if cpu and inv.interpreter:
            env["TRITON_INTERPRET"] = "1"
        elif cpu:
            env.pop("TRITON_INTERPRET", None)
        _log(f"[headline] {' '.join(cmd)}" + ("  (PTFAST_ALLOW_UNVERIFIED=1)" if inv.unverified else ""))
        start = time.monotonic()
        try:
            # The runner stops starting measurements at --time-limit and then writes its reports.
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        _log(f"[headline] {inv.op}: exit {rc} after {time.monotonic() - start:.0f} s")
        worst = worst or rc
    return worst


def _run_meta(device: str) -> dict[str, Any]:
    import torch

    from benchmarks import env

    meta = env.collect(torch.device(device), sys.argv)
    gpu = smoke.gpu_class(device)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    commit = str(meta.get("git_commit", "unknown"))[:12]
    return {"id": f"{stamp}-{gpu}-{commit}", "device": meta.get("device"), "gpu_class": gpu,
            "date": meta.get("date_utc"), "commit": meta.get("git_commit"), "dirty": meta.get("git_dirty"),
            "torch": meta.get("torch"), "triton": meta.get("triton"), "cuda": meta.get("cuda_runtime"),
            "driver": meta.get("driver"), "transformers": meta.get("transformers"),
            "method": "python -m benchmarks.first_contact (scripts/gpu_run.sh first-contact)"}  # fmt: skip


def cmd_record(args: argparse.Namespace) -> int:
    from ptfast import verification

    rows = json.loads(Path(args.smoke).read_text()) if Path(args.smoke).is_file() else []
    gpu = smoke.gpu_class(args.device)
    bench = headline.bench_rows(Path(args.results), gpu)
    run = _run_meta(args.device)
    base = verification.load_record()
    record = verification.build(rows, bench, run["id"], {k: v for k, v in run.items() if k != "id"}, base)
    text = json.dumps(record.to_json(), indent=1) + "\n"
    Path(args.out).write_text(text)
    _log(f"[record] {len(bench)} benchmarked classes -> {args.out}")
    for line in verification.status_lines(record, gpu):
        _log(f"  {line}")
    problems = _problems(rows, Path(args.results))
    for p in problems:
        _log(f"[record] problem: {p}")
    if args.strict and problems:
        return 1
    if args.package:
        if args.device == "cpu":
            _log("[record] a CPU rehearsal never writes the package's record")
            return 2
        verification.RECORD_PATH.write_text(text)
        _log(f"[record] also written to {verification.RECORD_PATH.relative_to(ROOT)} (commit it)")
    return 0


def _problems(smoke_rows: list[dict[str, Any]], results: Path) -> list[str]:
    """What makes a rehearsal fail: a failed smoke family, a headline op without results, a provider error, a
    failed backend check. (On a GPU these are findings the record and the summary report, not script errors.)"""
    out = [f"smoke {r['name']}: {r.get('error', '')[:200]}" for r in smoke_rows if r["status"] == "failed"]
    cpu = not any(r["gpu_class"].startswith("sm") for r in smoke_rows)
    for inv in headline.plan(cpu):
        path = results / f"{inv.op}.json"
        if not path.is_file():
            out.append(f"headline {inv.op}: no results ({path.name})")
            continue
        for rec in json.loads(path.read_text())["results"]:
            where = f"headline {inv.op} / {rec['case']} / {rec['provider']} / {rec['mode']}"
            if rec["status"] == "error":
                out.append(f"{where}: {rec['reason']}")
            check = rec.get("check")
            if check is not None and not check.get("passed"):
                out.append(f"{where}: check against {check['against']} failed: {check}")
    return out


def cmd_tier(args: argparse.Namespace) -> int:
    if args.check:
        problems = tier.check_coverage()
        for p in problems:
            _log(f"[tier] {p}")
        _log(f"[tier] coverage: {'OK' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    rows = tier.plan(results_dir=Path(args.results_dir) if args.results_dir else None)
    total = sum(r["tests"] for r in rows)
    _log(f"[tier] the rest of the GPU tier: {total} tests in {len(rows)} slices (budget {tier.SLICE_BUDGET_S} s "
         "each; estimates until measured), run in this order:")  # fmt: skip
    for i, r in enumerate(rows, 1):
        flag = "" if r["fits"] else "  (over budget: split it)"
        _log(f"  {i}. {r['command']:<45} {r['tests']:>4} tests ~{r['seconds']:>4} s "
             f"({r['measured']} measured)  {r['why']}{flag}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    rows = json.loads(Path(args.smoke).read_text()) if Path(args.smoke).is_file() else []
    record = json.loads(Path(args.record).read_text()) if Path(args.record).is_file() else {"entries": []}
    gpu = smoke.gpu_class(args.device)
    bench = headline.bench_rows(Path(args.results), gpu)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# First contact: {gpu}", "", f"Device `{args.device}`; run {when}.", "",
             "## GPU correctness smoke (docs/design.md §5 rule against float64)", "",
             "| family | status | seconds | detail |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        detail = (r.get("error") or "")[:160].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '')} | {detail} |")
    lines += ["", "## Headline: speed-up over the torch backend (fwd+bwd, same run)", "",
              "| op | backend | shape class | case | speed-up | p20-p80 | checked |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for b in bench:
        lo, hi = b["spread"]
        lines.append(f"| {b['op']} | {b['backend']} | {b['shape_class']} | {b['case']} | {b['speedup']:.3g}x | "
                     f"{lo:.2f}-{hi:.2f} | {b['checked']} |")  # fmt: skip
    lines += ["", f"## Verification record: {len(record.get('entries', []))} entries", ""]
    from ptfast.verification import Record, status_lines

    lines += [f"- {line}" for line in status_lines(Record.from_json(record), gpu)] if record.get("schema") else []
    Path(args.out).write_text("\n".join(lines) + "\n")
    _log(f"[summary] -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.first_contact", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke")
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per family process")
    p = sub.add_parser("smoke-one")
    p.add_argument("name")
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("headline")
    p.add_argument("--device", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all invocations: each gets at most what is left; one that would not fit is "
                   "not started (exit 124). Default: each its own --time-limit")  # fmt: skip
    p = sub.add_parser("record")
    p.add_argument("--device", required=True)
    p.add_argument("--smoke", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--package", action="store_true", help="also write ptfast/verified.json (GPU only)")
    p.add_argument("--strict", action="store_true", help="exit 1 on a failed smoke family, error or check (CI)")
    p = sub.add_parser("tier")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true", help="check that the slices hold every GPU test exactly once")
    p = sub.add_parser("summary")
    for name in ("--device", "--smoke", "--results", "--record", "--out"):
        p.add_argument(name, required=True)
    args = ap.parse_args(argv)
    handlers = {"smoke": cmd_smoke, "smoke-one": cmd_smoke_one, "headline": cmd_headline, "record": cmd_record,
                "tier": cmd_tier, "summary": cmd_summary}  # fmt: skip
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
