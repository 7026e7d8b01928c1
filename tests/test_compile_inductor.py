"""torch.compile with the default (inductor) backend over every op, forward and backward, against eager.

The aot_eager tests beside each op check tracing; this one also runs inductor's code generation around the
opaque ptfast ops. Dropout: the seed is drawn by torch's RNG, which inductor replaces with its own generator
unless ``fallback_random`` is set (as for every random op), so the dropout case sets it to compare bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config

import ptfast


def _inputs():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).requires_grad_() for n in (17, 13, 13))
    key_mask = torch.rand(2, 13, generator=g) > 0.3
    key_mask[:, 0] = True
    hidden = torch.randn(29, 24, generator=g).requires_grad_()
    weight = torch.randn(101, 24, generator=g).requires_grad_()
    labels = torch.randint(0, 101, (29,), generator=g)
    labels[::3] = -100
    x = torch.randn(2, 3, 9, 7, generator=g)
    conv_w = torch.randn(5, 3, 3, 3, generator=g).requires_grad_()
    conv_b = torch.randn(5, generator=g).requires_grad_()
    return (q, k, v, hidden, weight, x, conv_w, conv_b), key_mask, labels


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_inductor_fullgraph_matches_eager(dropout_p):
    args, key_mask, labels = _inputs()

    def step(q, k, v, hidden, weight, x, conv_w, conv_b):
        att = ptfast.attention(q, k, v, key_mask=key_mask, is_causal=True, dropout_p=dropout_p)
        loss = ptfast.masked_lm_loss(hidden, weight, labels, label_smoothing=0.1)
        conv = ptfast.conv_relu_pool(x, conv_w, conv_b).sum() + ptfast.conv_relu(x, conv_w, conv_b).mean()
        return att.square().mean() + loss + conv

    wrt = [a for a in args if a.requires_grad]
    torch.manual_seed(11)
    with inductor_config.patch(fallback_random=True):  # (monkeypatch would delete the config entry on undo)
        compiled = torch.compile(step, fullgraph=True)(*args)
        grads_c = torch.autograd.grad(compiled, wrt)
    torch.manual_seed(11)
    eager = step(*args)
    grads_e = torch.autograd.grad(eager, wrt)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
