"""Conv + bias (+ residual) + ReLU (+ 2x2 max-pool) benchmark specs: ``conv_relu`` and ``conv_relu_pool``.

Shapes: every distinct VGG-16 conv layer at 224x224, batch 64, bf16, channels_last. By default ``conv_relu``
runs the layers that are *not* followed by a pool and ``conv_relu_pool`` the five that are (what a patched
VGG-16 actually calls); ``--full`` runs every layer through both ops. Each row says whether the layer is
followed by a pool in VGG-16. The first layer's input is the image, so its backward computes no input gradient
(as in training).

``conv_relu`` also runs ResNet layers (:data:`RESNET_LAYERS`, batch 64, 224x224 images), each a kernel
specialization of its own: the ResNet-50 stem (7x7, stride 2), a strided 3x3 (``layer2.0.conv2``), a BasicBlock
tail (ResNet-18 ``layer3.1.conv2``, the residual added before the ReLU), the Bottleneck 1x1s (``conv1``, and
``conv3`` with its residual) and a downsample-like strided 1x1 (in ResNet that conv has no ReLU; the op always
applies one). Their eager baseline is torchvision's block: ``F.conv2d``, ``add_`` of the residual, ``relu_``.
The residual requires a gradient (it is the block's identity path).

FLOPs: 2·N·Cout·Hc·Wc·Cin·kh·kw forward (Hc, Wc the strided conv output); backward adds the same for the weight
gradient and again for the input gradient (when needed); the residual add is not counted. Bytes: a lower bound
on memory traffic (each tensor read or written once; the residual read in the forward, its gradient written in
the backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

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

PTFAST_BACKENDS = ("torch", "triton", "cuda", "auto")
# The triton backend's per-layer algorithm choices (ptfast.backends.triton.conv_config), each measured on its
# own so the per-GPU table can be filled from these rows: (forward, dgrad, wgrad). ptfast[triton] is the
# table's choice (implicit GEMM + cuDNN dgrad and wgrad while the table is empty).
TRITON_VARIANTS: dict[str, tuple[str, str, str]] = {
    "implicit-gemm,triton-dgrad": ("implicit_gemm", "triton", "cudnn"),
    "implicit-gemm,triton-wgrad": ("implicit_gemm", "cudnn", "triton"),
    "cudnn-conv+epilogue": ("cudnn", "cudnn", "cudnn"),
}

# (layer names, Cin, Cout, H=W, followed by a 2x2 max-pool in VGG-16). Identical shapes are merged.
VGG16_LAYERS: list[tuple[str, int, int, int, bool]] = [
    ("conv1_1", 3, 64, 224, False),
    ("conv1_2", 64, 64, 224, True),
    ("conv2_1", 64, 128, 112, False),
    ("conv2_2", 128, 128, 112, True),
    ("conv3_1", 128, 256, 56, False),
    ("conv3_2", 256, 256, 56, False),
    ("conv3_3", 256, 256, 56, True),
    ("conv4_1", 256, 512, 28, False),
    ("conv4_2", 512, 512, 28, False),
    ("conv4_3", 512, 512, 28, True),
    ("conv5_1+5_2", 512, 512, 14, False),
    ("conv5_3", 512, 512, 14, True),
]
# ResNet layers of conv_relu: (layer name, Cin, Cout, kernel, stride, H=W input, residual added before the
# ReLU), most valuable first (a --time-limit cuts the last ones). Padding is kernel // 2, as in torchvision.
RESNET_LAYERS: list[tuple[str, int, int, int, int, int, bool]] = [
    ("resnet50 stem", 3, 64, 7, 2, 224, False),
    ("resnet50 layer1.1.conv1", 256, 64, 1, 1, 56, False),
    ("resnet50 layer1.1.conv3", 64, 256, 1, 1, 56, True),
    ("resnet50 layer2.0.conv2", 128, 128, 3, 2, 56, False),
    ("resnet18 layer3.1.conv2", 256, 256, 3, 1, 14, True),
    ("resnet50 layer3.0.downsample-like", 512, 1024, 1, 2, 28, False),
]
# --quick: tiny odd sizes of each ResNet form (same order).
RESNET_QUICK: list[tuple[str, int, int, int, int, int, bool]] = [
    ("tiny-stem", 3, 8, 7, 2, 15, False),
    ("tiny", 16, 8, 1, 1, 11, False),
    ("tiny", 8, 16, 1, 1, 11, True),
    ("tiny", 8, 16, 3, 2, 13, False),
    ("tiny", 16, 16, 3, 1, 9, True),
    ("tiny", 16, 32, 1, 2, 13, False),
]
BATCH = 64


@contextlib.contextmanager
def _triton_algos(algos: tuple[str, str, str] | None) -> Iterator[None]:
    if algos is None:
        yield
        return
    from ptfast.backends.triton import conv_config

    with conv_config.use_algos(*algos):
        yield


def _case(name: str, n: int, cin: int, cout: int, hw: int, pool_after: bool, graph: bool = False) -> Case:
    # The first layer's input is an image: no gradient wanted.
    params = dict(N=n, Cin=cin, Cout=cout, H=hw, W=hw, k=3, padding=1, pool_after=pool_after, x_grad=cin > 3)
    params.update(stride=1, residual=False)
    return Case(f"{name} {cin}->{cout} @{hw}", params, graph=graph)


def _resnet_case(n: int, name: str, cin: int, cout: int, k: int, stride: int, hw: int, residual: bool) -> Case:
    """``"resnet50 stem 3->64 k7 s2 @224"``, ``"... k1 @56 +residual"``: a ResNet layer of ``conv_relu``."""
    params = dict(
        N=n, Cin=cin, Cout=cout, H=hw, W=hw, k=k, padding=k // 2, pool_after=False, x_grad=cin > 3,
        stride=stride, residual=residual,
    )  # fmt: skip
    label = f"{name} {cin}->{cout} k{k}{f' s{stride}' if stride != 1 else ''} @{hw}{' +residual' if residual else ''}"
    return Case(label, params, graph=_conv_hw(params)[0] <= 14)


def resnet_case_names(quick: bool) -> tuple[str, ...]:
    """The names of ``conv_relu``'s ResNet cases (``--quick``: their tiny versions), in benchmark order."""
    n, layers = (2, RESNET_QUICK) if quick else (BATCH, RESNET_LAYERS)
    return tuple(_resnet_case(n, *layer).name for layer in layers)


