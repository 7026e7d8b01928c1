"""Benchmark specs ``resnet50_frozen_step`` and ``resnet18_train_step``: whole ResNet training steps, stock vs patched.

The two ResNet workflows ptfast users bring (``docs/design.md`` §1, workflows 3 and 2):

* ``resnet50_frozen_step``: a frozen ResNet-50 backbone with a new head. Every backbone parameter has
  ``requires_grad=False``, the model is in ``eval()`` (BatchNorm on its running statistics: ``ptfast.patch`` folds
  it into the convolutions and runs conv + BatchNorm (+ residual) + ReLU as one ``ptfast.conv_relu``), a new
  ``fc = nn.Linear(2048, 100)`` is the only trained layer. One step: forward, ``loss.backward()`` (reaches ``fc``
  only), ``SGD.step()`` on ``fc``, ``zero_grad``. The backbone's BatchNorm statistics come from two train-mode
  forwards over random images at build time (a stand-in for pretrained statistics: fresh ones fold to the identity).
* ``resnet18_train_step``: ResNet-18 fine-tuned end to end (``net.fc = nn.Linear(512, 10)``, CIFAR-10's classes),
  ``train()`` mode: BatchNorm on batch statistics, which cannot be folded, so the patched blocks run their stock
  conv -> BatchNorm -> add -> ReLU steps; this case measures what patching costs or saves in plain training.

Both: ``cross_entropy(model(x), y)`` under ``torch.autocast("cuda", bfloat16)`` (fp32 parameters; plain fp32 on
CPU), SGD with momentum 0.9 and weight decay 5e-4 (``fused=True`` on CUDA), channels_last model and images, random
labels. The model is ``torchvision.models.resnet50`` / ``resnet18`` (``weights=None``) when torchvision is
importable, else :class:`ptfast.demo.models.ResNet`, the demo's copy of torchvision's layout (``conv1 bn1 relu
maxpool layer1..layer4 avgpool fc``; blocks ``conv1 bn1 (relu) conv2 bn2 [conv3 bn3] relu downsample``, ``out +=
identity`` before the last ReLU, torchvision's initialisation); which one ran is recorded in each case's ``model``
parameter and in the results' metadata (``model``). ``--quick`` (and the CPU rehearsal) always use the copy with
every width divided by 8.

Shapes: CUDA 224x224, batch 64 (ResNet-18 also at CIFAR's 32x32, batch 256); CPU 96x96, batch 8; ``--quick``
32x32, batch 2.

Providers (as ``vgg16_train_step``): ``eager`` (``cudnn.benchmark = True``), ``compile[default]`` and
``compile[max-autotune]`` (``torch.compile(model, mode=..., dynamic=False)`` of the stock model, where the harness
compiles: on by default on CUDA, off on CPU), and ``ptfast.patch(model)`` under ``use_backend("auto")``
(``ptfast``), ``"triton"`` and ``"cuda"``.

FLOPs (convolutions and linear layers, 2 per MAC, counted from the layer shapes): frozen: every conv x1 (forward
only), ``fc`` x2 (forward + weight gradient); train: the stem conv x2 (no input gradient), every other layer x3.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
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
from ptfast.demo.models import BasicBlock, Bottleneck, ResNet

LOCAL = "ptfast.demo.models.ResNet (torchvision's layout, built here: torchvision not importable)"
LOCAL_QUICK = "ptfast.demo.models.ResNet (torchvision's layout, built here, widths / 8)"
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


@functools.cache
def _torchvision_models() -> Any:
    try:
        import torchvision.models

        return torchvision.models
    except Exception:  # noqa: BLE001 - not installed, or broken against this torch: the local copy runs
        return None


def model_source() -> str:
    """Which ResNet the full-width cases build here (recorded in the results' metadata)."""
    if _torchvision_models() is None:
        return LOCAL
    import torchvision

    return f"torchvision.models (torchvision {torchvision.__version__}, weights=None)"


def build(arch: str, width_divisor: int) -> nn.Module:
    """``torchvision.models.<arch>(weights=None)`` at full width when torchvision is importable, else the copy."""
    tv = _torchvision_models()
    if width_divisor == 1 and tv is not None:
        return getattr(tv, arch)(weights=None)
    block, layers = ARCHS[arch]
    return ResNet(layers, 1000, width=64 // width_divisor, block=block)


# --- cases, FLOPs ---------------------------------------------------------------------------------------------------


def _case(name: str, arch: str, n: int, hw: int, width_divisor: int, classes: int, frozen: bool) -> Case:
    source = LOCAL_QUICK if width_divisor != 1 else (f"torchvision.models.{arch}" if _torchvision_models() else LOCAL)
    return Case(name, dict(arch=arch, N=n, H=hw, W=hw, width_divisor=width_divisor, classes=classes,
                           frozen_backbone=frozen, model=source))  # fmt: skip


def _frozen_cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [_case("resnet50/8 frozen-backbone @32 b2", "resnet50", 2, 32, 8, 100, True)]
    if not opts.cuda:
        return [_case("resnet50 frozen-backbone @96 b8", "resnet50", 8, 96, 1, 100, True)]
    return [_case("resnet50 frozen-backbone @224 b64", "resnet50", 64, 224, 1, 100, True)]


def _train_cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [_case("resnet18/8 @32 b2", "resnet18", 2, 32, 8, 10, False)]
    if not opts.cuda:
        return [_case("resnet18 @96 b8", "resnet18", 8, 96, 1, 10, False)]
    return [_case("resnet18 @224 b64", "resnet18", 64, 224, 1, 10, False),
            _case("resnet18 @32 b256 (CIFAR-10 size)", "resnet18", 256, 32, 1, 10, False)]  # fmt: skip


@functools.cache
def _layers(arch: str, n: int, hw: int, width_divisor: int, classes: int) -> tuple[tuple[str, float], ...]:
    """(kind, forward FLOPs) of every conv and linear layer in call order, from a forward on the meta device."""
    block, blocks = ARCHS[arch]
    with torch.device("meta"):
        model = ResNet(blocks, classes, width=64 // width_divisor, block=block)
        x = torch.empty(n, 3, hw, hw)
    out: list[tuple[str, float]] = []

    def hook(mod: nn.Module, args: tuple[Tensor, ...], y: Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            out.append(("conv", 2.0 * y.numel() * (mod.in_channels // mod.groups) * kh * kw))
        else:
            out.append(("linear", 2.0 * y.numel() * mod.in_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return tuple(out)


def _flops(case: Case, mode: str) -> float:
    p = case.params
    layers = _layers(p["arch"], p["N"], p["H"], p["width_divisor"], p["classes"])
    if p["frozen_backbone"]:  # convs forward only; fc forward + weight gradient (its input needs no gradient)
        return sum(f * (1.0 if kind == "conv" else 2.0) for kind, f in layers)
    return sum(f * (2.0 if i == 0 else 3.0) for i, (_, f) in enumerate(layers))


def _items(case: Case) -> float:
    return float(case.params["N"])


# --- models and inputs ----------------------------------------------------------------------------------------------


def _new_model(p: dict[str, Any], device: torch.device) -> nn.Module:
    torch.manual_seed(67)  # the initial weights, on the CPU generator
    model = build(p["arch"], p["width_divisor"])
    model.fc = nn.Linear(model.fc.in_features, p["classes"])  # the user's new head
    model = model.to(device=device, memory_format=torch.channels_last)
    if not p["frozen_backbone"]:
        return model.train()
    # Running statistics that do not fold to the identity: the average over two train-mode forwards of random
    # images (cumulative averaging, momentum None), as a pretrained backbone would carry.
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    g = generator(device, 71)
    with torch.no_grad():
        for m in bns:
            m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn((p["N"], 3, p["H"], p["W"]), device=device, generator=g))
        for m in bns:
            m.momentum = 0.1
    for name, q in model.named_parameters():
        q.requires_grad_(name.startswith("fc."))
    return model.eval()


def _make_inputs(op: str):
    def make(case: Case, opts: Options, seed: int) -> Inputs:
        p = case.params
        train_autocast(opts)  # refuses fp16 for the whole case (reason in the report)
        key = (op, case.name, str(opts.device), tuple(sorted(p.items(), key=lambda kv: kv[0])))
        token, model = initial_model(key, lambda: _new_model(p, opts.device))
        g = generator(opts.device, 73 + seed)
        x = torch.randn((p["N"], 3, p["H"], p["W"]), device=opts.device, generator=g)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, p["classes"], (p["N"],), device=opts.device, generator=g)
        return {"token": token, "model": model, "params": list(model.parameters()), "x": x, "y": y}

    return make


def _providers(opts: Options) -> list[Provider]:
    def sgd(params: list[nn.Parameter], opts: Options) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, fused=opts.cuda or None)

    desc = (
        "ptfast.patch(model) under use_backend({backend!r}): stem conv+BN+ReLU as a fused module, each "
        "block's conv -> BN -> [+ residual] -> ReLU chains as ptfast.conv_relu with the BN folded in eval "
        "mode (stock BN math in train mode), downsample conv+BN as ConvBN2d"
    )
    return image_step.providers(opts, desc, sgd, "SGD momentum 0.9 (fused on CUDA)")


def _setup(opts: Options) -> contextlib.AbstractContextManager[None]:
    return training_op(cudnn_benchmark_on=True)


def _metadata(opts: Options) -> dict[str, Any]:
    return {"model": LOCAL_QUICK if opts.quick else model_source()}


STEP_DOC = (
    "one training step: cross_entropy(model(x), y) under torch.autocast (bf16 on CUDA; fp32 on CPU), "
    "loss.backward(), SGD(momentum=0.9, weight_decay=5e-4).step() (fused on CUDA) over the trainable parameters, "
    "zero_grad(set_to_none=True); each provider trains its own copy of the same initial model. Peak MiB = the "
    "step's peak beyond what stays allocated between steps. rel. err: the loss of one forward of each provider's "
    "fresh copy (no update; the model's own mode) vs eager's (compiled providers: not checked)."
)
CASE_DOC = (
    "arch (torchvision's resnet18 / resnet50 layout), N images of H x W (channels_last, fp32 input), width_divisor "
    "(1 = the real network), classes of the new fc, frozen_backbone (every parameter but fc frozen, model in "
    "eval()), model: which implementation was built. FLOPs: convolutions + linear layers from their shapes, "
    "forward x1, + weight gradient of trained layers, + input gradient where an earlier layer trains."
)


def _spec(name: str, title: str, cases: Callable[[Options], list[Case]]) -> OpSpec:
    return OpSpec(
        name=name,
        title=title,
        cases=cases,
        make_inputs=_make_inputs(name),
        providers=_providers,
        flops=_flops,
        baseline="eager",
        reference=("eager",),
        setup=_setup,
        metric="items",
        items=_items,
        items_label="images",
        modes=(TRAIN_MODE,),
        case_doc=CASE_DOC,
        step_doc=STEP_DOC,
        metadata=_metadata,
    )


def spec_frozen() -> OpSpec:
    title = (
        "Frozen ResNet-50 backbone (eval mode) + new fc: one training step of the head (bf16 autocast on CUDA, "
        "fp32 on CPU; channels_last): patched vs eager and torch.compile"
    )
    return _spec("resnet50_frozen_step", title, _frozen_cases)


def spec_train() -> OpSpec:
    title = (
        "ResNet-18 full training step (train mode, SGD momentum, bf16 autocast on CUDA, fp32 on CPU; "
        "channels_last): patched vs eager and torch.compile"
    )
    return _spec("resnet18_train_step", title, _train_cases)
