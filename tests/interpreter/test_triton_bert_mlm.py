"""A tiny ``BertForMaskedLM`` patched by ``ptfast.patch`` on the triton backend (TRITON_INTERPRET=1, CPU).

Runs only in the interpreter process (``python tests/run.py``). The oracle is the stock model (``"eager"``
attention, full logits, ``CrossEntropyLoss``) with the same weights in float64; the patched model runs in fp32
with the masked-LM head on the masked rows only, the triton masked-LM loss kernel and the triton attention
kernels (``patch`` switches the attention to ``"ptfast"``). Loss and every parameter gradient must match to a
relative error of 1e-4. Dropout is off so both models compute the same function.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, rel_err

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.interpreter

# The backend under test. Flip to "torch" only to validate the test logic itself, never in a commit.
BACKEND = "triton"

B, S, VOCAB = 2, 13, 97
TOL = 1e-4


def _models():
    """(float64 stock oracle, fp32 patched model) with the same (fp32-rounded) weights, training mode."""
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    ours = transformers.BertForMaskedLM(config).float().train()
    oracle = copy.deepcopy(ours).double()  # exactly the fp32 weights, in float64
    ptfast.patch(ours)
    assert ours.config._attn_implementation == "ptfast" and oracle.config._attn_implementation == "eager"
    return oracle, ours


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(g_ours: dict[str, torch.Tensor], g_ref: dict[str, torch.Tensor]) -> None:
    assert g_ours.keys() == g_ref.keys() and len(g_ref) > 10
    flat = torch.cat([g.flatten() for g in g_ref.values()])
    total = torch.linalg.vector_norm(flat).item()
    assert rel_err(torch.cat([g.flatten() for g in g_ours.values()]), flat) <= TOL, "all gradients"
    for name, g in g_ref.items():
        # Per parameter, with a floor at 1e-6 of the whole gradient's norm: a key bias gradient is zero up to
        # rounding (a softmax cannot see it), so its own relative error is meaningless.
        err = torch.linalg.vector_norm(g_ours[name].double() - g).item()
        bound = TOL * max(torch.linalg.vector_norm(g).item(), 1e-6 * total)
        assert err <= bound, f"grad {name}: error {err:.3e} > {bound:.3e}"


def test_patched_masked_lm_on_triton_matches_float64_stock() -> None:
    oracle, ours = _models()
    ids = torch.randint(1, VOCAB, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    mask[1, 4:6] = 0  # a hole
    labels = torch.full((B, S), -100)
    masked = (torch.rand(B, S) < 0.3) & mask.bool()
    masked[1, 7] = True
    labels[masked] = torch.randint(0, VOCAB, (B, S))[masked]

    rows: list[int] = []
    ours.cls.predictions.transform.dense.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    assert_ran(events, "masked_lm_loss", BACKEND, ("forward", "backward"))
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    assert out.logits is None
    assert rows == [int(masked.sum())]  # the head ran on the masked rows only

    ref = oracle(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    e = rel_err(out.loss, ref.loss)
    assert e <= TOL, f"loss: relative error {e:.3e} > {TOL:.0e}"
    _check_grads(_grads(ours), _grads(oracle))
