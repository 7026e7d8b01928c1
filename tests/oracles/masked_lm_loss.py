"""Float64 oracle for ``masked_lm_loss``, written naively from the definition (never imports ptfast).

logits = h @ W^T + b, log p = logits - logsumexp(logits) (explicit max-shifted sum), per row
loss = (1 - eps) * (-log p_target) + eps * mean_j(-log p_j), rows labelled ``ignore_index`` contribute 0.
Reductions: ``sum``; ``mean`` = sum / number of non-ignored rows (0/0 = NaN when all are ignored);
``none`` = per-row losses with the labels' shape.

Gradients come from float64 autograd through this plain formula.
"""

from __future__ import annotations

import torch


def masked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss in float64 (differentiable with respect to float64 inputs)."""
    h = hidden.to(torch.float64)
    w = weight.to(torch.float64)
    flat_h = h.reshape(-1, h.shape[-1])
    flat_t = labels.reshape(-1)
    logits = flat_h @ w.t()
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    row_max = logits.max(dim=1, keepdim=True).values.detach()
    log_z = row_max + torch.log(torch.exp(logits - row_max).sum(dim=1, keepdim=True))
    log_p = logits - log_z
    valid = flat_t != ignore_index
    safe_t = torch.where(valid, flat_t, torch.zeros_like(flat_t))
    nll = -log_p.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    smooth = -log_p.mean(dim=1)
    per_row = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(labels.shape)
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / valid.sum().to(torch.float64)
    raise ValueError(reduction)


def loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    grad_out: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, dhidden, dweight, dbias)`` in float64; ``grad_out`` is the incoming gradient (default 1)."""
    h = hidden.detach().to(torch.float64).requires_grad_(True)
    w = weight.detach().to(torch.float64).requires_grad_(True)
    b = bias.detach().to(torch.float64).requires_grad_(True) if bias is not None else None
    loss = masked_lm_loss(h, w, labels, b, **kwargs)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(torch.float64)
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, inputs, g, allow_unused=True)
    dh, dw = (x if x is not None else torch.zeros_like(i) for x, i in zip(grads[:2], inputs[:2], strict=True))
    db = None
    if b is not None:
        db = grads[2] if grads[2] is not None else torch.zeros_like(b)
    return loss.detach(), dh, dw, db
