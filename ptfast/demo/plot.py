"""The demo's loss-curve figure (``loss_curves.png``): one panel per stage and one for the parity phases."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ptfast.demo.report import NAMES, RunInfo, moving_average, parity_tol, smooth, window

if TYPE_CHECKING:
    from ptfast.demo.training import Stage


def plot(stages: list[Stage], path: Path, info: RunInfo) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(stages) <= 3 else 3
    rows = -(-(len(stages) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.25 * rows), squeeze=False)
    colors = {"stock": "tab:blue", "ptfast": "tab:orange"}
    for ax in axes.flat[len(stages) + 1 :]:
        ax.set_visible(False)
    for ax, stage in zip(axes.flat, stages, strict=False):
        phase = stage.main
        span = window(phase)
        for name in NAMES:
            y = phase.losses[name]
            ax.plot(y, color=colors[name], alpha=0.25, linewidth=0.8)
            style = "-" if name == "stock" else "--"
            ax.plot(smooth(phase, name, span), color=colors[name], linewidth=1.8, linestyle=style,
                    label=f"{name} (moving average of {span})")  # fmt: skip
        if stage.control_losses:
            ax.plot(moving_average(stage.control_losses, span), color="grey", linewidth=1.2, linestyle=":",
                    label=f"{stage.control_what} (moving average of {span})")  # fmt: skip
        for start, label in phase.boundaries[1:]:
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
            ax.text(start, ax.get_ylim()[1], f" {label}", va="top", ha="left", rotation=90, fontsize=8, color="grey")
        ax.set_title(stage.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    ax = axes.flat[len(stages)]
    floor = 1e-12
    for stage, marker, size in zip(stages, ("o", "s", "^", "D", "v"), (10, 8, 6, 5, 4), strict=False):
        diffs = [
            max(abs(a - b), floor)
            for a, b in zip(stage.parity.losses["stock"], stage.parity.losses["ptfast"], strict=True)
        ]
        label = stage.key + (" (all 0)" if max(diffs, default=floor) <= floor else "")
        ax.semilogy(range(len(diffs)), diffs, marker=marker, markersize=size, label=label)
    ax.axhline(parity_tol(info.env), color="red", linestyle=":", linewidth=1, label="tolerance")
    ax.set_title(f"parity phases (fp32, dropout 0): |loss stock - loss ptfast| (0 drawn at {floor:g})", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"ptfast demo: stock vs ptfast.patch | {info.env.device_name} | size {info.size_name} | {info.precision}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
