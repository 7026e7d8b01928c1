"""ptfast vs the stock PyTorch composition, interleaved: a robust ratio on a noisy machine (CPU issue's rows).

``benchmarks.run`` times each provider in its own block of repetitions, so on a shared machine whose speed drifts
(a 2-core VM, say) two runs of the same code can differ by 20%. Here each round times ptfast and stock back to
back (the best of ``--inner`` calls each) and keeps the ratio of that round; the median and p20-p80 of the ratios
over ``--rounds`` rounds are reported. Forward+backward and forward-only (under ``no_grad``), fp32 (the masked-LM
rows also in bf16 and under CPU autocast to bf16).

    python -m benchmarks.interleaved --rounds 15 --out benchmarks/results/cpu-x86-64/interleaved.md
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
from benchmarks.env import cpu_report_head, run_start, write_report


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return step


def _fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn()

    return step


def _rows() -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """name -> (ptfast step, stock step): the CPU issue's shapes."""
    g = torch.Generator().manual_seed(0)
    rows = {}
    B, H, L, D = 8, 4, 128, 64
    lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
    key_mask = torch.arange(L)[None, :] < lengths[:, None]
    bool_mask = key_mask[:, None, None, :]
    for layout in ("BHLD", "BLHD"):
        if layout == "BHLD":
            leaves = [torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3)]
            q, k, v = leaves
        else:  # a Transformer's projections: (B, L, H, D) transposed
            leaves = [torch.randn(B, L, H, D, generator=g).requires_grad_() for _ in range(3)]
            q, k, v = (t.transpose(1, 2) for t in leaves)
        for p in (0.0, 0.1):

            def ours(p=p, q=q, k=k, v=v):
                return ptfast.attention(q, k, v, key_mask=key_mask, dropout_p=p)

            def stock(p=p, q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=p)

            name = f"attention B{B} H{H} L{L} D{D} key_mask p{p:g} {layout}"
            rows[f"{name} fwd+bwd"] = (_fwd_bwd(ours, leaves), _fwd_bwd(stock, leaves))
            rows[f"{name} fwd"] = (_fwd(ours), _fwd(stock))
    for fmt, layout in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")):
        for c, s in ((64, 32), (128, 16), (256, 8)):
            x = torch.randn(32, c, s, s, generator=g).contiguous(memory_format=fmt).requires_grad_()
            w = (torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).contiguous(memory_format=fmt).requires_grad_()
            b = torch.randn(c, generator=g).requires_grad_()
            for pool in (True, False):
                op = "conv_relu_pool" if pool else "conv_relu"

                def ours(x=x, w=w, b=b, pool=pool):
                    return (ptfast.conv_relu_pool if pool else ptfast.conv_relu)(x, w, b)

                def stock(x=x, w=w, b=b, pool=pool):
                    y = F.relu(F.conv2d(x, w, b, padding=1))
                    return F.max_pool2d(y, 2) if pool else y

                name = f"{op} N32 {c}->{c} @{s} {layout}"
                rows[f"{name} fwd+bwd"] = (_fwd_bwd(ours, [x, w, b]), _fwd_bwd(stock, [x, w, b]))
                rows[f"{name} fwd"] = (_fwd(ours), _fwd(stock))
    # The masked-LM head at the benchmark suite's CPU shapes (2048 tokens, 15% labelled). Stock: the strictest
    # plain-PyTorch composition, labelled rows gathered first, then linear + cross_entropy (what patch replaces,
    # HF's all-token head, is 5-15x slower still: benchmarks.run's masked_lm_loss results).
    # Last, BERT-base's head on 4096 tokens (the route's logits then 77 MB in fp32).
    for n, emb, vocab in ((2048, 256, 8000), (2048, 128, 4000), (4096, 768, 30522)):
        h = torch.randn(n, emb, generator=g).requires_grad_()
        w = (torch.randn(vocab, emb, generator=g) * 0.05).requires_grad_()
        b = torch.zeros(vocab).requires_grad_()
        labels = torch.where(torch.rand(n, generator=g) < 0.15, torch.randint(0, vocab, (n,), generator=g), -100)

        def ours(h=h, w=w, b=b, labels=labels):
            return ptfast.masked_lm_loss(h, w, labels, b)

        def stock(h=h, w=w, b=b, labels=labels):
            rows_ = (labels != -100).nonzero().squeeze(1)
            return F.cross_entropy(F.linear(h.index_select(0, rows_), w, b), labels.index_select(0, rows_))

        name = f"masked_lm_loss N{n} 15% E{emb} V{vocab}"
        rows[f"{name} fwd+bwd"] = (_fwd_bwd(ours, [h, w, b]), _fwd_bwd(stock, [h, w, b]))
        rows[f"{name} fwd"] = (_fwd(ours), _fwd(stock))
        # bf16 (the benchmark suite's default dtype), as bf16 tensors and as fp32 parameters under CPU autocast.
        # Stock computes the cross-entropy in fp32 on the upcast logits, as Hugging Face's heads do.
        for how in ("bf16", "autocast bf16"):
            leaves = [x if how != "bf16" else x.detach().bfloat16().requires_grad_() for x in (h, w, b)]

            def ours_lp(h=leaves[0], w=leaves[1], b=leaves[2], labels=labels, how=how):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "bf16"):
                    return ptfast.masked_lm_loss(h, w, labels, b)

            def stock_lp(h=leaves[0], w=leaves[1], b=leaves[2], labels=labels, how=how):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "bf16"):
                    rows_ = (labels != -100).nonzero().squeeze(1)
                    logits = F.linear(h.index_select(0, rows_), w, b).float()
                    return F.cross_entropy(logits, labels.index_select(0, rows_))

            rows[f"{name} {how} fwd+bwd"] = (_fwd_bwd(ours_lp, leaves), _fwd_bwd(stock_lp, leaves))
            rows[f"{name} {how} fwd"] = (_fwd(ours_lp), _fwd(stock_lp))
    rows.update(_step_rows(g))
    rows.update(_bert_rows(g))
    # The method's own noise: stock against itself (two closures over the same call), so a ratio is read against
    # how far from 1.0 identical code lands in the same run.
    x = torch.randn(32, 128, 16, 16, generator=g).requires_grad_()
    w = (torch.randn(128, 128, 3, 3, generator=g) / (9 * 128) ** 0.5).requires_grad_()
    b = torch.randn(128, generator=g).requires_grad_()

    def stock_a(x=x, w=w, b=b):
        return F.relu(F.conv2d(x, w, b, padding=1))

    def stock_b(x=x, w=w, b=b):
        return F.relu(F.conv2d(x, w, b, padding=1))

    name = "control: stock vs stock, conv_relu N32 128->128 @16 NCHW"
    rows[f"{name} fwd+bwd"] = (_fwd_bwd(stock_a, [x, w, b]), _fwd_bwd(stock_b, [x, w, b]))
    rows[f"{name} fwd"] = (_fwd(stock_a), _fwd(stock_b))
    return rows


