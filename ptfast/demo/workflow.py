"""The pretrain-then-fine-tune workflows, stock PyTorch and ``ptfast.patch`` side by side.

Five stages, each with a stock model and a deep copy patched with ``ptfast.patch`` (same initial weights, same
batches in the same order, the same torch seed before each step):

1. masked-LM pretraining of a small Hugging Face BERT on the docstrings of Python's standard library;
2. fine-tuning that pretrained encoder (``BertForSequenceClassification``) to tell which module a docstring
   comes from;
3. a VGG in torchvision's layout on scikit-learn's digits: a backbone pretrained on digits 0-4, then a new
   10-way head trained with the backbone frozen, then everything unfrozen;
4. a hand-written VGG (one attribute per conv / ReLU / pool layer) trained from scratch on the digits;
5. a ResNet in torchvision's layout on the digits: pretrained on digits 0-4, then a new ``fc`` with the backbone
   frozen in ``eval()`` (BatchNorm folded into the convolutions by the patched twin), then unfrozen in ``train()``.

Each stage first runs a short *parity phase* in fp32 with every dropout at 0 (training mode, so the patched
BERT takes its fused masked-LM path), where each step starts both twins from the same state and their losses and
gradients must agree; then the real
training with dropout on, where ptfast's attention dropout draws from its own generator, so the two runs are
compared as curves. ``ptfast.testing.record_dispatch`` shows which ptfast ops and backends ran. This module holds
the text stages and the command line; the CNN stages live in :mod:`ptfast.demo.cnn_stages`, and what every stage
shares (the environment, the results, side-by-side training) in :mod:`ptfast.demo.training`.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ptfast
from ptfast.demo import cnn_stages, plot, report
from ptfast.demo import data as D
from ptfast.demo.models import bert_config, set_dropout
from ptfast.demo.training import (
    NAMES,
    STAGE_TITLES,
    Env,
    Phase,
    Stage,
    accuracy,
    adamw,
    make_twins,
    train_side_by_side,
    train_single,
    train_step,
)

# Model and batch sizes; steps are (parity, masked-LM, classification, CNN pretrain, CNN frozen, CNN unfrozen,
# hand-written VGG, ResNet pretrain, ResNet frozen, ResNet unfrozen).
# "small" (the CPU default): masked-LM pretraining must leave the unigram plateau (held-out loss ~6.2, where the
# encoder has learned token frequencies only and fine-tunes worse than a random one) before it helps the
# classifier. Measured on the demo's data (CPU, one seed): 160-600 steps of batch 16 x 128 tokens at lr 1e-3 to
# 3e-3 stayed on it; batch 32 x 64 tokens at lr 2e-3 left it by 600 steps and, after 1000, fine-tuned to 64%
# validation accuracy against 53% for the never-pretrained control. With the constant rate after warmup: 600
# steps fine-tuned to 49% (below the control), 1040 (what the ptfast twin runs in the stock twin's 600-step
# seconds on this CPU) to 66%: the equal-wall-clock comparison is the one that shows what the speed buys.
# Fine-tuning (small): 587 training docstrings and 146 validation ones, so one fine-tuning seed moves the accuracy
# by up to 12 points; the encoder comparisons take the mean of 3 seeds. Measured on 600-step encoders (CPU, 3 seeds
# each, 100 steps of batch 16; control / stock twin's encoder / ptfast twin's same-seconds encoder): lr 1e-3 gave
# 55.7 / 61.2 / 61.9% with the seeds overlapping, 2e-3 67.6 / 68.5 / 68.5% (the task is learnt from scratch as
# fast), 7e-4 44.7 / 54.6 / 54.3% with every pretrained seed above every control seed, 5e-4 35.8 / 49.8 / 50.5%.
SIZES: dict[str, dict] = {
    "tiny": dict(
        vocab=1000, hidden=64, layers=2, heads=2, intermediate=128, max_len=64, mlm_batch=8, cls_batch=8,
        mlm_lr=1e-3, cls_lr=5e-4, cls_seeds=2,
        cnn=[8, 8, "M", 16, "M", 32, "M"], cnn_hidden=64, cnn_lr=(2e-3, 2e-3, 1e-3), image=32, cnn_batch=32,
        vgg_widths=(8, 8, 16, 16, 16), vgg_hidden=32, vgg_lr=2e-3,
        resnet_layers=(1, 1, 1, 1), resnet_width=8, resnet_lr=(0.05, 0.05, 0.01),
        steps=(2, 4, 4, 3, 2, 3, 3, 2, 2, 2),
    ),
    "small": dict(
        vocab=4000, hidden=128, layers=2, heads=2, intermediate=256, max_len=64, mlm_batch=32, cls_batch=16,
        mlm_lr=2e-3, cls_lr=7e-4, cls_seeds=3,
        cnn=[16, 16, "M", 32, 32, "M", 64, "M"], cnn_hidden=128, cnn_lr=(2e-3, 2e-3, 1e-3), image=32, cnn_batch=64,
        vgg_widths=(8, 16, 16, 32, 32), vgg_hidden=64, vgg_lr=2e-3,
        resnet_layers=(1, 1, 1, 1), resnet_width=16, resnet_lr=(0.05, 0.05, 0.01),
        steps=(6, 600, 100, 70, 30, 70, 60, 40, 20, 30),
    ),
    "base": dict(
        vocab=8000, hidden=768, layers=12, heads=12, intermediate=3072, max_len=128, mlm_batch=64, cls_batch=32,
        mlm_lr=2e-4, cls_lr=5e-5, cls_seeds=3,
        cnn=[64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], cnn_hidden=1024,
        cnn_lr=(5e-4, 1e-3, 2e-4), image=64, cnn_batch=128,
        vgg_widths=(64, 128, 256, 512, 512), vgg_hidden=512, vgg_lr=1e-3,
        resnet_layers=(2, 2, 2, 2), resnet_width=64, resnet_lr=(0.05, 0.05, 0.01),
        steps=(10, 400, 200, 150, 100, 150, 150, 150, 100, 150),
    ),
}  # fmt: skip
SMOKE_STEPS = (2, 3, 3, 2, 2, 2, 2, 2, 2, 2)


# --- environment ------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _say(msg: str) -> None:
    print(msg, flush=True)


# --- stage 1: masked-LM pretraining ------------------------------------------------------------------------


@dataclass
class TextData:
    docs: list[D.Doc]
    missing: list[str]
    cls: D.ClassificationData
    tokenizer: object
    vocab_size: int
    examples: list[list[int]]
    heldout: list[list[int]]
    pretrain_docs: int


def prepare_text(size: dict, seed: int) -> TextData:
    docs, missing = D.collect_docs()
    cls = D.classification_split(docs, val_fraction=0.2, seed=seed)
    held_out = set(cls.val_texts)
    # Validation docstrings of the classification task never reach pretraining (compared scrubbed, as split).
    pretrain = [d for d in docs if not (d.module in cls.labels and D.scrub_module_name(d.text, d.module) in held_out)]
    tokenizer = D.train_tokenizer([d.text for d in pretrain], size["vocab"])
    paragraphs = [p for d in pretrain for p in D.paragraphs(d.text)]
    examples = D.pack_examples(D.encode(tokenizer, paragraphs), size["max_len"], seed)
    heldout_paragraphs = [p for t in cls.val_texts for p in D.paragraphs(t)]
    heldout = D.pack_examples(D.encode(tokenizer, heldout_paragraphs), size["max_len"], seed + 7)
    return TextData(docs, missing, cls, tokenizer, tokenizer.get_vocab_size(), examples, heldout, len(pretrain))


def _to(batch: D.MLMBatch, device: torch.device) -> D.MLMBatch:
    return D.MLMBatch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device))


@torch.no_grad()
def _mlm_eval(env: Env, model: nn.Module, batches: list[D.MLMBatch]) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with env.autocast(True):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), reduction="sum").item()
        count += int((b.labels != D.IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def _continue_training(
    env: Env, model: nn.Module, opt: torch.optim.Optimizer, first: int, steps: int, loss_fn, *, amp: bool, seed: int
) -> float:
    """``steps`` more steps of a run at its optimizer's current rate (steps ``first``, ``first + 1``, ... with the
    run's seeding); returns their seconds."""
    start = time.perf_counter()
    for i in range(first, first + steps):
        train_step(env, model, opt, loss_fn, i, amp=amp, seed=seed)
    env.sync()
    return time.perf_counter() - start


