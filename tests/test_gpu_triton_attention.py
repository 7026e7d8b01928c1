"""``ptfast.attention`` / ``ptfast.attention_varlen`` on the triton backend on a CUDA GPU.

Runs only where a GPU is visible (marker ``gpu``; ``python tests/run.py --gpu``). Inputs are made on the CPU from a
seeded generator and moved, and the float64 oracle runs on the CPU on exactly what the GPU saw.

* bf16 / fp16: the low-precision rule (docs/design.md §5) against PyTorch's own SDPA in the same dtype, forward and
  grads: BERT-like shapes with padding, long causal, head dims 16..256, odd lengths, HF's non-contiguous layout,
  every mask combined with dropout (the yardstick applies the oracle's exact keep mask);
* fp32: tight against the oracle with TF32 off; with TF32 on within the rule against PyTorch's own fp32 matmul
  attention under TF32, and visibly less exact than with it off (the kernels follow the setting);
* dropout: exact keep mask vs the oracle; the default backward is bitwise run-to-run deterministic; the opt-in
  atomic dQ backward matches the oracle;
* CUDA graphs: replays of a captured forward (and forward + backward) draw fresh dropout seeds and each replay
  matches the oracle for the seed it drew;
* 16k tokens forward + backward with device memory linear in the length; varlen vs the oracle;
  ``torch.compile(fullgraph=True)`` (inductor) matches eager.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast import _dropout
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule, rel_err
from tests.oracles import attention as oracle
from tests.test_attention_varlen import cu_of

pytestmark = pytest.mark.gpu

DEV = "cuda"
HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 matmuls (and so the fp32 kernels' tl.dot) in IEEE fp32 unless a test turns TF32 on itself."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_qkv(b, h, lq, lk, d, dtype, *, seed=0, hf_layout=False):
    """q/k/v on the GPU in ``dtype``, requiring grad; ``hf_layout`` makes transposed (B, L, H, D) views."""
    gen = torch.Generator().manual_seed(seed)

    def one(length):
        if hf_layout:
            t = torch.randn(b, length, h, d, generator=gen).to(DEV, dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, length, d, generator=gen).to(DEV, dtype)
        return t.requires_grad_()

    return one(lq), one(lk), one(lk)


def right_padding(lengths, lk) -> torch.Tensor:
    return (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]).to(DEV)


def combined_mask(q, k, attn_mask, key_mask, is_causal):
    """The additive float mask (on q's device, q's dtype) equivalent to all given masks; -inf = excluded."""
    lq, lk = q.shape[-2], k.shape[-2]
    m = torch.zeros(1, 1, lq, lk, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        m = m.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else m + attn_mask.to(q.dtype)
    if key_mask is not None:
        m = m.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if is_causal:
        m = m.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(), -math.inf)
    return m


def sdpa_same_dtype(q, k, v, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, keep=None):
    """PyTorch's own attention in q's dtype on the GPU (the yardstick of the low-precision rule).

    Causal-only and unmasked problems go to SDPA's flash kernel; masks become one additive mask; dropout uses the
    math path with the oracle's exact keep mask. Rows with no admissible key are neutralized and zeroed.
    """
    if attn_mask is None and key_mask is None and dropout_p == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    m = combined_mask(q, k, attn_mask, key_mask, is_causal)
    valid = (m != -math.inf).any(-1, keepdim=True)
    m = m.masked_fill(~valid, 0.0)
    if dropout_p > 0:
        keep = keep.to(q.device).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, m, dropout_p, False, keep, scale=scale)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    return out * valid


def seed_words(seed: int) -> list[int]:
    """Seed torch and return the two dropout seed words the functional wrapper will draw next on the GPU."""
    torch.manual_seed(seed)
    drawn = torch.randint(0, 2**31, (2,), dtype=torch.int64, device=DEV).tolist()
    torch.manual_seed(seed)
    return drawn


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def check(q, k, v, *, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, seed=7,
          tol=None):  # fmt: skip
    """Forward + backward on triton (asserted) vs the CPU float64 oracle: fp32 tightly, half types by the rule."""
    drawn = seed_words(seed)
    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = ptfast.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, key_mask=key_mask)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention", "triton", ("forward", "backward"))
    assert out.dtype == q.dtype and out.shape == (*q.shape[:-1], v.shape[-1])
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = oracle.keep_mask(drawn, dropout_p, b, h, lq, lk) if dropout_p > 0 else None
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention(*leaves, _cpu(attn_mask), _cpu(key_mask), is_causal, scale, dropout_p, keep)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    if q.dtype == torch.float32:
        assert_close64(out.cpu(), ref, "out", tol=tol)
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            assert_close64(g.cpu(), r, f"d{name}", tol=tol)
    else:
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        tout = sdpa_same_dtype(tq, tk, tv, attn_mask, key_mask, is_causal, scale, dropout_p, keep)
        tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
        assert_rule(out.cpu(), tout.cpu(), ref, "out")
        for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
            assert_rule(g.cpu(), t.cpu(), r, f"d{name}")
    return out, grads


# --- half precision: the rule against SDPA ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_bert_like_right_padding(dtype):
    """(4, 12, 128, 64) with right-padded sequences, as in BERT fine-tuning."""
    q, k, v = make_qkv(4, 12, 128, 128, 64, dtype)
    check(q, k, v, key_mask=right_padding([128, 97, 64, 1], 128))


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_long_causal(dtype):
    check(*make_qkv(2, 8, 1000, 1000, 128, dtype), is_causal=True)


@pytest.mark.parametrize(
    "dtype,d",
    [(torch.bfloat16, d) for d in (16, 32, 96, 256)] + [(torch.float16, 256)],
    ids=lambda x: str(x).removeprefix("torch."),
)
def test_head_dims_odd_lengths(dtype, d):
    """Head dims 16/32/96 (padded inside)/256 with Lq = 333 != Lk = 1021 and a key mask with holes (64 and 128 are
    in the BERT-like and long causal tests)."""
    q, k, v = make_qkv(2, 4, 333, 1021, d, dtype, seed=d)
    gen = torch.Generator().manual_seed(d)
    key_mask = torch.rand(2, 1021, generator=gen) > 0.3
    key_mask[1, 700:] = False
    check(q, k, v, key_mask=key_mask.to(DEV))


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_hf_layout_with_dropout(dtype):
    """Non-contiguous (B, L, H, D)-transposed inputs, padding and dropout 0.1 (BERT pretraining)."""
    q, k, v = make_qkv(4, 12, 128, 128, 64, dtype, hf_layout=True)
    assert not q.is_contiguous()
    check(q, k, v, key_mask=right_padding([128, 101, 77, 3], 128), dropout_p=0.1)


def test_every_mask_combined_and_excluded_rows_bf16():
    """bool + float masks, key mask (one sequence fully padded), causal, custom scale and dropout together."""
    b, h, lq, lk = 3, 4, 333, 301
    q, k, v = make_qkv(b, h, lq, lk, 64, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    bool_mask = (torch.rand(b, 1, lq, lk, generator=gen) > 0.2).to(DEV)
    float_mask = torch.randn(1, h, lq, lk, generator=gen).to(DEV, torch.bfloat16)
    key_mask = right_padding([301, 0, 190], lk)
    out, (dq, dk, dv) = check(q, k, v, attn_mask=bool_mask, key_mask=key_mask, is_causal=True, scale=0.11,
                              dropout_p=0.15)  # fmt: skip
    check(q, k, v, attn_mask=float_mask, key_mask=key_mask, dropout_p=0.15)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


# --- fp32 and TF32 ----------------------------------------------------------------------------------------------


def _matmul_attention(q, k, v, m, scale):
    """Plain matmul attention in q's dtype (fp32 here: PyTorch's own fp32 matmuls, TF32 when allowed)."""
    s = (q @ k.transpose(-2, -1)) * scale + m
    return torch.softmax(s, dim=-1) @ v


def test_fp32_ieee_tight_and_tf32_follows_the_setting():
    b, h, lq, lk, d = 2, 4, 333, 257, 64
    q, k, v = make_qkv(b, h, lq, lk, d, torch.float32)
    gen = torch.Generator().manual_seed(5)
    float_mask = torch.randn(b, 1, lq, lk, generator=gen).to(DEV)
    key_mask = right_padding([257, 200], lk)
    out_ieee, grads_ieee = check(q, k, v, attn_mask=float_mask, key_mask=key_mask, is_causal=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    with ptfast.use_backend("triton"):
        out = ptfast.attention(q, k, v, float_mask, is_causal=True, key_mask=key_mask)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    m = combined_mask(tq, tk, float_mask, key_mask, True)
    tout = _matmul_attention(tq, tk, tv, m, 1 / math.sqrt(d))
    tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
    torch.backends.cuda.matmul.allow_tf32 = False
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention(*leaves, float_mask.cpu(), key_mask.cpu(), True)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    assert_rule(out.cpu(), tout.cpu(), ref, "out tf32")
    for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
        assert_rule(g.cpu(), t.cpu(), r, f"d{name} tf32")
    e_tf32, e_ieee = rel_err(out.cpu(), ref), rel_err(out_ieee.cpu(), ref)
    assert e_tf32 > 4 * e_ieee, f"TF32 on ({e_tf32:.2e}) should be less exact than off ({e_ieee:.2e})"


# --- dropout, determinism, atomic dQ ----------------------------------------------------------------------------


def test_dropout_exact_mask_fp32():
    """fp32 with dropout matches the oracle (exact hash keep mask) tightly, with and without other masks."""
    q, k, v = make_qkv(2, 4, 333, 301, 64, torch.float32)
    key_mask = right_padding([301, 123], 301)
    check(q, k, v, key_mask=key_mask, is_causal=True, dropout_p=0.1)
    check(q, k, v, dropout_p=0.37, seed=8)


def test_default_backward_is_bitwise_deterministic():
    q, k, v = make_qkv(2, 8, 1021, 1021, 64, torch.bfloat16)
    key_mask = right_padding([1021, 777], 1021)
    grad = torch.randn(2, 8, 1021, 64, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    runs = []
    with ptfast.use_backend("triton"):
        for _ in range(2):
            torch.manual_seed(4)
            out = ptfast.attention(q, k, v, dropout_p=0.1, key_mask=key_mask)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_atomic_dq_matches_oracle(dtype):
    from ptfast.backends.triton import attention_config

    q, k, v = make_qkv(2, 4, 333, 301, 64, dtype)
    with attention_config.use_atomic_dq(True):
        check(q, k, v, key_mask=right_padding([301, 150], 301), is_causal=True, dropout_p=0.1)


# --- CUDA graphs ------------------------------------------------------------------------------------------------


def _capture(step):
    """Warm up on a side stream, then capture ``step()`` into a CUDA graph; returns (graph, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.fixture
def seed_log(monkeypatch):
    """A static device buffer that receives every dropout seed the wrapper draws (graph-safe: a captured copy)."""
    log = torch.zeros(2, dtype=torch.int64, device=DEV)
    draw = _dropout.draw_seed

    def logged(device):
        seed = draw(device)
        log.copy_(seed)
        return seed

    monkeypatch.setattr(_dropout, "draw_seed", logged)
    return log


def _oracle_for(seed, q, k, v, key_mask, p, grad=None):
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = oracle.keep_mask(seed, p, b, h, lq, lk)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention(*leaves, key_mask=key_mask.cpu(), dropout_p=p, keep=keep)
    if grad is None:
        return ref.detach(), None
    return ref.detach(), torch.autograd.grad(ref, leaves, grad.cpu().double())


def test_cuda_graph_forward_replays_drop_differently(seed_log):
    q, k, v = (t.detach() for t in make_qkv(2, 3, 67, 67, 32, torch.float32))
    key_mask = right_padding([67, 41], 67)
    with ptfast.use_backend("triton"), record_dispatch() as events:
        graph, static_out = _capture(lambda: ptfast.attention(q, k, v, key_mask=key_mask, dropout_p=0.1))
    assert_ran(events, "attention", "triton")
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((seed_log.tolist(), static_out.clone()))
    (seed_a, out_a), (seed_b, out_b) = results
    assert seed_a != seed_b and not torch.equal(out_a, out_b), "two replays must draw different dropout seeds"
    for seed, out in results:
        assert_close64(out.cpu(), _oracle_for(seed, q, k, v, key_mask, 0.1)[0], "replayed out")


def test_cuda_graph_forward_backward_with_dropout(seed_log):
    """Forward + backward captured together: each replay's output and grads use one fresh seed consistently."""
    q, k, v = make_qkv(2, 3, 67, 67, 32, torch.float32)
    key_mask = right_padding([67, 41], 67)
    grad = torch.randn(2, 3, 67, 32, generator=torch.Generator().manual_seed(2)).to(DEV)
    params = (q, k, v)

    def step():
        for p in params:
            p.grad = None
        out = ptfast.attention(q, k, v, key_mask=key_mask, dropout_p=0.2, is_causal=True)
        out.backward(grad)
        return out

    with ptfast.use_backend("triton"):
        graph, static_out = _capture(step)
    static_grads = [p.grad for p in params]
    seeds = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seed = seed_log.tolist()
        seeds.append(seed)
        keep = oracle.keep_mask(seed, 0.2, 2, 3, 67, 67)
        leaves = [t.detach().cpu().double().requires_grad_() for t in params]
        ref = oracle.attention(*leaves, key_mask=key_mask.cpu(), is_causal=True, dropout_p=0.2, keep=keep)
        ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
        assert_close64(static_out.cpu(), ref, "replayed out")
        for name, g, r in zip("qkv", static_grads, ref_grads, strict=True):
            assert_close64(g.cpu(), r, f"replayed d{name}")
    assert seeds[0] != seeds[1]


# --- long sequences, varlen, compile ----------------------------------------------------------------------------


def _peak_growth(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_16k_tokens_memory_is_linear():
    """B=1, H=16, L=16384, D=128 bf16 forward + backward: device memory grows by a few q-sized tensors, never by
    an L x L score matrix (one head's fp32 scores alone are 1 GiB, all heads' bf16 scores 8 GiB)."""
    b, h, n, d = 1, 16, 16384, 128
    q, k, v = make_qkv(b, h, n, n, d, torch.bfloat16)
    grad = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    key_mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    key_mask[:, -1000:] = False
    io_bytes = 5 * q.numel() * q.element_size()  # q, k, v, out, grad
    for kwargs in ({"key_mask": key_mask}, {"is_causal": True}):

        def run(kwargs=kwargs):
            with ptfast.use_backend("triton"):
                out = ptfast.attention(q, k, v, **kwargs)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            assert torch.isfinite(out).all() and torch.isfinite(dq).all()
            return out

        run()  # compile the kernels first
        growth = _peak_growth(run)
        assert growth < 3 * io_bytes, f"{kwargs}: peak grew {growth / 2**20:.0f} MiB (io {io_bytes / 2**20:.0f} MiB)"
    # spot-check a few rows of the key-mask run against the oracle (whole k/v, a slice of the queries)
    with ptfast.use_backend("triton"):
        out = ptfast.attention(q, k, v, key_mask=key_mask)
    rows = torch.tensor([0, 1, 4097, 9999, 16383])
    ref = oracle.attention(q.detach()[:, :, rows].cpu().double(), k.detach().cpu().double(),
                           v.detach().cpu().double(), key_mask=key_mask.cpu())  # fmt: skip
    assert rel_err(out[:, :, rows.to(DEV)].cpu(), ref) < 1e-2


def sdpa_varlen(q, k, v, cu_q, cu_k, is_causal):
    """PyTorch's own SDPA in q's dtype one sequence at a time (sequences without queries or keys handled here)."""
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
        kb, vb = (t[cu_k[b] : cu_k[b + 1]].transpose(0, 1) for t in (k, v))
        if qb.shape[1] == 0 or kb.shape[1] == 0:
            outs.append(qb.transpose(0, 1) * 0)
            continue
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=is_causal).transpose(0, 1))
    return torch.cat(outs)


