"""ptfast.patch on a torchvision-shaped ``vgg*_bn`` (built here: no torchvision on CPU CI).

Conv2d -> BatchNorm2d -> ReLU [-> MaxPool2d(2, 2)] runs: BatchNorm folded into the fused conv on the fly in eval
mode, stock unfused math in training mode; state_dict keys, Parameter objects and hooks as stock.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ptfast
from ptfast.nn.conv import BatchNorm2dInFusedConv, ConvBN2d, ConvBNReLU2d, ConvBNReLUPool2d
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran

TOL64 = {"rtol": 1e-10, "atol": 1e-10}


class VGG(nn.Module):
    """torchvision's VGG module layout (module level so that whole-model pickling works)."""

    def __init__(self, layers: list[nn.Module], cin: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(cin * 4, 13), nn.ReLU(True), nn.Dropout(0.0), nn.Linear(13, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_vgg_bn(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """torchvision's vgg*_bn layout at toy width (odd channels), with random non-trivial BN statistics."""
    torch.manual_seed(seed)
    cfg = [5, 7, "M", 9, "M", 11]  # conv-bn-relu, conv-bn-relu-pool, conv-bn-relu-pool, conv-bn-relu
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            bn = nn.BatchNorm2d(v)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.3, 2.0)
            bn.num_batches_tracked.fill_(7)
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), bn, nn.ReLU(inplace=True)]
            cin = v

    return VGG(layers, cin).to(dtype)


def pair(dtype=torch.float64):
    stock = tiny_vgg_bn(dtype=dtype)
    return stock, ptfast.patch(copy.deepcopy(stock))


def bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def assert_same_step(model, stock, x, tol=TOL64):
    """One forward + backward on both: outputs, every parameter's grad and every BN buffer agree."""
    for m in (model, stock):
        m.zero_grad(set_to_none=True)
    out, ref = model(x), stock(x)
    torch.testing.assert_close(out, ref, **tol)
    (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    (ref * torch.arange(ref.numel(), dtype=ref.dtype).reshape(ref.shape)).sum().backward()
    for (n, p), (n2, q) in zip(model.named_parameters(), stock.named_parameters(), strict=True):
        assert n == n2
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)
    for (n, b), (_, c) in zip(model.named_buffers(), stock.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, **tol, msg=n)


def test_structure_keys_and_parameters_are_kept():
    stock = tiny_vgg_bn()
    model = copy.deepcopy(stock)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    bns = [model.features[k] for k in (1, 4, 8, 12)]
    ptfast.patch(model)
    f = model.features
    assert [type(f[k]) for k in (0, 3, 7, 11)] == [ConvBNReLU2d, ConvBNReLUPool2d, ConvBNReLUPool2d, ConvBNReLU2d]
    assert all(isinstance(f[k], nn.Conv2d) for k in (0, 3, 7, 11))
    assert [f[k] for k in (1, 4, 8, 12)] == bns  # the very same BN objects, in their slots
    assert all(isinstance(b, nn.BatchNorm2d) and type(b) is BatchNorm2dInFusedConv for b in bns)
    assert [f[k].bn for k in (0, 3, 7, 11)] == bns
    assert all(type(f[k]) is nn.Identity for k in (2, 5, 6, 9, 10, 13))
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    report = model.ptfast_patch_report
    assert len(report.replaced) == 4 and not report.skipped, str(report)
    assert all("folded BatchNorm on the fly in eval mode" in r for r in report.replaced)
    assert "features.3: Conv2d+BatchNorm2d+ReLU+MaxPool2d -> ConvBNReLUPool2d" in report.replaced[1]


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_mode_folds_and_matches_stock_fp64(channels_last):
    stock, model = pair()
    stock.eval(), model.eval()
    x = torch.randn(2, 3, 19, 17, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert all(model.features[k].uses_folded_bn() for k in (0, 3, 7, 11))
    with record_dispatch() as events:
        assert_same_step(model, stock, x)
    assert_ran(events, "conv_relu", "torch", ("forward", "backward"))
    assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))


def test_train_mode_is_stock_unfused_fp64():
    stock, model = pair()
    stock.train(), model.train()
    with record_dispatch() as events:
        for step in range(2):  # running stats and num_batches_tracked move the same way, step after step
            assert_same_step(model, stock, torch.randn(3, 3, 15, 13, dtype=torch.float64))
            assert int(model.features[1].num_batches_tracked) == 8 + step
    assert not any(e[0] in ("conv_relu", "conv_relu_pool") for e in events), events


def test_train_eval_train_switching():
    stock, model = pair()
    for mode in ("train", "eval", "train", "eval"):
        for m in (stock, model):
            m.train(mode == "train")
        with record_dispatch() as events:
            assert_same_step(model, stock, torch.randn(2, 3, 11, 10, dtype=torch.float64))
        assert any(e[0] == "conv_relu" for e in events) == (mode == "eval"), (mode, events)


def test_frozen_bn_in_a_training_model():
    """The usual fine-tuning setup: model.train() with BN layers put in eval mode and their params frozen."""
    stock, model = pair()
    for m in (stock, model):
        m.train()
        for bn in bn_modules(m):
            bn.eval()
            bn.requires_grad_(False)
    with record_dispatch() as events:
        assert_same_step(model, stock, torch.randn(2, 3, 12, 12, dtype=torch.float64))
    assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))
    assert all(b.weight.grad is None for b in bn_modules(model))


