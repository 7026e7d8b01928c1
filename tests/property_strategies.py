"""Hypothesis strategies and checks shared by the property-based tests of every op on every backend tier.

Each op has a *case* (a frozen dataclass, so a failing example prints as a constructor call that can be pasted
into ``@example(case=...)``), a strategy drawing many knobs of it at once, and a ``check_*`` function that builds
the inputs from the case (seeded generator, float64 draws rounded to the dtype under test, on ``device``), runs
``ptfast`` on the requested backend (asserted with ``record_dispatch``, forward and backward), and compares the
output and every gradient with the float64 oracle of ``tests/oracles``:

* float64 / float32 results: ``assert_close64`` (relative Frobenius error, tight);
* float16 / bfloat16 results: the low-precision rule of docs/design.md §5 against PyTorch's own op in the same dtype
  on the same device (SDPA, ``F.linear`` + ``F.cross_entropy``, ``F.conv2d`` + ReLU + ``F.max_pool2d``), with two
  documented allowances the drawn corner cases need (:func:`small_sample_slack` for tensors of a few elements,
  :func:`delta_floor` for attention gradients that are exactly or nearly 0).

Structural properties are checked exactly: shapes, dtypes, memory formats, zero rows (attention rows with no
admissible key, sequences without keys, ignored labels) and their zero gradients.

The checks are device-agnostic: the main tier runs them on CPU with the torch backend, the interpreter tier on
CPU with the triton backend (``TRITON_INTERPRET=1``), the GPU tier on CUDA with every backend that runs there.
Nothing here imports triton.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import ptfast
from ptfast import _dropout
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, rel_err, sdpa_same_dtype
from tests.oracles import attention as attention_oracle
from tests.oracles import masked_lm_loss as mlm_oracle
from tests.oracles.conv import conv_relu_ref

F64 = torch.float64
LOW_PRECISION = (torch.float16, torch.bfloat16)
SEEDS = st.integers(0, 2**16)
FP32_TOL = 2e-5  # assert_close64's float32 default


def sizes(lo: int, hi: int, *, zero_one_in: int = 6):
    """Sizes in [lo, hi], plus 0 about once in ``zero_one_in`` draws (empty tensors are a corner, not the norm)."""
    return st.sampled_from([True] * (zero_one_in - 1) + [False]).flatmap(
        lambda nonzero: st.integers(lo, hi) if nonzero else st.just(0)
    )


def _norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t.detach().double()).item()


def small_sample_slack(t: torch.Tensor) -> float:
    """Relative slack added to the low-precision rule for tensors with few elements: ``u * min(1, sqrt(64 / n))``
    (``u``: the dtype's unit roundoff). The rule compares two error norms; over a handful of elements each is the
    norm of a few rounding errors, and PyTorch's can be far below its typical size by luck (several of its elements
    rounding almost exactly), so a kernel that rounds once more (FlashAttention casts P to the input dtype before
    the ``P^T dO`` GEMM) fails the factor 2 without being less accurate. The slack fades like the sampling noise of
    a norm (``1 / sqrt(n)``): negligible for the fixed-shape tests' sizes, where the bare rule holds."""
    return torch.finfo(t.dtype).eps / 2 * min(1.0, math.sqrt(64 / max(t.numel(), 1)))


def _compare(name: str, ours, theirs_fn, oracle, dtype: torch.dtype, tol_fp64=1e-9, rule_fp32=False, floor=0.0):
    """Tight for fp64/fp32 (unless ``rule_fp32``), the low-precision rule otherwise (``theirs_fn()`` is PyTorch's
    own result in the same dtype; only evaluated when needed), plus :func:`small_sample_slack`.

    ``floor``: an absolute error allowance for rounding that PyTorch's own op provably does not make but any
    flash-style kernel must (see :func:`delta_floor`); 0 everywhere else. Added to the fp32 / fp64 tolerance too."""
    if dtype in LOW_PRECISION or (rule_fp32 and dtype == torch.float32):
        norm = _norm(oracle)
        e_ours, e_theirs = rel_err(ours, oracle), rel_err(theirs_fn(), oracle)
        allowance = (floor / norm if norm > 0 else floor) + small_sample_slack(ours)  # rel_err is absolute at 0
        assert e_ours <= 2 * e_theirs + 1e-5 + allowance, (
            f"{name}: err {e_ours:.3e} > 2 * torch err {e_theirs:.3e} + 1e-5 + slack {allowance:.3e}"
        )
    else:
        norm = _norm(oracle)
        tol = (tol_fp64 if dtype == F64 else FP32_TOL) + (floor / norm if norm > 0 else floor)
        assert_close64(ours, oracle, name, tol=tol)


