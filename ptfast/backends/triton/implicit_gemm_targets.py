"""Compile-for-target registrations of the implicit-GEMM convolution kernels (:mod:`.implicit_gemm_kernels`).

Kept apart from the kernels so each file stays readable; :mod:`.implicit_gemm_kernels` calls :func:`register_all`
at import, so importing it (as :mod:`.compile_targets` does) still registers everything. Plain data: this module
imports neither triton nor the kernels.

Every table entry of :data:`.conv_config.TABLES` is registered for its own GPU class:

* VGG (3x3 stride 1): the heaviest specialization (bias, pool, argmax) and the plain one (dgrad), for both ways of
  walking K, plus int64 indexing; the weight gradient for both walks.
* ResNet-18/50 (:data:`_RESNET_FWD`, :data:`_RESNET_WGRAD`): the strided, 1x1 and 7x7 specializations and the
  residual epilogue their forwards launch, each in the K walk :func:`.conv_config.k_walk` picks for its layer.

Half precision on sm_80 / sm_90 with int32 indexing is "hot" (:func:`_is_hot`): it must compile without register
spills. Names must not change: the committed static tables (benchmarks/results/static/) refer to them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ptfast.backends.triton import compile_targets, conv_config

_TRITON_DTYPES = {2: ("fp16", "bf16"), 4: ("fp32",)}
# (FLAT_K, epilogue on, LARGE): the heaviest and the plain variant of each K walk, plus int64 indexing.
_VARIANTS = [(flat, epi, False) for flat, epi in itertools.product((False, True), (True, False))]
_VARIANTS.append((False, True, True))
_CUDA = torch.device("cuda")  # k_walk only reads the device type; constructing it needs no GPU

_FWD_INTS = ("M", "Cin", "Cout", "H", "W", "Ho", "Wo", "pad_h", "pad_w")
_FWD_STRIDES = ("x_sn", "x_sc", "x_sh", "x_sw", "o_sn", "o_sc", "o_sh", "o_sw")
_FWD_POINTERS = ("x_ptr", "w_ptr", "bias_ptr", "residual_ptr", "out_ptr", "argmax_ptr")
_WGRAD_INTS = ("M", "Cin", "Cout", "H", "W", "Hc", "Wc", "pad_h", "pad_w", "rows_per_split")
_WGRAD_STRIDES = ("g_sn", "g_sc", "g_sh", "g_sw", "x_sn", "x_sc", "x_sh", "x_sw")
_WGRAD_POINTERS = ("g_ptr", "x_ptr", "dw_part_ptr", "db_part_ptr")
# The tap walk's launch with Cin a multiple of 16 in channels_last: every stride but the channel's is aligned.
_TAPS_ALIGNED = ("Cin", "Cout", "x_sn", "x_sh", "x_sw")


@dataclass(frozen=True)
class _ResNetConv:
    """A conv_relu specialization a ResNet forward launches, and the layer its ``launch_ints`` stand for."""

    tag: str  # appended to the registered name: ",k1x1" etc. (3x3 and stride 1 are the unnamed defaults)
    k: int
    stride: int
    residual: bool
    # Cout bucket -> (Cin, Cout, input H = W) of a ResNet-50 layer in that bucket; where ResNet has none (the
    # 64 bucket of a strided or residual layer) a 64-channel stand-in: same K walk and BLOCK_K as a real one.
    layers: dict[int, tuple[int, int, int]]

    @property
    def padding(self) -> int:
        return self.k // 2


# BatchNorm folding (eval mode) gives every fused ResNet conv a bias; conv_relu always applies the ReLU.
_RESNET_FWD = (
    _ResNetConv(",k7x7,s2", 7, 2, False, {64: (3, 64, 224), 128: (3, 128, 224)}),  # the stem (flat walk: Cin 3)
    # ResNet-50 layer2.0.conv2 (torchvision strides the 3x3), ResNet-18 layer2.0.conv1 (64 -> 128).
    _ResNetConv(",s2", 3, 2, False, {64: (64, 64, 56), 128: (128, 128, 56)}),
    _ResNetConv(",k1x1", 1, 1, False, {64: (256, 64, 56), 128: (256, 128, 56)}),  # Bottleneck conv1
    # The downsample's shape 256 -> 512 (ResNet v1 also strides conv1, 1x1 + BN + ReLU).
    _ResNetConv(",k1x1,s2", 1, 2, False, {64: (64, 64, 56), 128: (256, 512, 56)}),
    # Bottleneck conv3: 64 -> 256 at 56, + identity, ReLU; BasicBlock conv2 (ResNet-18): 3x3 + identity, ReLU.
    _ResNetConv(",residual,k1x1", 1, 1, True, {64: (64, 64, 56), 128: (64, 256, 56)}),
    _ResNetConv(",residual", 3, 1, True, {64: (64, 64, 56), 128: (128, 128, 28)}),
)
# Weight gradients of the new geometries (the 3x3 stride-1 ones are the VGG registrations).
_RESNET_WGRAD = tuple(c for c in _RESNET_FWD if not c.residual)


def register_all(fwd_kernel: Callable, wgrad_kernel: Callable) -> None:
    """Register every configuration of ``_conv_gemm_fwd`` / ``_conv_gemm_wgrad`` (passed in by the kernels module)."""
    _register_vgg_fwd(fwd_kernel)
    _register_vgg_wgrad(wgrad_kernel)
    _register_resnet(fwd_kernel, wgrad_kernel)


def _fwd_constexprs(k, stride, epilogue, pool, residual, flat_k, large, elem, blocks, block_k) -> dict[str, object]:
    return {
        "KH": k, "KW": k, "STRIDE": stride, "HAS_BIAS": epilogue, "HAS_RESIDUAL": residual, "RELU": epilogue,
        "POOL": pool, "NEED_ARGMAX": pool, "FLAT_K": flat_k, "LARGE": large,
        "DOT_PRECISION": "tf32" if elem == 4 else "ieee", "BLOCK_M": blocks.block_m, "BLOCK_N": blocks.block_n,
        "BLOCK_K": block_k, "GROUP_M": conv_config.GROUP_M,
    }  # fmt: skip


def _wgrad_constexprs(k, stride, flat_k, large, elem, block_m, blocks, block_k) -> dict[str, object]:
    return {
        "KH": k, "KW": k, "STRIDE": stride, "NEED_DBIAS": True, "FLAT_K": flat_k, "LARGE": large,
        "DOT_PRECISION": "tf32" if elem == 4 else "ieee", "BLOCK_M": block_m, "BLOCK_N": blocks.block_n,
        "BLOCK_K": block_k,
    }  # fmt: skip


def _fwd_signature(tdtype: str) -> dict[str, str]:
    pointers = dict.fromkeys(_FWD_POINTERS[:-1], f"*{tdtype}") | {"argmax_ptr": "*u8"}
    return pointers | dict.fromkeys(_FWD_INTS + _FWD_STRIDES, "i32")


def _wgrad_signature(tdtype: str) -> dict[str, str]:
    pointers = {"g_ptr": f"*{tdtype}", "x_ptr": f"*{tdtype}", "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32"}
    return pointers | dict.fromkeys(_WGRAD_INTS + _WGRAD_STRIDES, "i32")


def _register_vgg_fwd(kernel: Callable) -> None:
    """The 3x3 stride-1 forward for every table entry: the heaviest specialization (bias, pool, argmax) and the
    plain one (dgrad), for both ways of walking K (dtypes: see :func:`_with_dtypes`)."""
    for arch, table in conv_config.TABLES.items():
        for (elem, cout_bucket), blocks in table.items():
            for (flat_k, epilogue, large), tdtype in _with_dtypes(arch, elem, _VARIANTS):
                block_k = conv_config.flat_block_k(elem) if flat_k else blocks.block_k
                compile_targets.register(
                    f"conv_gemm_fwd[sm{arch},{tdtype},cout{cout_bucket},{'flat' if flat_k else 'taps'},"
                    f"{'bias_relu_pool_argmax' if epilogue else 'plain'}{',int64' if large else ''},"
                    f"{blocks.block_m}x{blocks.block_n}x{block_k},w{blocks.num_warps},s{blocks.num_stages}]",
                    kernel,
                    signature=_fwd_signature(tdtype),
                    constexprs=_fwd_constexprs(3, 1, epilogue, epilogue, False, flat_k, large, elem, blocks, block_k),
                    num_warps=blocks.num_warps,
                    num_stages=blocks.num_stages,
                    divisible_by_16=_FWD_POINTERS + (() if flat_k else _TAPS_ALIGNED),
                    archs=(arch,),
                    hot=_is_hot(arch, elem, large),
                    launch_ints=_fwd_launch_ints(*_layer(flat_k, cout_bucket), k=3, stride=1, pool=epilogue),
                )


def _register_vgg_wgrad(kernel: Callable) -> None:
    """The 3x3 stride-1 weight gradient for every table entry: both K walks with the bias sum on; int64 indexing."""
    for arch, table in conv_config.TABLES.items():
        for (elem, cout_bucket), blocks in table.items():
            block_m = conv_config.WGRAD_BLOCK_M[elem]
            for (flat_k, large), tdtype in _with_dtypes(arch, elem, ((False, False), (True, False), (False, True))):
                block_k = conv_config.flat_block_k(elem) if flat_k else blocks.block_k
                compile_targets.register(
                    f"conv_gemm_wgrad[sm{arch},{tdtype},cout{cout_bucket},{'flat' if flat_k else 'taps'},dbias"
                    f"{',int64' if large else ''},{block_m}x{blocks.block_n}x{block_k},w{blocks.num_warps},"
                    f"s{blocks.num_stages}]",
                    kernel,
                    signature=_wgrad_signature(tdtype),
                    constexprs=_wgrad_constexprs(3, 1, flat_k, large, elem, block_m, blocks, block_k),
                    num_warps=blocks.num_warps,
                    num_stages=blocks.num_stages,
                    divisible_by_16=_WGRAD_POINTERS + (() if flat_k else _TAPS_ALIGNED),
                    archs=(arch,),
                    hot=_is_hot(arch, elem, large),
                    launch_ints=_wgrad_launch_ints(*_layer(flat_k, cout_bucket), k=3, stride=1),
                )


def _register_resnet(fwd_kernel: Callable, wgrad_kernel: Callable) -> None:
    """:data:`_RESNET_FWD` (bias + [residual] + ReLU, no pool) and :data:`_RESNET_WGRAD` for every table entry,
    int32 indexing, each in the K walk and chunk the launcher picks for its layer's Cin."""
    for arch, table in conv_config.TABLES.items():
        for (elem, cout_bucket), blocks in table.items():
            hot = _is_hot(arch, elem, large=False)
            tdtypes = _TRITON_DTYPES[elem] if hot else _TRITON_DTYPES[elem][:1]
            suffix = f"w{blocks.num_warps},s{blocks.num_stages}]"
            for conv, tdtype in itertools.product(_RESNET_FWD, tdtypes):
                cin, cout, hw = conv.layers[cout_bucket]
                flat_k, block_k = conv_config.k_walk(cin, blocks, _CUDA)
                walk = "flat" if flat_k else "taps"
                compile_targets.register(
                    f"conv_gemm_fwd[sm{arch},{tdtype},cout{cout_bucket},{walk},bias_relu{conv.tag},"
                    f"{blocks.block_m}x{blocks.block_n}x{block_k},{suffix}",
                    fwd_kernel,
                    signature=_fwd_signature(tdtype),
                    constexprs=_fwd_constexprs(
                        conv.k, conv.stride, True, False, conv.residual, flat_k, False, elem, blocks, block_k
                    ),
                    num_warps=blocks.num_warps,
                    num_stages=blocks.num_stages,
                    divisible_by_16=_FWD_POINTERS + (() if flat_k else _TAPS_ALIGNED),
                    archs=(arch,),
                    hot=hot,
                    launch_ints=_fwd_launch_ints(cin, cout, hw, conv.k, conv.stride, pool=False),
                )
            block_m = conv_config.WGRAD_BLOCK_M[elem]
            for conv, tdtype in itertools.product(_RESNET_WGRAD, tdtypes):
                cin, cout, hw = conv.layers[cout_bucket]
                flat_k, block_k = conv_config.k_walk(cin, blocks, _CUDA)
                walk = "flat" if flat_k else "taps"
                compile_targets.register(
                    f"conv_gemm_wgrad[sm{arch},{tdtype},cout{cout_bucket},{walk},dbias{conv.tag},"
                    f"{block_m}x{blocks.block_n}x{block_k},{suffix}",
                    wgrad_kernel,
                    signature=_wgrad_signature(tdtype),
                    constexprs=_wgrad_constexprs(conv.k, conv.stride, flat_k, False, elem, block_m, blocks, block_k),
                    num_warps=blocks.num_warps,
                    num_stages=blocks.num_stages,
                    divisible_by_16=_WGRAD_POINTERS + (() if flat_k else _TAPS_ALIGNED),
                    archs=(arch,),
                    hot=hot,
                    launch_ints=_wgrad_launch_ints(cin, cout, hw, conv.k, conv.stride),
                )