def test_bn_without_running_stats_uses_batch_statistics_in_eval():
    stock = tiny_vgg_bn()
    for bn in bn_modules(stock):
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    model = ptfast.patch(copy.deepcopy(stock))
    stock.eval(), model.eval()
    assert not model.features[0].uses_folded_bn()
    assert_same_step(model, stock, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_fold_reads_current_bn_state_no_stale_copies():
    stock, model = pair()
    stock.eval(), model.eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    model(x)
    with torch.no_grad():
        for m in (stock, model):
            m.features[4].running_mean.add_(0.5)
            m.features[4].weight.mul_(1.3)
    torch.testing.assert_close(model(x), stock(x), **TOL64)
    fresh = tiny_vgg_bn(seed=3)
    model.load_state_dict(fresh.state_dict(), strict=True)
    torch.testing.assert_close(model(x), fresh.eval()(x), **TOL64)


def test_state_dicts_load_both_ways_strictly():
    stock, model = pair()
    other = tiny_vgg_bn(seed=5)
    model.load_state_dict(other.state_dict(), strict=True)  # an old checkpoint loads into the patched model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    stock.load_state_dict(torch.load(buf), strict=True)  # and the patched model's checkpoint into stock
    stock.eval(), model.eval()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    torch.testing.assert_close(model(x), stock(x), **TOL64)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_conv_and_bn_linked(how):
    stock, model = pair()
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert clone.features[0].bn is clone.features[1] and clone.features[1] is not model.features[1]
    assert list(clone.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    for mode in (False, True):
        for m in (stock, clone):
            m.train(mode)
        assert_same_step(clone, stock, x)


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_hooked_conv_bn_or_relu_is_not_fused(slot):
    """A hooked conv or BN keeps the whole run stock; a hooked ReLU keeps the ReLU module (its hook sees the same
    values), while conv + BN before it are still folded into one ConvBN2d."""
    stock, _ = pair()
    model = copy.deepcopy(stock)
    seen, seen_stock = [], []
    model.features[slot].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    stock.features[slot].register_forward_hook(lambda m, i, o: seen_stock.append(o.detach().clone()))
    ptfast.patch(model)
    conv_type = ConvBN2d if slot == 2 else nn.Conv2d
    assert [type(model.features[k]) for k in (0, 2)] == [conv_type, nn.ReLU]
    assert type(model.features[1]) is (BatchNorm2dInFusedConv if slot == 2 else nn.BatchNorm2d)
    assert type(model.features[3]) is ConvBNReLUPool2d  # the other runs are still fused
    lines = model.ptfast_patch_report.skipped + model.ptfast_patch_report.replaced
    assert any(s.startswith("features.0") and "hook" in s for s in lines), lines
    stock.eval(), model.eval()
    assert_same_step(model, stock, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert seen and len(seen) == len(seen_stock)
    for ours, theirs in zip(seen, seen_stock, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_hooked_pool_is_kept_and_the_rest_fused():
    stock, _ = pair()
    model = copy.deepcopy(stock)
    model.features[6].register_forward_pre_hook(lambda m, i: None)
    ptfast.patch(model)
    assert type(model.features[3]) is ConvBNReLU2d and type(model.features[6]) is nn.MaxPool2d
    for mode in (True, False):
        for m in (stock, model):
            m.train(mode)
        assert_same_step(model, stock, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_idempotent_opt_out_and_unsupported():
    model = ptfast.patch(tiny_vgg_bn())
    keys = list(model.state_dict())
    assert ptfast.patch(model).ptfast_patch_report.replaced == []
    assert list(model.state_dict()) == keys

    untouched = ptfast.patch(tiny_vgg_bn(), conv=False)
    assert not any(isinstance(m, (ConvBNReLU2d, BatchNorm2dInFusedConv)) for m in untouched.modules())

    class MyBN(nn.BatchNorm2d):
        pass

    odd = tiny_vgg_bn()
    odd.features[1] = MyBN(5).double()  # a BN subclass may do anything in forward: not fused
    odd.features[4] = nn.SyncBatchNorm(7).double()
    ptfast.patch(odd)
    assert type(odd.features[0]) is nn.Conv2d and type(odd.features[3]) is nn.Conv2d
    assert sum("not a plain nn.BatchNorm2d" in s for s in odd.ptfast_patch_report.skipped) == 2
    assert type(odd.features[7]) is ConvBNReLUPool2d


def test_module_constructors():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    with pytest.raises(TypeError, match="from_conv_bn"):
        ConvBNReLU2d(3, 5, 3, padding=1)
    with pytest.raises(TypeError, match="from_conv_bn"):
        ConvBNReLU2d.from_conv(conv)
    with pytest.raises(ValueError, match="features"):
        ConvBNReLU2d.from_conv_bn(conv, nn.BatchNorm2d(4))
    assert type(bn) is nn.BatchNorm2d  # a refused BN is left as it was
    fused = ConvBNReLUPool2d.from_conv_bn(conv, bn)
    assert fused.weight is conv.weight and list(fused.state_dict()) == list(conv.state_dict())
    assert "computed by the preceding fused conv" in repr(bn)


def test_fp32_eval_close_to_stock():
    stock, model = pair(torch.float32)
    stock.eval(), model.eval()
    assert_same_step(model, stock, torch.randn(2, 3, 13, 14), tol={"rtol": 1e-4, "atol": 1e-4})


def test_compiles_fullgraph_in_both_modes():
    stock, model = pair(torch.float32)
    x = torch.randn(2, 3, 12, 12)
    for mode in (False, True):
        for m in (stock, model):
            m.train(mode)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), stock(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.features[4].running_var, stock.features[4].running_var)
