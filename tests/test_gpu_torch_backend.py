"""The torch backend of every op on a CUDA GPU: low-precision rule, CUDA-graph capture, device memory.

Runs only where a GPU is visible (marker ``gpu``; ``python tests/run.py --gpu``). Inputs are made on the CPU
from a seeded generator and moved, so the float64 oracles see exactly what the GPU saw.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.testing import record_dispatch
from tests.helpers import assert_close64, assert_ran, assert_rule
from tests.oracles.conv import conv_relu_ref
from tests.oracles.masked_lm_loss import masked_lm_loss as masked_lm_loss_ref

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _rand(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _mlm_inputs(dtype, n=301, e=72, vocab=1013, ignore_every=3):
    gen = torch.Generator().manual_seed(5)
    hidden = _rand(n, e, gen=gen)
    weight = _rand(vocab, e, gen=gen, scale=e**-0.5)
    bias = _rand(vocab, gen=gen, scale=0.1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::ignore_every] = -100
    cast = [t.to(DEV, dtype).requires_grad_() for t in (hidden, weight, bias)]
    return cast, labels.to(DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_lm_loss_cuda(dtype, reduction, smoothing):
    (hidden, weight, bias), labels = _mlm_inputs(dtype)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    with record_dispatch() as events, ptfast.use_backend("torch"):
        loss = ptfast.masked_lm_loss(hidden, weight, labels, bias, **kwargs)
        grad = torch.rand_like(loss) + 0.5
        got = torch.autograd.grad(loss, (hidden, weight, bias), grad)
    assert_ran(events, "masked_lm_loss", "torch", ("forward", "backward"))
    base = F.cross_entropy(F.linear(hidden, weight, bias), labels, **kwargs)
    base_grads = torch.autograd.grad(base, (hidden, weight, bias), grad)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = masked_lm_loss_ref(leaves[0], leaves[1], labels.cpu(), leaves[2], **kwargs)
    ref_grads = torch.autograd.grad(ref, leaves, grad.detach().cpu().double())
    assert loss.dtype == dtype
    if dtype == torch.float32:
        assert_close64(loss.cpu(), ref, "loss", tol=1e-4)  # TF32 may be on for GEMMs: same bound as PyTorch's
    else:
        assert_rule(loss.cpu(), base.cpu(), ref, "loss")
    for name, g, gb, r in zip(("dhidden", "dweight", "dbias"), got, base_grads, ref_grads, strict=True):
        if dtype == torch.float32:
            assert_close64(g.cpu(), r, name, tol=1e-4)
        else:
            assert_rule(g.cpu(), gb.cpu(), r, name)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_torch_backend_cuda(pool, dtype):
    gen = torch.Generator().manual_seed(7)
    x = _rand(3, 13, 15, 17, gen=gen).to(DEV, dtype).to(memory_format=torch.channels_last).requires_grad_()
    w = _rand(11, 13, 3, 3, gen=gen, scale=(13 * 9) ** -0.5).to(DEV, dtype).requires_grad_()
    b = _rand(11, gen=gen, scale=0.3).to(DEV, dtype).requires_grad_()
    fn = ptfast.conv_relu_pool if pool else ptfast.conv_relu
    with ptfast.use_backend("torch"):
        out = fn(x, w, b)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w, b), grad)
    base = F.relu(F.conv2d(x, w, b, padding=1))
    base = F.max_pool2d(base, 2, 2) if pool else base
    base_grads = torch.autograd.grad(base, (x, w, b), grad)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    ref = conv_relu_ref(*leaves, padding=1, pool=pool)
    ref_grads = torch.autograd.grad(ref, leaves, grad.cpu().double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rule(out.cpu(), base.cpu(), ref, "out")
    for name, g, gb, r in zip(("dx", "dweight", "dbias"), got, base_grads, ref_grads, strict=True):
        assert_rule(g.cpu(), gb.cpu(), r, name)


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


def test_cuda_graph_masked_lm_loss_forward_backward():
    (hidden, weight, bias), labels = _mlm_inputs(torch.bfloat16)
    params = (hidden, weight, bias)

    def step():
        for p in params:
            p.grad = None
        loss = ptfast.masked_lm_loss(hidden, weight, labels, bias, label_smoothing=0.1)
        loss.backward()
        return loss

    graph, static_loss = _capture(step)
    static_grads = [p.grad for p in params]
    graph.replay()
    torch.cuda.synchronize()
    loss = ptfast.masked_lm_loss(hidden, weight, labels, bias, label_smoothing=0.1)  # eager: rows compacted
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(static_loss, loss, rtol=2e-3, atol=1e-3)
    for sg, g in zip(static_grads, grads, strict=True):
        torch.testing.assert_close(sg, g, rtol=2e-2, atol=2e-3)


def test_cuda_graph_conv_relu_pool_forward_backward():
    gen = torch.Generator().manual_seed(9)
    x = _rand(2, 5, 12, 14, gen=gen).to(DEV).to(memory_format=torch.channels_last)
    w = _rand(7, 5, 3, 3, gen=gen, scale=0.2).to(DEV).requires_grad_()
    b = _rand(7, gen=gen, scale=0.1).to(DEV).requires_grad_()

    def step():
        w.grad = b.grad = None
        out = ptfast.conv_relu_pool(x, w, b)
        out.square().sum().backward()
        return out

    graph, static_out = _capture(step)
    graph.replay()
    torch.cuda.synchronize()
    out = ptfast.conv_relu_pool(x, w, b)
    dw, db = torch.autograd.grad(out.square().sum(), (w, b))
    torch.testing.assert_close(static_out, out)
    torch.testing.assert_close(w.grad, dw)
    torch.testing.assert_close(b.grad, db)


def test_cuda_graph_attention_replays_drop_differently():
    gen = torch.Generator().manual_seed(13)
    q, k, v = (_rand(2, 3, 67, 32, gen=gen).to(DEV, torch.bfloat16) for _ in range(3))
    key_mask = (torch.arange(67)[None, :] < torch.tensor([[67], [41]])).to(DEV)
    graph, static_out = _capture(lambda: ptfast.attention(q, k, v, key_mask=key_mask, dropout_p=0.3))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert torch.isfinite(static_out).all()
    assert not torch.equal(first, static_out), "two replays must draw different dropout seeds"

    graph, static_out = _capture(lambda: ptfast.attention(q, k, v, key_mask=key_mask, is_causal=True))
    graph.replay()
    torch.testing.assert_close(static_out, ptfast.attention(q, k, v, key_mask=key_mask, is_causal=True))


def test_cuda_graph_attention_varlen():
    gen = torch.Generator().manual_seed(17)
    cu = torch.tensor([0, 37, 38, 101], dtype=torch.int32, device=DEV)
    q, k, v = (_rand(101, 4, 32, gen=gen).to(DEV, torch.float16) for _ in range(3))
    graph, static_out = _capture(lambda: ptfast.attention_varlen(q, k, v, cu, cu, 63, 63, is_causal=True))
    graph.replay()
    torch.testing.assert_close(static_out, ptfast.attention_varlen(q, k, v, cu, cu, 63, 63, is_causal=True))


def _peak_growth(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_masked_lm_loss_device_memory_is_bounded():
    # 16384 rows x 30522 vocab: fp32 logits alone would take 2 GiB; bf16 hidden/weight as in BERT pretraining.
    gen = torch.Generator().manual_seed(19)
    hidden = _rand(16384, 768, gen=gen).to(DEV, torch.bfloat16).requires_grad_()
    weight = _rand(30522, 768, gen=gen, scale=768**-0.5).to(DEV, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 30522, (16384,), generator=gen).to(DEV)

    def run():
        ptfast.masked_lm_loss(hidden, weight, labels).backward()

    run()  # warm-up: cuBLAS workspaces, the fp32 dW accumulator's first allocation
    hidden.grad = weight.grad = None
    growth = _peak_growth(run)
    full_logits = 16384 * 30522 * 4
    assert growth < full_logits / 4, f"peak grew {growth / 2**20:.0f} MiB (full fp32 logits: {full_logits / 2**20:.0f})"


def test_attention_memory_is_linear_in_length():
    # Causal and key-padding-only attention at 16k tokens must not form an L x L score matrix.
    length, heads = 16384, 4
    gen = torch.Generator().manual_seed(23)
    q, k, v = (_rand(1, heads, length, 64, gen=gen).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3))
    key_mask = torch.ones(1, length, dtype=torch.bool, device=DEV)
    key_mask[:, -1000:] = False
    scores = heads * length * length * 2  # one bf16 score matrix
    for kwargs in ({"is_causal": True}, {"key_mask": key_mask}):

        def run(kwargs=kwargs):
            ptfast.attention(q, k, v, **kwargs).sum().backward()

        run()
        growth = _peak_growth(run)
        assert growth < scores / 8, f"{kwargs}: peak grew {growth / 2**20:.0f} MiB vs {scores / 2**20:.0f} MiB"
