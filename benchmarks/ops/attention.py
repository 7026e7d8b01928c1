"""Attention benchmark spec: ptfast.attention / attention_varlen against every PyTorch attention path.

Shapes (bf16):

* BERT: batch 32 and 128, 12 heads, head dim 64, L = 128 and 512, right-padded with lengths uniform in
  [L/4, L] passed as ``key_mask``; with and without attention dropout 0.1 (BERT pretraining uses 0.1).
* Long: L = 1k..16k, head dim 64 and 128, causal and not, batch = 16k / L tokens, heads = 2048 / D (the
  FlashAttention papers' setting: hidden size 2048, 16k tokens per batch).

FLOPs: forward 4·B·H·Lq·Lk·D (half when causal), backward 2.5x forward; for padded batches only real
query x real key pairs count (sum over the batch of len²), so every provider is credited with the same useful
work and a provider that computes on padding shows up as slower, not as "more FLOP/s".

The q/k/v given to padded providers are ``(B, L, H, D)`` tensors viewed as ``(B, H, L, D)``, the
non-contiguous layout Hugging Face BERT passes; packed providers get ``(total, H, D)`` copies of the real
tokens (packing is done once in setup and not timed: a model packs once per batch for all layers).
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

PTFAST_BACKENDS = ("torch", "triton", "cuda", "auto")
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# The math backend materialises B*H*Lq*Lk scores (plus softmax and, for backward, their gradients in fp32).
MATH_MAX_SCORES = 2**30

PUBLISHED = [
    "FlashAttention-2 (Dao 2023), H100, bf16, fwd+bwd: ~215 TFLOP/s at head dim 64, L=512; "
    "~340 TFLOP/s at head dim 128, L=16k (non-causal).",
    "FlashAttention-3 (Shah et al. 2024), H100, bf16, forward: ~500 TFLOP/s at long L, head dim 128.",
    "PyTorch SDPA's memory-efficient kernel with a padding mask + dropout: ~140 TFLOP/s forward on H100 (DESIGN §3).",
]


# --- shapes -------------------------------------------------------------------------------------------------


def _lengths(batch: int, seqlen: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(seqlen // 4, seqlen + 1, (batch,), generator=g).tolist()


def _bert(batch: int, heads: int, seqlen: int, dim: int, dropout: float, graph: bool = False) -> Case:
    lengths = _lengths(batch, seqlen, seed=1000 * batch + seqlen)
    name = f"bert B{batch} L{seqlen}" + (f" p{dropout:g}" if dropout else "")
    params = dict(
        kind="bert",
        B=batch,
        H=heads,
        L=seqlen,
        D=dim,
        causal=False,
        dropout=dropout,
        padded=True,
        lengths=lengths,
        real_fraction=round(sum(lengths) / (batch * seqlen), 4),
    )
    return Case(name, params, graph=graph)


def _long(seqlen: int, dim: int, causal: bool, tokens: int = 16384, hidden: int = 2048) -> Case:
    batch = max(1, tokens // seqlen)
    name = f"long L{seqlen // 1024}k D{dim}" + (" causal" if causal else "")
    params = dict(
        kind="long", B=batch, H=hidden // dim, L=seqlen, D=dim, causal=causal, dropout=0.0, padded=False, lengths=None
    )
    return Case(name, params)


def cases(opts: Options) -> list[Case]:
    if opts.quick:
        return [
            _bert(2, 2, 64, 32, 0.0, graph=True),
            _bert(2, 2, 64, 32, 0.1, graph=True),
            Case(
                "long L128 D32 causal",
                dict(kind="long", B=2, H=2, L=128, D=32, causal=True, dropout=0.0, padded=False, lengths=None),
                graph=True,
            ),
        ]
    if not opts.cuda and not opts.full:
        # CPU shapes: a small BERT layer (what the demo and a laptop run), padding and dropout as in training.
        return [_bert(8, 4, 128, 64, p) for p in (0.0, 0.1)]
    out = [
        _bert(b, 12, seqlen, 64, p, graph=(b == 32 and seqlen == 128))
        for b in (32, 128)
        for seqlen in (128, 512)
        for p in (0.0, 0.1)
    ]
    lengths = (1024, 2048, 4096, 8192, 16384) if opts.full else (1024, 4096, 16384)
    out += [_long(seqlen, d, c) for d in (64, 128) for seqlen in lengths for c in (False, True)]
    return out


def flops(case: Case, mode: str) -> float:
    p = case.params
    if p["padded"]:
        pairs = sum(n * n for n in p["lengths"])
    else:
        pairs = p["B"] * p["L"] * p["L"]
    fwd = 4.0 * p["H"] * p["D"] * pairs * (0.5 if p["causal"] else 1.0)
    return fwd * 3.5 if mode == "fwd+bwd" else fwd


# --- inputs -------------------------------------------------------------------------------------------------


def make_inputs(case: Case, opts: Options, seed: int) -> Inputs:
    p = case.params
    b, h, seqlen, d = p["B"], p["H"], p["L"], p["D"]
    g = generator(opts.device, 17 + seed)
    leaves = [randn((b, seqlen, h, d), opts, g).requires_grad_() for _ in range(3)]
    inp: Inputs = {
        "leaves": leaves,
        "q": leaves[0].transpose(1, 2),
        "k": leaves[1].transpose(1, 2),
        "v": leaves[2].transpose(1, 2),
        "dout": randn((b, h, seqlen, d), opts, g),
        "key_mask": None,
    }
    if p["padded"]:
        lengths = torch.tensor(p["lengths"], device=opts.device)
        key_mask = torch.arange(seqlen, device=opts.device)[None, :] < lengths[:, None]
        cu = torch.zeros(b + 1, dtype=torch.int32, device=opts.device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        packed = [t.detach()[key_mask].requires_grad_() for t in leaves]  # (total, H, D), real tokens only
        inp.update(
            key_mask=key_mask,
            attn_mask=key_mask[:, None, None, :],  # SDPA's bool convention is also True = attend
            packed=packed,
            dout_packed=inp["dout"].transpose(1, 2)[key_mask].contiguous(),
            cu_seqlens=cu,
            max_seqlen=max(p["lengths"]),
        )
    return inp


def _canonical_padded(case: Case, inp: Inputs, out: Any) -> Tensor:
    """Compare outputs on real query rows only (padded rows are unspecified across implementations)."""
    if case.params["padded"]:
        return out.transpose(1, 2)[inp["key_mask"]]
    return out


def _canonical_packed(case: Case, inp: Inputs, out: Any) -> Tensor:
    return out


# --- providers ----------------------------------------------------------------------------------------------


def _ptfast(backend: str, atomic_dq: bool = False) -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        if atomic_dq and mode != "fwd+bwd":
            raise Skip("the atomic-dQ mode only changes the backward")
        ptfast = import_ptfast()
        p = case.params
        if atomic_dq:
            from ptfast.backends.triton import attention_config

            mode_ctx = attention_config.use_atomic_dq
        else:
            mode_ctx = None

        def fwd() -> Tensor:
            with ptfast.use_backend(backend):
                return ptfast.attention(
                    inp["q"],
                    inp["k"],
                    inp["v"],
                    dropout_p=p["dropout"],
                    is_causal=p["causal"],
                    key_mask=inp["key_mask"],
                )

        step = make_step(fwd, inp["leaves"], mode, inp["dout"])
        if mode_ctx is None:
            return step

        def step_atomic() -> Any:
            with mode_ctx(True):
                return step()

        return step_atomic

    name = f"ptfast[{backend},atomic-dq]" if atomic_dq else f"ptfast[{backend}]"
    what = " with the opt-in atomic-dQ backward (not bitwise reproducible)" if atomic_dq else ""
    return Provider(
        name,
        "ptfast",
        f"ptfast.attention with use_backend({backend!r}){what}; padding given as key_mask",
        build,
        _canonical_padded,
    )


def _ptfast_varlen(backend: str) -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        if not case.params["padded"]:
            raise Skip("no padding in this shape (same work as ptfast[...])")
        ptfast = import_ptfast()
        p = case.params
        q, k, v = inp["packed"]
        cu, m = inp["cu_seqlens"], inp["max_seqlen"]

        def fwd() -> Tensor:
            with ptfast.use_backend(backend):
                return ptfast.attention_varlen(q, k, v, cu, cu, m, m, dropout_p=p["dropout"], is_causal=p["causal"])

        return make_step(fwd, inp["packed"], mode, inp["dout_packed"])

    return Provider(
        f"ptfast-varlen[{backend}]",
        "ptfast",
        f"ptfast.attention_varlen on packed real tokens, use_backend({backend!r})",
        build,
        _canonical_packed,
    )


def _sdpa(short: str, opts: Options) -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        p = case.params
        if short == "math" and p["B"] * p["H"] * p["L"] * p["L"] > MATH_MAX_SCORES:
            raise Skip(
                f"math would materialise B*H*L*L = {p['B'] * p['H'] * p['L'] ** 2:.2e} scores "
                f"(limit {MATH_MAX_SCORES:.1e})"
            )
        backend = getattr(SDPBackend, SDPA_BACKENDS[short])
        mask = inp.get("attn_mask")

        def fwd() -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    inp["q"], inp["k"], inp["v"], attn_mask=mask, dropout_p=p["dropout"], is_causal=p["causal"]
                )

        return make_step(fwd, inp["leaves"], mode, inp["dout"])

    return Provider(
        f"sdpa[{short}]",
        "pytorch",
        f"F.scaled_dot_product_attention forced to SDPBackend.{SDPA_BACKENDS[short]} "
        "(padding as a broadcast bool attn_mask (B,1,1,L))",
        build,
        _canonical_padded,
    )


def _sdpa_nested() -> Provider:
    def build(case: Case, inp: Inputs, mode: str) -> Step:
        if not case.params["padded"]:
            raise Skip("no padding in this shape")
        if not hasattr(torch.nested, "nested_tensor_from_jagged"):
            raise Skip("torch.nested.nested_tensor_from_jagged is not available")
        p = case.params
        offsets = inp["cu_seqlens"].to(torch.int64)
        m = inp["max_seqlen"]

        def nest(t: Tensor) -> Tensor:
            # (total, H, D) -> jagged (B, j, H, D) -> (B, H, j, D), the layout SDPA expects.
            return torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=m).transpose(1, 2)

        q, k, v = inp["packed"]

        def fwd() -> Tensor:
            out = F.scaled_dot_product_attention(
                nest(q), nest(k), nest(v), dropout_p=p["dropout"], is_causal=p["causal"]
            )
            return out.transpose(1, 2).values()

        return make_step(fwd, inp["packed"], mode, inp["dout_packed"])

    return Provider(
        "sdpa-nested",
        "pytorch",
        "SDPA on jagged nested tensors (packed real tokens; PyTorch picks the backend)",
        build,
        _canonical_packed,
    )


def _flex(opts: Options) -> Provider:
    block_masks: dict[str, Any] = {}

    def build(case: Case, inp: Inputs, mode: str) -> Step:
        require_compile(opts)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Skip(f"FlexAttention is not available: {e}") from e
        p = case.params
        if p["dropout"]:
            raise Skip("flex_attention has no dropout")
        if not p["padded"] and not opts.full:
            raise Skip("long shapes run flex only with --full (compile time)")
        if p["padded"] and p["B"] > 32 and not opts.full:
            raise Skip("flex runs at batch 32 only without --full (compile time per shape)")
        seqlen = p["L"]
        if case.name in block_masks:
            # Every input set of a case has the same lengths: one mask (and one mask_mod object) serves all,
            # so the compiled function is not re-specialised per rotated input set.
            block_mask = block_masks[case.name]
        elif p["padded"]:
            km = inp["key_mask"]

            def real(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                # Padded queries are masked too, so whole padding blocks are skipped on both axes.
                return km[b, kv_idx] & km[b, q_idx]

            block_mask = create_block_mask(real, p["B"], None, seqlen, seqlen, device=str(opts.device))
        elif p["causal"]:

            def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return q_idx >= kv_idx

            block_mask = create_block_mask(causal, None, None, seqlen, seqlen, device=str(opts.device))
        else:
            block_mask = None
        block_masks[case.name] = block_mask
        flex = compiled(flex_attention)

        def fwd() -> Tensor:
            return flex(inp["q"], inp["k"], inp["v"], block_mask=block_mask)

        return make_step(fwd, inp["leaves"], mode, inp["dout"])

    return Provider(
        "flex",
        "pytorch",
        "torch.compile(flex_attention, dynamic=False) with a padding (or causal) block mask; mask built in setup",
        build,
        _canonical_padded,
    )


def providers(opts: Options) -> list[Provider]:
    out = [_ptfast(b) for b in PTFAST_BACKENDS]
    out.append(_ptfast("triton", atomic_dq=True))  # fastest mode, reported apart from the deterministic default
    # Packed attention is the larger lever for padded batches (DESIGN §3): its torch and triton backends are timed
    # by default (first contact's record needs both); the cuda one (no kernel yet) only with --full.
    out += [_ptfast_varlen(b) for b in (PTFAST_BACKENDS if opts.full else ("torch", "triton", "auto"))]
    out += [_sdpa(s, opts) for s in SDPA_BACKENDS]
    out += [_sdpa_nested(), _flex(opts)]
    return out


def spec() -> OpSpec:
    return OpSpec(
        name="attention",
        title="Attention (bf16): ptfast vs PyTorch SDPA backends, nested tensors, FlexAttention",
        cases=cases,
        make_inputs=make_inputs,
        providers=providers,
        flops=flops,
        baseline="sdpa[best]",
        best_of={"sdpa[best]": tuple(f"sdpa[{s}]" for s in SDPA_BACKENDS)},
        reference=("sdpa[efficient]", "sdpa[flash]", "sdpa[cudnn]", "sdpa[math]", "ptfast[torch]"),
        notes=PUBLISHED,
        case_doc="B batch, H heads, L sequence length (padded length for BERT shapes), D head dim, p dropout; "
        "BERT shapes are right-padded with lengths uniform in [L/4, L]; TFLOP/s count real query x key pairs only.",
    )
