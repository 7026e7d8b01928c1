"""Op specs, one module per op family. ``REGISTRY`` maps an op name to ``(module, spec factory name)``;
modules are imported only when their op is asked for, so one broken spec cannot stop the others."""

from __future__ import annotations

import importlib

from benchmarks.common import OpSpec

REGISTRY: dict[str, tuple[str, str]] = {
    "attention": ("benchmarks.ops.attention", "spec"),
    "masked_lm_loss": ("benchmarks.ops.masked_lm_loss", "spec"),
    "conv_relu": ("benchmarks.ops.conv", "spec_conv_relu"),
    "conv_relu_pool": ("benchmarks.ops.conv", "spec_conv_relu_pool"),
    "add_relu": ("benchmarks.ops.add_relu", "spec"),
    "vgg16_features": ("benchmarks.ops.vgg", "spec"),
    "bert_mlm_step": ("benchmarks.ops.bert_step", "spec"),
    "vgg16_train_step": ("benchmarks.ops.vgg_step", "spec"),
    "resnet50_frozen_step": ("benchmarks.ops.resnet_step", "spec_frozen"),
    "resnet18_train_step": ("benchmarks.ops.resnet_step", "spec_train"),
}


def load(name: str) -> OpSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(REGISTRY)}")
    module, factory = REGISTRY[name]
    return getattr(importlib.import_module(module), factory)()
