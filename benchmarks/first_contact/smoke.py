"""GPU correctness smoke: each kernel family once, forward and backward, against the float64 oracle.

A *family* is what selects a kernel specialization (op, backend, dtype, head dim, masks, layout): exactly the
family part of :mod:`ptfast.verification`'s shape classes, so a passed family vouches for the record's entries.
Each check draws odd-sized random inputs, runs the op on the family's backend explicitly (asserting it ran, forward
and backward), and applies docs/design.md §5 to the output and every gradient: ``err(ptfast) <= 2 * err(PyTorch's op in
the same dtype) + 1e-5``, errors relative to the float64 oracle of ``tests/oracles``. The model steps (a patched
tiny BERT and VGG, one training step under autocast; a tiny eval-mode ResNet, BatchNorm folded and blocks fused,
one forward and backward) check the loss and every parameter gradient the same way against the stock model; a
failing model step also fails the op families it covers.

``add_relu`` families: each backend, dtype and layout (one elementwise kernel per combination).

Conv families: the VGG ones (3x3, stride 1, with and without the pool, both layouts) and the ResNet
specializations of ``conv_relu`` (:data:`RESNET_CONV_FORMS`: the 7x7 stride-2 stem, strided 3x3, 3x3 with a
residual, 1x1 plain, strided and with a residual), channels_last (the layout the headline benchmarks measure)
plus NCHW for the 3x3 residual tail (there the kernels are cuDNN's convolution and the residual epilogue).

:func:`run_all` runs every family in its own subprocess (``python -m benchmarks.first_contact smoke-one NAME``),
several at a time: a crash or an illegal address takes down one family's process, never the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128)
# conv_relu's ResNet specializations: (kernel, stride, residual, layouts). Padding is kernel // 2.
RESNET_CONV_FORMS: tuple[tuple[int, int, bool, tuple[str, ...]], ...] = (
    (7, 2, False, ("channels_last",)),  # the stem
    (3, 2, False, ("channels_last",)),  # a Bottleneck's strided conv2, a BasicBlock's strided conv1
    (3, 1, True, ("channels_last", "nchw")),  # a BasicBlock's tail
    (1, 1, False, ("channels_last",)),  # a Bottleneck's conv1
    (1, 2, False, ("channels_last",)),  # downsample-like
    (1, 1, True, ("channels_last",)),  # a Bottleneck's tail (conv3)
)
ATTENTION_FORMS = {  # form -> (op, shape-class features)
    "bert": ("attention", "dropout+key_mask"),
    "bert-unpad": ("attention_varlen", "dropout+varlen"),
    "causal": ("attention", "causal"),
    "plain": ("attention", "plain"),
}


@dataclass(frozen=True)
class Family:
    name: str  # unique: "attention/triton/bf16/d64/dropout+key_mask"
    op: str  # the op the record's entries are for ("model" for model steps)
    backend: str
    dtype: str
    family: str  # shape-class family (ptfast.verification), "" for model steps
    kind: str  # which check runs it
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    covers: tuple[tuple[str, str], ...] = ()  # model steps: (op, family) a failure also fails


def conv_family(dtype: str, layout: str, k: int, stride: int, residual: bool, pool: bool) -> str:
    """The family part of :func:`ptfast.verification.conv_class` (the class minus its ``/coutN`` bucket)."""
    extra = ("/s2" if stride != 1 else "") + ("/residual" if residual else "")
    return f"{dtype}/{layout}/k{k}x{k}{extra}/{'pool' if pool else 'nopool'}"


def families(cpu: bool) -> list[Family]:
    """Every family of a first-contact run. ``cpu``: the rehearsal (fp16 only: the interpreter's bf16 dot is wrong)."""
    dtypes = ("fp16",) if cpu else DTYPES
    out: list[Family] = []
    for form, (op, features) in ATTENTION_FORMS.items():
        for dtype in dtypes:
            for d in HEAD_DIMS:
                fam = f"{dtype}/d{d}/{features}"
                out.append(Family(f"{op}/triton/{fam}", op, "triton", dtype, fam, "attention", {"form": form, "d": d}))
    for dtype in dtypes:
        out.append(Family(f"masked_lm_loss/triton/{dtype}", "masked_lm_loss", "triton", dtype, dtype, "mlm"))
    for backend in ("triton", "cuda"):
        for pool in (True, False):
            op = "conv_relu_pool" if pool else "conv_relu"
            for dtype in dtypes:
                for layout in ("channels_last", "nchw"):
                    fam = conv_family(dtype, layout, 3, 1, False, pool)
                    params = {"layout": layout, "k": 3, "stride": 1, "residual": False}
                    out.append(Family(f"{op}/{backend}/{fam}", op, backend, dtype, fam, "conv", params))
        for k, stride, residual, layouts in RESNET_CONV_FORMS:
            for dtype in dtypes:
                for layout in layouts:
                    fam = conv_family(dtype, layout, k, stride, residual, False)
                    params = {"layout": layout, "k": k, "stride": stride, "residual": residual}
                    out.append(Family(f"conv_relu/{backend}/{fam}", "conv_relu", backend, dtype, fam, "conv", params))
    for backend in ("triton", "cuda"):
        for dtype in dtypes:
            for layout in ("channels_last", "nchw"):
                fam = f"{dtype}/{layout}"
                out.append(Family(f"add_relu/{backend}/{fam}", "add_relu", backend, dtype, fam, "add_relu",
                                  {"layout": layout}))  # fmt: skip
    model_dtype = "fp32" if cpu else "bf16"  # CPU autocast is bf16-only and the interpreter's bf16 dot is wrong
    for unpad in (False, True):
        attention = ("attention_varlen", "varlen") if unpad else ("attention", "key_mask")
        covers = ((attention[0], f"{model_dtype}/d64/dropout+{attention[1]}"), ("masked_lm_loss", model_dtype))
        name = f"model/triton/bert-mlm{'-unpad' if unpad else ''}"
        out.append(Family(name, "model", "triton", model_dtype, "", "bert", {"unpad": unpad}, covers))
    for backend in ("triton", "cuda"):
        covers = tuple((op, f"{model_dtype}/channels_last/k3x3/{tail}")
                       for op, tail in (("conv_relu", "nopool"), ("conv_relu_pool", "pool")))  # fmt: skip
        out.append(Family(f"model/{backend}/vgg", "model", backend, model_dtype, "", "vgg", {}, covers))
    for backend in ("triton", "cuda"):
        out.append(Family(f"model/{backend}/resnet", "model", backend, model_dtype, "", "resnet", {},
                          tuple(("conv_relu", f) for f in resnet_model_families(model_dtype))))  # fmt: skip
    return out


def resnet_model_families(dtype: str) -> tuple[str, ...]:
    """The conv_relu families the tiny eval-mode Bottleneck ResNet of the ``model/*/resnet`` step runs (channels_last
    images): the stem, each block's 1x1 conv1, its 3x3 conv2 (strided in layers 2-4) and its conv3 + residual."""
    forms = ((7, 2, False), (1, 1, False), (3, 1, False), (3, 2, False), (1, 1, True))
    return tuple(conv_family(dtype, "channels_last", k, s, r, False) for k, s, r in forms)


# --- the checks (run inside the family's own process) ----------------------------------------------------------


def _torch_dtype(name: str):  # noqa: ANN202
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class RuleFailure(AssertionError):
    pass


def _rule(errors: dict[str, Any], what: str, ours, same_dtype, oracle) -> None:  # noqa: ANN001
    from tests.helpers import rel_err

    e_ours, e_torch = rel_err(ours.cpu(), oracle), rel_err(same_dtype.cpu(), oracle)
    bound = 2 * e_torch + 1e-5
    errors[what] = {"err": e_ours, "torch_err": e_torch, "bound": bound}
    if not e_ours <= bound:
        raise RuleFailure(f"{what}: err {e_ours:.3e} > 2 * torch err {e_torch:.3e} + 1e-5")


def _rules(names, ours, same_dtype, oracle) -> dict[str, Any]:  # noqa: ANN001
    """:func:`_rule` for each named output in order (the first failure raises); the errors of those checked."""
    errors: dict[str, Any] = {}
    for name, a, t, r in zip(names, ours, same_dtype, oracle, strict=True):
        _rule(errors, name, a, t, r)
    return errors


def _ran(events, op: str, backend: str) -> None:  # noqa: ANN001
    for phase in ("forward", "backward"):
        if (op, backend, phase) not in events:
            raise RuleFailure(f"expected {op}/{backend}/{phase} to run, saw {sorted(set(events))}")


def check_attention(fam: Family, device: str, cpu: bool) -> dict[str, Any]:
    import torch

    import ptfast
    from ptfast import _dropout
    from ptfast.testing import record_dispatch
    from tests.helpers import sdpa_same_dtype
    from tests.oracles import attention as oracle

    form, d = fam.params["form"], fam.params["d"]
    dtype, dev = _torch_dtype(fam.dtype), torch.device(device)
    # No sequence of one token: under dropout its dQ is rounding noise instead of 0 (delta = rowsum(dO * O) reads
    # the rounded output, as in FlashAttention-2), which SDPA's exact math path, the yardstick, does not show.
    lengths = [37, 20, 9] if cpu else [197, 83, 9]
    heads, longest = (2 if cpu else 3), max(lengths)
    p = 0.1 if form.startswith("bert") else 0.0
    causal = form == "causal"
    g = torch.Generator().manual_seed(11)
    varlen = form == "bert-unpad"
    shape = (sum(lengths), heads, d) if varlen else (len(lengths), heads, longest, d)
    q, k, v = (torch.randn(shape, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g).to(dev, dtype)
    key_mask = None
    if form == "bert":
        key_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(dev)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    torch.manual_seed(5)
    words = _dropout.draw_seed(dev).tolist()
    torch.manual_seed(5)
    with ptfast.use_backend(fam.backend), record_dispatch() as events:
        if varlen:
            out = ptfast.attention_varlen(q, k, v, cu.to(dev), cu.to(dev), longest, longest, dropout_p=p)
        else:
            out = ptfast.attention(q, k, v, dropout_p=p, is_causal=causal, key_mask=key_mask)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    _ran(events, fam.op, fam.backend)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    if varlen:
        bounds = cu.tolist()
        ref = oracle.attention_varlen(*leaves, bounds, bounds, dropout_p=p, seed=words)
        parts = []
        for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            keep = oracle.keep_mask(words, p, 1, heads, e - s, e - s, b_offset=b)
            one = [t[s:e].transpose(0, 1)[None] for t in (tq, tk, tv)]
            parts.append(sdpa_same_dtype(*one, dropout_p=p, keep=keep)[0].transpose(0, 1))
        theirs = torch.cat(parts)
    else:
        keep = oracle.keep_mask(words, p, len(lengths), heads, longest, longest) if p > 0 else None
        km_cpu = key_mask.cpu() if key_mask is not None else None
        ref = oracle.attention(*leaves, None, km_cpu, causal, None, p, keep)
        theirs = sdpa_same_dtype(tq, tk, tv, key_mask=key_mask, is_causal=causal, dropout_p=p, keep=keep)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    their_grads = torch.autograd.grad(theirs, (tq, tk, tv), grad)
    return _rules(("out", "dq", "dk", "dv"), (out, *grads), (theirs, *their_grads), (ref, *ref_grads))


def check_mlm(fam: Family, device: str, cpu: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import ptfast
    from ptfast.testing import record_dispatch
    from tests.oracles import masked_lm_loss as oracle

    dtype, dev = _torch_dtype(fam.dtype), torch.device(device)
    n, e, vocab = (67, 64, 1001) if cpu else (517, 768, 8191)
    g = torch.Generator().manual_seed(13)
    h = torch.randn(n, e, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(vocab, e, generator=g) * 0.05).to(dev, dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dev, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) > 0.15] = -100
    labels[0] = 7  # at least one labelled row
    labels = labels.to(dev)
    with ptfast.use_backend(fam.backend), record_dispatch() as events:
        loss = ptfast.masked_lm_loss(h, w, labels, b)
        grads = torch.autograd.grad(loss, (h, w, b))
    _ran(events, fam.op, fam.backend)
    ref_loss, *ref_grads = oracle.loss_and_grads(h.cpu(), w.cpu(), labels.cpu(), b.cpu())
    th, tw, tb = (t.detach().requires_grad_() for t in (h, w, b))
    theirs = F.cross_entropy(F.linear(th, tw, tb), labels)  # PyTorch's own ops in the inputs' dtype
    their_grads = torch.autograd.grad(theirs, (th, tw, tb))
    names = ("loss", "dhidden", "dweight", "dbias")
    return _rules(names, (loss, *grads), (theirs, *their_grads), (ref_loss, *ref_grads))


def check_conv(fam: Family, device: str, cpu: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import ptfast
    from ptfast.testing import record_dispatch
    from tests.oracles import conv as oracle

    dtype, dev = _torch_dtype(fam.dtype), torch.device(device)
    pool = fam.op == "conv_relu_pool"
    fmt = torch.channels_last if fam.params["layout"] == "channels_last" else torch.contiguous_format
    k, stride, residual = fam.params.get("k", 3), fam.params.get("stride", 1), fam.params.get("residual", False)
    padding = k // 2
    n, cin, cout, hh, ww = (2, 16, 32, 9, 11) if cpu else (3, 64, 128, 19, 23)
    if k == 7:  # the stem: an RGB image, large enough for a 7x7 window at stride 2
        n, cin, cout, hh, ww = (2, 3, 16, 15, 13) if cpu else (3, 3, 64, 37, 41)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(n, cin, hh, ww, generator=g).to(dev, dtype).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dev, dtype).requires_grad_()
    b = torch.randn(cout, generator=g).to(dev, dtype).requires_grad_()
    leaves = [x, w, b]
    kw = {}
    if not pool:
        ho, wo = (hh + 2 * padding - k) // stride + 1, (ww + 2 * padding - k) // stride + 1
        r = None
        if residual:  # the block's identity path: it gets a gradient too
            r = torch.randn(n, cout, ho, wo, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
            leaves.append(r.requires_grad_())
        kw = {"stride": stride, "residual": r}
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with ptfast.use_backend(fam.backend), record_dispatch() as events:
        out = fn(x, w, b, padding=padding, **kw)
        grad = torch.randn(out.shape, generator=g).to(dev, dtype)
        grads = torch.autograd.grad(out, leaves, grad)
    _ran(events, fam.op, fam.backend)
    if not out.is_contiguous(memory_format=fmt):
        raise RuleFailure(f"the output is not in the input's memory format ({fam.params['layout']})")
    cpu_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = oracle.conv_relu_ref(*cpu_leaves[:3], padding=padding, pool=pool, stride=stride,
                               residual=cpu_leaves[3] if residual else None)  # fmt: skip
    ref_grads = torch.autograd.grad(ref, cpu_leaves, grad.cpu().double())
    theirs_leaves = [t.detach().requires_grad_() for t in leaves]  # PyTorch's own ops in the inputs' dtype
    tx, tw, tb = theirs_leaves[:3]
    z = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    theirs = F.relu(z + theirs_leaves[3] if residual else z)
    theirs = F.max_pool2d(theirs, 2, 2) if pool else theirs
    their_grads = torch.autograd.grad(theirs, theirs_leaves, grad)
    names = ("out", "dx", "dweight", "dbias", "dresidual")[: 1 + len(leaves)]
    return _rules(names, (out, *grads), (theirs, *their_grads), (ref, *ref_grads))


def check_add_relu(fam: Family, device: str, cpu: bool) -> dict[str, Any]:
    import torch

    import ptfast
    from ptfast.testing import record_dispatch
    from tests.oracles import conv as oracle

    dtype, dev = _torch_dtype(fam.dtype), torch.device(device)
    fmt = torch.channels_last if fam.params["layout"] == "channels_last" else torch.contiguous_format
    shape = (2, 19, 9, 11) if cpu else (3, 67, 19, 23)
    g = torch.Generator().manual_seed(19)
    x, r = (torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt).requires_grad_()
            for _ in range(2))  # fmt: skip
    with ptfast.use_backend(fam.backend), record_dispatch() as events:
        out = ptfast.add_relu(x, r)
    if (fam.op, fam.backend, "forward") not in events:
        raise RuleFailure(f"expected add_relu/{fam.backend}/forward to run, saw {sorted(set(events))}")
    if not out.is_contiguous(memory_format=fmt):
        raise RuleFailure(f"the output is not in the input's memory format ({fam.params['layout']})")
    grad = torch.randn(shape, generator=g).to(dev, dtype)
    grads = torch.autograd.grad(out, (x, r), grad)
    x64, r64 = (t.detach().cpu().double().requires_grad_() for t in (x, r))
    ref = oracle.add_relu_ref(x64, r64)
    ref_grads = torch.autograd.grad(ref, (x64, r64), grad.cpu().double())
    tx, tr = (t.detach().requires_grad_() for t in (x, r))
    theirs = torch.relu(tx + tr)  # PyTorch's own ops in the inputs' dtype
    their_grads = torch.autograd.grad(theirs, (tx, tr), grad)
    return _rules(("out", "dx", "dresidual"), (out, *grads), (theirs, *their_grads), (ref, *ref_grads))


def _model_step(model, inputs: dict[str, Any], dtype, device) -> tuple[Any, Any]:  # noqa: ANN001
    """One forward + backward (autocast in ``dtype`` unless fp32/fp64): (loss, every parameter gradient, flat)."""
    import contextlib

    import torch

    model.zero_grad(set_to_none=True)
    ctx = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
           else contextlib.nullcontext())  # fmt: skip
    with ctx:
        loss = model(**inputs)
        loss = loss.loss if hasattr(loss, "loss") else loss
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.detach().float(), torch.cat([gr.detach().reshape(-1).double().cpu() for gr in grads])


def check_model(fam: Family, device: str, cpu: bool) -> dict[str, Any]:
    import copy

    import torch

    import ptfast
    from ptfast.testing import record_dispatch

    dtype, dev = _torch_dtype(fam.dtype), torch.device(device)
    torch.manual_seed(21)
    if fam.kind == "bert":
        import transformers

        cfg = transformers.BertConfig(
            vocab_size=1000, hidden_size=128 if cpu else 256, num_hidden_layers=2, num_attention_heads=2 if cpu else 4,
            intermediate_size=256 if cpu else 512, max_position_embeddings=128, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
        )  # fmt: skip
        stock = transformers.BertForMaskedLM(cfg)
        batch, seq = (3, 23) if cpu else (4, 67)
        lengths = torch.tensor([seq, seq - 9, 5] + ([seq // 2] if not cpu else []))
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 1000, (batch, seq))
        labels = torch.where((torch.rand(batch, seq) < 0.2) & mask.bool(), ids, torch.full_like(ids, -100))
        labels[0, 1] = ids[0, 1]
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        ops = {"attention_varlen" if fam.params["unpad"] else "attention", "masked_lm_loss"}
        patch_kw = {"unpad": fam.params["unpad"]}
    elif fam.kind == "resnet":
        stock, inputs, conv_calls = _tiny_resnet(cpu)
        ops, patch_kw = {"conv_relu"}, {}
    else:
        from torch import nn

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2, 2)] if pool else [])

        class TinyVGG(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.features = nn.Sequential(*block(3, 16, False), *block(16, 32, True), *block(32, 32, True))
                self.classifier = nn.Linear(32 * 4 * 4, 10)

            def forward(self, x, y):  # noqa: ANN001, ANN202
                return nn.functional.cross_entropy(self.classifier(self.features(x).flatten(1)).float(), y)

        stock = TinyVGG()
        x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        inputs = {"x": x, "y": torch.randint(0, 10, (4,))}
        ops, patch_kw = {"conv_relu", "conv_relu_pool"}, {}
    oracle = copy.deepcopy(stock).double()
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    ref_loss, ref_grads = _model_step(oracle, inputs64, torch.float64, torch.device("cpu"))
    on_dev = {k: v.to(dev) for k, v in inputs.items()}
    stock = stock.to(dev)
    ours = ptfast.patch(copy.deepcopy(stock), **patch_kw)
    their_loss, their_grads = _model_step(stock, on_dev, dtype, dev)
    with ptfast.use_backend(fam.backend), record_dispatch() as events:
        loss, grads = _model_step(ours, on_dev, dtype, dev)
    for op in ops:
        _ran(events, op, fam.backend)
    if fam.kind == "resnet":
        report = ours.ptfast_patch_report
        if report.skipped:
            raise RuleFailure(f"the patch left convs unfused: {report.skipped}")
        # Every fused chain (stem, each block's conv1 / conv2 / conv3 + residual) ran as one conv_relu forward, and
        # nothing else ran a ptfast op (the downsample conv+BN is a folded F.conv2d).
        forwards = sum(e == ("conv_relu", fam.backend, "forward") for e in events)
        if forwards != conv_calls or {(op, b) for op, b, _ in events} != {("conv_relu", fam.backend)}:
            raise RuleFailure(f"expected {conv_calls} conv_relu/{fam.backend} forwards and nothing else, saw "
                              f"{forwards}: {sorted(set(events))}")  # fmt: skip
    return _rules(("loss", "grads"), (loss, grads), (their_loss, their_grads), (ref_loss, ref_grads))


def _tiny_resnet(cpu: bool) -> tuple[Any, dict[str, Any], int]:
    """(model, inputs, fused conv_relu calls per forward): torchvision's layout (:class:`ptfast.demo.models.ResNet`)
    with one Bottleneck per stage, in eval mode with random BatchNorm statistics (fresh ones fold to the identity),
    behind a cross-entropy loss; channels_last images large enough that layer4 still has 2x2 pixels."""
    import torch
    from torch import nn

    from ptfast.demo.models import Bottleneck, ResNet

    class WithLoss(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, y):  # noqa: ANN001, ANN202
            return nn.functional.cross_entropy(self.net(x).float(), y)

    layers = (1, 1, 1, 1)
    net = ResNet(layers, 10, width=8 if cpu else 16, block=Bottleneck)
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    batch = 2 if cpu else 4
    x = torch.randn(batch, 3, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    inputs = {"x": x, "y": torch.randint(0, 10, (batch,), generator=gen)}
    return WithLoss(net).eval(), inputs, 1 + 3 * sum(layers)


CHECKS: dict[str, Callable[[Family, str, bool], dict[str, Any]]] = {
    "attention": check_attention, "mlm": check_mlm, "conv": check_conv, "bert": check_model, "vgg": check_model,
    "resnet": check_model, "add_relu": check_add_relu,
}  # fmt: skip


def run_one(name: str, device: str) -> dict[str, Any]:
    """Run one family in this process; returns its row (never raises)."""
    import torch

    cpu = device == "cpu"
    fam = next(f for f in families(cpu) if f.name == name)
    row = _row(fam, device)
    start = time.perf_counter()
    try:
        row["errors"] = CHECKS[fam.kind](fam, device, cpu)
        if not cpu:
            torch.cuda.synchronize()
        row.update(status="passed", passed=True)
    except Exception as exc:  # every failure becomes the row's error
        row.update(status="failed", passed=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        row["traceback"] = traceback.format_exc()[-4000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _row(fam: Family, device: str) -> dict[str, Any]:
    return {"name": fam.name, "gpu_class": gpu_class(device), "op": fam.op, "backend": fam.backend,
            "dtype": fam.dtype, "family": fam.family, "covers": [list(c) for c in fam.covers]}  # fmt: skip


def gpu_class(device: str) -> str:
    """The record's GPU class of ``device`` ("cpu" for a rehearsal, so its record can never apply to a GPU)."""
    import torch

    if device == "cpu":
        return "cpu"
    from ptfast.verification import gpu_class_name

    return gpu_class_name(torch.cuda.get_device_capability(torch.device(device)))


def _skip_reason(fam: Family, cpu: bool) -> str | None:
    if fam.backend == "cuda" and cpu:
        return "the cuda backend needs a GPU"
    if fam.backend == "cuda":
        from ptfast.backends import cuda as cuda_backend

        return cuda_backend.unavailable_reason()
    if fam.kind == "bert":
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"transformers is not installed ({exc})"
    return None


def run_all(
    device: str,
    jobs: int,
    timeout_s: float,
    log: Callable[[str], None] = print,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every family in its own subprocess, ``jobs`` at a time; rows in family order, expanded with the failures of
    the op families a failed model step covers. ``on_rows`` gets the (expanded) rows so far after each family, so
    a run stopped by its timeout still leaves what it verified (families not reached count as not run)."""
    cpu = device == "cpu"
    fams = families(cpu)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cpu:
        env["TRITON_INTERPRET"] = "1"

    def one(fam: Family) -> dict[str, Any]:
        reason = _skip_reason(fam, cpu)
        if reason is not None:
            return {**_row(fam, device), "status": "skipped", "passed": False, "error": reason}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "benchmarks.first_contact", "smoke-one", fam.name, "--device", device,
                   "--out", str(out)]  # fmt: skip
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return {**_row(fam, device), "status": "failed", "passed": False,
                        "error": f"timed out after {timeout_s:.0f} s", "seconds": timeout_s}  # fmt: skip
            if out.is_file():
                return json.loads(out.read_text())
            tail = (proc.stderr or proc.stdout or "")[-1500:]
            return {**_row(fam, device), "status": "failed", "passed": False, "seconds": time.perf_counter() - start,
                    "error": f"process exited with {proc.returncode} (a crash or a device fault): {tail}"}  # fmt: skip

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for row in pool.map(one, fams):
            log(f"[smoke] {row['status']:<7} {row['name']} ({row.get('seconds', 0):.1f} s)"
                + (f": {row['error'][:300]}" if row.get("error") else ""))  # fmt: skip
            rows.append(row)
            if on_rows is not None:
                on_rows(_with_model_failures(rows))
    return _with_model_failures(rows)


def _with_model_failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus a failed row for each op family a failed model step exercised."""
    out = list(rows)
    for row in rows:
        if row["op"] == "model" and row["status"] == "failed":
            for op, family in row["covers"]:
                why = f"model step {row['name']} failed: {row['error'][:200]}"
                out.append({"name": f"{row['name']} -> {op}/{family}", "gpu_class": row["gpu_class"], "op": op,
                            "backend": row["backend"], "family": family, "dtype": row["dtype"], "status": "failed",
                            "passed": False, "error": why})  # fmt: skip
    return out
