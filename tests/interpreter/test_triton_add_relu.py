"""``ptfast.add_relu`` on the triton backend under TRITON_INTERPRET=1 (CPU tensors), and the shared
bias/residual/ReLU kernel writing a separate output.

Runs only in the interpreter process (``python tests/run.py``). fp32 against the float64 oracle, fp16 by DESIGN
§4's rule (the interpreter rounds bf16 wrongly: bf16 runs on the GPU). Shapes are odd and cover every block
config of the kernel (inner dimension H*W in NCHW or C in channels_last: <= 16, <= 64, <= 256, > 256).
"""

from __future__ import annotations

import pytest
import torch

from ptfast.backends.triton import bias_relu as kernel
from tests import add_relu_cases as cases

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((3, 5, 3, 5), "nchw"),  # H*W 15
        ((2, 37, 5, 3), "channels_last"),  # C 37
        ((2, 3, 9, 11), "nchw"),  # H*W 99
        ((2, 300, 3, 1), "channels_last"),  # C 300: two column tiles of 256
        ((1, 2, 35, 37), "nchw"),  # H*W 1295: two tiles of 1024
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_oracle(shape, layout, dtype):
    cases.check("triton", shape, dtype, layout)


def test_edge_cases():
    cases.check_edge_cases("triton", torch.float32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_separate_output_matches_in_place(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(2)
    y, bias, res = (torch.randn(s, generator=gen) for s in ((2, 7, 5, 3), (7,), (2, 7, 5, 3)))
    y, res = y.contiguous(memory_format=fmt), res.contiguous(memory_format=fmt)
    out = kernel.bias_relu(y, bias, res)
    assert out.data_ptr() != y.data_ptr() and out.is_contiguous(memory_format=fmt)
    expected = kernel.bias_relu_(y.clone(), bias, res)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="out must match"):
        kernel.bias_relu(y, bias, res, out=torch.empty(2, 7, 5, 3).contiguous(memory_format=torch.channels_last)
                         if not channels_last else torch.empty(2, 7, 5, 3))  # fmt: skip
