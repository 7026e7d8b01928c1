"""Static kernel health: registers, spills, shared memory and tensor-core use of every hot Triton variant.

    python -m benchmarks.static_kernels --out benchmarks/results/static
    python -m benchmarks.static_kernels --out benchmarks/results/static --anchor /path/to/06-fused-attention.py \\
        --anchor-source "triton-lang/triton python/tutorials/06-fused-attention.py (copy in <repo>@<commit>)"

Compiles every hot configuration (``compile_targets.register(..., hot=True)``) for sm_80 and sm_90a with the
installed Triton, reads Triton's own ``ptxas -v`` (the assembler and flags its JIT uses), and writes
``triton-<version>.md`` / ``.json``: one row per (kernel, variant, target). No GPU needed; run it once per Triton
version (the GPU machine's floor and CI's newest) and commit the output. CI enforces the part that matters
(``tests/test_compile_targets.py``: zero spill stores in every hot variant); this table is the evidence.

The anchor is the Triton tutorial's fused attention, compiled the same way (same Triton, same targets, same
ptxas) at matching tiles, so the table can say how ptfast's register and shared-memory use compare with a
known-good kernel. Its source is not part of ptfast: pass its path (the file is loaded with a stand-in for the
GPU driver it queries at import, and only its kernels are compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ARCHS = (80, 90)


def ptfast_rows(archs: tuple[int, ...], jobs: int) -> list[dict[str, Any]]:
    from ptfast.backends.triton import compile_targets as ct

    configs = [c for c in ct.load_all() if c.hot]
    job_list = [(c.name, a) for a in archs for c in configs if a in ct._targets(c, list(archs))]
    return [ct.report_record(r) for r in ct._run_jobs(job_list, jobs)]


# --- the anchor ------------------------------------------------------------------------------------------------


def _load_anchor(path: Path) -> types.ModuleType:
    """Execute the tutorial file with a stand-in driver (it asks for the active GPU at import time)."""
    import triton
    from triton.backends.compiler import GPUTarget

    class _Driver:
        def get_active_torch_device(self) -> str:
            return "cpu"

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    import torch

    config = triton.runtime.driver
    old_active = config._active  # None here: reading .active would look for a GPU driver
    old_cap = torch.cuda.get_device_capability
    config.set_active(_Driver())
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # its config filters ask; no GPU is touched
    try:
        module = types.ModuleType("ptfast_anchor_fused_attention")
        module.__file__ = str(path)
        exec(compile(path.read_text(), str(path), "exec"), module.__dict__)  # noqa: S102 - a file the user named
        return module
    finally:
        config._active = old_active
        torch.cuda.get_device_capability = old_cap


def _jit(fn: Any) -> Any:
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):  # autotuned / heuristics-wrapped kernels keep theirs in .fn
        fn = fn.fn
    return fn


def anchor_configs(module: types.ModuleType) -> list[Any]:
    """The tutorial's kernels at the tiles it uses itself (forward 128x64 with 4 and 8 warps; its backward's
    fixed 32x128 / 128x32 tiles), fp16, head dims 64 and 128, causal and not; integer arguments specialized as
    the JIT specializes a BERT-base launch, like ptfast's own hot variants."""
    from ptfast.backends.triton.compile_targets import KernelConfig

    out = []
    fwd, bwd = _jit(module._attn_fwd), _jit(module._attn_bwd)
    for dim in (64, 128):
        for causal in (False, True):
            for warps in (4, 8):
                sig = {"sm_scale": "fp32", "M": "*fp32", "Z": "i32", "H": "i32", "desc_q": "*fp16", "desc_k": "*fp16",
                       "desc_v": "*fp16", "desc_o": "*fp16", "N_CTX": "i32"}  # fmt: skip
                cons = {"HEAD_DIM": dim, "BLOCK_M": 128, "BLOCK_N": 64, "FP8_OUTPUT": False,
                        "STAGE": 3 if causal else 1, "warp_specialize": False, "IS_HOPPER": True}  # fmt: skip
                cons = {k: v for k, v in cons.items() if k in fwd.arg_names}
                sig = {k: v for k, v in sig.items() if k in fwd.arg_names}
                name = f"anchor_fwd[{'causal' if causal else 'plain'},fp16,d{dim},128x64,w{warps},s3]"
                ints = {k: v for k, v in {"Z": 8, "H": 12, "N_CTX": 512}.items() if k in sig}
                aligned = ("desc_q", "desc_k", "desc_v", "desc_o")
                out.append(KernelConfig(name, fwd, sig, cons, warps, 3, aligned, launch_ints=ints))
        sig = {n: "*fp16" for n in ("Q", "K", "V", "DO", "DQ", "DK", "DV")}
        sig.update({"sm_scale": "fp32", "M": "*fp32", "D": "*fp32", "stride_z": "i32", "stride_h": "i32",
                    "stride_tok": "i32", "stride_d": "i32", "H": "i32", "N_CTX": "i32"})  # fmt: skip
        forms = (False, True) if "CAUSAL" in bwd.arg_names else (True,)  # older copies are causal-only
        for causal in forms:
            cons = {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "BLK_SLICE_FACTOR": 2,
                    "HEAD_DIM": dim, "CAUSAL": causal}  # fmt: skip
            cons = {k: v for k, v in cons.items() if k in bwd.arg_names}
            name = f"anchor_bwd[{'causal' if causal else 'plain'},fp16,d{dim},dkdv 32x128 + dq 128x32,w4,s5]"
            # Its own contiguous (Z, H, N_CTX, D) layout at BERT-base sizes, specialized as the JIT would.
            ints = {"stride_z": 12 * 512 * dim, "stride_h": 512 * dim, "stride_tok": dim, "stride_d": 1, "H": 12,
                    "N_CTX": 512}  # fmt: skip
            aligned = ("Q", "K", "V", "DO", "DQ", "DK", "DV")
            out.append(KernelConfig(name, bwd, sig, cons, 4, 5, aligned, launch_ints=ints))
    return out