LENS_Q = [128, 0, 333, 1, 77, 1021]
LENS_K = [128, 5, 290, 0, 77, 1021]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_varlen_rule(dtype, is_causal):
    gen = torch.Generator().manual_seed(6)
    h, d = 8, 64
    q, k, v = (torch.randn(sum(n), h, d, generator=gen).to(DEV, dtype).requires_grad_()
               for n in (LENS_Q, LENS_K, LENS_K))  # fmt: skip
    cu_q, cu_k = cu_of(LENS_Q).to(DEV), cu_of(LENS_K).to(DEV)
    with ptfast.use_backend("triton"), record_dispatch() as events:
        out = ptfast.attention_varlen(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), is_causal=is_causal)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_ran(events, "attention_varlen", "triton", ("forward", "backward"))
    cq, ck = cu_q.tolist(), cu_k.tolist()
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention_varlen(*leaves, cq, ck, is_causal)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    tout = sdpa_varlen(tq, tk, tv, cq, ck, is_causal)
    tgrads = torch.autograd.grad(tout, (tq, tk, tv), grad)
    assert_rule(out.cpu(), tout.cpu(), ref, "out")
    for name, g, t, r in zip("qkv", grads, tgrads, ref_grads, strict=True):
        assert_rule(g.cpu(), t.cpu(), r, f"d{name}")
    s3 = slice(cq[3], cq[4])  # sequence 3 has a query but no keys
    assert (out[s3] == 0).all() and (grads[0][s3] == 0).all()


