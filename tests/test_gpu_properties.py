"""Property-based tests of every op on every backend that runs on a CUDA GPU, with the real kernels.

The cases and checks of the main tier (``tests/property_strategies.py``), drawn on larger shapes (several
kernel tiles in every direction, head dims up to 256, vocabularies and channel counts past one tile) with more
examples, in bf16, fp16 and fp32. Inputs are made on the CPU from a seeded generator and moved; the float64
oracle runs on the CPU on exactly what the GPU saw. bf16 / fp16 follow the low-precision rule of docs/design.md §5
against PyTorch's own op in the same dtype on the GPU; fp32 attention and masked-LM loss are tight against the
oracle with TF32 off (fixture below); fp32 convolutions use the rule, as cuDNN runs them in TF32 by default in both
ours and PyTorch's. Backends: triton (the conv also on each of its algorithm mixes), torch, and cuda for the conv
when the extension is built (skipped with its reason otherwise).

Only collected with a GPU (marker ``gpu``; ``python tests/run.py --gpu``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.property_strategies import (
    AttentionCase,
    MaskSpec,
    MlmCase,
    attention_cases,
    check_attention,
    check_attention_varlen,
    check_conv,
    check_masked_lm_loss,
    conv_cases,
    mlm_cases,
    varlen_cases,
)

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])
HEAD_DIMS = [1, 16, 24, 40, 64, 72, 96, 128, 256]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 matmuls (and so the fp32 kernels' tl.dot) in IEEE fp32; convolutions keep cuDNN's default."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _require(backend: str) -> None:
    device = torch.device(DEV)
    if backend == "triton":
        from ptfast.backends import triton as triton_backend

        reason = triton_backend.device_reason(device)
    elif backend == "cuda":
        from ptfast.backends import cuda as cuda_backend

        reason = cuda_backend.unavailable_reason(device)
    else:
        reason = None
    if reason is not None:
        pytest.skip(reason)


# --- attention --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(max_examples=100)
@given(case=attention_cases(max_len=300, head_dims=HEAD_DIMS, max_batch=3, max_heads=4), dtype=DTYPES)
@example(  # BERT-like: right padding, HF layout, dropout 0.1, several tiles each way
    case=AttentionCase(b=3, h=4, lq=128, lk=128, d=64, q_layout="hf", kv_layout="hf", key_mask="right",
                       dropout_p=0.1, seed=1),
    dtype=torch.bfloat16,
)  # fmt: skip
@example(  # long causal with a broadcast bool mask, odd lengths, head dim 256
    case=AttentionCase(b=1, h=2, lq=257, lk=301, d=256, mask=MaskSpec("bool", (257, 301), False, 0.95), causal=True,
                       seed=2),
    dtype=torch.float16,
)  # fmt: skip
def test_attention_matches_oracle(backend, case, dtype):
    _require(backend)
    check_attention(case, dtype, backend, DEV)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(max_examples=50)
@given(case=varlen_cases(max_len=300, max_seqs=6, head_dims=HEAD_DIMS, max_heads=4), dtype=DTYPES)
def test_attention_varlen_matches_oracle(backend, case, dtype):
    _require(backend)
    check_attention_varlen(case, dtype, backend, DEV)


# --- masked_lm_loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(max_examples=100)
@given(case=mlm_cases(max_rows=400, max_e=200, max_vocab=1500), dtype=DTYPES)
# a bug the interpreter tier caught: the triton kernels read a non-contiguous bias (here b[::2]) as if contiguous
@example(
    case=MlmCase(lead=(8, 37), e=96, vocab=515, weight_layout="sliced", grad_scale=0.37, seed=1), dtype=torch.bfloat16
)
def test_masked_lm_loss_matches_oracle(backend, case, dtype):
    _require(backend)
    check_masked_lm_loss(case, dtype, backend, DEV)


# --- conv_relu / conv_relu_pool ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@settings(max_examples=80)
@given(
    case=conv_cases(max_n=3, channels=(1, 3, 5, 16, 32, 64), couts=(1, 3, 17, 64, 130), max_hw=33,
                    kernels=((1, 1), (3, 3), (5, 5), (3, 1)), algos=True),
    dtype=DTYPES,
)  # fmt: skip
def test_conv_matches_oracle_or_refuses(backend, case, dtype):
    _require(backend)
    check_conv(case, dtype, backend, DEV, rule_fp32=True)
