"""Benchmark spec ``bert_mlm_step``: one whole BERT masked-LM pretraining step, stock Hugging Face vs patched.

The step (mode ``train``, the only one): the forward with labels under ``torch.autocast("cuda",
bfloat16)`` (fp32 parameters; on CPU plain fp32), ``loss.backward()``, ``AdamW.step()`` (``fused=True`` on CUDA,
PyTorch's default foreach implementation on CPU), ``zero_grad(set_to_none=True)``. Every provider trains its own
deep copy of the same initial ``transformers.BertForMaskedLM`` with its own optimizer.

Model: BERT-base (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 30522, hidden and attention dropout
0.1), ``attn_implementation="sdpa"`` before patching. Batches: 128 x 128 and 32 x 512; sequence lengths uniform in
[L/4, L] (a fixed draw per case, so every input set has the same real-token count), right padding with an
``attention_mask``, ``[CLS]`` first and ``[SEP]`` last, round(15%) of each sequence's other real tokens replaced by
``[MASK]`` and labelled (labels -100 elsewhere). ``--quick``: a 2-layer hidden-64 BERT, batch 4 x 32. On CPU
(without ``--full``): a 4-layer hidden-256 BERT (4 heads, intermediate 1024, vocab 8192), batch 16 x 128.

Providers: ``hf[sdpa]`` (stock), ``ptfast`` (``ptfast.patch(model, unpad=False)``: ptfast attention and the
fused masked-LM head), ``ptfast[unpad]`` (``unpad=True``: every layer on the real tokens only), each also under
``torch.compile(model, dynamic=False)`` (``+compile``; the compilation happens in the runner's untimed first call).

Throughput: tokens/s counts real tokens (``attention_mask.sum()``). FLOPs (real tokens only, matmuls only; the
optimizer, embeddings, LayerNorms, softmax and GELU are not counted), with T real tokens, M masked tokens, layers
n, hidden E, intermediate I, vocab V, lengths l_b::

    6 * T * n * (4 E^2 + 2 E I)          encoder dense layers (QKV, output, FFN): 2 FLOPs per MAC, x3 for fwd+bwd
  + 12 * n * E * sum_b l_b^2             attention scores and values on real query x key pairs, fwd+bwd
  + 6 * M * (E^2 + E V)                  masked-LM head (transform dense + decoder) on the masked tokens

Correctness column: a dropout-free training-mode forward (every dropout module at p=0) of each provider's fresh
copy, before any update, gives a loss; rel. err is its distance to ``hf[sdpa]``'s. Compiled providers are not
checked (the check would need a second compilation with dropout off); their eager twins are.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    TRAIN_MODE,
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    Skip,
    Step,
    TrainState,
    dropout_free_loss,
    generator,
    import_ptfast,
    initial_model,
    require_compile,
    train_autocast,
    train_check,
    train_state,
    train_step,
    training_op,
)

BERT_BASE = dict(layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522)
BERT_TINY = dict(layers=2, hidden=64, heads=2, intermediate=256, vocab=4096)
BERT_SMALL = dict(layers=4, hidden=256, heads=4, intermediate=1024, vocab=8192)  # the CPU case
MASK_FRACTION = 0.15
DROPOUT = 0.1
CLS, SEP, MASK, FIRST_WORD = 101, 102, 103, 999  # bert-base-uncased's special ids; words drawn from [999, V)


def _lengths(batch: int, seq: int, seed: int) -> list[int]:
    """The case's sequence lengths: uniform in [L/4, L], from a fixed CPU draw (same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(seq // 4, seq + 1, (batch,), generator=g).tolist()


def _n_masked(length: int) -> int:
    """Masked tokens of one sequence: round(15%) of its real tokens, at least 1, never [CLS] / [SEP]."""
    return min(length - 2, max(1, int(MASK_FRACTION * length + 0.5)))


def _case(name: str, batch: int, seq: int, model: dict[str, int], seed: int) -> Case:
    lengths = _lengths(batch, seq, seed)
    params: dict[str, Any] = dict(B=batch, L=seq, **model, dropout_p=DROPOUT, mask_fraction=MASK_FRACTION)
    params.update(
        lengths_seed=seed,
        real_tokens=sum(lengths),
        masked_tokens=sum(_n_masked(n) for n in lengths),
        sum_len_sq=sum(n * n for n in lengths),
    )
    return Case(name, params)


def _cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [_case("bert-tiny b4 L32", 4, 32, BERT_TINY, 7)]
    if not opts.cuda and not opts.full:
        return [_case("bert-small b16 L128", 16, 128, BERT_SMALL, 5)]
    return [
        _case("bert-base b128 L128", 128, 128, BERT_BASE, 11),
        _case("bert-base b32 L512", 32, 512, BERT_BASE, 13),
    ]


def _flops(case: Case, mode: str) -> float:
    p = case.params
    e, i, n, v = p["hidden"], p["intermediate"], p["layers"], p["vocab"]
    dense = 6.0 * p["real_tokens"] * n * (4 * e * e + 2 * e * i)
    attention = 12.0 * n * e * p["sum_len_sq"]
    head = 6.0 * p["masked_tokens"] * (e * e + e * v)
    return dense + attention + head


def _items(case: Case) -> float:
    return float(case.params["real_tokens"])


