"""Op definitions: one file per op family holds its schema, fake kernel, autograd, autocast policy,
validation and backend dispatch. Backend implementations live in ``ptfast.backends.<backend>.<op>``.

Importing this package tags PyTorch's compile caches with a hash of these definitions (see
:func:`_tag_compile_caches`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _definitions_digest() -> str:
    """A hash of every op definition (these files) and of the dispatch layer that fills the ops' backend argument."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [*sorted(here.glob("*.py")), here.parent / "_dispatch.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _tag_compile_caches() -> None:
    """Add ``ptfast-ops-<hash>`` to ``torch.compiler.config.cache_key_tag``.

    PyTorch's compile caches (FX graph, AOTAutograd) key a graph on its traced code, not on a custom op's autograd
    formula or fake kernel: a graph cached with another version of these definitions would be replayed with, for
    example, the old arguments of a backward op. The tag makes any change here a cache miss. Appended to whatever
    tag the user set (``TORCH_COMPILE_CACHE_KEY_TAG``); nothing happens on a torch without the setting.
    """
    try:
        from torch.compiler import config as compiler_config
    except ImportError:
        return
    current = getattr(compiler_config, "cache_key_tag", None)
    if current is None:
        return
    tag = f"ptfast-ops-{_definitions_digest()}"
    if tag not in current.split(","):
        compiler_config.cache_key_tag = f"{current},{tag}" if current else tag


_tag_compile_caches()