def _cases(pool: bool, opts: Options) -> list[Case]:
    if opts.quick:
        if pool:
            return [_case("tiny", 2, 8, 16, 16, True, True), _case("tiny-odd", 2, 16, 16, 15, True, True)]
        vgg = [_case("tiny-first", 2, 3, 8, 16, False, True), _case("tiny", 2, 8, 16, 16, False, True)]
        return vgg + [_resnet_case(2, *layer) for layer in RESNET_QUICK]
    if not opts.cuda and not opts.full:
        # CPU shapes: VGG blocks of a small image model (batch 32), one per resolution.
        return [_case("cpu", 32, c, c, hw, pool) for c, hw in ((64, 32), (128, 16), (256, 8))]
    vgg = [
        _case(name, BATCH, cin, cout, hw, pool_after, graph=hw <= 14)
        for name, cin, cout, hw, pool_after in VGG16_LAYERS
        if opts.full or pool_after == pool
    ]
    return vgg if pool else vgg + [_resnet_case(BATCH, *layer) for layer in RESNET_LAYERS]


def _conv_hw(p: dict) -> tuple[int, int]:
    """The convolution's output size (before any pooling)."""
    s = p.get("stride", 1)
    return (p["H"] + 2 * p["padding"] - p["k"]) // s + 1, (p["W"] + 2 * p["padding"] - p["k"]) // s + 1