def test_varlen_fp32_dropout_exact():
    gen = torch.Generator().manual_seed(7)
    h, d = 4, 40
    q, k, v = (torch.randn(sum(n), h, d, generator=gen).to(DEV).requires_grad_() for n in (LENS_Q, LENS_K, LENS_K))
    cu_q, cu_k = cu_of(LENS_Q).to(DEV), cu_of(LENS_K).to(DEV)
    drawn = seed_words(5)
    with ptfast.use_backend("triton"):
        out = ptfast.attention_varlen(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), 0.2, True)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = oracle.attention_varlen(*leaves, cu_q.tolist(), cu_k.tolist(), True, None, 0.2, drawn)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    assert_close64(out.cpu(), ref, "out")
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close64(g.cpu(), r, f"d{name}")


def test_torch_compile_fullgraph_matches_eager():
    """Inductor, fullgraph: the traced call runs the triton kernels and matches eager (forward and grads)."""
    q, k, v = make_qkv(2, 12, 128, 128, 64, torch.bfloat16, hf_layout=True)
    key_mask = right_padding([128, 90], 128)

    def fn(q, k, v):
        return ptfast.attention(q, k, v, key_mask=key_mask, is_causal=True).float().square().sum()

    torch._dynamo.reset()
    with ptfast.use_backend("triton"), record_dispatch() as events:
        compiled = torch.compile(fn, fullgraph=True)(q, k, v)
        cgrads = torch.autograd.grad(compiled, (q, k, v))
        eager = fn(q, k, v)
        egrads = torch.autograd.grad(eager, (q, k, v))
    assert_ran(events, "attention", "triton", ("forward", "backward"))
    assert ("attention", "torch", "forward") not in events
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-3)
    for a, b in zip(cgrads, egrads, strict=True):
        torch.testing.assert_close(a, b)
