"""``ptfast.patch(model, unpad=True)`` on tiny random Hugging Face BERT models (CPU, torch backend, float64,
dropout off): unpadded execution equals the stock padded model at every real token.

Checked against a stock copy with the same weights (stock runs ``attn_implementation="eager"``): ``BertModel``
outputs (last hidden state, every hidden state, pooler) at real tokens and zeros at padding; the losses and every
parameter gradient of ``BertForMaskedLM`` (training with labels: the head runs on the packed masked rows),
``BertForPreTraining`` and ``BertForSequenceClassification``; several AdamW steps; right padding, left padding,
holes, a length-1 and an empty sequence; that attention really ran packed (``attention_varlen``) and that the
stock path is taken where unpadding cannot apply. Also: state_dict keys, idempotence, deepcopy / pickle, and
``torch.compile``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptfast  # noqa: E402
from ptfast.integrations import bert_unpad  # noqa: E402
from ptfast.testing import record_dispatch  # noqa: E402
from tests.helpers import assert_ran  # noqa: E402

VOCAB = 97
TOL = 1e-10  # float64 end to end
B, S = 4, 13


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> transformers.BertConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager", num_labels=5,
    )  # fmt: skip
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def _pair(cls, **patch_kw):
    torch.manual_seed(0)
    stock = cls(_config()).double().train()
    ours = copy.deepcopy(stock)
    ptfast.patch(ours, unpad=True, **patch_kw)
    return stock, ours


# Lengths: full, right-padded, length 1, empty (a row of pure padding).
LENGTHS = (13, 8, 1, 0)


def _mask(lengths=LENGTHS, left: bool = False) -> torch.Tensor:
    ar = torch.arange(S)[None, :]
    lens = torch.tensor(lengths)[:, None]
    mask = (ar >= S - lens) if left else (ar < lens)
    return mask.long()


def _batch(mask: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, mask.shape, generator=g)
    labels = torch.full(mask.shape, -100)
    masked = (torch.rand(mask.shape, generator=g) < 0.3) & mask.bool()
    masked[0, 2] = True
    labels[masked] = torch.randint(0, VOCAB, mask.shape, generator=g)[masked]
    token_type_ids = (torch.rand(mask.shape, generator=g) < 0.5).long()
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)


def _grads_match(stock, ours, tol=TOL) -> None:
    for (name, p), q in zip(ours.named_parameters(), stock.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)


def test_patch_report_and_structure() -> None:
    stock, ours = _pair(transformers.BertForMaskedLM)
    report = ours.ptfast_patch_report
    assert any("bert: BertModel: unpadded" in line for line in report.replaced), str(report)
    assert isinstance(bert_unpad.unpadded_forward_of(ours.bert), bert_unpad.UnpaddedBertForward)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ptfast.patch(ours, unpad=True)  # idempotent
    assert not ours.ptfast_patch_report.replaced
    # Without ptfast attention, unpadding cannot apply: reported, not done.
    plain = copy.deepcopy(stock)
    ptfast.patch(plain, unpad=True, attention=False)
    assert bert_unpad.unpadded_forward_of(plain.bert) is None
    assert any("not unpadded" in line for line in plain.ptfast_patch_report.skipped)


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_bert_model_outputs_match_at_real_tokens(left) -> None:
    stock, ours = _pair(transformers.BertModel)
    batch = _batch(_mask(left=left))
    del batch["labels"]
    real = batch["attention_mask"].bool()[..., None]
    rows = real[:, 0, 0]  # sequences whose position 0 is a real token: their pooled output is the stock one

    def loss(out, weights):
        return (out.last_hidden_state * weights * real).sum() + out.pooler_output[rows].sum()

    with record_dispatch() as events:
        out = ours(**batch, output_hidden_states=True)
        weights = torch.randn_like(out.last_hidden_state)
        loss(out, weights).backward()
    assert_ran(events, "attention_varlen", "torch", ("forward", "backward"))
    assert not any(op == "attention" for op, _, _ in events)  # nothing ran padded
    ref = stock(**batch, output_hidden_states=True)
    loss(ref, weights).backward()
    torch.testing.assert_close(out.last_hidden_state * real, ref.last_hidden_state * real, rtol=TOL, atol=TOL)
    assert (out.last_hidden_state * ~real == 0).all()  # padded positions hold 0
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours_h * real, ref_h * real, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.pooler_output[rows], ref.pooler_output[rows], rtol=TOL, atol=TOL)
    _grads_match(stock, ours)


def test_masked_lm_training_matches_over_optimizer_steps() -> None:
    stock, ours = _pair(transformers.BertForMaskedLM)
    opt_s = torch.optim.AdamW(stock.parameters(), lr=1e-3)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    for step in range(3):
        batch = _batch(_mask(), seed=step)
        with record_dispatch() as events:
            out = ours(**batch)
            out.loss.backward()
        assert out.logits is None  # the head ran on masked rows only
        assert_ran(events, "attention_varlen", "torch", ("forward", "backward"))
        assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
        ref = stock(**batch)
        ref.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss, rtol=TOL, atol=TOL)
        _grads_match(stock, ours)
        opt_s.step()
        opt_o.step()
        opt_s.zero_grad()
        opt_o.zero_grad()


def test_masked_lm_eval_logits_and_hidden_states() -> None:
    stock, ours = _pair(transformers.BertForMaskedLM)
    stock.eval()
    ours.eval()
    batch = _batch(_mask())
    real = batch["attention_mask"].bool()[..., None]
    with torch.no_grad():
        out = ours(**batch)
        ref = stock(**batch)
    torch.testing.assert_close(out.logits * real, ref.logits * real, rtol=TOL, atol=TOL)
    # The eval loss comes from the logits at labelled (real) tokens only: equal too.
    torch.testing.assert_close(out.loss, ref.loss, rtol=TOL, atol=TOL)


def test_pretraining_loss_and_grads_match() -> None:
    stock, ours = _pair(transformers.BertForPreTraining)
    batch = _batch(_mask((13, 8, 1, 5)))  # every sequence has a real token at position 0 (NSP reads it)
    nsp = torch.tensor([0, 1, 1, 0])
    out = ours(**batch, next_sentence_label=nsp, output_hidden_states=True)
    out.loss.backward()
    ref = stock(**batch, next_sentence_label=nsp, output_hidden_states=True)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, rtol=TOL, atol=TOL)
    real = batch["attention_mask"].bool()[..., None]
    torch.testing.assert_close(out.hidden_states[-1] * real, ref.hidden_states[-1] * real, rtol=TOL, atol=TOL)
    _grads_match(stock, ours)


def test_sequence_classification_matches() -> None:
    stock, ours = _pair(transformers.BertForSequenceClassification)
    batch = _batch(_mask((13, 8, 1, 5)))
    labels = torch.tensor([0, 4, 2, 1])
    batch["labels"] = labels
    with record_dispatch() as events:
        out = ours(**batch)
        out.loss.backward()
    assert_ran(events, "attention_varlen", "torch", ("forward", "backward"))
    ref = stock(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.loss, ref.loss, rtol=TOL, atol=TOL)
    _grads_match(stock, ours)


def test_stock_path_where_unpadding_cannot_apply() -> None:
    stock, ours = _pair(transformers.BertModel)
    ids = _batch(_mask())["input_ids"]
    with record_dispatch() as events:
        out = ours(input_ids=ids)  # no attention_mask: nothing to unpad
    assert not any(op == "attention_varlen" for op, _, _ in events)
    torch.testing.assert_close(out.last_hidden_state, stock(input_ids=ids).last_hidden_state, rtol=TOL, atol=TOL)
    reason = bert_unpad.unpad_reason(ours, _mask(), {"cu_seq_lens_q": torch.zeros(2)})
    assert reason is not None and "padding-free" in reason
    # A KV cache under either name (transformers 5.25 renamed past_key_values to cache).
    for name in ("past_key_values", "cache"):
        assert bert_unpad.unpad_reason(ours, _mask(), {name: object()}) == "KV cache"
    assert bert_unpad.unpad_reason(ours, _mask(), {}) is None


def test_return_tuple_and_copies() -> None:
    stock, ours = _pair(transformers.BertModel)
    batch = _batch(_mask())
    del batch["labels"]
    as_tuple = ours(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ours(**batch).last_hidden_state)
    for clone in (copy.deepcopy(ours), _pickled(ours)):
        forward = bert_unpad.unpadded_forward_of(clone)
        assert forward is not None and forward.bert is clone
        torch.testing.assert_close(clone(**batch).last_hidden_state, as_tuple[0], rtol=0, atol=0)
    fresh = transformers.BertModel(_config()).double()
    fresh.load_state_dict(ours.state_dict())  # a patched model's checkpoint loads into a stock one


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_torch_compile_with_unpadding() -> None:
    stock, ours = _pair(transformers.BertForMaskedLM)
    batch = _batch(_mask())
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager")  # the unpad step breaks the graph (data-dependent T)
    out = compiled(**batch)
    out.loss.backward()
    ref = stock(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=TOL, atol=TOL)
    _grads_match(stock, ours)
