"""GPU tests of what ResNets launch: conv_relu with stride 2, 1x1 and 7x7 kernels and a residual on the cuda and
triton backends, and patched ResNets (the seed models of tests/seed_models.py; torchvision's own when installed).

Low precision by DESIGN §4's rule against PyTorch's own ops in the same dtype, errors measured against a float64
reference (tests/oracles/conv.py). Only collected with a GPU; a backend that cannot run here is skipped.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.testing import record_dispatch
from tests import seed_models as sm
from tests.helpers import assert_ran, assert_rule
from tests.oracles.conv import conv_relu_ref
from tests.test_gpu_conv_backends import CONV_BACKENDS, _require, _use

pytestmark = pytest.mark.gpu

# (kernel, stride, padding, Cin, Cout, H, W, residual): the stem, strided 3x3, Bottleneck 1x1s, a BasicBlock tail.
GEOMETRIES = [
    (7, 2, 3, 3, 64, 57, 45, False),
    (3, 2, 1, 64, 128, 29, 27, True),
    (1, 1, 0, 256, 64, 15, 17, False),
    (1, 2, 0, 128, 256, 29, 27, True),
    (3, 1, 1, 64, 64, 15, 13, True),
]
IDS = ["stem7x7s2", "3x3s2-res", "1x1", "1x1s2-res", "3x3-res"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("spec", CONV_BACKENDS)
def test_strided_residual_conv_relu(spec, geometry, dtype, channels_last):
    _require(spec)
    k, stride, padding, cin, cout, h, w, with_residual = geometry
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, cin, h, w, generator=_gen(1)).to("cuda", dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(cout, cin, k, k, generator=_gen(2)) / (cin * k * k) ** 0.5).to("cuda", dtype)
    bias = (torch.randn(cout, generator=_gen(3)) * 0.3).to("cuda", dtype)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    residual = None
    if with_residual:
        residual = torch.randn(3, cout, ho, wo, generator=_gen(4)).to("cuda", dtype).contiguous(memory_format=fmt)
    leaves = [t.requires_grad_() for t in (x, weight, bias, residual) if t is not None]
    backend, ctx = _use(spec)
    with ctx, record_dispatch() as events:
        out = ptfast.conv_relu(x, weight, bias, stride=stride, padding=padding, residual=residual)
        grad = torch.randn(out.shape, generator=_gen(5)).to("cuda", dtype)
        grads = torch.autograd.grad(out, leaves, grad)
    assert_ran(events, "conv_relu", backend, ("forward", "backward"))
    assert out.is_contiguous(memory_format=fmt)
    z = F.conv2d(*leaves[:3], stride=stride, padding=padding)
    theirs = F.relu(z + residual if residual is not None else z)
    their_grads = torch.autograd.grad(theirs, leaves, grad)
    cpu = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = conv_relu_ref(*cpu[:3], padding, stride=stride, residual=cpu[3] if with_residual else None)
    ref_grads = torch.autograd.grad(ref, cpu, grad.cpu().double())
    assert_rule(out.cpu(), theirs.cpu(), ref, "out")
    for name, g, t, r in zip(("dx", "dweight", "dbias", "dresidual"), grads, their_grads, ref_grads, strict=False):
        assert_rule(g.cpu(), t.cpu(), r, name)


def _models():
    makers = [("seed-resnet18", lambda: sm.resnet18(width=64)), ("seed-resnet50", lambda: sm.resnet50(width=64))]
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        makers += [("torchvision-resnet18", torchvision.models.resnet18)]
        makers += [("torchvision-resnet50", torchvision.models.resnet50)]
        makers += [("torchvision-vgg16_bn", torchvision.models.vgg16_bn)]
    return makers


def _backend(spec: str):
    """A fresh context selecting ``spec`` ("auto" included)."""
    return ptfast.use_backend("auto") if spec == "auto" else _use(spec)[1]


@pytest.mark.parametrize("name,make", _models(), ids=[n for n, _ in _models()])
@pytest.mark.parametrize("spec", ["auto", *CONV_BACKENDS])
def test_patched_models_eval_and_train_under_autocast(name, make, spec):
    """Eval (BatchNorm folded, fused chains) and train (stock BatchNorm math) under bf16 autocast: the patched
    model's logits are within DESIGN §4's bound of the stock model's, both against the float64 model."""
    if spec != "auto":
        _require(spec)
    torch.manual_seed(0)
    stock64 = sm.randomize_batch_norms(make()).cuda().double().to(memory_format=torch.channels_last)
    stock = copy.deepcopy(stock64).float()
    ours = ptfast.patch(copy.deepcopy(stock))
    assert not ours.ptfast_patch_report.skipped, str(ours.ptfast_patch_report)
    x = torch.randn(4, 3, 96, 96, generator=_gen(7)).cuda().contiguous(memory_format=torch.channels_last)
    for mode in (False, True):
        for m in (stock64, stock, ours):
            m.train(mode)
        with torch.no_grad(), _backend(spec), record_dispatch() as events:
            ref = stock64(x.double())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                theirs, got = stock(x), ours(x)
        assert_rule(got.float(), theirs.float(), ref, f"{name} {'train' if mode else 'eval'} logits")
        if mode and spec != "auto" and "resnet" in name:  # BN on batch statistics: block tails' add + ReLU
            assert_ran(events, "add_relu", spec.partition(":")[0])
