"""``ptfast.patch`` on the CNNs users bring (docs/design.md §1): attribute-style and functional VGGs,
ResNet-18 / ResNet-50 in torchvision's layout (tests/seed_models.py), fine-tuned, frozen, then unfrozen.

Patched models must compute what the stock ones compute (float64 here, so "the same" means to rounding), keep
their classes, parameter objects and state_dict keys, and say in ``ptfast_patch_report`` what was fused and,
for every conv that was not, why.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptfast
from ptfast import _dispatch
from ptfast.nn.conv import ConvBN2d, ConvBNReLU2d, ConvReLUPool2d
from ptfast.testing import record_dispatch
from tests import seed_models as sm
from tests.helpers import assert_rule

TOL = {"rtol": 1e-9, "atol": 1e-9}


def _pair(make, seed=0):
    torch.manual_seed(seed)
    stock = sm.randomize_batch_norms(make().double(), seed)
    return stock, ptfast.patch(copy.deepcopy(stock))


def _image(n=3, h=37, w=29, channels_last=False, seed=1):
    x = torch.randn(n, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _assert_same_train_steps(stock, ours, x, steps=2):
    """SGD + momentum steps on both: same losses, gradients, parameters and BN buffers after each step."""
    labels = torch.arange(x.shape[0]) % 10
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (stock, ours)]
    for _ in range(steps):
        losses = []
        for model, opt in zip((stock, ours), opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], **TOL)
        for (name, p), q in zip(stock.named_parameters(), ours.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
            torch.testing.assert_close(q, p, **TOL, msg=name)
        for (name, b), c in zip(stock.named_buffers(), ours.buffers(), strict=True):
            torch.testing.assert_close(c, b, **TOL, msg=name)


# --- seed 4: a VGG written by hand ------------------------------------------------------------------------------


def test_attribute_vgg_is_fully_fused_and_trains_like_stock():
    stock, ours = _pair(sm.AttributeVGG)
    report = ours.ptfast_patch_report  # (32x32 images: the five stages pool CIFAR-10's size down to 1x1)
    assert len(report.replaced) == 5 and not report.skipped, str(report)
    assert all(f"conv{i}: Conv2d+ReLU+MaxPool2d -> ConvReLUPool2d" in report.replaced[i - 1] for i in range(1, 6))
    assert all(type(getattr(ours, f"conv{i}")) is ConvReLUPool2d for i in range(1, 6))
    assert all(type(getattr(ours, f"{k}{i}")) is nn.Identity for i in range(1, 6) for k in ("relu", "pool"))
    assert type(ours) is sm.AttributeVGG and list(ours.state_dict()) == list(stock.state_dict())
    x = _image(2, 32, 32)
    with record_dispatch() as events:
        _assert_same_train_steps(stock, ours, x)
    assert any(op == "conv_relu_pool" for op, _, _ in events)
    stock.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), **TOL)


def test_functional_vgg_is_reported_not_changed():
    """F.relu / torch.relu / .relu() in the forward's code: no module swap can remove them, and the report says so;
    the model (its Softmax included) computes exactly what it did."""
    stock, ours = _pair(sm.FunctionalVGG)
    report = ours.ptfast_patch_report
    assert report.replaced == [], str(report)
    assert [s.split(":")[0] for s in report.skipped] == ["conv1 (Conv2d)", "conv2 (Conv2d)", "conv3 (Conv2d)"]
    for line, call in zip(report.skipped, ("F.relu", "torch.relu", ".relu()"), strict=True):
        assert call in line, line
    x = _image(2, 32, 32)
    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=0)


# --- seeds 2 and 3: ResNet --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [sm.resnet18, sm.resnet50], ids=["resnet18", "resnet50"])
def test_resnet_blocks_are_fused(make):  # patching only: full size is cheap
    stock, ours = _pair(make)
    report = ours.ptfast_patch_report
    blocks = [m for m in ours.modules() if isinstance(m, (sm.BasicBlock, sm.Bottleneck))]
    assert not report.skipped, str(report)
    assert all(type(b).__name__ == f"Fused{type(b).__mro__[2].__name__}" for b in blocks)
    assert type(ours.conv1) is ConvBNReLU2d and type(ours.relu) is nn.Identity  # the 7x7 stride-2 stem
    assert all(type(m) is ConvBN2d for name, m in ours.named_modules() if name.endswith("downsample.0"))
    convs_per_block = 3 if make is sm.resnet50 else 2
    fused_lines = [r for r in report.replaced if "fused block" in r]
    assert len(fused_lines) == len(blocks)
    assert all(r.count("->") == convs_per_block and "conv_relu(residual)" in r for r in fused_lines)
    assert type(ours) is sm.ResNet and list(ours.state_dict()) == list(stock.state_dict())
    assert [id(p) for p in ours.parameters()] != [id(p) for p in stock.parameters()]  # a deep copy was patched


@pytest.mark.parametrize(
    ("make", "channels_last"),
    [
        (sm.resnet18, False),
        (sm.resnet18, True),
        (sm.small_bottleneck_resnet, False),
        (sm.small_bottleneck_resnet, True),
        (sm.resnet50, True),
    ],
    ids=["resnet18-nchw", "resnet18-channels_last", "bottleneck-nchw", "bottleneck-channels_last", "resnet50"],
)
def test_resnet_eval_and_training_match_stock(make, channels_last):
    stock, ours = _pair(make)
    if channels_last:
        stock, ours = stock.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    x = _image(2, 37, 29, channels_last)  # odd sizes through every stride-2 layer
    stock.eval(), ours.eval()
    with record_dispatch() as events, torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), **TOL)
    ran = [op for op, backend, phase in events if phase == "forward"]
    assert ran.count("conv_relu") == sum(1 for m in ours.modules() if isinstance(m, nn.Conv2d)) - sum(
        1 for name, _ in ours.named_modules() if name.endswith("downsample.0")
    )
    stock.train(), ours.train()
    with record_dispatch() as events, ptfast.use_backend("torch"):
        _assert_same_train_steps(stock, ours, x)
    # Training mode: BN on batch statistics runs stock between conv and the fused add + ReLU of each block tail.
    blocks = sum(1 for m in ours.modules() if isinstance(m, (sm.BasicBlock, sm.Bottleneck)))
    assert [e for e in events if e[0] != "add_relu"] == []
    assert events.count(("add_relu", "torch", "forward")) == 2 * blocks
    # Under auto on a CPU that plan is stock's own composition (nothing to fold or pool): the blocks' stock forward.
    with record_dispatch() as events:
        _assert_same_train_steps(stock, ours, x)
    assert events == []


def test_training_mode_blocks_run_their_plan_where_a_kernel_runs_cpu_tensors(monkeypatch):
    """Where a backend registered that it runs CPU tensors (Triton under TRITON_INTERPRET=1), auto on a CPU may pick
    kernels for the plan's ops: the blocks run their plan, not their stock forward (here Triton refuses, no
    interpreter, so the ops run torch)."""
    monkeypatch.setattr(_dispatch, "_cpu_backends", {"triton"})
    stock, ours = _pair(sm.resnet18)
    stock.train(), ours.train()
    x = _image(2, 37, 29, False)
    with record_dispatch() as events:
        out = ours(x)
    blocks = sum(1 for m in ours.modules() if isinstance(m, (sm.BasicBlock, sm.Bottleneck)))
    assert events.count(("add_relu", "torch", "forward")) == blocks
    torch.testing.assert_close(out, stock(x), **TOL)


def test_resnet_training_mode_is_bitwise_stock_in_fp32():
    """conv and BN run stock; add_relu's torch backend is stock's add + ReLU: not a bit may differ (outputs,
    every gradient, BN running statistics), in both layouts."""
    torch.manual_seed(4)
    stock = sm.randomize_batch_norms(sm.resnet18(), 4)
    ours = ptfast.patch(copy.deepcopy(stock))
    for channels_last in (False, True):
        # Batch 4, not 3: PyTorch 2.13's oneDNN corrupts the heap in the backward of stock's 1x1 stride-2 downsample
        # conv at batch 3 (or 5), 8 -> 16 channels, 10x8, channels-last fp32, 2 threads, on AVX-512 CPUs: stock alone
        # aborts (reproducer in the stop-24 note). Not ptfast's code; the spatial sizes stay odd.
        x = _image(4, 37, 29, channels_last).float()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        s, o = (copy.deepcopy(m).to(memory_format=fmt).train() for m in (stock, ours))
        with record_dispatch() as events, ptfast.use_backend("torch"):  # the plan (auto on a CPU: stock forward)
            out = o(x)
            out.square().sum().backward()
        ref = s(x)
        ref.square().sum().backward()
        assert ("add_relu", "torch", "forward") in events
        assert torch.equal(out, ref)
        for (name, p), q in zip(s.named_parameters(), o.parameters(), strict=True):
            assert torch.equal(q.grad, p.grad), name
        for (name, b), c in zip(s.named_buffers(), o.buffers(), strict=True):
            assert torch.equal(c, b), name


def test_frozen_backbone_then_unfrozen():
    """Seed 3: a frozen backbone in eval mode saves nothing for backward; unfrozen, it trains like stock."""
    stock, ours = _pair(sm.small_bottleneck_resnet)
    for model in (stock, ours):
        for p in model.parameters():
            p.requires_grad = False
        model.fc = nn.Linear(model.fc.in_features, 7).double()
        model.eval()
    ours.fc.load_state_dict(stock.fc.state_dict())
    x = _image(4, 25, 23)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        features = nn.Sequential(*list(ours.children())[:-1])(x)
    assert saved == [] and features.grad_fn is None
    labels = torch.tensor([0, 3, 6, 2])
    opts = [torch.optim.SGD(m.fc.parameters(), lr=0.1, momentum=0.9) for m in (stock, ours)]
    for _ in range(2):
        for model, opt in zip((stock, ours), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            opt.step()
    torch.testing.assert_close(ours.fc.weight, stock.fc.weight, **TOL)
    # Unfrozen for full fine-tuning: BN back in training mode, its statistics updating exactly as stock.
    for model in (stock, ours):
        for p in model.parameters():
            p.requires_grad = True
        model.train()
    _assert_same_train_steps(stock, ours, x)


def test_optimizer_checkpoints_copies_and_pickles_survive():
    torch.manual_seed(0)
    stock = sm.randomize_batch_norms(sm.resnet18().double())
    model = copy.deepcopy(stock)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before patching
    params = [id(p) for p in model.parameters()]
    ptfast.patch(model)
    assert [id(p) for p in model.parameters()] == params
    assert isinstance(model.layer1[0], sm.BasicBlock) and model.layer1[0].stride == 1
    x = _image(2, 32, 32)
    model.eval()
    ref = model(x)
    clones = [copy.deepcopy(model), torch.load(_saved(model), weights_only=False), pickle.loads(pickle.dumps(model))]
    for clone in clones:
        assert type(clone.layer1[0]) is type(model.layer1[0])
        torch.testing.assert_close(clone(x), ref, **TOL)
    fresh = sm.resnet18().double()
    fresh.load_state_dict(model.state_dict())  # patched -> stock checkpoint
    model.load_state_dict(stock.state_dict())  # stock -> patched checkpoint
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    assert all(opt.state[p]["momentum_buffer"] is not None for p in model.parameters())


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_patch_is_idempotent():
    stock, ours = _pair(sm.resnet18)
    again = ptfast.patch(ours)
    assert again is ours and again.ptfast_patch_report.replaced == [] == again.ptfast_patch_report.skipped
    ours.eval(), stock.eval()
    x = _image(2, 32, 32)
    torch.testing.assert_close(ours(x), stock(x), **TOL)


def test_hook_added_after_patching_still_fires():
    """The fused block skips its modules' calls; a hook put on one later sends that chain back to stock steps."""
    stock, ours = _pair(sm.resnet18)
    stock.eval(), ours.eval()
    seen, seen_stock = [], []
    ours.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    stock.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen_stock.append(o.clone()))
    x = _image(2, 32, 32)
    torch.testing.assert_close(ours(x), stock(x), **TOL)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], seen_stock[0], **TOL)


