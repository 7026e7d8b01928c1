"""``ptfast.add_relu`` on CUDA tensors, cuda and triton backends (the block tail of a ResNet trained with BatchNorm
on batch statistics): the float64 oracle in fp32, DESIGN §4's rule in bf16/fp16, both layouts, odd shapes, a
ResNet-50 layer-1-sized activation, and the edge cases. Only collected with a GPU; a backend that cannot run here
is skipped."""

from __future__ import annotations

import pytest
import torch

from tests import add_relu_cases as cases
from tests.test_gpu_conv_backends import _require

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
SHAPES = [(3, 5, 7, 9), (2, 64, 29, 27), (2, 300, 3, 1), (5, 256, 56, 56)]


@pytest.mark.parametrize("shape", SHAPES, ids=["tiny", "c64-odd", "c300-1px", "r50-layer1"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle(backend, dtype, layout, shape):
    _require(backend)
    cases.check(backend, shape, dtype, layout, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, dtype):
    _require(backend)
    cases.check_edge_cases(backend, dtype, device="cuda")