def _same_seconds_steps(phase: Phase, steps: int) -> int:
    """How many more steps the ptfast twin runs in the seconds it saved over ``steps`` step-matched steps (at its
    median step time; at most ``steps`` more, the batches prepared)."""
    saved = sum(phase.times["stock"]) - sum(phase.times["ptfast"])
    per_step = statistics.median(phase.times["ptfast"]) if phase.times["ptfast"] else 0.0
    if saved <= 0 or per_step <= 0:
        return 0
    return min(steps, int(saved / per_step))


def stage_pretrain(
    env: Env, size: dict, steps: tuple[int, ...], text: TextData
) -> tuple[Stage, nn.Module, nn.Module, int]:
    """Returns (stage, the stock twin, the ptfast twin trained on for the stock twin's seconds, its steps)."""
    from transformers import BertForMaskedLM

    stage = Stage("pretrain", STAGE_TITLES["pretrain"])
    parity_steps, mlm_steps = steps[0], steps[1]
    # Twice the step-matched phase's batches: the ptfast twin's equal-wall-clock continuation draws from the rest.
    batches = [
        _to(b, env.device)
        for b in D.mlm_batches(text.examples, size["mlm_batch"], 2 * mlm_steps, text.vocab_size, env.seed)
    ]
    eval_gen = torch.Generator().manual_seed(env.seed + 99)
    eval_batches = []
    for start in range(0, len(text.heldout), 32):
        ids, mask = D.pad_batch(text.heldout[start : start + 32])
        masked, labels = D.mask_tokens(ids, mask, text.vocab_size, eval_gen)
        eval_batches.append(_to(D.MLMBatch(masked, mask, labels), env.device))
    config = bert_config(
        text.vocab_size, size["hidden"], size["layers"], size["heads"], size["intermediate"], size["max_len"], 0.1
    )
    torch.manual_seed(env.seed)
    init = BertForMaskedLM(config).to(env.device)
    n_params = sum(p.numel() for p in init.parameters())
    lengths = [len(e) for e in text.examples]
    stage.details += [
        f"BertForMaskedLM: hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, intermediate "
        f"{size['intermediate']}, vocab {text.vocab_size} ({n_params / 1e6:.2f} M parameters), stock attention "
        f"'sdpa'",
        f"data: {text.pretrain_docs} docstrings -> {len(text.examples)} packed examples of {min(lengths)}-"
        f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); batch {size['mlm_batch']}, padded to the "
        f"longest example (multiple of 8), 15% masked (80/10/10)",
        f"AdamW lr {size['mlm_lr']}, 10% warmup then constant (so the faster twin can go on at the same rate for "
        f"the seconds it saved); held-out set: {len(text.heldout)} examples packed from the classification task's "
        "validation docstrings (never seen in pretraining)",
    ]

    def loss_fn(model: nn.Module, i: int) -> torch.Tensor:
        b = batches[i % len(batches)]
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss

    parity_stock = copy.deepcopy(init)
    set_dropout(parity_stock, 0.0)
    with env.exact_fp32():
        train_side_by_side(
            env, stage, stage.parity, "parity (fp32, dropout 0)", make_twins(env, parity_stock, stage),
            adamw(size["mlm_lr"]), parity_steps, loss_fn, amp=False, seed=env.seed * 1000, schedule=False,
        )  # fmt: skip
    del parity_stock
    models = make_twins(env, init, stage, record=False)
    seed = env.seed * 1000 + 500_000
    opts = train_side_by_side(
        env, stage, stage.main, "train (dropout 0.1)", models, adamw(size["mlm_lr"]), mlm_steps, loss_fn,
        amp=True, seed=seed, decay=False,
    )  # fmt: skip
    stage.metrics["held-out masked-LM loss"] = {n: _mlm_eval(env, models[n], eval_batches) for n in NAMES}
    stage.baselines["held-out masked-LM loss"] = ("uniform guess", math.log(text.vocab_size))
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(models["stock"].bert.parameters(), models["ptfast"].bert.parameters(), strict=True)
    )
    stage.details.append(f"after training: max |stock - ptfast| over the encoder's weights = {drift:.2e}")
    # Equal wall-clock: the ptfast twin goes on (same optimizer, same rate, the next batches) for the seconds it
    # saved, so it has pretrained for as long as the stock twin took for its steps.
    extra = _same_seconds_steps(stage.main, mlm_steps)
    seconds = _continue_training(env, models["ptfast"], opts["ptfast"], mlm_steps, extra, loss_fn, amp=True, seed=seed)
    held = _mlm_eval(env, models["ptfast"], eval_batches)
    stage.metrics["held-out masked-LM loss, same seconds"] = {
        "stock": stage.metrics["held-out masked-LM loss"]["stock"], "ptfast": held
    }  # fmt: skip
    stage.metrics["held-out masked-LM loss"] = stage.metrics.pop("held-out masked-LM loss")  # the headline: last
    stage.details.append(
        f"same seconds: the stock twin's {mlm_steps} steps took {sum(stage.main.times['stock']):.1f} s; the ptfast "
        f"twin used them for {mlm_steps + extra} steps ({extra} more, {seconds:.1f} s, after its "
        f"{sum(stage.main.times['ptfast']):.1f} s): held-out masked-LM loss {held:.3f} against the stock twin's "
        f"{stage.metrics['held-out masked-LM loss']['stock']:.3f}"
    )
    return stage, models["stock"], models["ptfast"], mlm_steps + extra


