"""``ptfast.patch`` on tiny random Hugging Face ``BertForMaskedLM`` / ``BertForPreTraining`` models (CPU, torch
backend, float64, dropout off so both models compute the same function).

Each patched model is checked against a stock copy with the same weights: the loss and every parameter gradient
(to ~1e-10 relative), padding, ``num_items_in_batch`` (checked against transformers' own ``fixed_cross_entropy``
on the stock logits: the stock BERT forwards ignore it), nothing masked, eval mode and no labels (logits as
stock), ``return_dict=False``, ``torch.compile`` with the static row budget (fitting and overflowing), and that the
head's transform really ran on the masked rows only. Also: parameters, state_dict keys and the tied decoder
weight unchanged, idempotence, models that must be left alone, and that ``import ptfast`` + ``patch`` on a
non-Hugging Face model never imports transformers.
"""

from __future__ import annotations

import copy
import inspect
import io
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptfast  # noqa: E402
from ptfast.integrations import bert_mlm  # noqa: E402
from ptfast.integrations.bert_mlm import PatchedMLMForward, row_budget  # noqa: E402
from ptfast.testing import record_dispatch  # noqa: E402
from tests.helpers import assert_ran  # noqa: E402

VOCAB = 97
TOL = 1e-10  # float64 end to end
B, S = 3, 13


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    # Tiny models: intra-op threads only add synchronization on a loaded 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> transformers.BertConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def _pair(cls=transformers.BertForMaskedLM, **patch_kw):
    """(stock model, patched copy) with identical float64 weights, in training mode."""
    torch.manual_seed(0)
    stock = cls(_config()).double().train()
    ours = copy.deepcopy(stock)
    ptfast.patch(ours, **patch_kw)
    return stock, ours


def _batch(
    p_masked: float = 0.15, padded: bool = True, seed: int = 1, B: int = B, S: int = S
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask[0, S - 4 :] = 0  # right padding
        mask[B - 1, 3:5] = 0  # a hole
    labels = torch.full((B, S), -100)
    masked = (torch.rand(B, S, generator=g) < p_masked) & mask.bool()
    masked[1, 2] = True  # at least one
    labels[masked] = torch.randint(0, VOCAB, (B, S), generator=g)[masked]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Every gradient matches to TOL relative to its own norm, with a floor at 1e-6 of the whole gradient's norm
    (a key bias cannot change a softmax: its gradient is zero up to rounding)."""
    g_ours, g_ref = _grads(ours), _grads(ref)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) > 10
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in g_ref.values()])).item()
    for name, g in g_ref.items():
        err = torch.linalg.vector_norm(g_ours[name] - g).item()
        bound = TOL * max(torch.linalg.vector_norm(g).item(), 1e-6 * total)
        assert err <= bound, f"grad {name}: error {err:.3e} > {bound:.3e}"


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = torch.linalg.vector_norm(a - b).item()
    assert err <= TOL * max(torch.linalg.vector_norm(b).item(), 1e-30), f"{what}: error {err:.3e}"


def _count_transform_rows(model: torch.nn.Module) -> list[int]:
    """A list that gets the number of rows (tokens) each call of the head's transform sees."""
    rows: list[int] = []
    model.cls.predictions.transform.dense.register_forward_hook(
        lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1])
    )
    return rows


# --- what patching changes and what it keeps ----------------------------------------------------------------


def test_patch_on_non_hf_model_never_imports_transformers() -> None:
    code = (
        "import sys, torch, ptfast\n"
        "m = ptfast.patch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()))\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert len(m.ptfast_patch_report.replaced) == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", [transformers.BertForMaskedLM, transformers.BertForPreTraining])
def test_patch_keeps_parameters_keys_and_tied_decoder(cls) -> None:
    torch.manual_seed(0)
    model = cls(_config())
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    assert ptfast.patch(model) is model
    report = model.ptfast_patch_report
    assert any(f"cls.predictions ({cls.__name__})" in r for r in report.replaced), str(report)
    assert any("'eager' -> 'ptfast'" in r for r in report.replaced), str(report)
    assert model.config._attn_implementation == "ptfast"
    assert type(model) is cls and isinstance(model.forward, PatchedMLMForward)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    model.load_state_dict(state)  # a stock checkpoint loads strictly
    # Trainer reads the signature: dataset columns to keep, and whether to pass num_items_in_batch.
    params_sig = inspect.signature(model.forward).parameters
    assert "labels" in params_sig and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params_sig.values())


