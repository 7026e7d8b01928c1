"""The two transformers interfaces ptfast's Hugging Face integration registers with, imported on first use with a
version check. Shared by :mod:`ptfast.integrations.transformers` (registration) and
:mod:`ptfast.integrations.transformers_mask` (the mask builder); imports nothing of ptfast."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MIN_TRANSFORMERS", "transformers_interfaces"]

MIN_TRANSFORMERS = (5, 0)


def transformers_interfaces() -> tuple[Any, Any]:
    """``(AttentionInterface, masking_utils)`` of the installed transformers, or a clear error."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "ptfast.integrations.transformers needs Hugging Face transformers >= 5.0 (pip install 'transformers>=5')"
        ) from e
    m = re.match(r"(\d+)\.(\d+)", getattr(transformers, "__version__", ""))
    version = (int(m.group(1)), int(m.group(2))) if m else None
    if version is None or version < MIN_TRANSFORMERS:
        raise ImportError(
            f"ptfast.integrations.transformers needs transformers >= 5.0 (found {transformers.__version__!r}): "
            "transformers 4.x selects attention classes per model instead of dispatching through AttentionInterface"
        )
    try:
        from transformers import AttentionInterface, masking_utils
    except ImportError as e:
        raise RuntimeError(f"transformers {transformers.__version__} has no AttentionInterface / masking_utils") from e
    needed = (
        "AttentionMaskInterface",
        "flash_attention_mask",
        "sdpa_mask",
        "causal_mask_function",
        "bidirectional_mask_function",
    )
    missing = [n for n in needed if not hasattr(masking_utils, n)]
    if missing or not hasattr(AttentionInterface, "register"):
        raise RuntimeError(
            f"transformers {transformers.__version__}: transformers.masking_utils lacks {', '.join(missing) or '-'} "
            "(or AttentionInterface.register is missing); ptfast's integration was written against 5.17-5.23"
        )
    return AttentionInterface, masking_utils
