"""Benchmark spec ``vgg16_features``: the whole VGG-16 feature stack (13 conv+ReLU, 5 max-pools), stock vs patched.

The stack is torchvision's ``vgg16().features`` layout, built here (torchvision is not a dependency):
``Conv2d(3x3, padding 1) -> ReLU(inplace=True)``, with ``MaxPool2d(2, 2)`` after each block. Case: 224x224,
batch 64, bf16, channels_last (``--quick``: 32x32, batch 2, channels divided by 8). The image needs no gradient
(training from pixels); every parameter does. Providers: eager PyTorch with ``cudnn.benchmark``,
``torch.compile`` (default and max-autotune) of the stock stack, and the stack after ``ptfast.patch`` under
each ptfast backend. The ``fwd`` rows' "kept MiB" column is the activation memory saved for backward.

FLOPs: the convolutions only, ``2 * N * Cout * H * W * Cin * 9`` each forward; backward twice that (dgrad +
wgrad), except the first layer (no input gradient).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from benchmarks.common import (
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    Skip,
    Step,
    compiled,
    cudnn_benchmark,
    generator,
    import_ptfast,
    make_step,
    randn,
    require_compile,
)

# torchvision's configuration "D" (VGG-16): output channels, "M" = 2x2 max-pool.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
PTFAST_BACKENDS = ("torch", "triton", "cuda", "auto")


def vgg16_features(width_divisor: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            cout = int(v) // width_divisor
            layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers)


def _cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [Case("vgg16/8 features @32", dict(N=2, H=32, W=32, width_divisor=8), graph=True)]
    return [Case("vgg16 features @224", dict(N=64, H=224, W=224, width_divisor=1))]


def _convs(p: dict) -> list[tuple[int, int, int, int]]:
    """(Cin, Cout, H, W) of every conv layer."""
    out, cin, h, w = [], 3, p["H"], p["W"]
    for v in VGG16_CFG:
        if v == "M":
            h, w = h // 2, w // 2
        else:
            cout = int(v) // p["width_divisor"]
            out.append((cin, cout, h, w))
            cin = cout
    return out


def _flops(case: Case, mode: str) -> float:
    total = 0.0
    for i, (cin, cout, h, w) in enumerate(_convs(case.params)):
        fwd = 2.0 * case.params["N"] * cout * h * w * cin * 9
        total += fwd if mode != "fwd+bwd" else fwd * (2.0 if i == 0 else 3.0)
    return total


def _make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    g = generator(opts.device, 53 + seed)
    torch.manual_seed(53 + seed)  # the stack's default init (kaiming-uniform), on the CPU generator
    model = vgg16_features(p["width_divisor"]).to(device=opts.device, dtype=opts.dtype)
    model = model.to(memory_format=torch.channels_last)
    x = randn((p["N"], 3, p["H"], p["W"]), opts, g).contiguous(memory_format=torch.channels_last)
    cout = _convs(p)[-1][1]
    dout = randn((p["N"], cout, p["H"] // 32, p["W"] // 32), opts, g).contiguous(memory_format=torch.channels_last)
    return {"model": model, "x": x, "dout": dout, "leaves": list(model.parameters())}


def _providers(opts: Options) -> list[Provider]:
    def stock(mode_name: str | None, use_compile: bool) -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            model = inp["model"]
            if use_compile:
                require_compile(opts)
                if mode_name == "max-autotune" and not opts.max_autotune:
                    raise Skip("max-autotune is slow to compile: pass --max-autotune")
                fn = compiled(model, mode=mode_name)
            else:
                fn = model

            def fwd() -> Tensor:
                return fn(inp["x"])

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        if not use_compile:
            return Provider("eager", "pytorch", "the stock stack, eager, cudnn.benchmark=True", build)
        label = mode_name or "default"
        return Provider(f"compile[{label}]", "pytorch", f"torch.compile(stack, mode={label!r}, dynamic=False)", build)

    def patched(backend: str) -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            ptfast = import_ptfast()
            model = ptfast.patch(copy.deepcopy(inp["model"]))

            def fwd() -> Tensor:
                with ptfast.use_backend(backend):
                    return model(inp["x"])

            return make_step(fwd, list(model.parameters()), mode, inp["dout"])

        return Provider(f"ptfast[{backend}]", "ptfast", f"ptfast.patch(stack) under use_backend({backend!r})", build)

    return [
        stock(None, False),
        stock(None, True),
        stock("max-autotune", True),
        *(patched(b) for b in PTFAST_BACKENDS),
    ]


def _setup(opts: Options) -> contextlib.AbstractContextManager[None]:
    return cudnn_benchmark(True)


def spec() -> OpSpec:
    return OpSpec(
        name="vgg16_features",
        title="VGG-16 feature stack (13 conv+ReLU, 5 max-pools; bf16, channels_last): patched vs eager and compile",
        cases=_cases,
        make_inputs=_make_inputs,
        providers=_providers,
        flops=_flops,
        baseline="eager",
        reference=("eager",),
        setup=_setup,
        case_doc="N batch, H=W image size; width_divisor: channel counts of VGG-16 divided by it (1 = real VGG-16).",
    )