class _Odd(nn.Module):
    """One conv for each reason the report gives."""

    def __init__(self) -> None:
        super().__init__()
        self.tanh_conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tanh = nn.Tanh()
        self.twice_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.hooked_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.stride3_conv = nn.Conv2d(4, 4, 3, stride=3, padding=1)
        self.relu3 = nn.ReLU()
        self.branchy = _Branchy()

    def forward(self, x):
        x = self.tanh(self.tanh_conv(x))
        y = self.twice_conv(x)
        x = self.relu(y) + y
        x = self.relu2(self.hooked_conv(x))
        x = self.relu3(self.stride3_conv(x))
        return self.branchy(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot read this forward
            return self.relu(self.conv(x))
        return self.conv(x)


def test_report_names_every_conv_not_fused_and_why():
    torch.manual_seed(0)
    stock = _Odd().double()
    ours = copy.deepcopy(stock)
    ours.hooked_conv.register_forward_hook(lambda m, i, o: None)
    ptfast.patch(ours)
    report = ours.ptfast_patch_report
    why = {line.split(" ")[0]: line for line in report.skipped}
    assert report.replaced == [], str(report)
    assert "followed by Tanh" in why["tanh_conv"]
    assert "used twice" in why["twice_conv"]
    assert "hook" in why["hooked_conv"]
    assert "stride 3 unsupported" in why["stride3_conv"]
    assert "could not trace _Branchy.forward" in why["branchy.conv"]
    x = _image(2, 13, 11)
    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=0)