# --- stage 2: classification fine-tuning -------------------------------------------------------------------


def _accs(values: list[float]) -> str:
    return ", ".join(f"{v:.1%}" for v in values)


def _load_encoder(model: nn.Module, pretrained: nn.Module) -> None:
    missing, unexpected = model.bert.load_state_dict(pretrained.bert.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights did not transfer: missing {missing}, unexpected {unexpected}")


def stage_finetune_text(
    env: Env,
    size: dict,
    steps: tuple[int, ...],
    text: TextData,
    pretrained: nn.Module,
    same_seconds: tuple[nn.Module, int] | None = None,
) -> Stage:
    """``same_seconds``: the ptfast twin's encoder pretrained for the stock twin's seconds, and its steps."""
    from transformers import BertForSequenceClassification

    stage = Stage("classify", STAGE_TITLES["classify"])
    parity_steps, cls_steps = steps[0], steps[2]
    cls = text.cls
    train_ex = D.classification_examples(text.tokenizer, cls.train_texts, size["max_len"])
    val_ex = D.classification_examples(text.tokenizer, cls.val_texts, size["max_len"])
    train_y = torch.tensor(cls.train_y, device=env.device)
    batches = []
    for idx in D.classification_batches(len(train_ex), size["cls_batch"], cls_steps, env.seed + 2):
        ids, mask = D.pad_batch([train_ex[i] for i in idx])
        batches.append((ids.to(env.device), mask.to(env.device), train_y[idx]))
    val_batches = []
    for start in range(0, len(val_ex), 64):
        ids, mask = D.pad_batch(val_ex[start : start + 64])
        y = torch.tensor(cls.val_y[start : start + 64], device=env.device)
        val_batches.append((ids.to(env.device), mask.to(env.device), y))
    config = copy.deepcopy(pretrained.config)
    config.num_labels = len(cls.labels)
    torch.manual_seed(env.seed + 1)
    init = BertForSequenceClassification(config).to(env.device)
    _load_encoder(init, pretrained)
    majority = Counter(cls.val_y).most_common(1)[0][1] / len(cls.val_y)
    stage.baselines["validation accuracy"] = ("majority", majority)
    stage.details += [
        f"BertForSequenceClassification, {len(cls.labels)} classes ({', '.join(cls.labels)}); encoder from the "
        "stock model of stage 1 (both twins start from it), pooler and classifier freshly initialized",
        f"data: {len(train_ex)} train / {len(val_ex)} validation docstrings (split per module), first "
        f"{size['max_len']} tokens, the module's own name removed from the text; batch {size['cls_batch']}",
        f"AdamW lr {size['cls_lr']}, 10% warmup then linear decay; majority-class baseline {majority:.1%}",
        "control (stock only, not part of the comparison): the same classifier with a randomly initialized encoder, "
        "same batches, schedule and seeds, to show what the pretraining of stage 1 bought",
    ]
    stage.control_what = "control without pretraining"

    def loss_fn(model: nn.Module, i: int) -> torch.Tensor:
        ids, mask, y = batches[i % len(batches)]
        return model(input_ids=ids, attention_mask=mask, labels=y).loss

    parity_stock = copy.deepcopy(init)
    set_dropout(parity_stock, 0.0)
    with env.exact_fp32():
        train_side_by_side(
            env, stage, stage.parity, "parity (fp32, dropout 0)", make_twins(env, parity_stock, stage),
            adamw(size["cls_lr"]), parity_steps, loss_fn, amp=False, seed=env.seed * 1000 + 1, schedule=False,
        )  # fmt: skip
    del parity_stock
    models = make_twins(env, init, stage, record=False)
    train_side_by_side(
        env, stage, stage.main, "train (dropout 0.1)", models, adamw(size["cls_lr"]), cls_steps, loss_fn,
        amp=True, seed=env.seed * 1000 + 600_000,
    )  # fmt: skip
    stage.metrics["validation accuracy"] = {n: accuracy(env, models[n], val_batches) for n in NAMES}
    del models
    # What the pretraining bought, and what the ptfast twin's extra same-seconds pretraining buys: stock
    # classifiers fine-tuned from each encoder (none, for the control) on the same batches with the same schedule.
    # On a validation set this small the fine-tuning seed alone moves the accuracy by several points (measured:
    # 60-75% for one encoder), so each encoder gets `cls_seeds` runs, each its own head initialisation and dropout
    # stream, and the comparisons use their mean. Seed 0 is exactly the stock twin's own run (same initialisation
    # seed, same per-step seeds), so the stock twin's encoder reuses that accuracy.
    n_seeds = size["cls_seeds"]

    def fine_tune(encoder: nn.Module | None, k: int, label: str) -> tuple[float, list[float]]:
        torch.manual_seed(env.seed + 1 + 1000 * k)
        model = BertForSequenceClassification(config).to(env.device)
        if encoder is not None:
            _load_encoder(model, encoder)
        losses = train_single(
            env, model, adamw(size["cls_lr"]), cls_steps, loss_fn, amp=True,
            seed=env.seed * 1000 + 600_000 + 10_000 * k, label=f"{label}, fine-tuning seed {k}",
        )  # fmt: skip
        return accuracy(env, model, val_batches), losses

    runs = [fine_tune(None, k, "control: encoder not pretrained") for k in range(n_seeds)]
    stage.control_losses = runs[0][1]  # the curve drawn: the run seeded as the twins are
    control_accs = [acc for acc, _ in runs]
    stage.control_metrics["validation accuracy"] = control_accs[0]
    same_steps = [stage.metrics["validation accuracy"]["stock"]]
    same_steps += [fine_tune(pretrained, k, "the stock twin's encoder")[0] for k in range(1, n_seeds)]
    control, pretrained_mean = statistics.mean(control_accs), statistics.mean(same_steps)
    seeds_text = f"mean of {n_seeds} fine-tuning seeds" if n_seeds > 1 else "one fine-tuning seed"
    stage.details.append(
        f"with {steps[1]} steps of masked-LM pretraining, the stock twin's encoder fine-tunes to {pretrained_mean:.1%} "
        f"validation accuracy ({seeds_text}: {_accs(same_steps)}) against {control:.1%} for the control "
        f"({_accs(control_accs)}): the pretrained encoder "
        + (
            "beat the control at this budget"
            if pretrained_mean > control
            else "did not beat the control at this budget (a short pretraining that has mostly learned token "
            "frequencies can be worse than none)"
        )
    )
    if same_seconds is not None:
        # The same classifier from the encoder the ptfast twin pretrained for the stock twin's seconds.
        encoder, encoder_steps = same_seconds
        accs = [fine_tune(encoder, k, "the ptfast twin's same-seconds encoder")[0] for k in range(n_seeds)]
        key = f"validation accuracy, same pretraining seconds ({seeds_text})"
        stage.metrics[key] = {"stock": pretrained_mean, "ptfast": statistics.mean(accs)}
        stage.control_metrics[key] = control
        stage.metrics["validation accuracy"] = stage.metrics.pop("validation accuracy")  # the headline stays last
        stage.details.append(
            f"same pretraining seconds: fine-tuned from the encoder the ptfast twin pretrained in the stock twin's "
            f"seconds ({encoder_steps} steps against {steps[1]}), the classifier reaches {statistics.mean(accs):.1%} "
            f"({_accs(accs)}) against {pretrained_mean:.1%} from the stock twin's encoder and {control:.1%} for "
            "the control"
        )
    return stage


# --- command line -----------------------------------------------------------------------------------------


def _finish(stage: Stage, env: Env, t0: float) -> Stage:
    stage.elapsed = time.perf_counter() - t0
    report.print_stage(stage, env)
    return stage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ptfast.demo",
        description="Pretrain a small BERT with a masked-LM loss and fine-tune it; fine-tune a VGG (torchvision "
        "layout), train a hand-written VGG and fine-tune a ResNet (frozen, then unfrozen) on scikit-learn's digits: "
        "stock PyTorch and ptfast.patch side by side (parity check, loss curves, step time, memory, which ptfast "
        "backend ran). `python -m ptfast.demo --tour` runs the quick op-by-op tour instead.",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument(
        "--size", choices=list(SIZES), default=None, help="model sizes (default: small on CPU, base on CUDA)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps of every stage (overrides the size's)")
    p.add_argument("--mlm-steps", type=int, default=None, help="masked-LM pretraining steps")
    p.add_argument("--cls-steps", type=int, default=None, help="classification fine-tuning steps")
    p.add_argument(
        "--cnn-steps",
        type=int,
        default=None,
        help="steps of every CNN phase (VGG and ResNet: pretrain, frozen, unfrozen; hand-written VGG)",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        choices=list(STAGE_TITLES),
        default=None,
        help="run only these stages (default: all; classify needs pretrain, which is then added)",
    )
    p.add_argument("--parity-steps", type=int, default=None, help="steps of each parity phase (dropout off)")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=None,
                   help="ptfast backend (default: PTFAST_BACKEND or auto)")  # fmt: skip
    p.add_argument("--no-amp", action="store_true", help="CUDA: train in fp32 instead of bf16 autocast")
    p.add_argument("--out", default="ptfast_demo_out", help="folder for report.md and loss_curves.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CI mode: tiny sizes and a few steps of every stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is no TTY)")
    p.add_argument(
        "--tour", action="store_true", help="run the quick op-by-op tour instead (other flags: --help there)"
    )
    return p