def _step_rows(g: torch.Generator) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Whole training steps of the benchmark suite's CPU cases (``vgg16_train_step``, ``resnet18_train_step``,
    ``resnet50_frozen_step``): stock model against ``ptfast.patch`` of a deep copy, each with its own optimizer,
    channels-last model and images, fp32."""
    from benchmarks.ops import resnet_step, vgg_step

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run

    cases = [
        ("vgg16/4 full @64 b8", vgg_step, dict(N=8, H=64, W=64, width_divisor=4, classes=100, frozen_backbone=False)),
        ("vgg16/4 frozen-backbone @64 b8", vgg_step, dict(N=8, H=64, W=64, width_divisor=4, classes=100,
                                                          frozen_backbone=True)),
        ("resnet18 @96 b8", resnet_step, dict(arch="resnet18", N=8, H=96, W=96, width_divisor=1, classes=10,
                                              frozen_backbone=False)),
        ("resnet50 frozen-backbone @96 b8", resnet_step, dict(arch="resnet50", N=8, H=96, W=96, width_divisor=1,
                                                              classes=100, frozen_backbone=True)),
    ]  # fmt: skip
    rows = {}
    for name, module, p in cases:
        stock = module._new_model(p, torch.device("cpu"))
        ours = ptfast.patch(copy.deepcopy(stock))
        x = torch.randn(p["N"], 3, p["H"], p["W"], generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, p["classes"], (p["N"],), generator=g)
        steps = []
        for model in (ours, stock):
            params = [q for q in model.parameters() if q.requires_grad]
            if module is vgg_step:
                opt = torch.optim.AdamW(params, lr=1e-4)
            else:
                opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
            steps.append(step(model, opt, x, y))
        rows[f"train step {name}"] = (steps[0], steps[1])
    return rows


def _bert_rows(g: torch.Generator) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Whole BERT training steps at the benchmark suite's CPU case (``bert_mlm_step``: 4 layers, hidden 256, batch
    16 x 128, lengths uniform in [32, 128], dropout 0.1): masked-LM pretraining, and fine-tuning a sequence
    classifier of the same shape (4 classes). Stock Hugging Face (sdpa) against ``ptfast.patch`` of a deep copy,
    with and without ``unpad``; each model has its own AdamW (the suite's settings), fp32."""
    from transformers import BertForSequenceClassification

    from benchmarks.ops import bert_step

    cpu = torch.device("cpu")
    p = dict(B=16, L=128, **bert_step.BERT_SMALL, dropout_p=bert_step.DROPOUT, lengths_seed=5)
    mlm = bert_step._new_model(p, cpu)
    config = copy.deepcopy(mlm.config)
    config.num_labels = 4
    torch.manual_seed(2000)
    classifier = BertForSequenceClassification(config).train()
    mlm_batch = bert_step._batch(p, cpu, g)
    cls_batch = {
        "input_ids": mlm_batch["input_ids"],
        "attention_mask": mlm_batch["attention_mask"],
        "labels": torch.randint(0, config.num_labels, (p["B"],), generator=g),
    }

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()

        return run

    rows = {}
    for task, model, batch in (("masked-LM", mlm, mlm_batch), ("classification", classifier, cls_batch)):
        stock = step(model, batch)  # one stock model per task, the baseline of both patched rows
        for unpad in (False, True):
            ours = step(ptfast.patch(copy.deepcopy(model), unpad=unpad), batch)
            rows[f"train step bert-small {task} b16 L128, patch(unpad={unpad})"] = (ours, stock)
    return rows


