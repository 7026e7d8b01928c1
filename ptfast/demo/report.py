"""Numbers, tables, the loss-curve plot and ``report.md`` of the demo. Measured numbers only, never a claim."""

from __future__ import annotations

import datetime
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import ptfast
from ptfast.demo.training import NAMES

if TYPE_CHECKING:
    from ptfast.demo.training import Env, Phase, Stage

CPU_PARITY_TOL = 1e-4  # fp32 on CPU: the ptfast ops run their torch backend (same kernels, other op order)
CUDA_PARITY_TOL = 1e-3  # fp32 without TF32 on CUDA: different kernels, different summation order


@dataclass
class RunInfo:
    command: str
    env: Env
    size_name: str
    size: dict
    steps: tuple[int, ...]
    precision: str
    elapsed: float
    max_rss_mib: float
    text_summary: str


# --- numbers ----------------------------------------------------------------------------------------------


def steps_text(steps: tuple[int, ...]) -> str:
    """The step counts of a run (``workflow.SIZES``' ``steps`` order), in words."""
    return (
        f"parity {steps[0]} per phase, masked-LM {steps[1]}, classification {steps[2]}, "
        f"VGG {steps[3]}+{steps[4]}+{steps[5]}, hand-written VGG {steps[6]}, ResNet {steps[7]}+{steps[8]}+{steps[9]}"
    )


def parity_tol(env: Env) -> float:
    return CUDA_PARITY_TOL if env.cuda else CPU_PARITY_TOL


def parity_ok(stage: Stage, env: Env) -> bool:
    tol = parity_tol(env)
    return stage.parity.max_abs_diff() <= tol and stage.parity.max_grad_diff() <= tol


def moving_average(values: list[float], window: int) -> list[float]:
    """Centered moving average (the window shrinks at the ends), so the smoothed curve does not lag."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half) : i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def smooth(phase: Phase, name: str, window: int) -> list[float]:
    """Moving average of one model's losses, restarted at each sub-phase boundary (a new head resets the loss)."""
    starts = [b for b, _ in phase.boundaries] or [0]
    cuts = [*starts, len(phase.losses[name])]
    out: list[float] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        out += moving_average(phase.losses[name][a:b], window)
    return out


