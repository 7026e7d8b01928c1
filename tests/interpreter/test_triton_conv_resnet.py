"""The Triton conv_relu's ResNet features under TRITON_INTERPRET=1 (CPU tensors): stride 2, 1x1 and 7x7 kernels,
and a residual added before the ReLU.

Runs only in the interpreter process (``python tests/run.py``). Forward and every gradient (dx, dweight, dbias,
dresidual) are checked against the float64 oracle (tests/oracles/conv.py) in fp32, and in fp16 by DESIGN §4's
rule against PyTorch's own ops in the same dtype (the interpreter rounds bf16 wrongly: bf16 runs on the GPU).

The interpreter costs about a second per case, so :data:`CASES` is a hand-picked covering set, not a cross
product: every geometry (3x3 stride 2, 1x1 stride 1 and 2, the 7x7 stride-2 stem) runs with and without a
residual, in NCHW and channels_last, under both forward algorithms (the fused implicit GEMM and cuDNN + the
bias/residual/ReLU epilogue kernel), and in both K walks where the geometry has them (flat: Cin 3 or 5; taps:
Cin 16, a multiple of the interpreter's BLOCK_K). Sizes are odd (M spans partial row tiles of 32; Cout 19 spans
two column tiles of 16). The Triton wgrad runs in every case; the Triton dgrad is stride 1 only, so stride-2
cases must show the cuDNN fallback.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.backends.triton import conv_config, implicit_gemm_kernels
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, conv_inputs, conv_params
from tests.oracles.conv import conv_relu_ref

pytestmark = pytest.mark.interpreter

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
NAMES = ("out", "dx", "dweight", "dbias", "dresidual")

# (k, stride, padding, N, Cin, Cout, H, W, residual, layout, forward): each geometry with and without residual,
# in both layouts and under both forwards; taps (Cin 16) for 3x3 and 1x1, flat for the rest.
CASES = [
    (3, 2, 1, 2, 5, 7, 11, 9, True, "channels_last", "implicit_gemm"),
    (3, 2, 1, 2, 16, 19, 9, 10, False, "channels_last", "implicit_gemm"),
    (3, 2, 1, 2, 5, 7, 13, 8, True, "nchw", "cudnn"),
    (3, 2, 1, 2, 5, 7, 10, 11, False, "nchw", "implicit_gemm"),
    (1, 1, 0, 2, 16, 19, 9, 7, True, "channels_last", "implicit_gemm"),  # Bottleneck conv3: 1x1 + residual
    (1, 1, 0, 2, 5, 7, 11, 8, False, "nchw", "implicit_gemm"),
    (1, 1, 0, 2, 5, 7, 9, 11, True, "nchw", "cudnn"),
    (1, 2, 0, 2, 16, 19, 11, 10, False, "channels_last", "implicit_gemm"),  # downsample: 1x1 stride 2
    (1, 2, 0, 2, 5, 7, 13, 9, True, "nchw", "implicit_gemm"),
    (1, 2, 0, 2, 5, 7, 9, 12, False, "channels_last", "cudnn"),
    (7, 2, 3, 2, 3, 7, 13, 11, False, "channels_last", "implicit_gemm"),  # the stem
    (7, 2, 3, 2, 3, 7, 11, 12, True, "nchw", "implicit_gemm"),
    (7, 2, 3, 2, 5, 7, 12, 13, True, "channels_last", "cudnn"),
]

# A cheaper fp16 subset: one case per geometry, both forwards, residual on.
FP16_CASES = [
    (3, 2, 1, 2, 16, 19, 9, 10, True, "channels_last", "implicit_gemm"),
    (1, 1, 0, 2, 16, 7, 9, 7, True, "channels_last", "cudnn"),
    (1, 2, 0, 2, 5, 7, 11, 10, True, "nchw", "implicit_gemm"),
    (7, 2, 3, 2, 3, 7, 13, 11, True, "channels_last", "implicit_gemm"),
]


def _case_id(case) -> str:
    k, stride, padding, n, cin, cout, h, w, residual, layout, forward = case
    res = "res" if residual else "plain"
    return f"{k}x{k}s{stride}-{n}x{cin}x{cout}x{h}x{w}-{res}-{layout}-{forward}"


def _inputs(case, dtype, seed=0):
    k, stride, padding, n, cin, cout, h, w, residual, layout, _ = case
    fmt = FORMATS[layout]
    x, weight, bias = conv_inputs(n, cin, cout, h, w, k, dtype, fmt, with_bias=True, seed=seed)
    res = None
    if residual:
        ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        gen = torch.Generator().manual_seed(seed + 100)
        res = torch.randn(n, cout, ho, wo, dtype=torch.float64, generator=gen).to(dtype).contiguous(memory_format=fmt)
        res.requires_grad_()
    return x, weight, bias, res


def _leaves(x, weight, bias, res):
    return conv_params(x, weight, bias) + ([res] if res is not None else [])


def _run_triton(x, weight, bias, res, stride, padding, forward):
    """conv_relu on the triton backend with the Triton dgrad/wgrad asked for; checks which kernels ran."""
    algos = conv_config.use_algos(forward=forward, dgrad="triton", wgrad="triton")
    with ptfast.use_backend("triton"), algos, record_dispatch() as events:
        out = ptfast.conv_relu(x, weight, bias, stride=stride, padding=padding, residual=res)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
        grads = torch.autograd.grad(out, _leaves(x, weight, bias, res), grad)
    # The Triton dgrad is the stride-1 transposed conv: stride 2 falls back to cuDNN (aten on CPU).
    dgrad = "triton" if stride == 1 else "cudnn"
    phases = ("forward", "backward", f"forward:{forward}", f"dgrad:{dgrad}", "wgrad:triton")
    assert_ran(events, "conv_relu", "triton", phases)
    return out, grads, grad


def _oracle(x, weight, bias, res, stride, padding, grad):
    leaves = [t.detach().double().requires_grad_() for t in _leaves(x, weight, bias, res)]
    x64, w64, b64 = leaves[:3]
    r64 = leaves[3] if res is not None else None
    out = conv_relu_ref(x64, w64, b64, padding, stride=stride, residual=r64)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.double()))


def _torch_same_dtype(x, weight, bias, res, stride, padding, grad):
    leaves = [t.detach().requires_grad_() for t in _leaves(x, weight, bias, res)]
    z = F.conv2d(leaves[0], leaves[1], leaves[2], stride=stride, padding=padding)
    out = F.relu(z + leaves[3] if res is not None else z)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp32_matches_float64(case) -> None:
    k, stride, padding, n, cin, cout, h, w, residual, layout, forward = case
    x, weight, bias, res = _inputs(case, torch.float32)
    out, grads, grad = _run_triton(x, weight, bias, res, stride, padding, forward)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    assert out.shape == (n, cout, ho, wo) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=FORMATS[layout]) and grads[0].is_contiguous(memory_format=FORMATS[layout])
    ref = _oracle(x, weight, bias, res, stride, padding, grad)
    names = NAMES if residual else NAMES[:4]
    for name, ours, want in zip(names, (out, *grads), ref, strict=True):
        assert ours.shape == want.shape, name
        assert_close64(ours, want, f"{name} {_case_id(case)}")


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_fp16_low_precision_rule(case) -> None:
    _, stride, padding, *_, forward = case
    x, weight, bias, res = _inputs(case, torch.float16, seed=1)
    out, grads, grad = _run_triton(x, weight, bias, res, stride, padding, forward)
    ref = _oracle(x, weight, bias, res, stride, padding, grad)
    same = _torch_same_dtype(x, weight, bias, res, stride, padding, grad)
    for name, ours, theirs, want in zip(NAMES, (out, *grads), same, ref, strict=True):
        assert ours.dtype == torch.float16, name
        assert_rule(ours, theirs, want, f"{name} {_case_id(case)}")


@pytest.mark.parametrize("k", [3, 1], ids=["3x3", "1x1"])
def test_stride2_runs_triton_wgrad_and_cudnn_dgrad(monkeypatch, k) -> None:
    # The dispatch record says which path was chosen; the spy on the kernel's launch says the Triton wgrad
    # really ran, specialized for stride 2 (and that the forward's implicit GEMM was launched with stride 2).
    launches = []
    for kernel in (implicit_gemm_kernels._conv_gemm_fwd, implicit_gemm_kernels._conv_gemm_wgrad):
        run = kernel.run

        def spy(*args, _run=run, _name=kernel.__name__, **kwargs):
            launches.append((_name, kwargs["STRIDE"]))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    padding = k // 2
    x, weight, bias = conv_inputs(2, 16, 7, 9, 10, k, torch.float32, torch.channels_last, True, seed=4)
    out, grads, grad = _run_triton(x, weight, bias, None, 2, padding, "implicit_gemm")
    assert launches == [("_conv_gemm_fwd", 2), ("_conv_gemm_wgrad", 2)]  # dx came from cuDNN: no third launch
    ref = _oracle(x, weight, bias, None, 2, padding, grad)
    for name, ours, want in zip(NAMES[:4], (out, *grads), ref, strict=True):
        assert_close64(ours, want, name)


@pytest.mark.parametrize("forward", conv_config.FORWARD_ALGOS)
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
def test_nchw_residual_with_channels_last_x(forward, stride) -> None:
    # The residual is read in the output's layout (channels_last, like x): an NCHW one is re-laid, not misread.
    x, weight, bias = conv_inputs(2, 5, 7, 9, 8, 3, torch.float32, torch.channels_last, True, seed=5)
    ho, wo = (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1
    res = torch.randn(2, 7, ho, wo, generator=torch.Generator().manual_seed(6)).requires_grad_()
    assert res.is_contiguous() and not res.is_contiguous(memory_format=torch.channels_last)
    out, grads, grad = _run_triton(x, weight, bias, res, stride, 1, forward)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = _oracle(x, weight, bias, res, stride, 1, grad)
    for name, ours, want in zip(NAMES, (out, *grads), ref, strict=True):
        assert_close64(ours, want, f"{name} {forward}")
