"""Patched models inside the usual training machinery (CPU, torch backend): activation checkpointing, gradient
accumulation, AMP autocast and the Hugging Face ``Trainer``. (DDP / FSDP2: tests/test_distributed.py.)

Checkpointing must not change a single gradient (float64, dropout off): Hugging Face's
``gradient_checkpointing_enable`` on a patched ``BertForMaskedLM`` (padded and unpadded, whose layers receive the
padding-free keyword arguments through the checkpoint) and ``torch.utils.checkpoint`` around a patched VGG's
fused blocks. Accumulating two micro-batches gives the gradient of their summed losses. Under bf16 autocast the
patched models follow the stock ones by the low-precision rule's spirit (loose relative bound: both round). The
``Trainer`` trains a patched model with gradient accumulation, passes ``num_items_in_batch`` to it, and the fused
ops run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran
from tests.test_nn_patch import tiny_vgg

TOL = 1e-10


def _bert(dtype=torch.float64, dropout: float = 0.0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.BertForMaskedLM(config).to(dtype).train()


def _mlm_batch(seed: int = 1, b: int = 3, s: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (b, s), generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor([s, 6, 9, 3, 11, 7][:b])[:, None]).long()
    labels = torch.full((b, s), -100)
    masked = (torch.rand(b, s, generator=g) < 0.3) & mask.bool()
    masked[0, 1] = True
    labels[masked] = torch.randint(0, 97, (b, s), generator=g)[masked]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys() and a
    for name, g in a.items():
        torch.testing.assert_close(g, b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_hf_gradient_checkpointing_changes_no_gradient(unpad: bool) -> None:
    plain = ptfast.patch(_bert(), unpad=unpad)
    ckpt = copy.deepcopy(plain)
    # transformers 5.23 renamed it (the old name warns); 5.17 has only the old one.
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()
    batch = _mlm_batch()
    plain(**batch).loss.backward()
    with record_dispatch() as events:
        loss = ckpt(**batch).loss
        loss.backward()
    # Recomputed in backward: the attention forward runs once more per layer inside the checkpoint.
    op = "attention_varlen" if unpad else "attention"
    assert sum(e == (op, "torch", "forward") for e in events) == 2 * 2
    _assert_same_grads(_grads(ckpt), _grads(plain))


def test_torch_checkpoint_around_fused_vgg_blocks() -> None:
    torch.manual_seed(0)
    model = ptfast.patch(tiny_vgg().double())
    x = torch.randn(2, 3, 19, 17, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    expected = _grads(model)
    model.zero_grad()

    def features(x):
        for block in model.features:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    # The torch backend explicitly: under auto, a channels-last input runs the modules' stock math on a CPU.
    with record_dispatch() as events, ptfast.use_backend("torch"):
        out = model.classifier(torch.flatten(model.avgpool(features(x)), 1))
        out.sum().backward()
    assert_ran(events, "conv_relu_pool", "torch", ("forward", "backward"))
    assert_ran(events, "conv_relu", "torch", ("forward", "backward"))
    _assert_same_grads(_grads(model), expected)


def test_gradient_accumulation_equals_summed_loss() -> None:
    model = ptfast.patch(_bert())
    first, second = _mlm_batch(1), _mlm_batch(2)
    model(**first).loss.backward()
    model(**second).loss.backward()
    accumulated = _grads(model)
    model.zero_grad()
    (model(**first).loss + model(**second).loss).backward()
    _assert_same_grads(accumulated, _grads(model), tol=1e-12)


def test_bf16_autocast_follows_stock() -> None:
    stock = _bert(torch.float32)
    ours = ptfast.patch(copy.deepcopy(stock), unpad=True)
    batch = _mlm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), record_dispatch() as events:
        loss = ours(**batch).loss
    loss.backward()
    assert_ran(events, "masked_lm_loss", "torch", ("forward",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = stock(**batch).loss
    ref.backward()
    exact = _bert(torch.float64)(**batch).loss.item()
    # Both round to bf16 along the way: each within a few bf16 ulps (relative 2^-8) of the float64 loss.
    assert abs(loss.item() - exact) <= 0.03 * abs(exact) and abs(ref.item() - exact) <= 0.03 * abs(exact)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)

    torch.manual_seed(0)
    vgg_stock = tiny_vgg()
    vgg = ptfast.patch(copy.deepcopy(vgg_stock))
    x = torch.randn(2, 3, 19, 17).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_stock = vgg(x), vgg_stock(x)
    assert out.dtype == out_stock.dtype
    torch.testing.assert_close(out.float(), out_stock.float(), rtol=5e-2, atol=5e-2)


def test_hf_trainer_with_gradient_accumulation(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = ptfast.patch(_bert(torch.float32, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    for seed in range(8):
        b = _mlm_batch(seed, b=1)
        rows.append({k: v[0] for k, v in b.items()})

    seen: list[object] = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return forward(*args, **kwargs)

    spy.__signature__ = forward.__signature__  # the Trainer reads it to decide what to pass
    model.forward = spy
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    with record_dispatch() as events:
        result = trainer.train()
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert len(seen) == 4 and all(n is not None for n in seen)  # masked tokens over the accumulated batch
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


ENCODERS = ["BertForSequenceClassification", "RobertaForMaskedLM", "ElectraForSequenceClassification"]


@pytest.mark.parametrize("cls_name", ENCODERS)
def test_other_encoders_train_like_stock(cls_name: str) -> None:
    """Encoders built on transformers' AttentionInterface: patch switches their attention to ptfast; losses and
    every gradient over three AdamW steps match the stock (eager) model."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.split("For")[0] + "Config")
    kw = dict(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        attn_implementation="eager", pad_token_id=0,
    )  # fmt: skip
    if cls_name.startswith("Electra"):
        kw["embedding_size"] = 32
    torch.manual_seed(0)
    stock = cls(config_cls(**kw)).double().train()
    ours = ptfast.patch(copy.deepcopy(stock))
    assert any("attn_implementation 'eager' -> 'ptfast'" in line for line in ours.ptfast_patch_report.replaced)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (stock, ours)]
    for step in range(3):
        batch = _mlm_batch(step, b=3)
        # Roberta's position ids start after pad_token_id: keep token 0 (padding) out of real positions.
        batch["input_ids"] = batch["input_ids"].clamp(min=1) * batch["attention_mask"]
        if "SequenceClassification" in cls_name:
            batch["labels"] = torch.tensor([0, 2, 1])
        with record_dispatch() as events:
            loss = ours(**batch).loss
            loss.backward()
        assert_ran(events, "attention", "torch", ("forward", "backward"))
        ref = stock(**batch).loss
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=TOL, atol=TOL)
        _assert_same_grads(_grads(ours), _grads(stock), tol=1e-9)
        for opt in opts:
            opt.step()
            opt.zero_grad()


def test_patch_before_or_after_dtype_change() -> None:
    batch = _mlm_batch()
    first = ptfast.patch(_bert(torch.float32), unpad=True).double()  # patch, then .double()
    second = ptfast.patch(_bert(torch.float32).double(), unpad=True)  # .double(), then patch
    loss_a, loss_b = first(**batch).loss, second(**batch).loss
    assert loss_a.dtype == torch.float64
    torch.testing.assert_close(loss_a, loss_b, rtol=TOL, atol=TOL)
    torch.manual_seed(0)
    vgg = tiny_vgg()
    half_after = ptfast.patch(copy.deepcopy(vgg)).to(torch.bfloat16)
    half_before = ptfast.patch(copy.deepcopy(vgg).to(torch.bfloat16))
    x = torch.randn(2, 3, 19, 17, dtype=torch.bfloat16)
    assert torch.equal(half_after(x), half_before(x))