def seed_words(seed: int, device) -> list[int]:
    """Seed torch and return the dropout seed words the functional wrapper will draw next on ``device``."""
    torch.manual_seed(seed)
    drawn = _dropout.draw_seed(torch.device(device)).tolist()
    torch.manual_seed(seed)
    return drawn


def _grads(out, inputs, grad):
    """Gradients of ``out`` (upstream ``grad``) for the inputs that require grad; None for the others."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not out.requires_grad:  # e.g. the oracle of zero sequences: a constant empty tensor
        got = iter([None] * len(wanted))
    else:
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
    res = []
    for t in inputs:
        if t is not None and t.requires_grad:
            g = next(got)
            res.append(torch.zeros_like(t) if g is None else g)
        else:
            res.append(None)
    return res


def _randn(gen, shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(device=device, dtype=dtype)


def _only(events, backend: str) -> None:
    assert all(e[1] == backend for e in events), f"another backend than {backend} ran: {events}"


# --- attention --------------------------------------------------------------------------------------------------

# How q / k / v are laid out in memory (the values are the same logical (B, H, L, D) tensor either way):
#   contiguous; hf: a transposed (B, L, H, D) tensor, what Hugging Face passes; strided: every other element of
#   the last dim (stride 2); expand_heads: one head expanded over H (stride 0 over heads).
HEAD_LAYOUTS = ("contiguous", "hf", "strided", "expand_heads")
KEY_MASKS = (None, "all", "right", "left", "holes", "padded_row")


@dataclass(frozen=True)
class MaskSpec:
    kind: str  # "bool" (True = attend) or "float" (additive)
    shape: tuple[int, ...]  # the stored mask: 2..4 dims, each 1 or the full size of (B, H, Lq, Lk)'s trailing dims
    expand: bool  # pass it expanded to the full trailing shape (stride-0 dims, like HF's padding mask)
    density: float  # bool: P(True); float: P(-inf)


@dataclass(frozen=True)
class AttentionCase:
    b: int
    h: int
    lq: int
    lk: int
    d: int
    q_layout: str = "contiguous"
    kv_layout: str = "contiguous"
    mask: MaskSpec | None = None
    key_mask: str | None = None
    causal: bool = False
    dropout_p: float = 0.0
    scale: float | None = None
    needs: tuple[bool, bool, bool] = (True, True, True)  # which of q, k, v require grad
    seed: int = 0


@st.composite
def mask_specs(draw, b: int, h: int, lq: int, lk: int):
    full = (b, h, lq, lk)
    ndim = draw(st.sampled_from([4, 2, 3]))
    keep = [draw(st.booleans()) for _ in range(ndim)]
    shape = tuple(n if k else 1 for n, k in zip(full[4 - ndim :], keep, strict=True))
    kind = draw(st.sampled_from(["bool", "float"]))
    density = draw(st.sampled_from([0.7, 0.3, 0.95]) if kind == "bool" else st.sampled_from([0.0, 0.25, 0.6]))
    return MaskSpec(kind, shape, draw(st.booleans()), density)


@st.composite
def attention_cases(
    draw,
    *,
    max_len: int,
    head_dims,
    max_batch: int = 2,
    max_heads: int = 3,
    dropouts=(0.0, 0.1, 0.37, 0.0, 1.0),
    layouts=HEAD_LAYOUTS,
):
    b = draw(sizes(1, max_batch))
    h = draw(st.integers(1, max_heads))
    lq = draw(sizes(1, max_len, zero_one_in=10))
    lk = draw(sizes(1, max_len))
    mask = draw(st.none() | mask_specs(b, h, lq, lk))
    needs = draw(st.sampled_from([(True, True, True), (True, False, False), (False, True, True), (False, False, True)]))
    return AttentionCase(
        b=b,
        h=h,
        lq=lq,
        lk=lk,
        d=draw(st.sampled_from(head_dims)),
        q_layout=draw(st.sampled_from(layouts)),
        kv_layout=draw(st.sampled_from(layouts)),
        mask=mask,
        key_mask=draw(st.sampled_from(KEY_MASKS)),
        causal=draw(st.booleans()),
        dropout_p=draw(st.sampled_from(dropouts)),
        scale=draw(st.sampled_from([None, 0.3, 1.7, 0.0])),
        needs=needs,
        seed=draw(SEEDS),
    )


def _heads(layout: str, b: int, h: int, n: int, d: int, dtype, device, gen, needs_grad: bool) -> torch.Tensor:
    """A logical (B, H, n, D) tensor in the given memory layout (a leaf that may be a view)."""
    if layout == "contiguous":
        t = _randn(gen, (b, h, n, d), dtype, device)
    elif layout == "hf":
        t = _randn(gen, (b, n, h, d), dtype, device).transpose(1, 2)
    elif layout == "strided":
        t = _randn(gen, (b, h, n, 2 * d), dtype, device)[..., 1::2]
    elif layout == "expand_heads":
        t = _randn(gen, (b, 1, n, d), dtype, device).expand(b, h, n, d)
    else:
        raise ValueError(layout)
    return t.requires_grad_(needs_grad)


def _attn_mask(spec: MaskSpec | None, case: AttentionCase, dtype, device, gen) -> torch.Tensor | None:
    if spec is None:
        return None
    full = (case.b, case.h, case.lq, case.lk)[4 - len(spec.shape) :]
    if spec.kind == "bool":
        m = torch.rand(spec.shape, generator=gen) < spec.density
    else:
        m = torch.randn(spec.shape, generator=gen, dtype=F64) * 2
        m = m.masked_fill(torch.rand(spec.shape, generator=gen) < spec.density, -math.inf).to(dtype)
    m = m.to(device)
    return m.expand(full) if spec.expand else m


def _key_mask(kind: str | None, b: int, lk: int, gen) -> torch.Tensor | None:
    """bool (B, Lk), True = real token: every padding pattern, incl. sequences with no real key."""
    if kind is None:
        return None
    pos = torch.arange(lk)[None, :]
    if kind == "all":
        return torch.ones(b, lk, dtype=torch.bool)
    if kind == "right":
        return pos < torch.randint(0, lk + 1, (b, 1), generator=gen)
    if kind == "left":
        return pos >= torch.randint(0, lk + 1, (b, 1), generator=gen)
    km = torch.rand(b, lk, generator=gen) < 0.7
    if kind == "padded_row" and b > 0:
        km[torch.randint(0, b, (1,), generator=gen)] = False
    return km


def delta_floor(q, k, out, ref_out, grad, attn_mask, key_mask, causal, scale, dropout_p, keep):
    """Absolute rounding floor ``(dq, dk)`` of attention's gradients from the ``Delta`` term, ``(B, H, L, D)`` inputs.

    Backward forms ``dS = P * (dP - Delta)`` with ``Delta_i = rowsum(dO_i * O_i)``. A flash-style kernel (ours,
    FlashAttention's) takes ``O`` as the output it returned, rounded and with its own error, so ``Delta_i`` is off
    by ``delta_i <= |dO_i| (|O_i - O_exact_i| + eps |O_i|)``; that error does not cancel against ``dP``, and adds
    ``-scale * delta_i * (P k)_i`` to dq_i and ``-scale * sum_i P_ij delta_i q_i`` to dk_j. It is invisible
    next to a normal dq, but where the exact dq is 0 or nearly so (a row with one admissible key, or one key
    dominating through a large mask value) it is the whole answer, and PyTorch's math path (which differentiates
    through its own softmax) does not have it. The floor is that first-order bound, with the exact (dropout-scaled)
    ``P`` from the oracle, times 2. ``keep``: the oracle's dropout keep mask (None without dropout).
    """
    b, h, lk = q.shape[0], q.shape[1], k.shape[2]
    if q.numel() == 0 or lk == 0:
        return 0.0, 0.0
    q64, k64, o, o_ref, g = (t.detach().cpu().double() for t in (q, k, out, ref_out, grad))
    eye = torch.eye(lk, dtype=F64).expand(b, h, lk, lk)  # the oracle's output with v = I is its P (dropout-scaled)
    m = attn_mask.cpu() if attn_mask is not None else None
    km = key_mask.cpu() if key_mask is not None else None
    probs = attention_oracle.attention(q64, k64, eye, m, km, causal, scale, dropout_p, keep).abs()
    gn = torch.linalg.vector_norm
    delta = gn(g, dim=-1) * (gn(o - o_ref, dim=-1) + torch.finfo(out.dtype).eps * gn(o, dim=-1))  # (B, H, Lq)
    s = abs(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    floor_dq = 2 * s * gn(delta * gn(probs @ k64, dim=-1)).item()
    floor_dk = 2 * s * gn(probs.transpose(-2, -1) @ (delta * gn(q64, dim=-1))[..., None]).item()
    return floor_dq, floor_dk


def allowed_keys(b, h, lq, lk, attn_mask, key_mask, causal) -> torch.Tensor:
    """bool (B, H, Lq, Lk) on the CPU: which scores any mask leaves admissible (a -inf float entry excludes)."""
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if attn_mask is not None:
        m = attn_mask.cpu()
        allowed = allowed & (m if m.dtype == torch.bool else m != -math.inf)
    if key_mask is not None:
        allowed = allowed & key_mask.cpu()[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool).tril()
    return allowed


def check_attention(case: AttentionCase, dtype: torch.dtype, backend: str, device="cpu", tol_fp64=1e-9) -> None:
    """``ptfast.attention`` on ``backend`` vs the float64 oracle (same dropout keep mask), forward and grads."""
    gen = torch.Generator().manual_seed(case.seed)
    b, h, lq, lk, d = case.b, case.h, case.lq, case.lk, case.d
    q = _heads(case.q_layout, b, h, lq, d, dtype, device, gen, case.needs[0])
    k = _heads(case.kv_layout, b, h, lk, d, dtype, device, gen, case.needs[1])
    v = _heads(case.kv_layout, b, h, lk, d, dtype, device, gen, case.needs[2])
    attn_mask = _attn_mask(case.mask, case, dtype, device, gen)
    key_mask = _key_mask(case.key_mask, b, lk, gen)
    key_mask = key_mask.to(device) if key_mask is not None else None
    grad = _randn(gen, (b, h, lq, d), dtype, device)
    p = case.dropout_p
    drawn = seed_words(case.seed, device) if p > 0 else None
    with ptfast.use_backend(backend), record_dispatch() as events:
        out = ptfast.attention(q, k, v, attn_mask, p, case.causal, case.scale, key_mask=key_mask)
        grads = _grads(out, (q, k, v), grad)
    phases = ("forward", "backward") if any(case.needs) else ("forward",)
    assert_ran(events, "attention", backend, phases)
    _only(events, backend)
    assert out.shape == (b, h, lq, d) and out.dtype == dtype and out.device == q.device
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g is None or (g.shape == t.shape and g.dtype == dtype)
    if p == 1.0:  # everything dropped (the oracle's 1 / (1 - p) is undefined): exact zeros, zero gradients
        assert (out == 0).all() and all(g is None or (g == 0).all() for g in grads), "dropout_p = 1 is not all 0"
        return

    keep = attention_oracle.keep_mask(drawn, p, b, h, lq, lk) if p > 0 else None
    leaves = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    mask_cpu = attn_mask.cpu() if attn_mask is not None else None
    km_cpu = key_mask.cpu() if key_mask is not None else None
    ref = attention_oracle.attention(*leaves, mask_cpu, km_cpu, case.causal, case.scale, p, keep)
    ref_grads = _grads(ref, leaves, grad.cpu().double())

    same = {}

    def theirs():
        if not same:
            tq, tk, tv = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            tout = sdpa_same_dtype(tq, tk, tv, attn_mask, key_mask, case.causal, case.scale, p, keep)
            same["out"] = tout.detach()
            same["grads"] = _grads(tout, (tq, tk, tv), grad) if any(case.needs) else [None] * 3
        return same

    allowed = allowed_keys(b, h, lq, lk, attn_mask, key_mask, case.causal)
    floors = delta_floor(q, k, out, ref, grad, attn_mask, key_mask, case.causal, case.scale, p, keep) + (0.0,)
    _compare("out", out, lambda: theirs()["out"], ref, dtype, tol_fp64)
    for i, name in enumerate("qkv"):
        if grads[i] is not None:
            _compare(
                f"d{name}", grads[i], lambda i=i: theirs()["grads"][i], ref_grads[i], dtype, tol_fp64, floor=floors[i]
            )

    # Rows with no admissible key (bool mask, -inf float mask, key mask, causality): exact zeros, zero dq.
    excluded = ~allowed.any(-1)
    if excluded.any():
        excluded = excluded.to(out.device)
        assert (out[excluded] == 0).all(), "a row with no admissible key is not exactly 0"
        if grads[0] is not None:
            assert (grads[0][excluded] == 0).all(), "a row with no admissible key has a nonzero dq"


# --- attention_varlen -------------------------------------------------------------------------------------------

# Packed layouts: contiguous (total, H, D); head_major: a transposed (H, total, D) tensor; packed_qkv: q, k and v
# sliced from one (total, 3, H, D) tensor (only when the q and k lengths agree); strided: last-dim stride 2.
VARLEN_LAYOUTS = ("contiguous", "head_major", "packed_qkv", "strided")


@dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    h: int
    d: int
    layout: str = "contiguous"
    causal: bool = False
    dropout_p: float = 0.0
    scale: float | None = None
    slack: int = 0  # max_seqlen = longest sequence + slack (a loose bound is valid)
    seed: int = 0


@st.composite
def varlen_cases(draw, *, max_len: int, head_dims, max_seqs: int = 4, max_heads: int = 3, dropouts=(0.0, 0.2)):
    n = draw(sizes(1, max_seqs, zero_one_in=8))
    lens = st.lists(sizes(1, max_len, zero_one_in=4), min_size=n, max_size=n)
    lens_q = tuple(draw(lens))
    lens_k = lens_q if draw(st.booleans()) else tuple(draw(lens))
    layouts = VARLEN_LAYOUTS if lens_q == lens_k else tuple(x for x in VARLEN_LAYOUTS if x != "packed_qkv")
    return VarlenCase(
        lens_q=lens_q,
        lens_k=lens_k,
        h=draw(st.integers(1, max_heads)),
        d=draw(st.sampled_from(head_dims)),
        layout=draw(st.sampled_from(layouts)),
        causal=draw(st.booleans()),
        dropout_p=draw(st.sampled_from(dropouts)),
        scale=draw(st.sampled_from([None, 0.45])),
        slack=draw(st.sampled_from([0, 3])),
        seed=draw(SEEDS),
    )


def _packed(case: VarlenCase, dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tq, tk, h, d = sum(case.lens_q), sum(case.lens_k), case.h, case.d
    if case.layout == "packed_qkv":
        base = _randn(gen, (tq, 3, h, d), dtype, device)
        return tuple(base[:, i] for i in range(3))
    out = []
    for n in (tq, tk, tk):
        if case.layout == "contiguous":
            t = _randn(gen, (n, h, d), dtype, device)
        elif case.layout == "head_major":
            t = _randn(gen, (h, n, d), dtype, device).transpose(0, 1)
        elif case.layout == "strided":
            t = _randn(gen, (n, h, 2 * d), dtype, device)[..., ::2]
        else:
            raise ValueError(case.layout)
        out.append(t)
    return tuple(out)


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def check_attention_varlen(case: VarlenCase, dtype: torch.dtype, backend: str, device="cpu") -> None:
    """``ptfast.attention_varlen`` vs the per-sequence float64 oracle (dropout positions within each sequence)."""
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v = (t.requires_grad_() for t in _packed(case, dtype, device, gen))
    cu_q, cu_k = cu_seqlens(case.lens_q).to(device), cu_seqlens(case.lens_k).to(device)
    max_q = max(case.lens_q, default=0) + case.slack
    max_k = max(case.lens_k, default=0) + case.slack
    grad = _randn(gen, q.shape, dtype, device)
    p = case.dropout_p
    drawn = seed_words(case.seed, device) if p > 0 else None
    with ptfast.use_backend(backend), record_dispatch() as events:
        out = ptfast.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, p, case.causal, case.scale)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention_varlen", backend, ("forward", "backward"))
    _only(events, backend)
    assert out.shape == q.shape and out.dtype == dtype
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == dtype

    cq, ck = cu_q.tolist(), cu_k.tolist()
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = attention_oracle.attention_varlen(*leaves, cq, ck, case.causal, case.scale, p, drawn)
    ref_grads = _grads(ref, leaves, grad.cpu().double())

    same = {}

    def theirs():
        if not same:
            tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
            outs = []
            for i in range(len(case.lens_q)):
                qi = tq[cq[i] : cq[i + 1]].transpose(0, 1)[None]
                ki, vi = (t[ck[i] : ck[i + 1]].transpose(0, 1)[None] for t in (tk, tv))
                keep = None
                if p > 0:
                    keep = attention_oracle.keep_mask(drawn, p, 1, case.h, qi.shape[2], ki.shape[2], b_offset=i)
                oi = sdpa_same_dtype(qi, ki, vi, is_causal=case.causal, scale=case.scale, dropout_p=p, keep=keep)
                outs.append(oi[0].transpose(0, 1))
            tout = torch.cat(outs) if outs else torch.zeros_like(tq)
            same["out"] = tout.detach()
            same["grads"] = _grads(tout, (tq, tk, tv), grad)
        return same

    floor_dq = floor_dk = 0.0
    for i in range(len(case.lens_q)):  # the rounding floor of the Delta term, sequence by sequence
        lqi, lki = case.lens_q[i], case.lens_k[i]
        qi, oi, ri, gi = (t[cq[i] : cq[i] + lqi].transpose(0, 1)[None] for t in (q, out, ref, grad))
        ki = k[ck[i] : ck[i] + lki].transpose(0, 1)[None]
        keep = attention_oracle.keep_mask(drawn, p, 1, case.h, lqi, lki, b_offset=i) if p > 0 else None
        fq, fk = delta_floor(qi, ki, oi, ri, gi, None, None, case.causal, case.scale, p, keep)
        floor_dq, floor_dk = math.hypot(floor_dq, fq), math.hypot(floor_dk, fk)
    _compare("out", out, lambda: theirs()["out"], ref, dtype)
    for i, (name, floor) in enumerate(zip("qkv", (floor_dq, floor_dk, 0.0), strict=True)):
        _compare(f"d{name}", grads[i], lambda i=i: theirs()["grads"][i], ref_grads[i], dtype, floor=floor)
    # A sequence without keys gives exact zeros and zero dq; keys no query sees get exactly zero dk / dv.
    for i in range(len(case.lens_q)):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if case.lens_k[i] == 0:
            assert (out[sq] == 0).all() and (grads[0][sq] == 0).all(), f"sequence {i} has no keys"
        if case.lens_q[i] == 0:
            assert (grads[1][sk] == 0).all() and (grads[2][sk] == 0).all(), f"sequence {i} has no queries"


# --- masked_lm_loss ---------------------------------------------------------------------------------------------

HIDDEN_LAYOUTS = ("contiguous", "transposed", "strided")  # transposed: (S, B, ..., E) storage seen as (B, S, ...)
WEIGHT_LAYOUTS = ("contiguous", "transposed", "sliced")  # transposed: an (E, V) matrix's .t(); sliced: columns of
# a wider matrix (row stride > E), and then bias is every other element of a longer vector


@dataclass(frozen=True)
class MlmCase:
    lead: tuple[int, ...]
    e: int
    vocab: int
    ignore_frac: float = 0.3
    ignore_index: int = -100
    bias: bool = True
    reduction: str = "mean"
    smoothing: float = 0.0
    hidden_layout: str = "contiguous"
    weight_layout: str = "contiguous"
    needs: tuple[bool, bool, bool] = (True, True, True)  # hidden, weight, bias
    grad_scale: float | None = 1.0  # upstream gradient of a scalar loss; None with reduction "none": random
    seed: int = 0


@st.composite
def mlm_cases(draw, *, max_rows: int, max_e: int, max_vocab: int):
    ndim = draw(st.integers(1, 3))
    lead = []
    for _ in range(ndim):
        lead.append(draw(sizes(1, max(1, max_rows // max(1, math.prod(lead))), zero_one_in=8)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return MlmCase(
        lead=tuple(lead),
        e=draw(st.integers(1, max_e)),
        vocab=draw(st.integers(1, max_vocab)),
        ignore_frac=draw(st.sampled_from([0.3, 0.0, 0.85, 1.0])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, 3, 10**6])),
        bias=draw(st.booleans()),
        reduction=reduction,
        smoothing=draw(st.sampled_from([0.0, 0.1, 0.35, 1.0])),
        hidden_layout=draw(st.sampled_from(HIDDEN_LAYOUTS)),
        weight_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
        needs=draw(st.sampled_from([(True, True, True), (True, False, False), (False, True, True), (True, True,
                                                                                                   False)])),
        grad_scale=None if reduction == "none" else draw(st.sampled_from([1.0, 0.37, -2.5, 8.0])),
        seed=draw(SEEDS),
    )  # fmt: skip


def _mlm_inputs(case: MlmCase, dtype, device, gen):
    lead, e, vocab = case.lead, case.e, case.vocab
    if case.hidden_layout == "transposed" and len(lead) >= 2:
        hidden = _randn(gen, (lead[1], lead[0], *lead[2:], e), dtype, device).transpose(0, 1)
    elif case.hidden_layout in ("strided", "transposed"):
        hidden = _randn(gen, (*lead, 2 * e), dtype, device)[..., ::2]
    else:
        hidden = _randn(gen, (*lead, e), dtype, device)
    ws = 1 / math.sqrt(e)
    if case.weight_layout == "transposed":
        weight = _randn(gen, (e, vocab), dtype, device, ws).t()
    elif case.weight_layout == "sliced":
        weight = _randn(gen, (vocab, e + 3), dtype, device, ws)[:, 1 : e + 1]
    else:
        weight = _randn(gen, (vocab, e), dtype, device, ws)
    bias = None
    if case.bias:
        bias = _randn(gen, (2 * vocab,), dtype, device)[::2] if case.weight_layout == "sliced" else None
        bias = bias if bias is not None else _randn(gen, (vocab,), dtype, device)
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < case.ignore_frac] = case.ignore_index
    hidden.requires_grad_(case.needs[0])
    weight.requires_grad_(case.needs[1])
    if bias is not None:
        bias.requires_grad_(case.needs[2])
    return hidden, weight, bias, labels.to(device)


def check_masked_lm_loss(case: MlmCase, dtype: torch.dtype, backend: str, device="cpu", rule_fp32=False) -> None:
    """``ptfast.masked_lm_loss`` vs the float64 oracle, loss and every gradient, under an upstream gradient."""
    gen = torch.Generator().manual_seed(case.seed)
    hidden, weight, bias, labels = _mlm_inputs(case, dtype, device, gen)
    kwargs = dict(ignore_index=case.ignore_index, reduction=case.reduction, label_smoothing=case.smoothing)
    with ptfast.use_backend(backend), record_dispatch() as events:
        loss = ptfast.masked_lm_loss(hidden, weight, labels, bias, **kwargs)
        if case.grad_scale is None:
            grad = _randn(gen, loss.shape, dtype, device)
        else:
            grad = torch.full(loss.shape, case.grad_scale, dtype=dtype, device=device)
        needs_any = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        grads = _grads(loss, (hidden, weight, bias), grad) if needs_any else [None] * 3
    assert_ran(events, "masked_lm_loss", backend, ("forward", "backward") if needs_any else ("forward",))
    _only(events, backend)
    assert loss.shape == (labels.shape if case.reduction == "none" else ()) and loss.dtype == dtype
    for g, t in zip(grads, (hidden, weight, bias), strict=True):
        assert g is None or (g.shape == t.shape and g.dtype == dtype)

    leaves = [t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (hidden, weight, bias)]  # fmt: skip
    labels_cpu = labels.cpu()
    ref = mlm_oracle.masked_lm_loss(leaves[0], leaves[1], labels_cpu, leaves[2], **kwargs)
    ref_grads = _grads(ref, leaves, grad.cpu().double()) if needs_any else [None] * 3

    valid = labels_cpu != case.ignore_index
    if case.reduction == "none":
        assert (loss[~valid.to(loss.device)] == 0).all(), "an ignored row has a nonzero loss"
    if not valid.any():
        # Every row ignored: PyTorch's own op gives NaN gradients under "mean"; the contract says zeros.
        assert_close64(loss, ref, "loss (all rows ignored)")
        assert all(g is None or (g == 0).all() for g in grads), "all rows ignored but a gradient is nonzero"
        return
    if grads[0] is not None:
        assert (grads[0][~valid.to(grads[0].device)] == 0).all(), "an ignored row has a nonzero dhidden"

    same = {}

    def theirs():
        if not same:
            th, tw, tb = (t.detach().requires_grad_(t.requires_grad) if t is not None else None
                          for t in (hidden, weight, bias))  # fmt: skip
            tl = F.cross_entropy(F.linear(th, tw, tb).reshape(-1, case.vocab), labels.reshape(-1), **kwargs)
            tl = tl.reshape(loss.shape)
            same["loss"] = tl.detach()
            same["grads"] = _grads(tl, (th, tw, tb), grad) if needs_any else [None] * 3
        return same

    _compare("loss", loss, lambda: theirs()["loss"], ref, dtype, rule_fp32=rule_fp32)
    for i, name in enumerate(("dhidden", "dweight", "dbias")):
        if grads[i] is not None:
            _compare(name, grads[i], lambda i=i: theirs()["grads"][i], ref_grads[i], dtype, rule_fp32=rule_fp32)


# --- conv_relu / conv_relu_pool ---------------------------------------------------------------------------------

# nchw; channels_last; sliced: a window of a bigger NCHW tensor (channel, row and column slices, column stride 2);
# channels_last_sliced: a channel / column window of a channels_last tensor.
CONV_LAYOUTS = ("nchw", "channels_last", "sliced", "channels_last_sliced")
CONV_ALGOS = ("implicit_gemm", "cudnn")  # the triton backend's forward algorithms
GRAD_ALGOS = ("triton", "cudnn")  # its dgrad / wgrad algorithms


@dataclass(frozen=True)
class ConvCase:
    n: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: tuple[int, int] = (3, 3)
    padding: int = 1
    pool: bool = False
    bias: bool = True
    layout: str = "nchw"
    needs: tuple[bool, bool, bool] = (True, True, True)  # x, weight, bias
    algos: tuple[str, str, str] | None = None  # triton backend: (forward, dgrad, wgrad); None = its default
    seed: int = 0


@st.composite
def conv_cases(
    draw, *, max_n=2, channels=(1, 2, 3, 5), couts=(1, 3, 4, 7), max_hw=9, kernels=((1, 1), (3, 3), (5, 5)),
    algos=False,
):  # fmt: skip
    return ConvCase(
        n=draw(sizes(1, max_n)),
        cin=draw(st.sampled_from(channels)),
        cout=draw(st.sampled_from(couts)),
        height=draw(st.integers(1, max_hw)),
        width=draw(st.integers(1, max_hw)),
        kernel=draw(st.sampled_from(kernels)),
        padding=draw(st.integers(0, 2)),
        pool=draw(st.booleans()),
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(CONV_LAYOUTS)),
        needs=draw(st.sampled_from([(True, True, True), (True, False, False), (False, True, True), (False,) * 3])),
        algos=(draw(st.sampled_from(CONV_ALGOS)), draw(st.sampled_from(GRAD_ALGOS)), draw(st.sampled_from(GRAD_ALGOS)))
        if algos
        else None,
        seed=draw(SEEDS),
    )


def conv_output_hw(case: ConvCase) -> tuple[int, int] | None:
    """The conv output size, or None when the op must refuse the shape (smaller than the kernel / the pool)."""
    hc = case.height + 2 * case.padding - case.kernel[0] + 1
    wc = case.width + 2 * case.padding - case.kernel[1] + 1
    if hc < 1 or wc < 1 or (case.pool and (hc < 2 or wc < 2)):
        return None
    return (hc // 2, wc // 2) if case.pool else (hc, wc)


def _conv_x(case: ConvCase, dtype, device, gen) -> torch.Tensor:
    n, c, h, w = case.n, case.cin, case.height, case.width
    if case.layout == "sliced":
        return _randn(gen, (n, c + 2, h + 1, 2 * w), dtype, device)[:, 1 : c + 1, 1:, ::2]
    if case.layout == "channels_last_sliced":
        base = _randn(gen, (n, c + 1, h, w + 1), dtype, device).contiguous(memory_format=torch.channels_last)
        return base[:, :c, :, 1:]
    x = _randn(gen, (n, c, h, w), dtype, device)
    return x.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else x


def _expected_format(x: torch.Tensor) -> torch.memory_format:
    """The contract: the output (and dx) in the input's memory format; NCHW when that is ambiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _conv_algos(backend: str, algos):
    if backend != "triton" or algos is None:
        return contextlib.nullcontext()
    from ptfast.backends.triton import conv_config  # does not import triton

    return conv_config.use_algos(*algos)