def _out_hw(p: dict, pool: bool) -> tuple[int, int]:
    hc, wc = _conv_hw(p)
    return (hc // 2, wc // 2) if pool else (hc, wc)


def _flops(case: Case, mode: str) -> float:
    p = case.params
    hc, wc = _conv_hw(p)
    fwd = 2.0 * p["N"] * p["Cout"] * hc * wc * p["Cin"] * p["k"] * p["k"]
    if mode != "fwd+bwd":
        return fwd
    return fwd * (3.0 if p["x_grad"] else 2.0)


def _bytes(pool: bool):  # noqa: ANN202 - returns the spec's bytes callback
    def count(case: Case, mode: str) -> float:
        p = case.params
        e = 2  # bf16
        x = p["N"] * p["Cin"] * p["H"] * p["W"] * e
        w = p["Cout"] * p["Cin"] * p["k"] * p["k"] * e
        ho, wo = _out_hw(p, pool)
        out = p["N"] * p["Cout"] * ho * wo * e
        res = out if p.get("residual") else 0  # read in the forward; its gradient written in the backward
        fwd = x + w + out + res
        if mode != "fwd+bwd":
            return float(fwd)
        # backward: read grad_out, x, w (and the saved output/argmax); write dx, dw (and dresidual).
        return float(fwd + out + x + w + (x if p["x_grad"] else 0) + w + out + res)

    return count


def _make_inputs(pool: bool):  # noqa: ANN202
    def make(case: Case, opts: Options, seed: int) -> Inputs:
        p = case.params
        g = generator(opts.device, 41 + seed)
        cl = torch.channels_last
        x = randn((p["N"], p["Cin"], p["H"], p["W"]), opts, g).contiguous(memory_format=cl)
        fan_in = p["Cin"] * p["k"] * p["k"]
        w = randn((p["Cout"], p["Cin"], p["k"], p["k"]), opts, g, scale=(2.0 / fan_in) ** 0.5)
        w = w.contiguous(memory_format=cl)
        b = randn((p["Cout"],), opts, g, scale=0.1)
        x.requires_grad_(p["x_grad"])
        w.requires_grad_()
        b.requires_grad_()
        ho, wo = _out_hw(p, pool)
        r = None
        if p.get("residual"):  # the block's identity path: it wants its gradient
            r = randn((p["N"], p["Cout"], ho, wo), opts, g).contiguous(memory_format=cl).requires_grad_()
        dout = randn((p["N"], p["Cout"], ho, wo), opts, g).contiguous(memory_format=cl)
        return {"x": x, "w": w, "b": b, "r": r, "dout": dout, "leaves": [x, w, b] + ([r] if r is not None else [])}

    return make


def _eager_inplace(x: Tensor, w: Tensor, b: Tensor, pool: bool, p: dict, r: Tensor | None = None) -> Tensor:
    # torchvision's VGG: Conv2d -> ReLU(inplace=True) (-> MaxPool2d(2, 2)); its ResNet blocks: conv (-> BN),
    # out += identity, ReLU(inplace=True).
    y = F.conv2d(x, w, b, stride=p.get("stride", 1), padding=p["padding"])
    if r is not None:
        y.add_(r)
    y = torch.relu_(y)
    return F.max_pool2d(y, 2, 2) if pool else y


def _plain_relu(x: Tensor, w: Tensor, b: Tensor, stride: int, padding: int, r: Tensor | None) -> Tensor:
    y = F.conv2d(x, w, b, stride=stride, padding=padding)
    return torch.relu(y + r if r is not None else y)


def _plain_relu_pool(x: Tensor, w: Tensor, b: Tensor, stride: int, padding: int, r: Tensor | None) -> Tensor:
    return F.max_pool2d(torch.relu(F.conv2d(x, w, b, stride=stride, padding=padding)), 2, 2)


def _providers(pool: bool):  # noqa: ANN202
    op_name = "conv_relu_pool" if pool else "conv_relu"

    def ptfast_provider(backend: str, variant: str | None = None) -> Provider:
        algos = TRITON_VARIANTS[variant] if variant else None

        def build(case: Case, inp: Inputs, mode: str) -> Step:
            ptfast = import_ptfast()
            fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu

            p = case.params
            # conv_relu_pool takes neither a stride nor a residual (its cases have neither).
            kw = {} if pool else {"stride": p.get("stride", 1), "residual": inp.get("r")}

            def fwd() -> Tensor:
                with ptfast.use_backend(backend), _triton_algos(algos):
                    return fn(inp["x"], inp["w"], inp["b"], padding=p["padding"], **kw)

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        name = f"ptfast[{backend}{',' + variant if variant else ''}]"
        desc = f"ptfast.{op_name} with use_backend({backend!r})"
        if algos:
            desc += f", triton conv algorithms forward={algos[0]!r} dgrad={algos[1]!r} wgrad={algos[2]!r}"
        return Provider(name, "ptfast", desc, build)

    def eager() -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            def fwd() -> Tensor:
                return _eager_inplace(inp["x"], inp["w"], inp["b"], pool, case.params, inp.get("r"))

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        desc = "eager cuDNN conv2d (bias inside) + relu_" + (" + max_pool2d(2, 2)" if pool else "")
        if not pool:  # torchvision's ResNet block: out += identity; relu(out)
            desc = "eager cuDNN conv2d (bias inside) + add_(residual) (ResNet layers with one) + relu_"
        return Provider("eager", "pytorch", desc + ", cudnn.benchmark=True", build)

    def compile_provider(mode_name: str | None, opts: Options) -> Provider:
        label = mode_name or "default"

        def build(case: Case, inp: Inputs, mode: str) -> Step:
            require_compile(opts)
            if mode_name == "max-autotune" and not opts.max_autotune:
                raise Skip("max-autotune is slow to compile: pass --max-autotune")
            fn = compiled(_plain_relu_pool if pool else _plain_relu, mode=mode_name)
            stride, padding = case.params.get("stride", 1), case.params["padding"]

            def fwd() -> Tensor:
                return fn(inp["x"], inp["w"], inp["b"], stride, padding, inp.get("r"))

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        return Provider(
            f"compile[{label}]", "pytorch", f"torch.compile(mode={label!r}, dynamic=False) of the eager function", build
        )

    def cudnn_fused() -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            if pool:
                raise Skip("cuDNN conv+bias+ReLU has no pooling")
            fn = getattr(torch, "cudnn_convolution_relu", None)
            if fn is None:
                raise Skip(f"torch.cudnn_convolution_relu is not in torch {torch.__version__}")
            if inp["x"].device.type != "cuda":
                raise Skip("cuDNN needs CUDA")
            if mode == "fwd+bwd":
                raise Skip("no autograd formula (forward only)")
            if inp.get("r") is not None:
                raise Skip("cudnn_convolution_relu has no residual input (relu(conv + bias) only)")
            x, w, b = inp["x"], inp["w"], inp["b"]
            stride, padding = case.params.get("stride", 1), case.params["padding"]

            def fwd() -> Tensor:
                with torch.no_grad():  # no autograd formula: run as inference even in "fwd" mode
                    return fn(x, w, b, [stride] * 2, [padding] * 2, [1, 1], 1)

            return fwd

        return Provider(
            "cudnn-conv-relu",
            "pytorch",
            "torch.cudnn_convolution_relu (cuDNN fused conv+bias+ReLU; forward only, no autograd)",
            build,
        )

    def make(opts: Options) -> list[Provider]:
        out = [ptfast_provider(b) for b in PTFAST_BACKENDS]
        out += [ptfast_provider("triton", v) for v in TRITON_VARIANTS]
        out += [eager(), compile_provider(None, opts), compile_provider("max-autotune", opts)]
        if not pool:
            out.append(cudnn_fused())
        return out

    return make


def _setup(opts: Options) -> contextlib.AbstractContextManager[None]:
    return cudnn_benchmark(True)


def _spec(pool: bool) -> OpSpec:
    name = "conv_relu_pool" if pool else "conv_relu"
    what = "conv + bias + ReLU + 2x2 max-pool" if pool else "conv + bias (+ residual) + ReLU"
    layers = "VGG-16 layers" if pool else "VGG-16 and ResNet layers"
    doc = (
        "N batch, Cin->Cout channels, H=W input size, 3x3 kernel, padding 1; pool_after: the layer is "
        "followed by a 2x2 max-pool in VGG-16; x_grad: the input gradient is computed in the backward."
    )
    if not pool:
        doc += (
            " ResNet layers: kN the kernel (padding N // 2), sS the stride (1 when absent), +residual: a "
            "residual of the output's shape is added before the ReLU and gets a gradient."
        )
    return OpSpec(
        name=name,
        title=f"{what} (bf16, channels_last, {layers}): ptfast vs eager cuDNN and torch.compile",
        cases=lambda opts: _cases(pool, opts),
        make_inputs=_make_inputs(pool),
        providers=_providers(pool),
        flops=_flops,
        bytes_moved=_bytes(pool),
        baseline="eager",
        reference=("eager", "ptfast[torch]"),
        setup=_setup,
        case_doc=doc,
        # Two correct bf16/fp16 convs differ in the last bit, which decides some 2x2 windows' maximum (ties at
        # half precision are common): each such window sends its gradient to another pixel. The first H200 run
        # measured 3.7% between the Triton and cuDNN paths at VGG sizes; a misplaced gradient gives ~141%. The
        # precision rule proper is the GPU smoke's, against float64.
        grads_check_tol={torch.float16: 0.1, torch.bfloat16: 0.1} if pool else {},
    )


def spec_conv_relu() -> OpSpec:
    return _spec(pool=False)


def spec_conv_relu_pool() -> OpSpec:
    return _spec(pool=True)
