"""Drop-in modules backed by ptfast ops; parameter names match the modules they replace."""

from ptfast.nn.conv import ConvBN2d, ConvBNReLU2d, ConvBNReLUPool2d, ConvReLU2d, ConvReLUPool2d
from ptfast.nn.loss import MaskedLMLoss

__all__ = ["ConvBN2d", "ConvBNReLU2d", "ConvBNReLUPool2d", "ConvReLU2d", "ConvReLUPool2d", "MaskedLMLoss"]
