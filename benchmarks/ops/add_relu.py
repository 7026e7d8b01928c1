"""``add_relu`` benchmark spec: ``relu(y + residual)``, the tail of a ResNet block whose BatchNorm runs on batch
statistics (training), against what torchvision's block runs there.

Shapes: the block-tail activations of a ResNet-50 training step at batch 64, 224x224, bf16, channels_last
(layer1: 256 ch @56, layer3: 1024 ch @14) and of a ResNet-18 (layer2: 128 ch @28); ``--quick``: tiny odd
shapes. ``y`` stands for the BatchNorm output. The eager baseline cannot add into ``y`` in place as
``out += identity`` does (``y`` would change between repetitions), so it runs ``torch.add`` (one new tensor, as
the BatchNorm's output is) and ``relu_``: the same two kernels and five passes over the activation as
``out += identity; relu(out)``.

Bytes: the fused forward reads y and the residual once and writes the output once (3 passes); the backward
(ReLU's threshold_backward, the same on every provider) reads the gradient and the output and writes one
gradient shared by both inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.common import (
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    Step,
    compiled,
    generator,
    import_ptfast,
    make_step,
    randn,
    require_compile,
)

BATCH = 64
# (name, channels, H=W)
LAYERS = [("resnet50 layer1", 256, 56), ("resnet18 layer2", 128, 28), ("resnet50 layer3", 1024, 14)]
QUICK = [("tiny", 19, 9), ("tiny-wide", 67, 5)]
PTFAST_BACKENDS = ("torch", "triton", "cuda", "auto")


def _cases(opts: Options) -> list[Case]:
    n, layers = (2, QUICK) if opts.quick else (BATCH, LAYERS)
    return [Case(f"{name} {c}ch @{hw}", dict(N=n, C=c, H=hw, W=hw), graph=hw <= 14) for name, c, hw in layers]


def _numel(case: Case) -> int:
    p = case.params
    return p["N"] * p["C"] * p["H"] * p["W"]


def _bytes(case: Case, mode: str) -> float:
    e = 2  # bf16
    fwd = 3 * _numel(case) * e
    return float(fwd if mode != "fwd+bwd" else fwd + 3 * _numel(case) * e)


def _make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    g = generator(opts.device, 71 + seed)
    shape = (p["N"], p["C"], p["H"], p["W"])
    y, r, dout = (randn(shape, opts, g).contiguous(memory_format=torch.channels_last) for _ in range(3))
    y.requires_grad_()
    r.requires_grad_()
    return {"y": y, "r": r, "dout": dout, "leaves": [y, r]}


def _stock(y: Tensor, r: Tensor) -> Tensor:
    return torch.add(y, r).relu_()


def _providers(opts: Options) -> list[Provider]:
    def ptfast_provider(backend: str) -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            ptfast = import_ptfast()

            def fwd() -> Tensor:
                with ptfast.use_backend(backend):
                    return ptfast.add_relu(inp["y"], inp["r"])

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        return Provider(f"ptfast[{backend}]", "ptfast", f"ptfast.add_relu with use_backend({backend!r})", build)

    def eager() -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            return make_step(lambda: _stock(inp["y"], inp["r"]), inp["leaves"], mode, inp["dout"])

        return Provider("eager", "pytorch", "eager torch.add(y, residual).relu_() (torchvision: out += identity; "
                        "relu(out))", build)  # fmt: skip

    def compile_provider() -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            require_compile(opts)
            fn = compiled(lambda y, r: torch.relu(y + r))
            return make_step(lambda: fn(inp["y"], inp["r"]), inp["leaves"], mode, inp["dout"])

        return Provider("compile[default]", "pytorch", "torch.compile(dynamic=False) of relu(y + residual)", build)

    return [*(ptfast_provider(b) for b in PTFAST_BACKENDS), eager(), compile_provider()]


def spec() -> OpSpec:
    return OpSpec(
        name="add_relu",
        title="relu(y + residual) (bf16, channels_last, ResNet block tails in training): ptfast vs eager",
        cases=_cases,
        make_inputs=_make_inputs,
        providers=_providers,
        flops=lambda case, mode: None,
        bytes_moved=_bytes,
        metric="gbps",
        baseline="eager",
        reference=("eager", "ptfast[torch]"),
        case_doc="N batch, C channels, H=W spatial size: the activation at a ResNet block's tail.",
    )
