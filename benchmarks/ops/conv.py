"""Conv + bias + ReLU (+ 2x2 max-pool) benchmark specs: ``conv_relu`` and ``conv_relu_pool``.

Shapes: every distinct VGG-16 conv layer at 224x224, batch 64, bf16, channels_last. By default ``conv_relu``
runs the layers that are *not* followed by a pool and ``conv_relu_pool`` the five that are (what a patched
VGG-16 actually calls); ``--full`` runs every layer through both ops. Each row says whether the layer is
followed by a pool in VGG-16. The first layer's input is the image, so its backward computes no input gradient
(as in training).

FLOPs: 2·N·Cout·Hc·Wc·Cin·kh·kw forward; backward adds the same for the weight gradient and again for the
input gradient (when needed). Bytes: a lower bound on memory traffic (each tensor read or written once).
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
    params = dict(
        N=n, Cin=cin, Cout=cout, H=hw, W=hw, k=3, padding=1, pool_after=pool_after, x_grad=cin > 3
    )  # the first layer's input is an image: no gradient wanted
    return Case(f"{name} {cin}->{cout} @{hw}", params, graph=graph)


def _cases(pool: bool, opts: Options) -> list[Case]:
    if opts.quick:
        if pool:
            return [_case("tiny", 2, 8, 16, 16, True, True), _case("tiny-odd", 2, 16, 16, 15, True, True)]
        return [_case("tiny-first", 2, 3, 8, 16, False, True), _case("tiny", 2, 8, 16, 16, False, True)]
    return [
        _case(name, BATCH, cin, cout, hw, pool_after, graph=hw <= 14)
        for name, cin, cout, hw, pool_after in VGG16_LAYERS
        if opts.full or pool_after == pool
    ]


def _out_hw(p: dict, pool: bool) -> tuple[int, int]:
    hc = p["H"] + 2 * p["padding"] - p["k"] + 1
    wc = p["W"] + 2 * p["padding"] - p["k"] + 1
    return (hc // 2, wc // 2) if pool else (hc, wc)


def _flops(case: Case, mode: str) -> float:
    p = case.params
    hc = p["H"] + 2 * p["padding"] - p["k"] + 1
    wc = p["W"] + 2 * p["padding"] - p["k"] + 1
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
        fwd = x + w + out
        if mode != "fwd+bwd":
            return float(fwd)
        # backward: read grad_out, x, w (and the saved output/argmax); write dx, dw.
        return float(fwd + out + x + w + (x if p["x_grad"] else 0) + w + out)

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
        dout = randn((p["N"], p["Cout"], ho, wo), opts, g).contiguous(memory_format=cl)
        return {"x": x, "w": w, "b": b, "dout": dout, "leaves": [x, w, b]}

    return make


def _eager_inplace(x: Tensor, w: Tensor, b: Tensor, pool: bool) -> Tensor:
    # torchvision's VGG: Conv2d -> ReLU(inplace=True) (-> MaxPool2d(2, 2)).
    y = torch.relu_(F.conv2d(x, w, b, padding=1))
    return F.max_pool2d(y, 2, 2) if pool else y


def _plain_relu(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return torch.relu(F.conv2d(x, w, b, padding=1))


def _plain_relu_pool(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.max_pool2d(torch.relu(F.conv2d(x, w, b, padding=1)), 2, 2)


def _providers(pool: bool):  # noqa: ANN202
    op_name = "conv_relu_pool" if pool else "conv_relu"

    def ptfast_provider(backend: str, variant: str | None = None) -> Provider:
        algos = TRITON_VARIANTS[variant] if variant else None

        def build(case: Case, inp: Inputs, mode: str) -> Step:
            ptfast = import_ptfast()
            fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu

            def fwd() -> Tensor:
                with ptfast.use_backend(backend), _triton_algos(algos):
                    return fn(inp["x"], inp["w"], inp["b"], padding=case.params["padding"])

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        name = f"ptfast[{backend}{',' + variant if variant else ''}]"
        desc = f"ptfast.{op_name} with use_backend({backend!r})"
        if algos:
            desc += f", triton conv algorithms forward={algos[0]!r} dgrad={algos[1]!r} wgrad={algos[2]!r}"
        return Provider(name, "ptfast", desc, build)

    def eager() -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            def fwd() -> Tensor:
                return _eager_inplace(inp["x"], inp["w"], inp["b"], pool)

            return make_step(fwd, inp["leaves"], mode, inp["dout"])

        desc = "eager cuDNN conv2d (bias inside) + relu_" + (" + max_pool2d(2, 2)" if pool else "")
        return Provider("eager", "pytorch", desc + ", cudnn.benchmark=True", build)

    def compile_provider(mode_name: str | None, opts: Options) -> Provider:
        label = mode_name or "default"

        def build(case: Case, inp: Inputs, mode: str) -> Step:
            require_compile(opts)
            if mode_name == "max-autotune" and not opts.max_autotune:
                raise Skip("max-autotune is slow to compile: pass --max-autotune")
            fn = compiled(_plain_relu_pool if pool else _plain_relu, mode=mode_name)

            def fwd() -> Tensor:
                return fn(inp["x"], inp["w"], inp["b"])

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
            x, w, b = inp["x"], inp["w"], inp["b"]

            def fwd() -> Tensor:
                with torch.no_grad():  # no autograd formula: run as inference even in "fwd" mode
                    return fn(x, w, b, [1, 1], [case.params["padding"]] * 2, [1, 1], 1)

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
    what = "conv + bias + ReLU + 2x2 max-pool" if pool else "conv + bias + ReLU"
    return OpSpec(
        name=name,
        title=f"{what} (bf16, channels_last, VGG-16 layers): ptfast vs eager cuDNN and torch.compile",
        cases=lambda opts: _cases(pool, opts),
        make_inputs=_make_inputs(pool),
        providers=_providers(pool),
        flops=_flops,
        bytes_moved=_bytes(pool),
        baseline="eager",
        reference=("eager", "ptfast[torch]"),
        setup=_setup,
        case_doc="N batch, Cin->Cout channels, H=W input size, 3x3 kernel, padding 1; pool_after: the layer is "
        "followed by a 2x2 max-pool in VGG-16; x_grad: the input gradient is computed in the backward.",
    )


def spec_conv_relu() -> OpSpec:
    return _spec(pool=False)


def spec_conv_relu_pool() -> OpSpec:
    return _spec(pool=True)
