"""Property-based tests (hypothesis, derandomized, fixed example count per test): every op on the torch backend
against its float64 oracle, drawing many knobs at once (see ``tests/property_strategies.py`` for the cases and the
checks). Mostly float64 inputs, so any disagreement is a semantic difference, not rounding; float32 is checked
tightly too and bfloat16 by the low-precision rule against PyTorch's own op in bf16.

The triton backend runs the same checks under the interpreter (``tests/interpreter/test_triton_properties.py``)
and every backend on a GPU (``tests/test_gpu_properties.py``). Failing examples found by hypothesis are kept as
``@example`` regression cases, each with a comment saying what it caught.
"""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.property_strategies import (
    AttentionCase,
    ConvCase,
    MaskSpec,
    MlmCase,
    VarlenCase,
    attention_cases,
    check_attention,
    check_attention_varlen,
    check_conv,
    check_masked_lm_loss,
    conv_cases,
    mlm_cases,
    varlen_cases,
)

BACKEND = "torch"
# float64 most of the time (semantics), float32 (tight) and bfloat16 (the low-precision rule) too.
DTYPES = st.sampled_from([torch.float64, torch.float64, torch.float32, torch.bfloat16])


@settings(max_examples=100)
@given(case=attention_cases(max_len=21, head_dims=[1, 3, 8, 16]), dtype=DTYPES)
# corners kept whatever hypothesis draws: no batch; no keys at all; one query one key with every mask form
@example(case=AttentionCase(b=0, h=2, lq=3, lk=5, d=3, key_mask="right", causal=True), dtype=torch.float64)
@example(case=AttentionCase(b=2, h=1, lq=4, lk=0, d=3, key_mask="all", dropout_p=0.3), dtype=torch.float64)
@example(
    case=AttentionCase(b=1, h=1, lq=1, lk=1, d=1, mask=MaskSpec("float", (1, 1), True, 0.0), key_mask="holes"),
    dtype=torch.float64,
)
# an HF-style expanded (B, 1, Lq, Lk) bool mask with stride 0 over Lq, a fully padded sequence, dropout
@example(
    case=AttentionCase(
        b=2, h=3, lq=7, lk=9, d=8, q_layout="hf", kv_layout="hf", mask=MaskSpec("bool", (2, 1, 1, 9), True, 0.7),
        key_mask="padded_row", dropout_p=0.37, seed=3,
    ),
    dtype=torch.float64,
)  # fmt: skip
# caught a test-rule gap: two admissible keys, one nearly masked out by a large additive value, so the exact dq is
# ~1e-5 and fp32 cancellation in dP - rowsum(dO * O) gave a 5e-3 relative error -> delta_floor
@example(
    case=AttentionCase(b=1, h=1, lq=20, lk=12, d=3, mask=MaskSpec("float", (1, 12), False, 0.25), key_mask="left",
                       seed=235),
    dtype=torch.float32,
)  # fmt: skip
# caught a bug: is_causal with scale=0.0 returned NaN on the torch backend (PyTorch's SDPA does), not the mean of
# each row's causal keys
@example(case=AttentionCase(b=1, h=1, lq=1, lk=2, d=1, causal=True, scale=0.0), dtype=torch.float64)
@example(case=AttentionCase(b=2, h=3, lq=5, lk=7, d=8, causal=True, scale=0.0, seed=4), dtype=torch.float64)
def test_attention_matches_oracle(case, dtype):
    check_attention(case, dtype, BACKEND)


@settings(max_examples=60)
@given(case=varlen_cases(max_len=13, head_dims=[1, 3, 8]), dtype=DTYPES)
@example(case=VarlenCase(lens_q=(), lens_k=(), h=2, d=3), dtype=torch.float64)  # no sequences at all
@example(  # empty sequences both ways, a query without keys, keys without queries, dropout, causal
    case=VarlenCase(lens_q=(5, 0, 1, 3), lens_k=(2, 4, 0, 3), h=2, d=3, causal=True, dropout_p=0.2, slack=3),
    dtype=torch.float64,
)
def test_attention_varlen_matches_oracle(case, dtype):
    check_attention_varlen(case, dtype, BACKEND)


@settings(max_examples=100)
@given(case=mlm_cases(max_rows=24, max_e=9, max_vocab=13), dtype=DTYPES)
@example(case=MlmCase(lead=(0,), e=3, vocab=5), dtype=torch.float64)  # no rows: mean is NaN, grads zero
@example(case=MlmCase(lead=(2, 3), e=4, vocab=7, ignore_frac=1.0, smoothing=0.1), dtype=torch.float64)  # all ignored
@example(  # ignore_index a real class, transposed (tied) weight, frozen bias, sum with a scaled upstream grad
    case=MlmCase(lead=(5, 3), e=5, vocab=6, ignore_index=3, reduction="sum", smoothing=0.35,
                 weight_layout="transposed", needs=(True, True, False), grad_scale=-2.5),
    dtype=torch.float64,
)  # fmt: skip
def test_masked_lm_loss_matches_oracle(case, dtype):
    check_masked_lm_loss(case, dtype, BACKEND)


@settings(max_examples=120)
@given(case=conv_cases(kernels=((1, 1), (3, 3), (5, 5), (2, 3), (3, 1))), dtype=DTYPES)
@example(case=ConvCase(n=0, cin=3, cout=4, height=5, width=7, pool=True), dtype=torch.float64)  # empty batch
@example(case=ConvCase(n=1, cin=1, cout=1, height=3, width=3, padding=0), dtype=torch.float64)  # 1x1 output
@example(case=ConvCase(n=2, cin=3, cout=5, height=7, width=6, pool=True, layout="channels_last"), dtype=torch.float64)
@example(  # frozen backbone: nothing requires grad, pooled forward without argmax
    case=ConvCase(n=2, cin=3, cout=5, height=9, width=5, kernel=(5, 5), padding=2, pool=True, needs=(False,) * 3),
    dtype=torch.float64,
)
# caught a bug (first in the interpreter tier): a channels_last x got an NCHW dx whenever the conv output's layout
# is ambiguous (Cout = 1, or a 1x1 output), as dx's layout came from the saved output
@example(
    case=ConvCase(n=1, cin=2, cout=1, height=1, width=2, kernel=(1, 1), padding=0, layout="channels_last"),
    dtype=torch.float64,
)
@example(
    case=ConvCase(n=2, cin=3, cout=4, height=3, width=2, kernel=(1, 1), padding=0, pool=True, layout="channels_last"),
    dtype=torch.float64,
)
def test_conv_matches_oracle_or_refuses(case, dtype):
    check_conv(case, dtype, BACKEND)
