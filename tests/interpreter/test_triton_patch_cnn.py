"""``ptfast.patch`` on the seed CNNs with the triton backend under the interpreter (fp32, small shapes).

The same models as tests/test_patch_cnn.py (the attribute-style VGG; ResNets with BasicBlock and Bottleneck
blocks): patched models trained and evaluated with every conv chain on the Triton kernels must match the stock
model in fp32 (the kernels accumulate in another order: tolerances of fp32 rounding over a few layers).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.testing import record_dispatch
from tests import seed_models as sm

TOL = {"rtol": 2e-4, "atol": 2e-5}


def _pair(make):
    torch.manual_seed(0)
    stock = sm.randomize_batch_norms(make())
    return stock, ptfast.patch(copy.deepcopy(stock))


def _vgg():
    return sm.AttributeVGG(widths=(4, 8, 8, 8, 8))


def _tiny_resnet(block):
    return lambda: sm.ResNet(block, [1, 1, 1, 1], num_classes=5, width=4)


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (_vgg, 32),
        (_tiny_resnet(sm.BasicBlock), 19),
        (_tiny_resnet(sm.Bottleneck), 17),
    ],
    ids=["attribute-vgg", "basic-block", "bottleneck"],
)
def test_patched_model_on_triton_matches_stock(make, size):
    stock, ours = _pair(make)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.tensor([1, 3])
    stock.eval(), ours.eval()
    with ptfast.use_backend("triton"), record_dispatch() as events, torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), **TOL)
    assert {(op, backend) for op, backend, _ in events} <= {("conv_relu", "triton"), ("conv_relu_pool", "triton")}
    assert events
    stock.train(), ours.train()
    with ptfast.use_backend("triton"), record_dispatch() as events:
        losses = [F.cross_entropy(m(x), labels) for m in (stock, ours)]
        for loss in losses:
            loss.backward()
    if make is not _vgg:  # ResNets: BN on batch statistics, then each block tail's add + ReLU on the Triton kernel
        blocks = sum(1 for m in ours.modules() if isinstance(m, (sm.BasicBlock, sm.Bottleneck)))
        assert events.count(("add_relu", "triton", "forward")) == blocks
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    for (name, p), q in zip(stock.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, b), c in zip(stock.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(c, b, **TOL, msg=name)
