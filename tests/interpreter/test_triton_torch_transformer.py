"""A patched ``nn.TransformerEncoder`` on the triton backend (TRITON_INTERPRET=1, CPU).

Runs only in the interpreter process (``python tests/run.py``). The oracle is the stock encoder with the same
weights in float64; the patched copy runs in fp32 with the triton attention kernels and must match it to a
relative Frobenius error of 1e-4: the output on real tokens and every parameter gradient. One batch with a bool
key padding mask (right padding on one row, a hole in another: ptfast's ``key_mask`` path), one with a causal
mask plus padding (``is_causal=True``) and a seq-first, pre-LayerNorm encoder.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptfast
from ptfast.integrations.torch_transformer import PatchedTransformerEncoder, patch_encoders
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, rel_err

pytestmark = [
    pytest.mark.interpreter,
    # The stock oracle warns that a float causal mask and a bool padding mask are mixed (its own conversion).
    pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning"),
]

# The backend under test. Flip to "torch" only to validate the test logic itself, never in a commit.
BACKEND = "triton"

B, L, E, NHEAD, FF = 2, 13, 24, 3, 40
TOL = 1e-4


def _models(batch_first: bool, norm_first: bool) -> tuple[nn.Module, nn.Module]:
    """(float64 stock oracle, fp32 patched encoder) with the same (fp32-rounded) weights, dropout off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        E, NHEAD, FF, 0.0, activation="gelu", batch_first=batch_first, norm_first=norm_first
    )
    ours = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
    with torch.no_grad():  # the stock init zeroes the biases: make them count
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    oracle = copy.deepcopy(ours).double()
    replaced: list[str] = []
    patch_encoders(ours, replaced, [])
    assert type(ours) is PatchedTransformerEncoder and len(replaced) == 3
    return oracle, ours


def _forward_backward(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, **kw):
    model.zero_grad(set_to_none=True)
    out = model(x.to(next(model.parameters()).dtype), **kw)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check(ours, ref, real: torch.Tensor) -> None:
    (out, grads), (out_ref, grads_ref) = ours, ref
    e = rel_err(out[real], out_ref[real])
    assert e <= TOL, f"output on real tokens: relative error {e:.3e} > {TOL:.0e}"
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads_ref.values()])).item()
    for name, g in grads_ref.items():
        # Per parameter, with a floor at 1e-6 of the whole gradient's norm: the key bias gradient is zero up to
        # rounding (a softmax cannot see it), so its own relative error is meaningless.
        err = torch.linalg.vector_norm(grads[name].double() - g).item()
        bound = TOL * max(torch.linalg.vector_norm(g).item(), 1e-6 * total)
        assert err <= bound, f"grad {name}: error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize(
    "batch_first, norm_first, causal", [(True, False, False), (False, True, True)], ids=["padding", "causal_seq_first"]
)
def test_patched_encoder_on_triton_matches_float64_stock(batch_first, norm_first, causal) -> None:
    oracle, ours = _models(batch_first, norm_first)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    weight = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool)  # True = padding (PyTorch's convention)
    kpm[0, 9:] = True  # right padding
    kpm[1, 4:6] = True  # a hole
    if not batch_first:
        x, weight = x.transpose(0, 1).contiguous(), weight.transpose(0, 1).contiguous()
    kw = dict(src_key_padding_mask=kpm)
    if causal:
        kw.update(mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64), is_causal=True)

    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        got = _forward_backward(ours, x, weight, **kw)
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    ref = _forward_backward(oracle, x, weight, **kw)
    real = ~kpm if batch_first else ~kpm.T
    _check(got, ref, real)