def test_patch_is_idempotent_and_survives_copies() -> None:
    stock, ours = _pair()
    forward = ours.forward
    ptfast.patch(ours, mlm_row_budget=0.5)
    assert ours.forward is forward and forward.row_budget == 0.5
    assert not ours.ptfast_patch_report.replaced, str(ours.ptfast_patch_report)
    assert any("already patched" in s for s in ours.ptfast_patch_report.skipped)
    for clone in (copy.deepcopy(ours), _torch_save_load(ours)):
        assert isinstance(clone.forward, PatchedMLMForward) and clone.forward.model is clone
        assert clone.get_output_embeddings().weight is clone.get_input_embeddings().weight
        batch = _batch()
        _close(clone(**batch).loss, stock(**batch).loss, "loss of a copy")


def _torch_save_load(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_a_model_inside_a_wrapper_is_patched() -> None:
    stock, _ = _pair()

    class Wrapper(torch.nn.Module):  # e.g. a LightningModule holding the Hugging Face model
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.net = model

        def forward(self, **batch):
            return self.net(**batch).loss

    wrapper = Wrapper(copy.deepcopy(stock))
    ptfast.patch(wrapper)
    assert isinstance(wrapper.net.forward, PatchedMLMForward)
    assert any(r.startswith("net.cls.predictions (BertForMaskedLM)") for r in wrapper.ptfast_patch_report.replaced)
    batch = _batch()
    _close(wrapper(**batch), stock(**batch).loss, "loss through the wrapper")


def test_models_that_are_left_alone() -> None:
    torch.manual_seed(0)
    hooked = transformers.BertForMaskedLM(_config())
    hooked.cls.register_forward_hook(lambda *a: None)
    ptfast.patch(hooked)
    assert "forward" not in hooked.__dict__
    assert any("hooks on cls" in s for s in hooked.ptfast_patch_report.skipped), str(hooked.ptfast_patch_report)

    class Custom(transformers.BertForMaskedLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    custom = Custom(_config())
    ptfast.patch(custom)
    assert "forward" not in custom.__dict__
    assert any("overrides BertForMaskedLM.forward" in s for s in custom.ptfast_patch_report.skipped)

    kept = transformers.BertForMaskedLM(_config())
    ptfast.patch(kept, attention=False, mlm=False)
    assert "forward" not in kept.__dict__ and kept.config._attn_implementation == "eager"

    with pytest.raises(ValueError, match="mlm_row_budget"):
        ptfast.patch(transformers.BertForMaskedLM(_config()), mlm_row_budget=1.5)


# --- BertForMaskedLM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attention", [True, False])
def test_masked_lm_training_matches_stock(padded: bool, attention: bool) -> None:
    stock, ours = _pair(attention=attention)
    assert ours.config._attn_implementation == ("ptfast" if attention else "eager")
    rows = _count_transform_rows(ours)
    batch = _batch(padded=padded)
    ref = stock(**batch)
    ref.loss.backward()
    with record_dispatch() as events:
        out = ours(**batch)
        out.loss.backward()
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    assert out.logits is None  # documented: no full logits in training with labels
    _close(out.loss, ref.loss, "loss")
    _assert_same_grads(ours, stock)
    n_masked = int((batch["labels"] != -100).sum())
    assert rows == [n_masked] and n_masked < B * S  # eager: the transform ran on exactly the masked rows


@pytest.mark.parametrize("as_tensor", [True, False])
def test_num_items_in_batch_normalizes_like_hf(as_tensor: bool) -> None:
    from transformers.loss.loss_utils import fixed_cross_entropy

    stock, ours = _pair()
    batch = _batch()
    n_items = 2 * int((batch["labels"] != -100).sum()) + 3  # e.g. two accumulated micro-batches
    num_items = torch.tensor(n_items) if as_tensor else n_items
    # The stock forward ignores num_items_in_batch; HF's loss functions divide the summed loss by it.
    logits = stock(**{**batch, "labels": None}).logits
    ref = fixed_cross_entropy(logits.view(-1, VOCAB), batch["labels"].view(-1), num_items_in_batch=num_items)
    ref.backward()
    out = ours(**batch, num_items_in_batch=num_items)
    out.loss.backward()
    _close(out.loss, ref, "loss with num_items_in_batch")
    _assert_same_grads(ours, stock)
    # Eval mode (the Trainer's prediction_step passes it too): same value, logits returned.
    ours.eval()
    with torch.no_grad():
        ev = ours(**batch, num_items_in_batch=num_items)
    _close(ev.loss, ref.detach(), "eval loss with num_items_in_batch")
    _close(ev.logits, logits.detach(), "eval logits")


def test_nothing_masked_gives_stock_nan_and_zero_grads() -> None:
    stock, ours = _pair()
    batch = {**_batch(), "labels": torch.full((B, S), -100)}
    ref, out = stock(**batch), ours(**batch)
    assert torch.isnan(ref.loss) and torch.isnan(out.loss)  # CrossEntropyLoss's 0 / 0
    ref.loss.backward()
    out.loss.backward()
    g_ours, g_ref = _grads(ours), _grads(stock)
    assert g_ours.keys() == g_ref.keys()
    assert all(torch.equal(g_ours[n], g) and not g.any() for n, g in g_ref.items())
    # With num_items_in_batch the sum over no token is 0.
    assert ours(**batch, num_items_in_batch=torch.tensor(5)).loss.item() == 0.0


def test_eval_and_no_labels_return_stock_logits() -> None:
    stock, ours = _pair()
    batch = _batch()
    rows = _count_transform_rows(ours)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    out, ref = ours(**no_labels), stock(**no_labels)  # training mode, no labels
    assert out.loss is None
    _close(out.logits, ref.logits, "training logits without labels")
    stock.eval()
    ours.eval()
    with torch.no_grad():
        out, ref = ours(**batch), stock(**batch)
    _close(out.logits, ref.logits, "eval logits")
    _close(out.loss, ref.loss, "eval loss")
    assert rows == [B * S, B * S]  # the stock head on every token


def test_return_dict_false_tuples() -> None:
    stock, ours = _pair()
    batch = _batch()
    out, ref = ours(**batch, return_dict=False), stock(**batch, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1  # (loss,): the None logits are dropped, as to_tuple() does
    _close(out[0], ref[0], "tuple loss")
    ours.config.return_dict = False  # the config default is honoured too, like can_return_tuple
    assert isinstance(ours(**batch), tuple)
    ours.config.return_dict = True
    ours.eval()
    stock.eval()
    with torch.no_grad():
        out, ref = ours(**batch, return_dict=False), stock(**batch, return_dict=False)
    assert len(out) == len(ref) == 2
    for a, b, what in zip(out, ref, ("loss", "logits"), strict=True):
        _close(a, b, f"eval tuple {what}")


def test_output_hidden_states_pass_through() -> None:
    stock, ours = _pair(attention=False)
    batch = _batch()
    out, ref = ours(**batch, output_hidden_states=True), stock(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        _close(a, b, "hidden state")


# --- BertForPreTraining -----------------------------------------------------------------------------------


def test_pretraining_matches_stock() -> None:
    stock, ours = _pair(transformers.BertForPreTraining)
    rows = _count_transform_rows(ours)
    batch = {**_batch(), "next_sentence_label": torch.tensor([0, 1, 1])}
    ref, out = stock(**batch), ours(**batch)
    ref.loss.backward()
    out.loss.backward()
    assert out.prediction_logits is None
    _close(out.loss, ref.loss, "MLM + NSP loss")
    _close(out.seq_relationship_logits, ref.seq_relationship_logits, "NSP logits")
    _assert_same_grads(ours, stock)
    assert rows == [int((batch["labels"] != -100).sum())]
    tup = ours(**batch, return_dict=False)
    assert len(tup) == 2  # (loss, seq_relationship_logits)
    _close(tup[1], ref.seq_relationship_logits, "tuple NSP logits")
    # Without next_sentence_label the stock model computes no loss at all: so does the patched one.
    only_mlm = {k: v for k, v in batch.items() if k != "next_sentence_label"}
    out, ref = ours(**only_mlm), stock(**only_mlm)
    assert out.loss is None and ref.loss is None
    _close(out.prediction_logits, ref.prediction_logits, "prediction logits without NSP labels")
    stock.eval()
    ours.eval()
    with torch.no_grad():
        out, ref = ours(**batch), stock(**batch)
    _close(out.loss, ref.loss, "eval loss")
    _close(out.prediction_logits, ref.prediction_logits, "eval prediction logits")


# --- torch.compile: the static row budget -----------------------------------------------------------------


def test_row_budget_rounding() -> None:
    assert row_budget(39, 0.2) == 8  # ceil(7.8) = 8
    assert row_budget(41, 0.2) == 16  # ceil(8.2) = 9 -> 16
    assert row_budget(100, 0.15) == 16
    assert row_budget(5, 0.2) == 5  # never more rows than there are
    assert row_budget(64, 1.0) == 64


def test_compiled_training_uses_the_budget_and_matches_stock() -> None:
    from torch._dynamo.backends.debugging import aot_eager

    stock, ours = _pair()
    graphs: list[torch.fx.GraphModule] = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=recording_aot_eager, fullgraph=False)
    budget = row_budget(B * S, bert_mlm.DEFAULT_ROW_BUDGET)
    # A batch whose masked rows fit the budget, one that overflows it (the head then runs on every row), and one
    # of another shape (recompiled with dynamic sizes, where the budget is symbolic).
    n_static_graphs = 0
    for p_masked, fits, shape in ((0.1, True, (B, S)), (0.7, False, (B, S)), (0.1, True, (2, 17))):
        batch = _batch(p_masked=p_masked, seed=3, B=shape[0], S=shape[1])
        n_masked = int((batch["labels"] != -100).sum())
        assert (n_masked <= row_budget(shape[0] * shape[1], bert_mlm.DEFAULT_ROW_BUDGET)) == fits
        stock.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        ref = stock(**batch)
        ref.loss.backward()
        out = compiled(**batch)
        out.loss.backward()
        assert out.logits is None
        _close(out.loss, ref.loss, f"compiled loss (fits={fits}, shape={shape})")
        _assert_same_grads(ours, stock)
        if shape == (B, S):
            n_static_graphs = len(graphs)
    torch._dynamo.reset()

    def cond_branches(gm: torch.fx.GraphModule) -> dict[str, torch.fx.GraphModule]:
        return {name.rsplit("_", 1)[0]: sub for name, sub in gm.named_children() if name.startswith("cond_")}

    # The traced head is a torch.cond whose budget branch runs the transform's dense layer on `budget` rows.
    branch_rows = {}
    for gm in graphs[:n_static_graphs]:
        for name, sub in cond_branches(gm).items():
            for node in sub.graph.nodes:
                if node.op == "call_function" and node.target is torch._C._nn.linear:
                    branch_rows[name] = node.meta["example_value"].shape[0]
    assert branch_rows == {"cond_true": budget, "cond_false": B * S}, branch_rows
    # The recompile for the other shape (symbolic sizes) keeps the budget branch.
    assert any(cond_branches(gm) for gm in graphs[n_static_graphs:])


def test_compiled_head_loss_takes_all_rows_where_torch_cond_cannot_trace() -> None:
    """A side-effecting hook in the transform, or ``dynamic=True``, would make dynamo fail inside torch.cond."""
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    torch.manual_seed(0)
    head = BertLMPredictionHead(_config()).double()
    hidden = torch.randn(2, 11, 48, dtype=torch.float64)
    labels = torch.full((2, 11), -100)
    labels[0, 3], labels[1, 7] = 5, 11
    ref = torch.nn.functional.cross_entropy(head(hidden).view(-1, VOCAB), labels.view(-1))
    rows: list[int] = []
    head.transform.dense.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    torch._dynamo.reset()
    fn = torch.compile(bert_mlm.mlm_head_loss, backend="aot_eager")
    _close(fn(head, hidden, labels), ref, "compiled head loss with a hook")
    assert rows == [22]  # every row: the budget branch was not used
    head.transform.dense._forward_hooks.clear()
    torch._dynamo.reset()
    fn = torch.compile(bert_mlm.mlm_head_loss, backend="aot_eager", dynamic=True)
    _close(fn(head, hidden, labels), ref, "compiled head loss with dynamic=True")
    torch._dynamo.reset()