def check_conv(case: ConvCase, dtype: torch.dtype, backend: str, device="cpu", rule_fp32=False) -> None:
    """``ptfast.conv_relu`` / ``conv_relu_pool`` vs the float64 oracle (or the refusal of a too-small input)."""
    gen = torch.Generator().manual_seed(case.seed)
    x = _conv_x(case, dtype, device, gen).requires_grad_(case.needs[0])
    kh, kw = case.kernel
    weight = _randn(gen, (case.cout, case.cin, kh, kw), dtype, device, 1 / math.sqrt(case.cin * kh * kw))
    weight.requires_grad_(case.needs[1])
    bias = _randn(gen, (case.cout,), dtype, device).requires_grad_(case.needs[2]) if case.bias else None
    fn, op = (ptfast.conv_relu_pool, "conv_relu_pool") if case.pool else (ptfast.conv_relu, "conv_relu")
    out_hw = conv_output_hw(case)
    if out_hw is None:
        import pytest

        with ptfast.use_backend(backend), pytest.raises(ValueError, match="smaller than the kernel|too small for 2x2"):
            fn(x, weight, bias, padding=case.padding)
        return
    needs_any = any(t is not None and t.requires_grad for t in (x, weight, bias))
    with ptfast.use_backend(backend), _conv_algos(backend, case.algos), record_dispatch() as events:
        out = fn(x, weight, bias, padding=case.padding)
        grad = _randn(gen, out.shape, dtype, device)
        grads = _grads(out, (x, weight, bias), grad) if needs_any else [None] * 3
    assert_ran(events, op, backend, ("forward", "backward") if needs_any else ("forward",))
    _only(events, backend)
    if backend == "triton" and case.algos is not None:
        forward, dgrad, wgrad = case.algos
        phases = [f"forward:{forward}"]
        if grads[0] is not None:
            supported = case.padding <= kh - 1 and case.padding <= kw - 1  # dgrad is a conv with padding k-1-p
            phases.append(f"dgrad:{dgrad if supported else 'cudnn'}")
        if grads[1] is not None:
            phases.append(f"wgrad:{wgrad}")
        assert_ran(events, op, backend, phases)
    assert out.shape == (case.n, case.cout, *out_hw) and out.dtype == dtype
    fmt = _expected_format(x)
    if case.layout in ("nchw", "channels_last"):
        assert out.is_contiguous(memory_format=fmt), f"output not in the input's memory format {fmt}"
        if grads[0] is not None:
            assert grads[0].is_contiguous(memory_format=fmt), f"dx not in the input's memory format {fmt}"
    for g, t in zip(grads, (x, weight, bias), strict=True):
        assert g is None or (g.shape == t.shape and g.dtype == dtype)

    leaves = [t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, weight, bias)]  # fmt: skip
    ref = conv_relu_ref(leaves[0], leaves[1], leaves[2], case.padding, case.pool)
    ref_grads = _grads(ref, leaves, grad.cpu().double()) if needs_any else [None] * 3

    same = {}

    def theirs():
        if not same:
            tx, tw, tb = (t.detach().requires_grad_(t.requires_grad) if t is not None else None
                          for t in (x, weight, bias))  # fmt: skip
            to = F.relu(F.conv2d(tx, tw, tb, padding=case.padding))
            to = F.max_pool2d(to, 2, 2) if case.pool else to
            same["out"] = to.detach()
            same["grads"] = _grads(to, (tx, tw, tb), grad) if needs_any else [None] * 3
        return same

    _compare("out", out, lambda: theirs()["out"], ref, dtype, rule_fp32=rule_fp32)
    for i, name in enumerate(("dx", "dweight", "dbias")):
        if grads[i] is not None:
            _compare(name, grads[i], lambda i=i: theirs()["grads"][i], ref_grads[i], dtype, rule_fp32=rule_fp32)
