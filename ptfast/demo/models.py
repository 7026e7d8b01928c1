"""The demo's models: a small Hugging Face BERT and a VGG-style CNN in torchvision's layout (built here)."""

from __future__ import annotations

import torch
from torch import nn


def bert_config(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, max_len: int, dropout: float):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_len,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every ``nn.Dropout`` in ``module`` to ``p`` (Hugging Face BERT reads its attention dropout from one)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


class VGG(nn.Module):
    """torchvision's VGG layout: ``features`` (Conv2d / ReLU / MaxPool2d), ``avgpool``, ``classifier``."""

    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int = 1, hidden: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # torchvision's conv init; the Linear layers keep PyTorch's default
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
