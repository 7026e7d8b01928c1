"""Loss modules backed by ptfast ops."""

from __future__ import annotations

import torch
from torch import Tensor

from ptfast.ops.masked_lm_loss import masked_lm_loss


class MaskedLMLoss(torch.nn.Module):
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materializing the logits.

    A module form of :func:`ptfast.masked_lm_loss`; it owns no parameters (the decoder weight and bias are
    passed in, so a weight tied to the word embeddings stays a single parameter).

    Shapes: hidden ``(..., E)``, weight ``(V, E)``, labels ``(...)`` int64 (``hidden.shape[:-1]``), bias ``(V,)``.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> Tensor:
        return masked_lm_loss(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