def resolve_steps(args: argparse.Namespace, size_name: str) -> tuple[int, ...]:
    parity, mlm, cls, *cnn = SMOKE_STEPS if args.smoke else SIZES[size_name]["steps"]
    if args.steps is not None:
        mlm = cls = args.steps
        cnn = [args.steps] * len(cnn)
    mlm = args.mlm_steps if args.mlm_steps is not None else mlm
    cls = args.cls_steps if args.cls_steps is not None else cls
    if args.cnn_steps is not None:
        cnn = [args.cnn_steps] * len(cnn)
    parity = args.parity_steps if args.parity_steps is not None else parity
    steps = (parity, mlm, cls, *cnn)
    if min(steps) < 1:
        raise SystemExit("python -m ptfast.demo: every step count must be at least 1")
    return steps


def resolve_stages(chosen: list[str] | None) -> list[str]:
    """The stages to run, in the demo's order (classify fine-tunes pretrain's encoder, so it brings pretrain)."""
    wanted = set(chosen or STAGE_TITLES)
    if "classify" in wanted:
        wanted.add("pretrain")
    return [k for k in STAGE_TITLES if k in wanted]


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m ptfast.demo: --device cuda asked for, but torch sees no CUDA GPU")
    size_name = args.size or ("tiny" if args.smoke else "base" if device.type == "cuda" else "small")
    size = SIZES[size_name]
    steps = resolve_steps(args, size_name)
    backend = args.backend or ptfast.requested_backend()
    env = Env(
        device=device,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        amp=device.type == "cuda" and not args.no_amp,
        channels_last=device.type == "cuda",
        progress=not args.no_progress and sys.stderr.isatty(),
        seed=args.seed,
        backend=backend,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    precision = "bf16 autocast" if env.amp else "fp32"
    _say(
        f"ptfast {ptfast.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"{env.device_name} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else f"ptfast {ptfast.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"{env.device_name}"
    )
    wanted = resolve_stages(args.stages)
    _say(
        f"size {size_name} | steps: {report.steps_text(steps)} | {precision} | ptfast backend {backend} | "
        f"seed {args.seed}"
    )
    if device.type == "cpu":
        _say("on CPU every ptfast op runs its `torch` backend (plain PyTorch): CPU timings are no performance claim")
    torch.manual_seed(args.seed)
    stages: list[Stage] = []
    text = None
    with ptfast.use_backend(backend):
        if "pretrain" in wanted:
            _say("\npreparing text: stdlib docstrings, WordPiece vocabulary, packed examples ...")
            t0 = time.perf_counter()
            text = prepare_text(size, args.seed)
            _say(
                f"  {len(text.docs)} docstrings from {len(D.CORPUS_MODULES) - len(text.missing)} modules"
                + (f" (missing here: {', '.join(text.missing)})" if text.missing else "")
                + f"; vocab {text.vocab_size}; {len(text.examples)} pretraining examples "
                f"({time.perf_counter() - t0:.1f} s)"
            )
            t0 = time.perf_counter()
            _say(f"\n{STAGE_TITLES['pretrain']}")
            stage, pretrained, faster, faster_steps = stage_pretrain(env, size, steps, text)
            stages.append(_finish(stage, env, t0))
            if "classify" in wanted:
                t0 = time.perf_counter()
                _say(f"\n{STAGE_TITLES['classify']}")
                stage = stage_finetune_text(env, size, steps, text, pretrained, (faster, faster_steps))
                stages.append(_finish(stage, env, t0))
            del pretrained, faster
        for key, fn in (("cnn", cnn_stages.stage_cnn), ("vgg_attr", cnn_stages.stage_vgg_attr),
                        ("resnet", cnn_stages.stage_resnet)):  # fmt: skip
            if key in wanted:
                t0 = time.perf_counter()
                _say(f"\n{STAGE_TITLES[key]}")
                stages.append(_finish(fn(env, size, steps), env, t0))
    elapsed = time.perf_counter() - t_start
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        rss = float("nan")
    info = report.RunInfo(
        command="python -m ptfast.demo "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        env=env,
        size_name=size_name,
        size=size,
        steps=steps,
        precision=precision,
        elapsed=elapsed,
        max_rss_mib=rss,
        text_summary=(
            f"{len(text.docs)} docstrings from {len(D.CORPUS_MODULES) - len(text.missing)} standard-library modules"
            + (f" (missing from this Python: {', '.join(text.missing)})" if text.missing else "")
            + f", Python {platform.python_version()}; WordPiece vocabulary of {text.vocab_size}"
            if text is not None
            else ""
        ),
    )
    png = plot.plot(stages, out / "loss_curves.png", info)
    md = report.write_markdown(stages, out / "report.md", info, png)
    report.write_json(stages, out / "results.json", info)
    _say("\n" + report.summary_table(stages, env))
    ok = all(report.parity_ok(s, env) for s in stages)
    _say(f"\nreport: {md}\nplot:   {png}\n{'parity ok' if ok else 'PARITY MISMATCH'} | total {elapsed:.1f} s")
    return 0 if ok else 1
