"""Float64 oracle for conv + bias (+ residual) + ReLU (+ 2x2 max-pool), written from the definition.

The convolution is an explicit sum over kernel offsets of shifted input windows (no F.conv2d); a strided one
keeps every ``stride``-th output of the stride-1 sum (the definition of a strided convolution); pooling takes
the first maximum of each 2x2 window in row-major order (the contract's tie rule) and floors odd sizes.
Differentiable with autograd, so gradients come from the same definition.
"""

from __future__ import annotations

import torch


def conv2d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, stride: int = 1
) -> torch.Tensor:
    x, weight = x.to(torch.float64), weight.to(torch.float64)
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    xp = torch.cat(
        [
            torch.zeros(n, cin, padding, w + 2 * padding, dtype=torch.float64, device=x.device),
            torch.cat(
                [
                    torch.zeros(n, cin, h, padding, dtype=torch.float64, device=x.device),
                    x,
                    torch.zeros(n, cin, h, padding, dtype=torch.float64, device=x.device),
                ],
                dim=3,
            ),
            torch.zeros(n, cin, padding, w + 2 * padding, dtype=torch.float64, device=x.device),
        ],
        dim=2,
    )
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    out = torch.zeros(n, cout, ho, wo, dtype=torch.float64, device=x.device)
    for dy in range(kh):
        for dx in range(kw):
            window = xp[:, :, dy : dy + ho, dx : dx + wo]  # (n, cin, ho, wo)
            out = out + torch.einsum("nchw,oc->nohw", window, weight[:, :, dy, dx])
    out = out[:, :, ::stride, ::stride]
    if bias is not None:
        out = out + bias.to(torch.float64).view(1, cout, 1, 1)
    return out


def maxpool2x2_first_ref(y: torch.Tensor) -> torch.Tensor:
    """2x2/stride-2 max-pool, floor mode; the first maximum (row-major) wins ties, NaN wins over numbers."""
    n, c, h, w = y.shape
    ho, wo = h // 2, w // 2
    cands = [y[:, :, dy : 2 * ho : 2, dx : 2 * wo : 2] for dy in (0, 1) for dx in (0, 1)]
    best = cands[0]
    for cand in cands[1:]:
        take = (cand > best) | (torch.isnan(cand) & ~torch.isnan(best))  # strict '>' keeps the first maximum
        best = torch.where(take, cand, best)
    return best


def conv_relu_ref(x, weight, bias=None, padding: int = 1, pool: bool = False, stride: int = 1, residual=None):
    y = conv2d_ref(x, weight, bias, padding, stride)
    if residual is not None:
        y = y + residual.to(torch.float64)
    y = torch.relu(y)
    return maxpool2x2_first_ref(y) if pool else y


def add_relu_ref(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(x + residual) in float64, from the definition: the sum where it is positive, else 0 (NaN stays)."""
    s = x.to(torch.float64) + residual.to(torch.float64)
    return torch.where(s > 0, s, torch.where(torch.isnan(s), s, torch.zeros_like(s)))
