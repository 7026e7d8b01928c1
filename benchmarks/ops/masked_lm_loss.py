"""Masked-LM loss benchmark spec: ptfast.masked_lm_loss against the ways people compute the MLM head loss.

Shapes (bf16 hidden/weight, fp32 loss):

* BERT-base head: 256 x 128 = 32768 tokens, 15% of them labelled, hidden 768, vocab 30522, with decoder bias.
* BERT-large head: the same with hidden 1024.
* Large vocabulary: 8192 tokens x hidden 2048 x vocab 256000, every row labelled, no bias (LLM-style head).

Useful FLOPs: 2·rows·E·V forward on *labelled* rows only, x3 for forward+backward (the two gradient GEMMs).
Providers that project every token do more arithmetic than they are credited with; that is the point of the
comparison. Peak memory is reported next to time because memory (the logits) is half of the story here.

PyTorch baselines cast the logits to fp32 before ``F.cross_entropy``, which is what ``cross_entropy`` does under
AMP autocast (it is on autocast's fp32 list), i.e. what a Hugging Face BERT trained with AMP pays.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    Case,
    Inputs,
    OpSpec,
    Options,
    Provider,
    Skip,
    Step,
    compiled,
    generator,
    import_ptfast,
    make_step,
    randn,
    require_compile,
)

IGNORE = -100
PTFAST_BACKENDS = ("torch", "triton", "cuda", "auto")


def _case(
    name: str, rows: tuple[int, ...], hidden: int, vocab: int, frac: float, bias: bool, graph: bool = False
) -> Case:
    n = 1
    for r in rows:
        n *= r
    valid = n if frac >= 1.0 else max(1, round(frac * n))
    return Case(name, dict(rows=list(rows), N=n, E=hidden, V=vocab, valid=valid, bias=bias), graph=graph)


def cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [
            _case("tiny 15% masked", (4, 64), 64, 1000, 0.15, True, graph=True),
            _case("tiny all rows", (96,), 64, 1001, 1.0, False, graph=True),
        ]
    if not opts.cuda and not opts.full:
        # CPU shapes: a small BERT's head (the demo's is hidden 128, vocab 4000), a batch of 16 x 128 tokens.
        return [
            _case("small bert 2k tok", (16, 128), 256, 8000, 0.15, True),
            _case("demo bert 2k tok", (16, 128), 128, 4000, 0.15, True),
        ]
    return [
        _case("bert-base 32k tok", (256, 128), 768, 30522, 0.15, True),
        _case("bert-large 32k tok", (256, 128), 1024, 30522, 0.15, True),
        _case("large vocab 8k x 256k", (8192,), 2048, 256000, 1.0, False),
    ]


def flops(case: Case, mode: str) -> float:
    p = case.params
    fwd = 2.0 * p["valid"] * p["E"] * p["V"]
    return 3.0 * fwd if mode == "fwd+bwd" else fwd


def make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    g = generator(opts.device, 29 + seed)
    hidden = randn((*p["rows"], p["E"]), opts, g).requires_grad_()
    weight = randn((p["V"], p["E"]), opts, g, scale=0.02).requires_grad_()  # BERT's init scale
    bias = randn((p["V"],), opts, g, scale=0.02).requires_grad_() if p["bias"] else None
    labels = torch.randint(0, p["V"], (p["N"],), device=opts.device, generator=g)
    if p["valid"] < p["N"]:
        # Exactly `valid` labelled rows at random positions (a fixed count keeps FLOPs identical across sets).
        drop = torch.randperm(p["N"], device=opts.device, generator=g)[p["valid"] :]
        labels[drop] = IGNORE
    return {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "labels": labels.view(p["rows"]),
        "leaves": [hidden, weight, bias],
    }


def _ptfast(backend: str, atomic: bool = False) -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        if atomic and mode == "fwd":
            raise Skip("the atomic mode only changes the backward")
        ptfast = import_ptfast()

        def fwd() -> Tensor:
            with ptfast.use_backend(backend):
                return ptfast.masked_lm_loss(
                    inp["hidden"], inp["weight"], inp["labels"], inp["bias"], ignore_index=IGNORE
                )

        step = make_step(fwd, inp["leaves"], mode, None)
        if not atomic:
            return step
        from ptfast.backends.triton import masked_lm_loss as triton_mlm

        def step_atomic() -> Any:
            with triton_mlm.use_atomic_backward():
                return step()

        return step_atomic

    if atomic:
        name, what = f"ptfast[{backend},atomic]", " with the opt-in atomic backward (not bitwise reproducible)"
    else:
        name, what = f"ptfast[{backend}]", ""
    return Provider(name, "ptfast", f"ptfast.masked_lm_loss with use_backend({backend!r}){what}", build)


def _all_tokens(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor) -> Tensor:
    logits = F.linear(h, w, b)
    return F.cross_entropy(logits.reshape(-1, w.shape[0]).float(), y.reshape(-1), ignore_index=IGNORE)


def _hf_all_tokens() -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        def fwd() -> Tensor:
            return _all_tokens(inp["hidden"], inp["weight"], inp["bias"], inp["labels"])

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "hf-all-tokens",
        "pytorch",
        "stock HF BertForMaskedLM head: linear over all tokens, fp32 F.cross_entropy(ignore_index)",
        build,
    )


def _gathered_loss(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, w, b).float(), y)


def _gather(inp: Inputs) -> tuple[Tensor, Tensor]:
    # Boolean indexing: one host sync per call, which is what eager users pay; it is inside the timing.
    labels = inp["labels"].reshape(-1)
    sel = labels != IGNORE
    return inp["hidden"].reshape(-1, inp["hidden"].shape[-1])[sel], labels[sel]


def _gathered() -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        def fwd() -> Tensor:
            h, y = _gather(inp)
            return _gathered_loss(h, inp["weight"], inp["bias"], y)

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "gathered",
        "pytorch",
        "plain PyTorch on labelled rows only (boolean gather incl. its host sync, then linear + fp32 cross_entropy)",
        build,
    )


def _compiled_gathered(opts: Options) -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        require_compile(opts)
        fn = compiled(_gathered_loss)

        def fwd() -> Tensor:
            h, y = _gather(inp)  # data-dependent shape: gathered eagerly, the rest is one static graph
            return fn(h, inp["weight"], inp["bias"], y)

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "compile-gathered",
        "pytorch",
        "eager gather, then torch.compile(linear + cross_entropy, mode=default, dynamic=False)",
        build,
    )


def _torch_linear_ce() -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        fn = getattr(F, "linear_cross_entropy", None)
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if fn is None or options_cls is None:
            raise Skip(f"F.linear_cross_entropy (chunked) is not in torch {torch.__version__}")
        options = options_cls()
        e = inp["hidden"].shape[-1]

        def fwd() -> Tensor:
            return fn(
                inp["hidden"].reshape(-1, e),
                inp["weight"],
                inp["labels"].reshape(-1),
                linear_bias=inp["bias"],
                ignore_index=IGNORE,
                options=options,
            )

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "torch-linear-ce",
        "pytorch",
        "F.linear_cross_entropy(options=LinearCrossEntropyOptions()) (chunked) on all tokens",
        build,
    )


def _liger() -> Provider:
    # Checked against liger-kernel 0.8.5: LigerFusedLinearCrossEntropyLoss(ignore_index=..., reduction="mean", ...)
    # and forward(lin_weight, _input, target, bias=None) -> loss (a tensor unless extra outputs are asked for).
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            raise Skip(f"Liger-Kernel is not importable ({e.__class__.__name__}: {e})") from e
        if inp["hidden"].device.type != "cuda":
            raise Skip("Liger-Kernel needs CUDA")
        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
        e = inp["hidden"].shape[-1]

        def fwd() -> Tensor:
            out: Any = loss_fn(inp["weight"], inp["hidden"].reshape(-1, e), inp["labels"].reshape(-1), inp["bias"])
            return out if isinstance(out, Tensor) else out.loss

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "liger",
        "external",
        "Liger-Kernel LigerFusedLinearCrossEntropyLoss (defaults: accum_dtype=None, i.e. gradient accumulators in "
        "the parameters' dtype): chunked linear over all tokens; with a training forward it computes the gradients "
        "in the forward, so its fwd column includes most of the backward work",
        build,
    )


def _cce() -> Provider:
    # Checked against cut-cross-entropy 25.1.1: linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None,
    # reduction="mean", shift=False, filter_eps="high", impl="cce") -- there is no bias argument.
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise Skip(f"cut-cross-entropy is not importable ({e.__class__.__name__}: {e})") from e
        if inp["hidden"].device.type != "cuda":
            raise Skip("cut-cross-entropy needs CUDA")
        if inp["bias"] is not None:
            raise Skip("cut-cross-entropy's linear_cross_entropy takes no bias (this case has a decoder bias)")
        e = inp["hidden"].shape[-1]

        def fwd() -> Tensor:
            return linear_cross_entropy(
                inp["hidden"].reshape(-1, e),
                inp["weight"],
                inp["labels"].reshape(-1),
                ignore_index=IGNORE,
                reduction="mean",
            )

        return make_step(fwd, inp["leaves"], mode, None)

    return Provider(
        "cut-cross-entropy",
        "external",
        "Apple's cut-cross-entropy linear_cross_entropy (impl='cce', default filter_eps='high': gradients below "
        "eps/32 are skipped); ignored rows are dropped with nonzero() (a host sync); no bias support",
        build,
    )


def providers(opts: Options) -> list[Provider]:
    return [
        *(_ptfast(b) for b in PTFAST_BACKENDS),
        _ptfast("triton", atomic=True),  # fastest mode, reported apart from the deterministic default
        _hf_all_tokens(),
        _gathered(),
        _compiled_gathered(opts),
        _torch_linear_ce(),
        _liger(),
        _cce(),
    ]


def spec() -> OpSpec:
    return OpSpec(
        name="masked_lm_loss",
        title="Masked-LM loss (bf16 hidden/weight, fp32 loss): ptfast vs PyTorch heads",
        cases=cases,
        make_inputs=make_inputs,
        providers=providers,
        flops=flops,
        baseline="hf-all-tokens",
        reference=("hf-all-tokens", "gathered", "ptfast[torch]"),
        notes=[
            "Liger-Kernel and cut-cross-entropy are measured only when importable on the machine (on the offline "
            "GPU machine: fetch their wheels with scripts/fetch_bench_wheels.sh and carry wheels/); otherwise "
            "they are listed as skipped.",
        ],
        case_doc="N tokens (rows), valid = labelled rows, E hidden size, V vocabulary; TFLOP/s count labelled rows "
        "only (2·valid·E·V forward, x3 with backward).",
    )
