"""Headline benchmarks of first contact, and the verification-record rows they yield.

Each entry of :func:`plan` is one ``python -m benchmarks.run`` invocation (its own process, its own time limit):
every provider of a shape side by side in one run, every ptfast backend checked against the torch backend's
output and gradients (``--check-backends``). On a GPU (bf16, the default shapes):

* attention at BERT shapes: batch 32, L 128 and 512, head dim 64, key_mask lengths uniform in [L/4, L], dropout
  0.1, forward and forward+backward: ptfast's torch and triton backends, padded and packed (varlen), against every
  SDPA backend that accepts the input (``sdpa[best]`` is the fastest of them);
* the BERT-base masked-LM head (32k tokens, 15 % labelled, vocab 30522): ptfast torch / triton against the stock
  Hugging Face head and a gathered PyTorch head;
* three VGG-16 conv layers (conv1_2 and conv3_3 with the 2x2 pool, conv4_2 without) against cuDNN eager;
* six ResNet conv layers through ``conv_relu`` (after conv4_2, most valuable first: the invocation's time limit
  cuts the last), each a kernel specialization and shape class of its own, against torchvision's eager block
  (``F.conv2d``, ``add_`` of the residual, ``relu_``): the ResNet-50 stem (7x7 stride 2), Bottleneck 1x1s
  (``layer1.1.conv1``, ``conv3`` + residual), a strided 3x3 (``layer2.0.conv2``), a BasicBlock tail (ResNet-18
  ``layer3.1.conv2`` + residual) and a downsample-like strided 1x1 (:data:`benchmarks.ops.conv.RESNET_LAYERS`);
* ``add_relu`` at two ResNet block-tail activations of batch 64 (ResNet-50 layer1: 51 Mi elements, ResNet-18
  layer2: 6 Mi; two size classes) against eager ``torch.add(y, r).relu_()``;
* a BERT-base masked-LM training step, stock (sdpa) vs ``ptfast.patch`` vs ``ptfast.patch(unpad=True)``;
* a VGG-16 training step, eager vs ``ptfast.patch`` on the triton and cuda backends;
* a frozen ResNet-50 backbone (eval mode, BatchNorm folded by the patch) with a new trainable ``fc``: one step,
  eager vs ``ptfast.patch`` on the triton and cuda backends;
* a ResNet-18 training step (train mode: BatchNorm on batch statistics, so the patched blocks run stock conv and
  BN math, and ``add_relu`` at each block tail), eager vs ``ptfast.patch`` (auto).

The ResNet step invocations come last: they feed no record row, so a run short of time loses them first.

The patched models run under ``PTFAST_ALLOW_UNVERIFIED=1``: with no record yet, ``auto`` would run the torch
backend and the step would measure nothing new. A CPU rehearsal runs the same invocations with ``--quick`` shapes,
fp16 and the Triton interpreter (the ResNet steps without it, on the torch backend; the ResNet conv layers as tiny
odd-sized versions of each form); its timings are no performance claim and never reach the package's record.

:func:`bench_rows` turns the op benchmarks' JSON into the record's rows: per shape class and backend, the speed-up
over the torch backend in the same run (median of forward+backward, with a p20-p80 spread) and whether the check
passed. A conv row's class carries the case's kernel, stride and residual
(``bf16/channels_last/k7x7/s2/nopool/cout64``, ``bf16/channels_last/k3x3/residual/nopool/cout256``): each ResNet
specialization is vouched for by its own smoke family (:mod:`.smoke`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ops.conv import resnet_case_names
from ptfast import verification

CHECKED = ("ptfast[torch]", "ptfast[triton]", "ptfast[cuda]", "ptfast-varlen[torch]", "ptfast-varlen[triton]")


@dataclass(frozen=True)
class Invocation:
    op: str
    cases: tuple[str, ...]
    providers: tuple[str, ...]
    seconds: int  # its share of the headline budget (--time-limit; a killed run keeps its partial JSON)
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    unverified: bool = False  # run with PTFAST_ALLOW_UNVERIFIED=1 (patched models under auto)
    interpreter: bool = True  # the CPU rehearsal runs it under TRITON_INTERPRET=1 (else: no Triton on the CPU)
    extra: tuple[str, ...] = field(default=())


def plan(cpu: bool) -> list[Invocation]:
    """The headline invocations (GPU shapes, or the ``--quick`` shapes of a CPU rehearsal)."""
    attention = ("bert B2 L64 p0.1",) if cpu else ("bert B32 L128 p0.1", "bert B32 L512 p0.1")
    sdpa = () if cpu else ("sdpa[flash]", "sdpa[efficient]", "sdpa[cudnn]", "sdpa[math]")
    mlm = ("tiny 15% masked",) if cpu else ("bert-base 32k tok",)
    pool_layers = ("tiny 8->16 @16",) if cpu else ("conv1_2 64->64 @224", "conv3_3 256->256 @56")
    # conv_relu: a VGG layer, then the ResNet layers (stem, 1x1s, strided, residual tails; tiny ones on the CPU).
    conv_layers = (("tiny 8->16 @16",) if cpu else ("conv4_2 512->512 @28",)) + resnet_case_names(quick=cpu)
    conv_providers = ("ptfast[torch]", "ptfast[triton]", "ptfast[cuda]", "eager")
    bert_case = ("bert-tiny b4 L32",) if cpu else ("bert-base b128 L128",)
    vgg_case = ("vgg16/8 full @32",) if cpu else ("vgg16 full @224",)
    # The rehearsal skips what cannot run on a CPU anyway (the cuda backend) and what only repeats a path.
    bert_providers = ("hf[sdpa]", "ptfast[unpad]") if cpu else ("hf[sdpa]", "ptfast", "ptfast[unpad]")
    vgg_providers = ("eager", "ptfast[triton]") if cpu else ("eager", "ptfast[triton]", "ptfast[cuda]")
    # ResNet-50's ~50 fused convs under the Triton interpreter take half a minute (measured: 34 s for the
    # invocation): the rehearsal runs the patched ResNets without the interpreter, where auto picks the torch
    # backend. That proves the invocations, not the kernels (the smoke and interpreter tests cover those).
    frozen_case = ("resnet50/8 frozen-backbone @32 b2",) if cpu else ("resnet50 frozen-backbone @224 b64",)
    frozen_providers = ("eager", "ptfast") if cpu else ("eager", "ptfast[triton]", "ptfast[cuda]")
    train_case = ("resnet18/8 @32 b2",) if cpu else ("resnet18 @224 b64",)
    add_relu = ("tiny 19ch @9",) if cpu else ("resnet50 layer1 256ch @56", "resnet18 layer2 128ch @28")
    # Seconds (--time-limit, soft: a measurement that has started finishes) sum to 300: conv_relu's 45 s hold seven
    # layers (each new specialization compiles its Triton kernels and tunes cuDNN on its first call; its cases run
    # in order, so a short run loses the last ResNet layers); add_relu (two elementwise cases) needs a few seconds.
    # Paid for by the masked-LM loss (one case), attention, the VGG step and the ResNet steps, which run last and
    # feed no record row.
    return [
        Invocation("attention", attention, CHECKED[:2] + CHECKED[3:] + sdpa, 70),
        Invocation("masked_lm_loss", mlm, ("ptfast[torch]", "ptfast[triton]", "hf-all-tokens", "gathered"), 30),
        Invocation("conv_relu_pool", pool_layers, conv_providers, 40),
        Invocation("conv_relu", conv_layers, conv_providers, 45),
        Invocation("add_relu", add_relu, conv_providers, 8),
        Invocation("bert_mlm_step", bert_case, bert_providers, 45, ("train",), True),
        Invocation("vgg16_train_step", vgg_case, vgg_providers, 30, ("train",), True),
        Invocation("resnet50_frozen_step", frozen_case, frozen_providers, 20, ("train",), True, interpreter=False),
        Invocation("resnet18_train_step", train_case, ("eager", "ptfast"), 12, ("train",), True, interpreter=False),
    ]


#: Seconds an invocation needs beyond its --time-limit: process start (imports, device init), the measurement
#: running when the limit passes, the reports. With less headline budget left than this, it is not started.
START_UP_S = 25


def limits(inv: Invocation, budget_left: float | None) -> tuple[int, float] | None:
    """(--time-limit, process timeout) for ``inv`` with ``budget_left`` seconds of the headline budget left (None:
    no budget); None when not even half its share fits (it should not start at all)."""
    limit, timeout = inv.seconds, inv.seconds + 90.0
    if budget_left is None:
        return limit, timeout
    if budget_left < START_UP_S + inv.seconds / 2:
        return None
    return min(limit, int(budget_left - START_UP_S)), min(timeout, budget_left)


def command(inv: Invocation, *, cpu: bool, out_dir: Path, python: str, seconds: int | None = None) -> list[str]:
    seconds = inv.seconds if seconds is None else seconds
    args = [python, "-m", "benchmarks.run", "--op", inv.op, "--cases", *inv.cases, "--providers", *inv.providers,
            "--out", str(out_dir), "--time-limit", str(seconds), "--check-backends", "--no-compile"]  # fmt: skip
    if inv.modes != ("train",):
        args += ["--modes", *inv.modes]
    args += ["--device", "cpu", "--quick", "--dtype", "fp16", "--no-plot", "--one-rep"] if cpu else ["--device", "cuda"]
    return args + list(inv.extra)


# --- results -> record rows ------------------------------------------------------------------------------------


def _shape_class(op: str, provider: str, params: dict[str, Any], dtype) -> tuple[str, str] | None:  # noqa: ANN001
    """(record op, shape class) a provider measured at ``params``; None for providers that are not ptfast ops."""
    if op == "attention":
        varlen = provider.startswith("ptfast-varlen")
        kv_len = max(params["lengths"]) if (varlen and params.get("lengths")) else params["L"]
        cls = verification.attention_class(
            dtype, params["D"], kv_len, attn_mask=False, key_mask=bool(params["padded"]) and not varlen,
            dropout=params["dropout"] > 0, causal=bool(params["causal"]), varlen=varlen,
        )  # fmt: skip
        return ("attention_varlen" if varlen else "attention"), cls
    if op == "masked_lm_loss":
        return op, verification.masked_lm_loss_class(dtype, params["E"])
    if op in ("conv_relu", "conv_relu_pool"):
        # The spec's inputs are channels_last; results written before the ResNet cases have no stride/residual.
        weight = (params["Cout"], params["Cin"], params["k"], params["k"])
        stride, residual = int(params.get("stride", 1)), bool(params.get("residual", False))
        return op, verification.conv_class(
            dtype, True, weight, op == "conv_relu_pool", stride=stride, residual=residual
        )
    if op == "add_relu":  # channels_last inputs
        return op, verification.add_relu_class(dtype, True, params["N"] * params["C"] * params["H"] * params["W"])
    return None


def bench_rows(results_dir: Path, gpu_class: str) -> list[dict[str, Any]]:
    """One row per (op, backend, shape class) measured: speed-up over the torch twin and the check's verdict."""
    import torch

    rows = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        op = data.get("op")
        if op not in ("attention", "masked_lm_loss", "conv_relu", "conv_relu_pool", "add_relu"):
            continue
        dtype = getattr(torch, data["options"]["dtype"])
        params = {c["name"]: c["params"] for c in data["cases"]}
        recs = data["results"]
        for rec in recs:
            name = rec["provider"]
            if rec["mode"] != "fwd+bwd" or not name.startswith("ptfast") or name.endswith("[torch]"):
                continue
            if rec["status"] != "ok" or "[" not in name or "," in name:
                continue
            backend = name[name.index("[") + 1 : -1]
            if backend not in ("triton", "cuda"):
                continue
            twin = name[: name.index("[")] + "[torch]"
            base = next((r for r in recs if r["case"] == rec["case"] and r["provider"] == twin
                         and r["mode"] == "fwd+bwd" and r["status"] == "ok"), None)  # fmt: skip
            op_cls = _shape_class(op, name, params[rec["case"]], dtype)
            if base is None or op_cls is None:
                continue
            checks = [r.get("check") for r in recs if r["case"] == rec["case"] and r["provider"] == name]
            checked = bool(checks) and all(c is not None and c.get("passed") for c in checks)
            t, b = rec["timing"], base["timing"]
            rows.append({
                "gpu_class": gpu_class, "op": op_cls[0], "backend": backend, "shape_class": op_cls[1],
                "speedup": b["median_ms"] / t["median_ms"],
                "spread": [b["p20_ms"] / t["p80_ms"], b["p80_ms"] / t["p20_ms"]],
                "checked": checked, "case": rec["case"], "source": path.name,
            })  # fmt: skip
    return _merge_same_class(rows)


def _merge_same_class(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several cases of one shape class (two layers in one channel bucket): the slowest speed-up speaks for the
    class, and every check must have passed."""
    merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["gpu_class"], row["op"], row["backend"], row["shape_class"])
        old = merged.get(key)
        if old is None:
            merged[key] = row
            continue
        keep = dict(row if row["speedup"] < old["speedup"] else old)
        keep["checked"] = old["checked"] and row["checked"]
        keep["case"] = f"{old['case']}; {row['case']}"
        merged[key] = keep
    return list(merged.values())
