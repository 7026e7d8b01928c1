"""ptfast: fused attention, masked-LM loss, conv+bias+ReLU(+pool) and add+ReLU for BERT-, VGG- and ResNet-style
training.

``import ptfast`` never initializes CUDA and never imports triton, transformers or torchvision.
"""

from ptfast import nn
from ptfast._dispatch import (
    BackendNotSupportedError,
    FallbackWarning,
    KernelFault,
    requested_backend,
    use_backend,
)
from ptfast.ops.add_relu import add_relu
from ptfast.ops.attention import attention, attention_varlen
from ptfast.ops.conv import conv_relu, conv_relu_pool
from ptfast.ops.masked_lm_loss import masked_lm_loss
from ptfast.patching import patch

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "FallbackWarning",
    "KernelFault",
    "add_relu",
    "attention",
    "attention_varlen",
    "conv_relu",
    "conv_relu_pool",
    "masked_lm_loss",
    "nn",
    "patch",
    "requested_backend",
    "use_backend",
]
