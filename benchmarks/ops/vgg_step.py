"""Benchmark spec ``vgg16_train_step``: one whole VGG-16 fine-tuning step, stock vs patched.

The step (mode ``train``, the only one): ``cross_entropy(model(x), y)`` under ``torch.autocast("cuda", bfloat16)``
(fp32 parameters; on CPU plain fp32), ``loss.backward()``, ``AdamW.step()`` (``fused=True`` on CUDA, PyTorch's
default foreach implementation on CPU), ``zero_grad(set_to_none=True)``. Every provider trains its own deep copy
of the same initial model with its own optimizer.

Model: torchvision's VGG-16 layout, built here (torchvision is not a dependency): the feature stack of
:func:`benchmarks.ops.vgg.vgg16_features` (13 ``Conv2d(3x3) -> ReLU`` with 5 ``MaxPool2d(2, 2)``), then
``AdaptiveAvgPool2d(7)``, ``flatten`` and the classifier ``Linear(25088, 4096) -> ReLU -> Dropout(0.5) ->
Linear(4096, 4096) -> ReLU -> Dropout(0.5) -> Linear(4096, 100)``, torchvision's initialisation. Batch 64 of
224x224 fp32 images in channels_last (the model too), random labels over 100 classes. Cases: ``full`` (every
parameter trains) and ``frozen-backbone`` (the feature stack's parameters have ``requires_grad=False``: its forward
saves nothing for backward and only the classifier trains). ``--quick``: channels and classifier width divided by 8,
32x32 images, batch 2.

Providers: ``eager`` (``cudnn.benchmark = True`` for the whole op), ``compile[default]`` and
``compile[max-autotune]`` (``torch.compile(model, mode=..., dynamic=False)``; max-autotune only with
``--max-autotune``), and ``ptfast.patch(model)`` under ``use_backend("auto")`` (``ptfast``), ``"triton"`` and
``"cuda"``.

Throughput: images/s. FLOPs (matmul work: convolutions and linear layers, 2 per MAC): forward
``2 N Cout H W Cin 9`` per conv and ``2 N in out`` per linear; a trained layer's backward adds its weight gradient
(x1) and, when something before it needs a gradient, its input gradient (x1): ``full`` counts the first conv x2,
every other layer x3; ``frozen-backbone`` counts the convolutions x1, the first linear x2, the other linears x3.

Correctness column: a dropout-free training-mode forward of each provider's fresh copy (dropout at p=0) gives a
loss; rel. err is its distance to ``eager``'s. Compiled providers are not checked (that would need a second
compilation).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import (
    TRAIN_MODE,
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    generator,
    initial_model,
    train_autocast,
    training_op,
)
from benchmarks.ops import image_step
from benchmarks.ops.vgg import vgg16_features

NUM_CLASSES = 100


class VGG16(nn.Module):
    """torchvision's ``vgg16()`` layout (features, avgpool, classifier) with ``num_classes`` outputs."""

    def __init__(self, width_divisor: int = 1, num_classes: int = NUM_CLASSES, dropout: float = 0.5) -> None:
        super().__init__()
        channels, hidden = 512 // width_divisor, 4096 // width_divisor
        self.features = vgg16_features(width_divisor)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _case(name: str, n: int, hw: int, width_divisor: int, frozen: bool) -> Case:
    return Case(name, dict(N=n, H=hw, W=hw, width_divisor=width_divisor, classes=NUM_CLASSES, frozen_backbone=frozen))


def _cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [_case("vgg16/8 full @32", 2, 32, 8, False), _case("vgg16/8 frozen-backbone @32", 2, 32, 8, True)]
    if not opts.cuda and not opts.full:  # CPU: VGG-16's layout at a quarter of the width, 64x64 images
        return [_case("vgg16/4 full @64", 8, 64, 4, False), _case("vgg16/4 frozen-backbone @64", 8, 64, 4, True)]
    return [_case("vgg16 full @224", 64, 224, 1, False), _case("vgg16 frozen-backbone @224", 64, 224, 1, True)]