def anchor_rows(path: Path, archs: tuple[int, ...]) -> list[dict[str, Any]]:
    from ptfast.backends.triton import compile_targets as ct

    rows = []
    for cfg in anchor_configs(_load_anchor(path)):
        for arch in archs:
            rows.append(ct.report_record(ct.compile_config(cfg, arch)))
    return rows


# --- the table -------------------------------------------------------------------------------------------------


def _fmt(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "?" if value is None else str(value)


def _variant(name: str) -> tuple[str, str]:
    kernel, _, rest = name.partition("[")
    return kernel, rest.rstrip("]")


def markdown(rows: list[dict[str, Any]], anchor: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Static kernel health: Triton {meta['triton']} (ptxas of that Triton), {meta['date']}",
        "",
        f"Command: `{meta['command']}` at commit {meta['commit']}. Compiled for sm_80 and sm_90a without a GPU; "
        "registers and spills from Triton's own `ptxas -v`; shared memory from Triton's metadata; `wgmma` / "
        "`mma.sync` = instructions in the PTX (sm_90a's warpgroup MMA, Ampere's MMA). Hot variants must have 0 "
        "spill stores (CI: tests/test_compile_targets.py). Each variant is compiled as the JIT compiles a typical "
        "launch of it (BERT-base attention and masked-LM head, VGG-16 conv layers; `launch_ints` in the "
        "registrations): unit strides are constants, multiples of 16 are marked aligned, pointers are 16-byte "
        "aligned.",
        "",
        f"Hot variants: {len(rows)} (kernel x variant x target); spilling: "
        f"{sum(1 for r in rows if r.get('spill_stores'))}; failed to compile: {sum(1 for r in rows if not r['ok'])}.",
        "",
        HEADER + " | ok |",
        "|---" * 11 + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["name"].split("[")[0], r["arch"], r["name"])):
        status = "yes" if r["ok"] else "NO: " + r["detail"][:80]
        lines.append(f"{_row(r)} {status} |")
    lines += ["", "## Anchor: the Triton tutorial's fused attention, compiled the same way", ""]
    if not anchor:
        lines.append("Not compiled in this run (no `--anchor` given).")
    else:
        source = meta.get("anchor_source") or meta.get("anchor_path")
        lines += [f"Source: {source}. fp16, its own tiles.", "", HEADER + " |", "|---" * 10 + "|"]
        for r in anchor:
            if r.get("registers") is None:
                kernel, variant = _variant(r["name"])
                lines.append(f"| {kernel} | {variant} | sm_{r['arch']} | compile failed: {r['detail'][:120]} |")
                continue
            lines.append(_row(r))
        lines += ["", "### ptfast next to the anchor (fp16, same head dim, same target)", ""]
        lines += summary(rows, anchor) + [""] + comparison(rows, anchor)
    return "\n".join(lines) + "\n"


HEADER = "| kernel | variant | target | warps | stages | regs | spill st/ld (B) | shared (B) | wgmma | mma.sync"


def _row(r: dict[str, Any]) -> str:
    kernel, variant = _variant(r["name"])
    cells = [kernel, variant, f"sm_{r['arch']}", str(r["num_warps"]), str(r["num_stages"]), _fmt(r, "registers"),
             f"{_fmt(r, 'spill_stores')}/{_fmt(r, 'spill_loads')}", _fmt(r, "shared"), _fmt(r, "wgmma"),
             _fmt(r, "mma")]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _usage(r: dict[str, Any]) -> str:
    return f"{r['registers']} regs, {r['spill_stores']} B spilled, {r['shared']} B shared ({r['num_warps']} warps)"