def _layer(flat_k: bool, cout_bucket: int) -> tuple[int, int, int]:
    """(Cin, Cout, H = W) of the VGG-16 layer a configuration stands for: the RGB stem for the flat K walk, else
    the 64- or 128-channel block."""
    if flat_k:
        return 3, cout_bucket, 224
    return cout_bucket, cout_bucket, 224 if cout_bucket == 64 else 112


def _channels_last(c: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(n, c, h, w) strides of a channels_last tensor."""
    return h * w * c, 1, w * c, c


def _conv_hw(hw: int, k: int, stride: int) -> int:
    return (hw + 2 * (k // 2) - k) // stride + 1


def _fwd_launch_ints(cin: int, cout: int, hw: int, k: int, stride: int, pool: bool) -> dict[str, int]:
    """Integer arguments of a typical launch (batch 32, channels_last, padding k // 2): the JIT compiles the unit
    channel stride (and a unit padding) as a constant, and so does the check."""
    out_hw = _conv_hw(hw, k, stride) // (2 if pool else 1)
    ints = {"M": 32 * out_hw * out_hw * (4 if pool else 1), "Cin": cin, "Cout": cout, "H": hw, "W": hw}
    ints |= {"Ho": out_hw, "Wo": out_hw, "pad_h": k // 2, "pad_w": k // 2}
    ints |= dict(zip(("x_sn", "x_sc", "x_sh", "x_sw"), _channels_last(cin, hw, hw), strict=True))
    return ints | dict(zip(("o_sn", "o_sc", "o_sh", "o_sw"), _channels_last(cout, out_hw, out_hw), strict=True))


def _wgrad_launch_ints(cin: int, cout: int, hw: int, k: int, stride: int) -> dict[str, int]:
    hc = _conv_hw(hw, k, stride)
    ints = {"M": 32 * hc * hc, "Cin": cin, "Cout": cout, "H": hw, "W": hw, "Hc": hc, "Wc": hc, "pad_h": k // 2}
    ints |= {"pad_w": k // 2, "rows_per_split": 8192}
    ints |= dict(zip(("g_sn", "g_sc", "g_sh", "g_sw"), _channels_last(cout, hc, hc), strict=True))
    return ints | dict(zip(("x_sn", "x_sc", "x_sh", "x_sw"), _channels_last(cin, hw, hw), strict=True))


def _with_dtypes(arch: int, elem: int, variants: Iterable[tuple[bool, ...]]) -> Iterator[tuple[tuple[bool, ...], str]]:
    """(variant, Triton dtype) pairs to register: hot variants in every dtype of the size (fp16 and bf16 share
    tiles, not conversions), the others in the first (which stands for the rest: same tile bytes)."""
    for variant in variants:
        hot = _is_hot(arch, elem, large=variant[-1])
        for tdtype in _TRITON_DTYPES[elem] if hot else _TRITON_DTYPES[elem][:1]:
            yield variant, tdtype


def _is_hot(arch: int, elem: int, large: bool) -> bool:
    """Half-precision entries of sm_80 / sm_90 with int32 indexing: what VGG and ResNet training run (must not
    spill)."""
    return arch in (80, 90) and elem == 2 and not large