def _layers(p: dict[str, Any]) -> list[tuple[str, float]]:
    """(kind, forward FLOPs) of every conv and linear layer, in order."""
    from benchmarks.ops.vgg import VGG16_CFG

    out: list[tuple[str, float]] = []
    cin, h, w, n = 3, p["H"], p["W"], p["N"]
    for v in VGG16_CFG:
        if v == "M":
            h, w = h // 2, w // 2
        else:
            cout = int(v) // p["width_divisor"]
            out.append(("conv", 2.0 * n * cout * h * w * cin * 9))
            cin = cout
    hidden = 4096 // p["width_divisor"]
    for fan_in, fan_out in ((cin * 49, hidden), (hidden, hidden), (hidden, p["classes"])):
        out.append(("linear", 2.0 * n * fan_in * fan_out))
    return out


def _flops(case: Case, mode: str) -> float:
    frozen = case.params["frozen_backbone"]
    total, needs_input_grad = 0.0, False
    for kind, fwd in _layers(case.params):
        trains = not (frozen and kind == "conv")
        total += fwd * (1.0 + (1.0 if trains else 0.0) + (1.0 if needs_input_grad else 0.0))
        needs_input_grad = needs_input_grad or trains  # the layers after a trained one back-propagate into it
    return total


def _items(case: Case) -> float:
    return float(case.params["N"])


def _new_model(p: dict[str, Any], device: torch.device) -> nn.Module:
    torch.manual_seed(61)  # the initial weights, on the CPU generator
    model = VGG16(p["width_divisor"], p["classes"])
    if p["frozen_backbone"]:
        model.features.requires_grad_(False)
    return model.to(device=device, memory_format=torch.channels_last).train()


def _make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    train_autocast(opts)  # refuses fp16 for the whole case (reason in the report)
    key = ("vgg16_train_step", case.name, str(opts.device), tuple(sorted(p.items(), key=lambda kv: kv[0])))
    token, model = initial_model(key, lambda: _new_model(p, opts.device))
    g = generator(opts.device, 59 + seed)
    # Images as a data loader hands them over: fp32, normalized (autocast casts them for the first conv).
    x = torch.randn((p["N"], 3, p["H"], p["W"]), device=opts.device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, p["classes"], (p["N"],), device=opts.device, generator=g)
    # "params" only tells the runner's L2 planning how big an input set is (the model's weights are in it).
    return {"token": token, "model": model, "params": list(model.parameters()), "x": x, "y": y}


def _providers(opts: Options) -> list[Provider]:
    def adamw(params: list[nn.Parameter], opts: Options) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=opts.cuda or None)

    desc = "ptfast.patch(model) under use_backend({backend!r}): conv+bias+ReLU(+2x2 max-pool) fused"
    return image_step.providers(opts, desc, adamw, "AdamW (fused on CUDA)")


def _setup(opts: Options) -> contextlib.AbstractContextManager[None]:
    return training_op(cudnn_benchmark_on=True)


def spec() -> OpSpec:
    return OpSpec(
        name="vgg16_train_step",
        title="VGG-16 fine-tuning step (forward + backward + AdamW; bf16 autocast, channels_last): patched vs "
        "eager and torch.compile",
        cases=_cases,
        make_inputs=_make_inputs,
        providers=_providers,
        flops=_flops,
        baseline="eager",
        reference=("eager",),
        setup=_setup,
        metric="items",
        items=_items,
        items_label="images",
        modes=(TRAIN_MODE,),
        case_doc="N images of H x W (channels_last, fp32 input), width_divisor: VGG-16's channel counts and "
        "classifier width divided by it (1 = real VGG-16), classes outputs; frozen_backbone: the feature stack "
        "does not train. FLOPs: convolutions + linear layers, forward x1, + weight gradient of trained layers, "
        "+ input gradient where an earlier layer trains.",
        step_doc="one training step: cross_entropy(model(x), y) under torch.autocast (bf16 on CUDA; fp32 on CPU), "
        "loss.backward(), AdamW.step() (fused on CUDA) over the trainable parameters, zero_grad(set_to_none=True); "
        "each provider trains its own copy of the same initial model. Peak MiB = the step's peak beyond what stays "
        "allocated between steps (weights + AdamW moments of the trained parameters, the same for every "
        "provider); it counts activations, gradients and workspaces. rel. err: the loss of a dropout-free forward "
        "of each provider's fresh copy vs eager's (compiled providers: not checked).",
    )
