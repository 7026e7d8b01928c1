"""How much a CNN's memory layout matters to its training step on a CPU, with and without ``ptfast.patch``.

``ptfast.patch`` keeps a model's parameters as they are, so an NCHW model stays NCHW (only its unfused max-pools
run channels-last inside). This measures what converting the model itself would add: the demo's ResNet and VGG
(size ``small``) trained in four variants: stock and patched, each NCHW and channels-last (``model.to(
memory_format=torch.channels_last)`` and channels-last images). Rounds alternate the variants (order rotating);
each round takes the best of ``--inner`` steps per variant; the table gives the median step time and the median
per-round speed ratio against stock NCHW, with p20-p80.

    python -m benchmarks.cpu_cnn_layout --out benchmarks/results/cpu-x86-64/cnn_layout.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ptfast
from ptfast.demo.models import VGG, ResNet

VARIANTS = ("stock NCHW", "ptfast NCHW", "stock channels_last", "ptfast channels_last")


def _models(width: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """The demo's CNNs at size ``small`` (``width`` 16) or smaller (the smoke test's)."""
    return {
        f"demo ResNet (1,1,1,1) width {width}": lambda: ResNet((1, 1, 1, 1), 10, width=width, in_channels=1),
        f"demo VGG {width}-{2 * width}-{4 * width}": lambda: VGG(
            [width, width, "M", 2 * width, 2 * width, "M", 4 * width, "M"], 10, hidden=8 * width
        ),
    }


def variants(base: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """variant -> (a copy of ``base`` in that layout, patched or not; the images in that layout)."""
    out = {}
    for variant in VARIANTS:
        fmt = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format
        model = copy.deepcopy(base).to(memory_format=fmt)
        if variant.startswith("ptfast"):
            model = ptfast.patch(model)
        out[variant] = (model, x.contiguous(memory_format=fmt))
    return out


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD training step (the demo's CNN optimizer settings)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def measure(rounds: int, inner: int, batch: int, width: int) -> list[tuple[str, str, float, float, float, float]]:
    """``[(model, variant, median ms, median ratio, p20, p80)]``, ratio = stock NCHW time / variant time."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, make in _models(width).items():
        torch.manual_seed(0)
        base = make().train()
        x = torch.randn(batch, 1, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        steps = {variant: _step(model, xv, y) for variant, (model, xv) in variants(base, x).items()}
        for fn in steps.values():  # warm-up: allocator, oneDNN primitive caches
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                best = float("inf")
                for _ in range(inner):
                    start = time.perf_counter()
                    steps[variant]()
                    best = min(best, time.perf_counter() - start)
                times[variant].append(best)
        for variant in VARIANTS:
            ratios = sorted(s / t for s, t in zip(times["stock NCHW"], times[variant], strict=True))
            lo, hi = ratios[len(ratios) // 5], ratios[(4 * len(ratios)) // 5]  # as benchmarks.interleaved
            ms = statistics.median(times[variant]) * 1e3
            rows.append((name, variant, ms, statistics.median(ratios), lo, hi))
            print(f"{name:34s} {variant:22s} {ms:8.2f} ms  x{rows[-1][3]:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="the models' first width (the demo's small size: 16)")
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    from benchmarks.env import cpu_report_head, run_start, write_report

    started, commit = run_start()
    rows = measure(args.rounds, args.inner, args.batch, args.width)
    lines = cpu_report_head(
        "CNN training step on CPU: NCHW against channels-last, stock and ptfast.patch",
        "benchmarks.cpu_cnn_layout",
        started,
        commit,
        f"fp32 · batch {args.batch} of 1x32x32 images · {args.rounds} rounds, best of {args.inner} per round",
    )
    lines += [
        "Training step: forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 5e-4), train mode. "
        "Ratio: stock NCHW time / this variant's time in the same round (> 1 = faster than stock NCHW).",
        "",
        "| model | variant | median ms | ratio vs stock NCHW | p20–p80 |",
        "|---|---|---:|---:|---:|",
    ]
    for name, variant, ms, ratio, lo, hi in rows:
        lines.append(f"| {name} | {variant} | {ms:.2f} | {ratio:.3f} | {lo:.3f}–{hi:.3f} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
