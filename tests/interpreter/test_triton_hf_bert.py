"""A tiny Hugging Face BERT with ``attn_implementation="ptfast"`` on the triton backend (TRITON_INTERPRET=1, CPU).

Runs only in the interpreter process (``python tests/run.py``). The oracle is the stock ``"eager"`` model with the
same weights in float64; the ptfast model runs in fp32 with the triton attention kernels and must match it to a
relative Frobenius error of 1e-4: hidden states on real tokens and every parameter gradient. One padded batch
(right padding on one row, a hole in the other) goes through ``ptfast.attention``; the same sequences flattened
into one row with the padding-free kwargs go through ``ptfast.attention_varlen``.
"""

from __future__ import annotations

import pytest
import torch

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran, rel_err

transformers = pytest.importorskip("transformers")

from ptfast.integrations import transformers as ptfast_hf  # noqa: E402

pytestmark = pytest.mark.interpreter

# The backend under test. Flip to "torch" only to validate the test logic itself, never in a commit.
BACKEND = "triton"

B, S, HIDDEN = 2, 13, 48
TOL = 1e-4


def _models(cls):
    """(float64 eager oracle, fp32 ptfast model) with the same weights, eval mode."""
    ptfast_hf.register()
    kw = dict(
        vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    oracle = cls(transformers.BertConfig(**kw, attn_implementation="eager")).double().eval()
    ours = cls(transformers.BertConfig(**kw, attn_implementation="ptfast")).float().eval()
    ours.load_state_dict(oracle.state_dict())  # copies cast the float64 weights to fp32
    # The oracle starts from exactly the fp32-rounded weights ptfast uses.
    oracle.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
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
        # rounding (a softmax cannot see it), so its own relative error is meaningless. (Query/key weight
        # gradients are ~1e-4 of the whole here, so the floor does not loosen their check.)
        err = torch.linalg.vector_norm(g_ours[name].double() - g).item()
        bound = TOL * max(torch.linalg.vector_norm(g).item(), 1e-6 * total)
        assert err <= bound, f"grad {name}: error {err:.3e} > {bound:.3e}"


def _forward_backward(model, ids, mask, weight, **kw) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    (hidden * weight.to(hidden.dtype) * real[..., None]).sum().backward()
    return hidden.detach()


def test_padded_bert_on_triton_matches_float64_eager() -> None:
    oracle, ours = _models(transformers.BertModel)
    ids = torch.randint(1, 97, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    mask[1, 4:6] = 0  # a hole
    weight = torch.randn(B, S, HIDDEN, dtype=torch.float64)

    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        h_ours = _forward_backward(ours, ids, mask, weight)
    assert_ran(events, "attention", BACKEND, ("forward", "backward"))
    h_ref = _forward_backward(oracle, ids, mask, weight)

    real = mask.bool()
    e = rel_err(h_ours[real], h_ref[real])
    assert e <= TOL, f"last_hidden_state on real tokens: relative error {e:.3e} > {TOL:.0e}"
    _check_grads(_grads(ours), _grads(oracle))


def test_padding_free_bert_on_triton_matches_float64_eager() -> None:
    oracle, ours = _models(transformers.BertModel)
    lengths = (9, 4)
    ids = torch.randint(1, 97, (B, S))
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    weight = torch.randn(B, S, HIDDEN, dtype=torch.float64)
    real = mask.bool()
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    packed = dict(
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
    )  # fmt: skip

    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        h_ours = _forward_backward(ours, ids[real][None], None, weight[real][None], **packed)
    assert_ran(events, "attention_varlen", BACKEND, ("forward", "backward"))
    h_ref = _forward_backward(oracle, ids, mask, weight)

    e = rel_err(h_ours[0], h_ref[real])
    assert e <= TOL, f"packed hidden states: relative error {e:.3e} > {TOL:.0e}"
    _check_grads(_grads(ours), _grads(oracle))


def test_unpadded_bert_on_triton_matches_float64_eager() -> None:
    # ptfast.patch(unpad=True): the padded batch is packed once inside the model (holes included) and every
    # layer runs on real tokens; attention goes through attention_varlen on the triton backend.
    oracle, ours = _models(transformers.BertModel)
    ptfast.patch(ours, unpad=True)
    ids = torch.randint(1, 97, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    mask[1, 4:6] = 0  # a hole: packed with its original position ids
    weight = torch.randn(B, S, HIDDEN, dtype=torch.float64)

    with ptfast.use_backend(BACKEND), record_dispatch() as events:
        h_ours = _forward_backward(ours, ids, mask, weight)
    assert_ran(events, "attention_varlen", BACKEND, ("forward", "backward"))
    assert not any(op == "attention" for op, _, _ in events)
    h_ref = _forward_backward(oracle, ids, mask, weight)

    real = mask.bool()
    e = rel_err(h_ours[real], h_ref[real])
    assert e <= TOL, f"unpadded last_hidden_state on real tokens: relative error {e:.3e} > {TOL:.0e}"
    assert (h_ours[~real] == 0).all()
    _check_grads(_grads(ours), _grads(oracle))
