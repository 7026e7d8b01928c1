"""The masked-LM head on a CPU, one process per measurement: step time and peak memory, stock vs ptfast.

Peak memory on a CPU has no allocator counter like CUDA's, so each (provider, dtype, size) runs in a fresh
process and reports its peak resident set above the level after its inputs were made (``ru_maxrss``; memory the
process had already freed is reused unseen, so small sizes undercount). Each
process times ``--steps`` consecutive fwd+bwd calls (a training loop's pattern, gradients cleared between them)
and reports their median. Stock: the labelled rows gathered, then ``F.cross_entropy(F.linear(...).float())``
(Hugging Face's head computes the loss on fp32 logits too, over every token). BERT-base's head: E768, V30522,
15% of the tokens labelled.

    python -m benchmarks.cpu_head_memory --out benchmarks/results/cpu-x86-64/masked_lm_head_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

EMB, VOCAB = 768, 30522


def _one(provider: str, how: str, tokens: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import ptfast

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if how == "bf16" else torch.float32
    # Made in their dtype (no fp32 temporaries freed before the baseline, which later steps would reuse unseen).
    h = torch.randn(tokens, EMB, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(VOCAB, EMB, generator=g, dtype=dtype).mul_(0.05).requires_grad_()
    b = torch.randn(VOCAB, generator=g, dtype=dtype).mul_(0.01).requires_grad_()
    labels = torch.where(torch.rand(tokens, generator=g) < 0.15, torch.randint(0, VOCAB, (tokens,), generator=g), -100)
    autocast = how == "autocast bf16"

    def stock() -> torch.Tensor:
        rows = (labels != -100).nonzero().squeeze(1)
        return F.cross_entropy(F.linear(h.index_select(0, rows), w, b).float(), labels.index_select(0, rows))

    def ours() -> torch.Tensor:
        return ptfast.masked_lm_loss(h, w, labels, b)

    fn = stock if provider == "stock" else ours
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = w.grad = b.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "ms": statistics.median(times) * 1e3,
        "peak_mib": (peak - base) / 1024,
        "labelled": int((labels != -100).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    ap.add_argument("--one", nargs=3, metavar=("PROVIDER", "HOW", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        provider, how, tokens = args.one
        print(json.dumps(_one(provider, how, int(tokens), args.steps)))
        return

    from benchmarks.env import cpu_report_head, run_start, write_report

    started, commit = run_start()
    lines = cpu_report_head(
        "Masked-LM head on CPU: step time and peak memory, one process per measurement",
        "benchmarks.cpu_head_memory",
        started,
        commit,
        f"BERT-base's head (E{EMB}, V{VOCAB}), 15% of the tokens labelled · median of {args.steps} consecutive "
        "fwd+bwd steps",
    )
    lines += [
        "| tokens (labelled) | dtype | stock ms | ptfast ms | speed ratio | stock peak MiB | ptfast peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for tokens in args.tokens:
        for how in ("fp32", "bf16", "autocast bf16"):
            res = {}
            for provider in ("stock", "ptfast"):
                cmd = [sys.executable, "-m", "benchmarks.cpu_head_memory", "--steps", str(args.steps)]
                cmd += ["--one", provider, how, str(tokens)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                res[provider] = json.loads(out.strip().splitlines()[-1])
            s, p = res["stock"], res["ptfast"]
            lines.append(
                f"| {tokens} ({s['labelled']}) | {how} | {s['ms']:.0f} | {p['ms']:.0f} | {s['ms'] / p['ms']:.3f} | "
                f"{s['peak_mib']:.0f} | {p['peak_mib']:.0f} |"
            )
            print(lines[-1], flush=True)
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
