"""Result files of one op: ``<op>.json`` (every raw sample + metadata), ``<op>.md`` (tables) and ``<op>.png``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

METHOD_TEXT = (
    "Each step (forward, or forward + backward via torch.autograd.grad) is called once untimed (compilation, "
    "autotuning, lazy init), then warmed up, then timed for a fixed number of repetitions chosen from a time "
    "budget. CUDA: one pair of CUDA events per repetition; inputs that fit in L2 are rotated over independent "
    "random copies, larger ones are preceded by an untimed write of a buffer larger than L2; "
    "torch.cuda.synchronize around every loop. CPU: time.perf_counter per repetition. Reported: median and "
    "p20-p80 of the repetitions. 'graph' = the same step captured in a CUDA graph and replayed (launch overhead "
    "removed), reported separately. Peak memory = torch.cuda.max_memory_allocated during one step minus what "
    "was allocated before it (inputs, caches); kept (fwd rows) = what is still allocated beyond that while the "
    "step's output is alive: the output plus the activations autograd saved for backward."
)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def _mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def _reason(rec: dict[str, Any]) -> str:
    return (rec.get("reason") or "").replace("|", "/").replace("\n", " ")[:300]


def write(result: dict[str, Any], out_dir: Path, stem: str, *, png: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(result))
    paths.append(md)
    if png:
        p = out_dir / f"{stem}.png"
        if plot(result, p):
            paths.append(p)
    return paths


def markdown(result: dict[str, Any]) -> str:
    meta = result["metadata"]
    metric = result.get("metric", "tflops")
    lines = [f"# {result['title']}", ""]
    lines.append(
        f"Device: **{meta.get('device')}** (driver {meta.get('driver')}) · torch {meta.get('torch')} · "
        f"triton {meta.get('triton')} · CUDA {meta.get('cuda_runtime')} · cuDNN {meta.get('cudnn')} · "
        f"Python {meta.get('python')}"
    )
    lines.append(
        f"Date (UTC): {meta.get('date_utc')} · commit `{meta.get('git_commit')}`"
        + (" (dirty tree)" if meta.get("git_dirty") else "")
        + f" · dtype {result['options']['dtype']}"
    )
    lines.append(f"Command: `{meta.get('command')}`")
    if meta.get("model"):
        lines.append(f"Model: {meta['model']}")
    if result["options"]["device"].startswith("cpu"):
        lines += [
            "",
            f"**CPU run** ({meta.get('cpu_count')} logical CPUs, {meta.get('torch_threads')} torch threads, load "
            f"average {meta.get('load_average')} at the start): ptfast runs its `torch` backend (plain PyTorch) "
            "here, so these timings are no performance claim for ptfast's GPU kernels.",
        ]
    lines.append("")
    lines.append(
        f"Baseline for the speed-up column: **{result['baseline']}** (speed-up = baseline median / "
        "provider median; > 1 is faster than the baseline)."
    )
    if result.get("case_doc"):
        lines.append("")
        lines.append(f"Shapes: {result['case_doc']}")
    lines.append("")
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in result["results"]:
        by_mode[rec["mode"]].append(rec)
    has_graph = any(r.get("graph_timing", {}).get("median_ms") for r in result["results"])
    for mode, recs in by_mode.items():
        ok = [r for r in recs if r["status"] == "ok"]
        lines += [f"## {mode}", ""]
        if not ok:
            lines += ["No provider ran.", ""]
            continue
        head = ["shape", "provider", "median ms", "p20–p80 ms"]
        items_col = f"{result['items_label']}/s" if result.get("items_label") else None
        if items_col and any(r.get("items_per_s") for r in ok):
            head.append(items_col)
        head.append("TFLOP/s")
        if metric == "gbps" or any(r.get("gbps") for r in ok):
            head.append("GB/s")
        head += ["peak MiB"]
        if mode == "fwd":
            head.append("kept MiB")
        head += ["speed-up", "rel. err"]
        if has_graph:
            head += ["graph ms", "graph TFLOP/s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
        for r in ok:
            t = r["timing"]
            name = r["provider"] + (f" (= {r['derived_from']})" if r.get("derived_from") else "")
            row = [
                r["case"],
                name,
                _fmt(t["median_ms"]),
                f"{_fmt(t['p20_ms'])}–{_fmt(t['p80_ms'])}",
            ]
            if items_col in head:
                row.append(_fmt(r.get("items_per_s"), 4))
            row.append(_fmt(r.get("tflops"), 3))
            if "GB/s" in head:
                row.append(_fmt(r.get("gbps"), 3))
            row.append(_mib(r.get("peak_mem_bytes")))
            if "kept MiB" in head:
                row.append(_mib(r.get("kept_mem_bytes")))
            row += [
                _fmt(r.get("speedup_vs_baseline"), 3),
                "–" if r.get("rel_err") is None else f"{r['rel_err']:.1e}",
            ]
            if has_graph:
                g = r.get("graph_timing") or {}
                row += [_fmt(g.get("median_ms")), _fmt(r.get("graph_tflops"), 3)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    skipped = [r for r in result["results"] if r["status"] != "ok"]
    if skipped:
        lines += ["## Skipped and failed", ""]
        groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for r in skipped:
            groups[(r["provider"], r["status"], _reason(r))].append(f"{r['case']} [{r['mode']}]")
        lines += ["| provider | status | reason | where |", "|---|---|---|---|"]
        for (prov, status, reason), where in groups.items():
            w = ", ".join(where) if len(where) <= 4 else f"{len(where)} case/mode pairs"
            lines.append(f"| {prov} | {status} | {reason} | {w} |")
        lines.append("")
    graph_skips = [r for r in result["results"] if (r.get("graph_timing") or {}).get("status") == "skipped"]
    if graph_skips:
        lines += [
            "CUDA-graph timing not possible for: "
            + "; ".join(sorted({f"{r['provider']} ({_reason(r['graph_timing'])})" for r in graph_skips})),
            "",
        ]
    ran = [
        r for r in result["results"] if r["status"] == "ok" and "dispatch" in r and r["provider"].startswith("ptfast")
    ]
    if ran:
        lines += ["## ptfast ops that ran", "", "In each ptfast provider's untimed first call "
                  "(`ptfast.testing.record_dispatch`: op:backend:phase[:algorithm]).", ""]  # fmt: skip
        seen: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
        for r in ran:
            seen[(r["provider"], tuple(r["dispatch"]))].append(f"{r['case']} [{r['mode']}]")
        for (prov, dispatch), where in seen.items():
            ops = ", ".join(f"`{d}`" for d in dispatch) or "none (no ptfast op was called)"
            w = ", ".join(where) if len(where) <= 4 else f"{len(where)} case/mode pairs"
            lines.append(f"- **{prov}** ({w}): {ops}")
        lines.append("")
    lines += ["## Providers", ""]
    for p in result["providers"]:
        lines.append(f"- **{p['name']}** ({p['kind']}): {p['description']}")
    for name, members in result.get("best_of", {}).items():
        lines.append(f"- **{name}** (derived): the fastest of {', '.join(members)} that accepted the input")
    lines.append("")
    if result.get("notes"):
        lines += [
            "## Published, not measured here",
            "",
            "These numbers come from papers or other documents, not from this run or this machine; they are "
            "listed only as context for baselines that cannot be run here.",
            "",
        ]
        lines += [f"- {n}" for n in result["notes"]]
        lines.append("")
    lines += ["## Method", "", METHOD_TEXT, ""]
    if result.get("step_doc"):
        lines += [f"This op's step: {result['step_doc']}", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Grouped bars: throughput per provider per shape, one panel per mode. Returns False if nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("gbps", "GB/s") if result.get("metric") == "gbps" else ("tflops", "TFLOP/s")
    if result.get("metric") == "items" and result.get("items_label"):
        key, label = "items_per_s", f"{result['items_label']}/s"
    derived = set(result.get("best_of", {}))
    modes = list(dict.fromkeys(r["mode"] for r in result["results"]))
    data: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for r in result["results"]:
        if r["status"] == "ok" and r.get(key) and r["provider"] not in derived:
            data[r["mode"]][(r["case"], r["provider"])] = r[key]
    modes = [m for m in modes if data[m]]
    if not modes:
        return False
    cases = list(dict.fromkeys(r["case"] for r in result["results"]))
    provs = list(
        dict.fromkeys(
            r["provider"]
            for r in result["results"]
            if r["provider"] not in derived and any(r["provider"] == p for _, p in data[r["mode"]])
        )
    )
    cmap = plt.get_cmap("tab20" if len(provs) > 10 else "tab10")
    colors = {p: cmap(i % cmap.N) for i, p in enumerate(provs)}
    # Long shape lists are wrapped over several panels so bars stay readable at a fixed figure width.
    per_panel = max(1, min(len(cases), max(3, 60 // max(len(provs), 1))))
    chunks = [cases[i : i + per_panel] for i in range(0, len(cases), per_panel)]
    panels = [(mode, chunk) for mode in modes for chunk in chunks]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14.0, 3.3 * len(panels) + 1.2), squeeze=False)
    bar_w = 0.8 / max(len(provs), 1)
    for ax, (mode, chunk) in zip(axes[:, 0], panels, strict=True):
        for j, prov in enumerate(provs):
            xs, ys = [], []
            for i, case in enumerate(chunk):
                v = data[mode].get((case, prov))
                if v is not None:
                    xs.append(i - 0.4 + (j + 0.5) * bar_w)
                    ys.append(v)
            if xs:
                ax.bar(xs, ys, width=bar_w, color=colors[prov], label=prov)
        ax.set_title(f"{result['op']} — {mode}", fontsize=10, loc="left")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(chunk)))
        ax.set_xticklabels(chunk, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, per_panel - 0.4)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    meta = result["metadata"]
    fig.text(
        0.01,
        0.005,
        f"{meta.get('device')} · torch {meta.get('torch')} · {meta.get('date_utc')} · "
        f"{label} counted on useful work only (see {result['op']}.md)",
        fontsize=7,
        color="0.4",
    )
    n_leg_rows = math.ceil(len(labels) / 6)
    height = 3.3 * len(panels) + 1.2
    fig.tight_layout(rect=(0, 0.02, 1, 1 - (0.22 * n_leg_rows + 0.1) / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
