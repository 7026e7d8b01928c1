"""The max-pools ``ptfast.patch`` leaves unfused, pooled in channels-last on a CPU (ptfast/nn/pool.py).

The claim is "stock's result bit for bit", so the reference is stock ``nn.MaxPool2d`` itself (NCHW), on inputs
built to hit what could differ between PyTorch's two CPU kernels: exact ties (small integers), NaNs, padding,
ceil_mode, dilation, overlapping windows; values and the gradient's destination.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptfast
import ptfast.nn.pool as pool_module
from ptfast.nn.pool import ChannelsLastMaxPool2d
from tests import seed_models as sm

SETTINGS = [
    dict(kernel_size=3, stride=2, padding=1),  # ResNet's stem
    dict(kernel_size=2, stride=2),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=2),  # stride None: the kernel size
]


def _input(nan: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (3, 5, 17, 15), generator=g).float()
    if nan:
        x[0, 1, 3, 4] = x[0, 1, 3, 5] = x[1, 2, 0, 0] = x[2, 4, 16, 14] = math.nan
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("nan", [False, True], ids=["ties", "nan"])
def test_values_and_gradients_are_stocks_bit_for_bit(settings, nan):
    stock = nn.MaxPool2d(**settings)
    ours = copy.deepcopy(stock)
    ours.__class__ = ChannelsLastMaxPool2d
    x = _input(nan)
    grad = torch.randn(stock(x).shape, generator=torch.Generator().manual_seed(1))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_stock, out_ours = stock(a), ours(b)
    assert out_ours.is_contiguous() and out_ours.shape == out_stock.shape
    assert _same(out_ours, out_stock)
    (da,) = torch.autograd.grad(out_stock, a, grad)
    (db,) = torch.autograd.grad(out_ours, b, grad)
    assert db.is_contiguous() and _same(db, da)
    with torch.no_grad():
        assert _same(ours(x), stock(x))


def test_the_channels_last_kernel_really_runs(monkeypatch):
    """Otherwise the bit-for-bit test above would pass by running stock's own NCHW kernel."""
    seen = []
    real = pool_module._POOL

    def spy(x, *args):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *args)

    monkeypatch.setattr(pool_module, "_POOL", spy)
    pool = nn.MaxPool2d(3, 2, 1)
    pool.__class__ = ChannelsLastMaxPool2d
    pool(_input(False).requires_grad_()).sum().backward()
    assert seen == [True]


def test_other_inputs_run_stock_unchanged():
    pool = nn.MaxPool2d(2)
    pool.__class__ = ChannelsLastMaxPool2d
    for x in (
        _input(False).double(),  # not fp32
        _input(False)[:, :1],  # one channel: both layouts are the same memory
        _input(False).contiguous(memory_format=torch.channels_last),  # stock's CL kernel already
        _input(False)[0],  # 3-d (C, H, W)
        torch.empty(0, 5, 6, 6),
    ):
        torch.testing.assert_close(pool(x), F.max_pool2d(x, 2), rtol=0, atol=0)
    pool.return_indices = True
    out, index = pool(_input(False))
    ref, ref_index = F.max_pool2d(_input(False), 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(index, ref_index)


def test_patch_switches_unfused_pools_only_and_keeps_the_model_working():
    torch.manual_seed(0)
    stock = sm.resnet18()
    model = ptfast.patch(copy.deepcopy(stock))
    assert type(model.maxpool) is ChannelsLastMaxPool2d and isinstance(model.maxpool, nn.MaxPool2d)
    assert any("maxpool (MaxPool2d" in line for line in model.ptfast_patch_report.replaced)
    assert type(pickle.loads(pickle.dumps(model)).maxpool) is ChannelsLastMaxPool2d
    # A hooked pool (a feature extractor taps it) and a subclass stay as they are.
    hooked, sub = nn.MaxPool2d(2), type("MyPool", (nn.MaxPool2d,), {})(2)
    hooked.register_forward_hook(lambda *a: None)
    seq = ptfast.patch(nn.Sequential(hooked, sub))
    assert type(seq[0]) is nn.MaxPool2d and type(seq[1]).__name__ == "MyPool"
    model.eval(), stock.eval()
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-4, atol=1e-5)


def test_compiles_without_a_graph_break():
    pool = nn.MaxPool2d(3, 2, 1)
    pool.__class__ = ChannelsLastMaxPool2d
    x = _input(False).requires_grad_()
    out = torch.compile(pool, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1))