def _new_model(p: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        intermediate_size=p["intermediate"],
        hidden_dropout_prob=p["dropout_p"],
        attention_probs_dropout_prob=p["dropout_p"],
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(1000 + p["lengths_seed"])  # the initial weights (HF init, on the CPU generator)
    model = BertForMaskedLM(config)
    if model.config._attn_implementation != "sdpa":
        raise Skip(f"transformers gave attn_implementation={model.config._attn_implementation!r}, not 'sdpa'")
    return model.to(device).train()


def _batch(p: dict[str, Any], device: torch.device, g: torch.Generator) -> dict[str, Tensor]:
    b, s = p["B"], p["L"]
    lengths = torch.tensor(_lengths(b, s, p["lengths_seed"]), device=device)
    pos = torch.arange(s, device=device).expand(b, s)
    real = pos < lengths[:, None]
    ids = torch.randint(FIRST_WORD, p["vocab"], (b, s), device=device, generator=g)
    ids[:, 0] = CLS
    ids.scatter_(1, (lengths - 1)[:, None], SEP)
    ids[~real] = 0
    # Exactly _n_masked(l) positions per sequence, among the real tokens other than [CLS] / [SEP].
    eligible = real & (pos > 0) & (pos < (lengths - 1)[:, None])
    score = torch.rand((b, s), device=device, generator=g).masked_fill(~eligible, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)
    k = torch.tensor([_n_masked(n) for n in lengths.tolist()], device=device)
    masked = rank < k[:, None]
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    ids = ids.masked_fill(masked, MASK)
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}


def _make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    train_autocast(opts)  # refuses fp16 for the whole case (reason in the report)
    key = ("bert_mlm_step", case.name, str(opts.device), tuple(sorted(p.items(), key=lambda kv: kv[0])))
    token, model = initial_model(key, lambda: _new_model(p, opts.device))
    batch = _batch(p, opts.device, generator(opts.device, 71 + seed))
    # "params" only tells the runner's L2 planning how big an input set is (the model's weights are in it).
    return {"token": token, "model": model, "params": list(model.parameters()), "batch": batch}


def _providers(opts: Options) -> list[Provider]:
    def provider(name: str, patched: bool, unpad: bool, use_compile: bool) -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            if mode != TRAIN_MODE:
                raise Skip(f"this op times whole training steps only (mode {TRAIN_MODE!r})")
            if use_compile:
                require_compile(opts)
            ptfast = import_ptfast() if patched else None

            def context() -> contextlib.ExitStack:
                stack = contextlib.ExitStack()
                stack.enter_context(train_autocast(opts))
                if ptfast is not None:
                    stack.enter_context(ptfast.use_backend("auto"))
                return stack

            def make() -> TrainState:
                model = copy.deepcopy(inp["model"])
                if ptfast is not None:
                    ptfast.patch(model, unpad=unpad)

                def eager_loss(i: Inputs) -> Tensor:
                    return model(**i["batch"]).loss

                check = None if use_compile else dropout_free_loss(model, eager_loss, inp, context)
                fn = torch.compile(model, dynamic=False) if use_compile else model

                def loss(i: Inputs) -> Tensor:
                    return fn(**i["batch"]).loss

                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=opts.cuda or None)
                return TrainState(model, loss, opt, check)

            state = train_state((name, inp["token"]), make)
            return train_step(state, inp, context)

        return Provider(name, "ptfast" if patched else "pytorch", _describe(patched, unpad, use_compile), build,
                        canonical=train_check)  # fmt: skip

    out = []
    for use_compile in (False, True):
        suffix = "+compile" if use_compile else ""
        out += [
            provider(f"hf[sdpa]{suffix}", False, False, use_compile),
            provider(f"ptfast{suffix}", True, False, use_compile),
            provider(f"ptfast[unpad]{suffix}", True, True, use_compile),
        ]
    return out


def _describe(patched: bool, unpad: bool, use_compile: bool) -> str:
    if not patched:
        what = 'stock BertForMaskedLM, attn_implementation="sdpa" (padded; full-vocabulary logits on every token)'
    else:
        what = (
            f"ptfast.patch(model, unpad={unpad}) under use_backend('auto'): ptfast attention"
            + (" on the real tokens only (attention_varlen; padding removed before the embeddings)" if unpad else "")
            + ", masked-LM head on the masked rows + fused loss"
        )
    if use_compile:
        what += "; torch.compile(model, dynamic=False) (default mode; compiled in the untimed first call)"
    return what + "; AdamW (fused on CUDA)"


def spec() -> OpSpec:
    return OpSpec(
        name="bert_mlm_step",
        title="BERT masked-LM pretraining step (forward + backward + AdamW; bf16 autocast): patched vs stock "
        "Hugging Face and torch.compile",
        cases=_cases,
        make_inputs=_make_inputs,
        providers=_providers,
        flops=_flops,
        baseline="hf[sdpa]",
        reference=("hf[sdpa]",),
        setup=lambda opts: training_op(),
        metric="items",
        items=_items,
        items_label="tokens",
        modes=(TRAIN_MODE,),
        case_doc="B x L batch (right padding), lengths uniform in [L/4, L] (fixed per case: real_tokens, "
        "sum_len_sq), 15% of the real non-special tokens masked (masked_tokens); layers / hidden / heads / "
        "intermediate / vocab of the BERT config, dropout_p its hidden and attention dropout. tokens/s and TFLOP/s "
        "count real tokens only: FLOPs = 6 T n (4E^2 + 2EI) + 12 n E sum(l^2) + 6 M (E^2 + EV).",
        step_doc="one training step: forward with labels under torch.autocast (bf16 on CUDA; fp32 on CPU), "
        "loss.backward(), AdamW.step() (fused on CUDA), zero_grad(set_to_none=True); each provider trains its own "
        "copy of the same initial model. Peak MiB = the step's peak beyond what stays allocated between steps "
        "(weights + AdamW moments, the same for every provider: 12 bytes per parameter with fp32 weights); it "
        "counts activations, gradients and workspaces. rel. err: the loss of a dropout-free forward of each "
        "provider's fresh copy vs the baseline's (compiled providers: not checked).",
    )
