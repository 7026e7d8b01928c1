"""What a ptfast call adds to stock PyTorch on a CPU: microseconds per call on inputs small enough that the
kernels take no longer than the Python around them.

On a CPU, ``auto`` runs every op as PyTorch's own kernels (see the README's torch-backend row), so at the
benchmark shapes ptfast and stock differ only by the Python in front of the kernels: input checks, the backend
choice, the route. This measures that directly. Each op runs stock and ptfast alternately, ``--repeats`` blocks
of ``--calls`` calls each; the table gives the fastest block per call (warm caches: right after a large kernel
the same Python costs several times more, which is what the interleaved benchmark's rows see).

    python -m benchmarks.cpu_call_overhead --out benchmarks/results/cpu-x86-64/call_overhead.md
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ptfast


def _cases() -> dict[str, tuple[Callable[[], object], Callable[[], object], list[torch.Tensor]]]:
    """op -> (stock call, ptfast call, the tensors that take a gradient)."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 3, 17, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    key_mask = torch.arange(L)[None, :] < torch.tensor([5, L])[:, None]
    bool_mask = key_mask[:, None, None, :]
    x = torch.randn(2, 5, 7, 9, generator=g)
    w = torch.randn(5, 5, 3, 3, generator=g)
    b = torch.randn(5, generator=g)
    r = torch.randn(2, 5, 7, 9, generator=g)
    h = torch.randn(33, 16, generator=g)
    vw = torch.randn(51, 16, generator=g)
    vb = torch.randn(51, generator=g)
    labels = torch.randint(0, 51, (33,), generator=g)
    labels[::3] = -100
    rows = (labels != -100).nonzero().squeeze(1)
    return {
        "attention (key_mask)": (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
            lambda: ptfast.attention(q, k, v, key_mask=key_mask),
            [q, k, v],
        ),
        "conv_relu": (lambda: F.relu(F.conv2d(x, w, b, padding=1)), lambda: ptfast.conv_relu(x, w, b), [x, w, b]),
        "conv_relu_pool": (
            lambda: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2),
            lambda: ptfast.conv_relu_pool(x, w, b),
            [x, w, b],
        ),
        "add_relu": (lambda: F.relu(x + r), lambda: ptfast.add_relu(x, r), [x, r]),
        "masked_lm_loss (mean)": (
            lambda: F.cross_entropy(F.linear(h.index_select(0, rows), vw, vb), labels.index_select(0, rows)),
            lambda: ptfast.masked_lm_loss(h, vw, labels, vb),
            [h, vw, vb],
        ),
    }


def _per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=repeats)) / calls * 1e6


def measure(calls: int, repeats: int) -> list[tuple[str, str, float, float]]:
    """``[(op, mode, stock us, ptfast us)]``; modes: forward under ``no_grad``, forward recording the graph."""
    rows = []
    for name, (stock, ours, leaves) in _cases().items():
        for mode in ("forward, no_grad", "forward, graph recorded"):
            grad = mode != "forward, no_grad"
            for t in leaves:
                t.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                for fn in (stock, ours):  # warm-up: mask caches, first-call imports
                    for _ in range(200):
                        fn()
                best = {"stock": float("inf"), "ptfast": float("inf")}
                for i in range(repeats):
                    for label, fn in (
                        (("stock", stock), ("ptfast", ours)) if i % 2 else (("ptfast", ours), ("stock", stock))
                    ):
                        best[label] = min(best[label], _per_call_us(fn, calls, 1))
            rows.append((name, mode, best["stock"], best["ptfast"]))
            print(f"{name:24s} {mode:24s} stock {best['stock']:7.1f} us  ptfast {best['ptfast']:7.1f} us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    from benchmarks.env import cpu_report_head, run_start, write_report

    started, commit = run_start()
    rows = measure(args.calls, args.repeats)
    lines = cpu_report_head(
        "Per-call overhead on CPU: what a ptfast call adds to stock PyTorch (tiny inputs, warm)",
        "benchmarks.cpu_call_overhead",
        started,
        commit,
        f"fp32 · fastest of {args.repeats} alternating blocks of {args.calls} calls",
    )
    lines += [
        "Stock: the same computation in plain PyTorch (SDPA with the bool mask; conv2d + relu (+ max_pool2d); "
        "relu(x + r); the labelled rows gathered, then cross_entropy(linear)). Inputs: attention B2 H3 L17 D8, "
        "conv 2x5x7x9 with 5 output channels, masked-LM 33 tokens E16 V51.",
        "",
        "| op | mode | stock us | ptfast us | added us |",
        "|---|---|---:|---:|---:|",
    ]
    for name, mode, s, p in rows:
        lines.append(f"| {name} | {mode} | {s:.1f} | {p:.1f} | {p - s:+.1f} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
