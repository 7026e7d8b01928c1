"""The torch backend: production fallbacks built on PyTorch's own fast paths; runs on every device."""