def window(phase: Phase) -> int:
    """Smoothing window: a tenth of the steps, odd, at least 3."""
    return max(3, len(phase.losses["stock"]) // 10 | 1)


def tail(phase: Phase) -> int:
    """How many final steps 'final loss' averages over."""
    return max(1, min(len(phase.losses["stock"]), max(3, len(phase.losses["stock"]) // 10)))


def curve_stats(phase: Phase) -> dict[str, float]:
    """Final loss (mean of the last steps) of each model and the largest gap between the smoothed curves."""
    k = tail(phase)
    span = window(phase)
    curves = {m: smooth(phase, m, span) for m in NAMES}
    gaps = [abs(a - b) for a, b in zip(curves["stock"], curves["ptfast"], strict=True)]
    stats = {f"final {m}": statistics.mean(phase.losses[m][-k:]) for m in NAMES}
    stats["smoothed max gap"] = max(gaps, default=0.0)
    stats["span"] = span
    return stats


def step_ms(phase: Phase, name: str) -> float:
    return 1000 * statistics.median(phase.times[name]) if phase.times[name] else float("nan")


def peak_mib(phase: Phase, name: str) -> float | None:
    return max(phase.mem[name]) / 2**20 if phase.mem[name] else None


def dispatch_lines(stage: Stage) -> list[str]:
    """One line per ptfast op that ran in the patched model, with counts per backend and phase."""
    per_op: dict[str, dict[str, int]] = defaultdict(dict)
    for (op, backend, kind), count in sorted(stage.dispatch["ptfast"].items()):
        per_op[op][f"{kind} {backend}"] = count
    lines = [f"{op}: " + ", ".join(f"{k} x{c}" for k, c in kinds.items()) for op, kinds in sorted(per_op.items())]
    if not lines:
        lines = ["no ptfast op ran in the patched model"]
    stock = sum(stage.dispatch["stock"].values())
    lines.append("stock model: no ptfast op ran" if stock == 0 else f"stock model: {stock} ptfast op calls (!)")
    return lines


def ops_ran(stages: list[Stage]) -> set[str]:
    return {op for s in stages for (op, _, _) in s.dispatch["ptfast"]}


def _short_device(env: Env) -> str:
    return env.device_name if env.cuda else f"CPU x{torch.get_num_threads()} threads"


def _fmt_pair(a: float, b: float, fmt: str) -> str:
    return f"{a:{fmt}} / {b:{fmt}}"


def _metric_items(stage: Stage) -> list[tuple[str, str]]:
    items = []
    for metric, values in stage.metrics.items():
        fmt = ".1%" if "accuracy" in metric else ".3f"
        what, base = stage.baselines.get(metric, ("", None))
        note = "" if base is None else f" ({what} {base:{fmt}})"
        control = stage.control_metrics.get(metric)
        if control is not None:
            note += f"; {stage.control_what} {control:{fmt}}"
        items.append((metric, _fmt_pair(values["stock"], values["ptfast"], fmt) + note))
    return items


def _mem_text(env: Env, phase: Phase) -> str:
    if not env.cuda:
        return "n/a on CPU"
    a, b = peak_mib(phase, "stock"), peak_mib(phase, "ptfast")
    return f"{a:.0f} / {b:.0f} MiB"


# --- terminal ---------------------------------------------------------------------------------------------


def print_stage(stage: Stage, env: Env) -> None:
    tol = parity_tol(env)
    diffs = [abs(a - b) for a, b in zip(stage.parity.losses["stock"], stage.parity.losses["ptfast"], strict=True)]
    shown = " ".join(f"{d:.1e}" for d in diffs[:12]) + (" ..." if len(diffs) > 12 else "")
    print(
        f"  parity ({len(diffs)} steps from identical weights, fp32, dropout 0): max |loss diff| "
        f"{max(diffs, default=0):.2e}, max relative gradient diff {stage.parity.max_grad_diff():.2e} "
        f"[{'ok' if parity_ok(stage, env) else 'MISMATCH'}, tolerance {tol:.0e}]; per step: {shown}"
    )
    st = curve_stats(stage.main)
    print(
        f"  training ({len(stage.main.losses['stock'])} steps, {stage.main_note}): final loss stock "
        f"{st['final stock']:.4f} / ptfast {st['final ptfast']:.4f} (mean of last {tail(stage.main)}); "
        f"smoothed curves max gap {st['smoothed max gap']:.4f} (moving average of {st['span']:.0f} steps)"
    )
    for metric, text in _metric_items(stage):
        print(f"  {metric} stock / ptfast: {text}")
    print(
        f"  median step time stock / ptfast: {step_ms(stage.main, 'stock'):.1f} / {step_ms(stage.main, 'ptfast'):.1f}"
        f" ms on {env.device_name}; peak step memory: {_mem_text(env, stage.main)}"
    )
    print("  ptfast ops that ran: " + "; ".join(dispatch_lines(stage)))
    print(f"  stage took {stage.elapsed:.1f} s")


def summary_table(stages: list[Stage], env: Env) -> str:
    head = [
        "stage",
        "parity max|dloss|",
        "final loss stock / ptfast",
        "smoothed gap",
        "metric stock / ptfast",
        f"step ms stock / ptfast [{_short_device(env)}]",
        "peak step mem stock / ptfast",
    ]
    rows = [head]
    for s in stages:
        st = curve_stats(s.main)
        metric = _metric_items(s)[-1]
        rows.append(
            [
                s.key,
                f"{s.parity.max_abs_diff():.1e}",
                _fmt_pair(st["final stock"], st["final ptfast"], ".4f"),
                f"{st['smoothed max gap']:.4f}",
                f"{metric[0]}: {metric[1]}",
                _fmt_pair(step_ms(s.main, "stock"), step_ms(s.main, "ptfast"), ".1f"),
                _mem_text(env, s.main),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    device = f"times and memory measured on {env.device_name}"
    if not env.cuda:
        device += " (ptfast ran its torch backend there: no performance claim)"
    return f"summary ({device}):\n" + "\n".join(lines)


# --- markdown ---------------------------------------------------------------------------------------------


def write_markdown(stages: list[Stage], path: Path, info: RunInfo, png: Path) -> Path:
    import transformers

    env = info.env
    tol = parity_tol(env)
    lines = [
        "# ptfast demo report",
        "",
        f"`{info.command}` — {datetime.datetime.now().isoformat(timespec='seconds')}, {info.elapsed:.0f} s in total.",
        "",
        f"- device: **{env.device_name}**"
        + (f" ({torch.get_num_threads()} torch threads)" if not env.cuda else "")
        + f"; precision of the training phases: {info.precision}; parity phases: fp32"
        + (" without TF32" if env.cuda else ""),
        f"- ptfast {ptfast.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"requested ptfast backend: `{env.backend}`",
        f"- size `{info.size_name}`; steps: {steps_text(info.steps)}; seed {env.seed}",
        *([f"- text: {info.text_summary}"] if info.text_summary else []),
        "",
    ]
    if not env.cuda:
        lines += [
            "> On CPU every ptfast op runs its `torch` backend, i.e. plain PyTorch, so the CPU step times below are",
            "> no performance claim: they show that the patched models train the same, not how fast ptfast's GPU",
            "> kernels are. Peak GPU memory does not exist here (n/a); the whole process peaked at "
            f"{info.max_rss_mib:.0f} MiB resident memory (both models of every stage, data, Python).",
            "",
        ]
    lines += [
        "## Summary",
        "",
        f"Times and memory measured on **{env.device_name}**. Step time: median over the training phase's steps, "
        "stock and ptfast steps interleaved (order alternating each step)."
        + (
            " Peak step memory: `torch.cuda.max_memory_allocated` during a step minus the memory allocated before it"
            " (activations, gradients, temporaries; both models' weights and optimizer states stay resident)."
            if env.cuda
            else ""
        ),
        "",
        "| stage | parity max \\|Δloss\\| / max relative \\|Δgrad\\| (fp32, dropout 0) "
        "| final loss stock / ptfast | smoothed-curve max gap "
        "| metric stock / ptfast | median step time stock / ptfast | peak step memory stock / ptfast |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in stages:
        st = curve_stats(s.main)
        metrics = "<br>".join(f"{m}: {t}" for m, t in _metric_items(s))
        lines.append(
            f"| {s.title} | {s.parity.max_abs_diff():.2e} / {s.parity.max_grad_diff():.2e} "
            f"({len(s.parity.losses['stock'])} steps, "
            f"{'ok' if parity_ok(s, env) else '**MISMATCH**'}) | "
            f"{_fmt_pair(st['final stock'], st['final ptfast'], '.4f')} (mean of last {tail(s.main)}) | "
            f"{st['smoothed max gap']:.4f} | {metrics} | "
            f"{_fmt_pair(step_ms(s.main, 'stock'), step_ms(s.main, 'ptfast'), '.1f')} ms ({_short_device(env)}) | "
            f"{_mem_text(env, s.main)} |"
        )
    lines += [
        "",
        f"![loss curves]({png.name})",
        "",
        "Parity phases: both twins start every step from the same weights and optimizer state (after each step the "
        "patched twin takes the stock twin's, once the step's gradients are compared), get the same batches and the "
        "same torch seed before each step, with every dropout at 0 in training mode (so the patched BERT takes its "
        "fused masked-LM path: "
        f"head on the masked rows only, logits never formed); tolerance {tol:.0e}. Training phases: dropout on where "
        "the model has dropout (BERT, the classifier of the torchvision-layout VGG; the hand-written VGG and the "
        "ResNet have none, so their training phases differ from the parity phases only in length, learning-rate "
        "schedule and, on CUDA, bf16 autocast); "
        "ptfast's attention dropout keeps or drops each element by a hash of a per-call seed and its position (not "
        "PyTorch's dropout stream), and every later random draw shifts with it, so the runs are compared as curves: "
        "the mean loss over the last steps and the largest gap between the smoothed curves (centered moving average "
        "over a tenth of the steps, restarted where a sub-phase starts).",
        "",
    ]
    for s in stages:
        lines += [f"## {s.title}", ""]
        lines += [f"- {d}" for d in s.details]
        diffs = [abs(a - b) for a, b in zip(s.parity.losses["stock"], s.parity.losses["ptfast"], strict=True)]
        lines += [
            f"- parity |Δloss| per step: {', '.join(f'{d:.1e}' for d in diffs)}",
            f"- parity relative |Δgrad| per step: {', '.join(f'{d:.1e}' for d in s.parity.grad_diffs)}",
            "- `ptfast.patch` on the twin (`model.ptfast_patch_report`)"
            + (f", {len(s.patch_report)} lines:" if s.patch_report else ": nothing replaced"),
            *(f"  - {line}" for line in s.patch_report),
            "- ptfast ops that ran (`ptfast.testing.record_dispatch()`, op: phase backend x calls):",
        ]
        lines += [f"  - {line}" for line in dispatch_lines(s)]
        if s.checks:
            lines.append("- findings: " + "; ".join(f"{k}: {'yes' if v else '**no**'}" for k, v in s.checks.items()))
        lines.append("")
    lines += [
        "## How to read this",
        "",
        "- Same weights, same data, same seeds, every step: the parity phase isolates the ops ptfast replaced. Any",
        "  difference there is rounding from a different order of operations, in one step.",
        "- Loss curves with dropout on are two samples of the same training process; a gap of the size of the",
        "  step-to-step noise is expected.",
        "- Timings are measured numbers on the device named above, nothing more; on a shared or busy machine they",
        "  vary from run to run.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


# --- machine-readable -------------------------------------------------------------------------------------


def write_json(stages: list[Stage], path: Path, info: RunInfo) -> Path:
    """The measured numbers as JSON (``results.json``), for CI and tests."""
    import json

    env = info.env
    out = {
        "command": info.command,
        "device": env.device_name,
        "device_type": env.device.type,
        "size": info.size_name,
        "steps": list(info.steps),
        "precision": info.precision,
        "backend_requested": env.backend,
        "parity_tolerance": parity_tol(env),
        "elapsed_s": info.elapsed,
        "ops_ran": sorted(ops_ran(stages)),
        "stages": {},
    }
    for s in stages:
        st = curve_stats(s.main)
        out["stages"][s.key] = {
            "title": s.title,
            "parity_loss_diffs": [
                abs(a - b) for a, b in zip(s.parity.losses["stock"], s.parity.losses["ptfast"], strict=True)
            ],
            "parity_max_abs_diff": s.parity.max_abs_diff(),
            "parity_grad_diffs": s.parity.grad_diffs,
            "parity_max_grad_diff": s.parity.max_grad_diff(),
            "parity_ok": parity_ok(s, env),
            "losses": s.main.losses,
            "final_loss": {m: st[f"final {m}"] for m in NAMES},
            "smoothed_max_gap": st["smoothed max gap"],
            "metrics": s.metrics,
            "control": {"what": s.control_what, "metrics": s.control_metrics, "losses": s.control_losses},
            "median_step_ms": {m: step_ms(s.main, m) for m in NAMES},
            "peak_step_mem_mib": {m: peak_mib(s.main, m) for m in NAMES},
            "dispatch": {
                m: [[op, backend, kind, n] for (op, backend, kind), n in sorted(s.dispatch[m].items())] for m in NAMES
            },
            "patch_report": s.patch_report,
            "phase_dispatch": {
                label: [[op, backend, kind, n] for (op, backend, kind), n in sorted(c.items())]
                for label, c in s.phase_dispatch.items()
            },
            "checks": s.checks,
        }
    path.write_text(json.dumps(out, indent=1))
    return path
