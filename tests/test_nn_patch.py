"""ptfast.nn conv modules and ptfast.patch on a torchvision-shaped VGG (built here: no torchvision on CPU CI)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import ptfast
from ptfast import _dispatch
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran


def tiny_vgg(batch_norm: bool = False) -> nn.Module:
    """torchvision's VGG layout (features / avgpool / classifier) at toy width; odd channel counts."""
    cfg = [5, "M", 7, 9, "M", 11]
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(cin, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
            self.classifier = nn.Sequential(nn.Linear(cin * 4, 13), nn.ReLU(True), nn.Dropout(0.0), nn.Linear(13, 3))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return VGG()


def test_modules_are_conv2d_with_same_state_dict():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    fused = ptfast.nn.ConvReLUPool2d.from_conv(conv)
    assert isinstance(fused, nn.Conv2d)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert list(fused.state_dict()) == list(conv.state_dict())
    fresh = ptfast.nn.ConvReLU2d(3, 5, 3, padding=1)
    fresh.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(fresh(x), torch.relu(conv(x)))
    torch.testing.assert_close(fused(x), torch.max_pool2d(torch.relu(conv(x)), 2, 2))


def test_module_refuses_unsupported_conv():
    with pytest.raises(ValueError, match="stride"):
        ptfast.nn.ConvReLU2d(3, 5, 3, stride=3)
    with pytest.raises(ValueError, match="stride"):
        ptfast.nn.ConvReLUPool2d(3, 5, 3, stride=2)
    with pytest.raises(ValueError, match="groups"):
        ptfast.nn.ConvReLU2d(4, 4, 3, groups=2)
    same = ptfast.nn.ConvReLU2d(3, 5, 3, padding="same")
    assert same.fused_padding == 1


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_patched_vgg_matches_stock(channels_last, backend):
    """The ops run under an explicit backend. Under auto on a CPU the fused modules run the replaced modules' own
    math where the op's CPU route would compute just that (see ptfast.nn.conv._stock_math_on_cpu): every
    ConvReLU2d, and ConvReLUPool2d on channels-last input; an NCHW pool keeps the op (its channels-last pooling)."""
    stock = tiny_vgg()
    model = copy.deepcopy(stock)
    keys_before = list(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    ptfast.patch(model)
    report = model.ptfast_patch_report
    assert len(report.replaced) == 4, str(report)
    assert isinstance(model.features[0], ptfast.nn.ConvReLUPool2d)
    assert isinstance(model.features[3], ptfast.nn.ConvReLU2d)
    assert list(model.state_dict()) == keys_before
    assert [id(p) for p in model.parameters()] == params_before

    x = torch.randn(2, 3, 19, 17)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with record_dispatch() as events, ptfast.use_backend(backend):
        out = model(x)
        out.sum().backward()
    if backend == "torch":
        assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))
        assert_ran(events, "conv_relu", "torch", ("forward", "backward"))
    elif channels_last:
        assert events == []
    else:
        assert {e[0] for e in events} == {"conv_relu_pool"}
        assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))
    ref = stock(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), stock.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_patch_is_idempotent_and_checkpoints_round_trip():
    model = ptfast.patch(tiny_vgg())
    again = ptfast.patch(model)
    assert again is model and again.ptfast_patch_report.replaced == []
    stock = tiny_vgg()
    model.load_state_dict(stock.state_dict())  # an old checkpoint loads into the patched model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    stock.load_state_dict(torch.load(buf))  # and the patched model's checkpoint loads into stock
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(model(x), stock(x))
    torch.testing.assert_close(copy.deepcopy(model)(x), stock(x))


def test_hooks_and_opt_out_are_respected():
    model = tiny_vgg()
    seen = []
    model.features[4].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # the ReLU after conv 7
    ptfast.patch(model)
    assert type(model.features[3]) is nn.Conv2d and type(model.features[4]) is nn.ReLU
    model(torch.randn(1, 3, 8, 8))
    assert seen, "hooked ReLU must still run"
    assert any("hook" in s for s in model.ptfast_patch_report.skipped)

    untouched = ptfast.patch(tiny_vgg(), conv=False)
    assert not any(isinstance(m, ptfast.nn.ConvReLU2d) for m in untouched.modules())
    # Conv -> BN -> ReLU runs become the BatchNorm-aware fused modules (tests/test_patch_bn.py covers them),
    # never the plain conv+ReLU ones, which would drop the BatchNorm.
    bn = ptfast.patch(tiny_vgg(batch_norm=True))
    assert not any(type(m) in (ptfast.nn.ConvReLU2d, ptfast.nn.ConvReLUPool2d) for m in bn.modules())


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_modules_run_stock_math_on_cpu_under_auto(pool, channels_last):
    """Where auto's CPU route of the op would compute the replaced modules' own math, the module runs that math
    itself (no op, no ptfast Python): the same bits as stock, forward and every gradient. NCHW pooling, an empty
    batch and an explicit backend run the op."""
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    stock = nn.Sequential(conv, nn.ReLU(inplace=True), *([nn.MaxPool2d(2, 2)] if pool else []))
    cls = ptfast.nn.ConvReLUPool2d if pool else ptfast.nn.ConvReLU2d
    fused = cls.from_conv(copy.deepcopy(conv))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 13, 11).contiguous(memory_format=fmt).requires_grad_()
    takes_op = pool and not channels_last
    with record_dispatch() as events:
        out = fused(x)
        grads = torch.autograd.grad(out.square().sum(), (x, fused.weight, fused.bias))
    ref = stock(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    assert {e[0] for e in events} == ({"conv_relu_pool"} if takes_op else set())
    if not takes_op:  # the same ops in the same order: bitwise
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
    with record_dispatch() as events, ptfast.use_backend("torch"):
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-6)
    assert {e[0] for e in events} == {"conv_relu_pool" if pool else "conv_relu"}
    with record_dispatch() as events:
        assert fused(x[:0]).shape == (0, 7, *ref.shape[2:])
    assert {e[0] for e in events} == {"conv_relu_pool" if pool else "conv_relu"}


@pytest.mark.parametrize("pool", [False, True])
def test_fused_modules_leave_auto_to_the_op_where_a_kernel_runs_cpu_tensors(monkeypatch, pool):
    """Where a backend registered that it runs CPU tensors (Triton under TRITON_INTERPRET=1), auto on a CPU may pick
    a kernel: the module then runs the op, which decides (here Triton refuses, no interpreter: torch runs)."""
    monkeypatch.setattr(_dispatch, "_cpu_backends", {"triton"})
    conv = nn.Conv2d(5, 7, 3, padding=1)
    fused = (ptfast.nn.ConvReLUPool2d if pool else ptfast.nn.ConvReLU2d).from_conv(conv)
    x = torch.randn(3, 5, 13, 11).contiguous(memory_format=torch.channels_last)
    with record_dispatch() as events:
        fused(x)
    assert {e[:2] for e in events} == {("conv_relu_pool" if pool else "conv_relu", "torch")}


def test_one_channel_input_pools_through_the_op():
    """A one-channel NCHW image is channels-last contiguous too, but PyTorch's convolution keeps it (and its output)
    NCHW, whose max-pool is the slow one on a CPU: the op runs (its route pools in channels-last)."""
    fused = ptfast.nn.ConvReLUPool2d(1, 6, 3, padding=1)
    x = torch.randn(4, 1, 15, 13)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with record_dispatch() as events:
        fused(x).sum().backward()
    assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))