def measure(rounds: int, inner: int, only: str | None = None) -> list[tuple[str, float, float, float]]:
    rows = {name: steps for name, steps in _rows().items() if only is None or only in name}
    for ours, stock in rows.values():  # warm-up
        ours(), stock(), ours(), stock()
    ratios: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(rounds):
        for name, (ours, stock) in rows.items():
            times: dict[Callable[[], None], list[float]] = {ours: [], stock: []}
            # Which of the two runs first alternates by round: the first call after another row's runs pays
            # for cold caches, and an order that never changes would charge one side every time.
            order = (ours, stock) if i % 2 == 0 else (stock, ours)
            for _ in range(inner):
                for fn in order:
                    t0 = time.perf_counter()
                    fn()
                    times[fn].append(time.perf_counter() - t0)
            ratios[name].append(min(times[stock]) / min(times[ours]))
    out = []
    for name, r in ratios.items():
        r.sort()
        out.append((name, statistics.median(r), r[len(r) // 5], r[(4 * len(r)) // 5]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--only", default=None, help="only the rows whose name contains this text")
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()
    started, commit = run_start()
    results = measure(args.rounds, args.inner, args.only)
    lines = cpu_report_head(
        "ptfast vs stock PyTorch on CPU, interleaved (speed ratio: stock time / ptfast time, > 1 = ptfast faster)",
        "benchmarks.interleaved",
        started,
        commit,
        f"fp32 unless a row says bf16 · {args.rounds} rounds, best of {args.inner} per round",
    )
    lines += [
        "Stock: `F.scaled_dot_product_attention` with the bool mask `(B, 1, 1, L)` (dropout: SDPA's own); "
        "`F.relu(F.conv2d(...))` (+ `F.max_pool2d(2)`). BHLD: contiguous q/k/v; BLHD: transposes of (B, L, H, D). "
        "NCHW: contiguous x and weight (the issue's rows); NHWC: channels_last (the benchmark suite's conv cases). "
        "masked_lm_loss: labelled rows gathered, then `F.cross_entropy(F.linear(...))` (mean; bf16 rows: the "
        "cross-entropy on `.float()` logits). Train steps: the benchmark suite's CPU cases (forward, backward, "
        "optimizer step), stock model against `ptfast.patch` of a copy; the BERT steps: Hugging Face's sdpa models "
        "(masked-LM pretraining, sequence classification), dropout 0.1, lengths uniform in [32, 128].",
        "",
        "| row | median ratio | p20–p80 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {med:.3f} | {lo:.3f}–{hi:.3f} |" for name, med, lo, hi in results]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