def test_verbose_prints_the_report(capsys):
    ptfast.patch(sm.AttributeVGG(), verbose=True)
    out = capsys.readouterr().out
    assert "5 replaced, 0 left alone" in out and "conv3: Conv2d+ReLU+MaxPool2d -> ConvReLUPool2d" in out


def test_compiled_patched_resnet_matches_eager():
    stock, ours = _pair(sm.resnet18)
    ours.eval()
    x = _image(2, 32, 32)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x), **TOL)


def test_autocast_bf16_eval_follows_the_low_precision_rule():
    """Mixed precision (CPU autocast, bf16): the patched model's error against the float64 model is within
    DESIGN §4's bound of the stock model's error under the same autocast."""
    stock64, _ = _pair(sm.resnet18)
    stock64.eval()
    stock, ours = copy.deepcopy(stock64).float(), ptfast.patch(copy.deepcopy(stock64).float())
    x = _image(2, 32, 32)
    with torch.no_grad():
        ref = stock64(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs, got = stock(x.float()), ours(x.float())
    assert got.dtype == theirs.dtype
    assert_rule(got.float(), theirs.float(), ref, "logits")


def test_folded_weights_follow_every_change_of_a_frozen_model():
    """The fold of a frozen BatchNorm is computed once and reused: any change to the conv or BN tensors (in place,
    load_state_dict, a dtype change) must be seen by the next forward."""
    stock, ours = _pair(sm.resnet18)
    for model in (stock, ours):
        model.eval()
        model.requires_grad_(False)
    x = _image(2, 32, 32)
    torch.testing.assert_close(ours(x), stock(x), **TOL)
    with torch.no_grad():
        for model in (stock, ours):
            model.layer1[0].bn1.running_mean.add_(0.3)  # in place
            model.conv1.weight.mul_(1.1)  # the stem's fused ConvBNReLU2d
            model.layer2[0].downsample[1].bias.sub_(0.2)  # ConvBN2d
    torch.testing.assert_close(ours(x), stock(x), **TOL)
    other = sm.randomize_batch_norms(sm.resnet18().double(), seed=5)
    stock.load_state_dict(other.state_dict()), ours.load_state_dict(other.state_dict())
    torch.testing.assert_close(ours(x), stock(x), **TOL)
    stock.float(), ours.float()
    torch.testing.assert_close(ours(x.float()), stock(x.float()), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x.float()), stock(x.float()), rtol=1e-5, atol=1e-5)
    probe = x.float().requires_grad_()  # frozen weights, an input that needs grad: folds cached above are usable
    (dx,) = torch.autograd.grad(ours(probe).sum(), probe)
    (dx_stock,) = torch.autograd.grad(stock(probe).sum(), probe)
    torch.testing.assert_close(dx, dx_stock, rtol=1e-4, atol=1e-5)


class _FunctionalStage(nn.Module):
    """A submodule written with functional calls: module swaps cannot fuse it, a fused block can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv_a(x)), 2)
        return torch.relu(self.conv_b(y) + y)


def test_functional_submodule_becomes_a_fused_block_that_pickles():
    torch.manual_seed(0)
    stock = nn.Sequential(_FunctionalStage(), nn.Flatten()).double()
    ours = ptfast.patch(copy.deepcopy(stock))
    (line,) = ours.ptfast_patch_report.replaced
    assert "conv_a+F.relu+F.max_pool2d -> conv_relu_pool" in line and "conv_relu(residual)" in line, line
    x = _image(2, 11, 9)
    for clone in (ours, pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        with record_dispatch() as events:
            torch.testing.assert_close(clone(x), stock(x), **TOL)
        assert {op for op, _, _ in events} == {"conv_relu", "conv_relu_pool"}