def summary(rows: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> list[str]:
    """One paragraph: registers and shared memory of ptfast's plain/causal forward against the anchor's best
    spill-free forward at the same (target, head dim, form), and the backward's spills on both sides."""
    regs, shared = [], []
    for arch in ARCHS:
        for dim in (64, 128):
            for form in ("plain", "causal"):
                ours = [
                    r for r in rows if r["arch"] == arch and r["name"].startswith(f"attention_fwd[{form},fp16,d{dim},")
                ]
                stem = f"anchor_fwd[{form},fp16,d{dim},"
                theirs = [r for r in anchor if r.get("registers") is not None and r["arch"] == arch
                          and r["name"].startswith(stem) and not r["spill_stores"]]  # fmt: skip
                if ours and theirs:
                    best = min(theirs, key=lambda r: r["registers"])
                    regs.append(ours[0]["registers"] - best["registers"])
                    shared.append(ours[0]["shared"] / best["shared"])
    if not regs:
        return ["No forward of the anchor compiled without spills: nothing to compare."]
    bwd_spills = [r["spill_stores"] for r in anchor if r["name"].startswith("anchor_bwd") and r.get("registers")]
    ours_bwd = [r for r in rows if r["name"].startswith(("attention_bwd_dkdv", "attention_bwd_dq"))]
    text = (
        f"Forward: over {len(regs)} (target, head dim, plain/causal) pairs, ptfast's forward uses "
        f"{min(regs):+d} to {max(regs):+d} registers per thread against the anchor's leanest spill-free forward "
        f"(median {sorted(regs)[len(regs) // 2]:+d}; ptfast's kernel also masks odd sequence lengths and head dims "
        f"and computes int64 row offsets), and {min(shared):.2f}x to {max(shared):.2f}x its shared memory. "
        f"Backward: ptfast's dK/dV and dQ kernels spill nothing "
        f"({max(r['spill_stores'] or 0 for r in ours_bwd)} B at most over {len(ours_bwd)} hot variants)"
    )
    if bwd_spills:
        text += (
            f"; the anchor's single fused backward at its own tiles spills {min(bwd_spills)} to {max(bwd_spills)} B."
        )
    else:
        text += "."
    return [text]


def comparison(rows: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> list[str]:
    """Plain sentences: ptfast's plain/causal forward and backward against the anchor's at each head dim."""
    out = []
    compiled = [r for r in anchor if r.get("registers") is not None]
    for arch in ARCHS:
        for dim in (64, 128):
            for form in ("plain", "causal"):
                theirs = [
                    r for r in compiled if r["arch"] == arch and r["name"].startswith(f"anchor_fwd[{form},fp16,d{dim},")
                ]
                ours = [
                    r for r in rows if r["arch"] == arch and r["name"].startswith(f"attention_fwd[{form},fp16,d{dim},")
                ]
                if theirs and ours:
                    best = min(theirs, key=lambda r: (r.get("spill_stores") or 0, r["registers"]))
                    out.append(f"- sm_{arch} d{dim} {form} forward: ptfast {_usage(ours[0])}; anchor {_usage(best)}.")
                theirs = [
                    r for r in compiled if r["arch"] == arch and r["name"].startswith(f"anchor_bwd[{form},fp16,d{dim},")
                ]
                ours = [r for r in rows if r["arch"] == arch and f"[{form},fp16,d{dim}," in r["name"]
                        and r["name"].startswith(("attention_bwd_dkdv", "attention_bwd_dq"))]  # fmt: skip
                if theirs and ours:
                    mine = "; ".join(
                        f"{_variant(r['name'])[0].removeprefix('attention_bwd_')} {_usage(r)}" for r in ours
                    )
                    out.append(f"- sm_{arch} d{dim} {form} backward: ptfast (dK/dV and dQ kernels) {mine}; "
                               f"anchor (one kernel) {_usage(theirs[0])}.")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for triton-<version>.md / .json")
    ap.add_argument("--anchor", default=None, help="path of the Triton tutorial's 06-fused-attention.py")
    ap.add_argument("--anchor-source", default=None, help="where that file came from (repository, commit)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    import triton

    from benchmarks import env

    with tempfile.TemporaryDirectory(prefix="ptfast-static-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cached kernel runs no ptxas: no register report
        rows = ptfast_rows(ARCHS, args.jobs)
        anchor = anchor_rows(Path(args.anchor), ARCHS) if args.anchor else []
    meta = {
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": env.git_commit(),
        "dirty": env.git_dirty(), "command": " ".join(["python -m benchmarks.static_kernels", *(argv or sys.argv[1:])]),
        "anchor_path": args.anchor, "anchor_source": args.anchor_source, "archs": list(ARCHS),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"triton-{triton.__version__}"  # not with_suffix: the version's last ".0" would count as one
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "hot": rows, "anchor": anchor}, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(rows, anchor, meta))
    spilling = [r["name"] + f" sm_{r['arch']}" for r in rows if r.get("spill_stores")]
    print(f"{len(rows)} hot rows, {len(spilling)} spill, {len(anchor)} anchor rows -> {stem}.md / .json")
    for name in spilling:
        print(f"  spills: {name}")
    return 1 if spilling or not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
