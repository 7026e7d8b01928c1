"""The mask builder ptfast registers with ``transformers.masking_utils.AttentionMaskInterface``.

What this module holds:

* :func:`create_mask`: transformers' mask-interface signature. A plain causal or bidirectional pattern gets
  transformers' flash-attention builder: the ``(B, Lk)`` bool key mask, or ``None`` when nothing is padded, which
  :func:`ptfast.attention` takes as ``key_mask`` (padding-only key blocks skipped, no ``L x L`` mask). Sequences
  packed into one row (the pattern transformers composes from restarting ``position_ids``) get ``None`` too: the
  attention function takes their boundaries from ``cu_seq_lens_*`` or ``position_ids``, as transformers' flash
  path does. Any other pattern (sliding windows, chunked attention, custom ``and``/``or`` overlays) cannot be
  told by a key mask and the flash builder would silently drop it, so it gets transformers' SDPA builder: a 4-D
  bool mask (or ``None`` when the pattern needs none) that ptfast takes as ``attn_mask``.
* :func:`packed_sequence_base`: recognizes that packed-sequence composition.

Why the packed case matters: transformers looks for packed sequences in ``position_ids`` whenever no 2-D mask is
given, and composes ``base AND same-sequence`` (5.17 did so for causal masks; 5.25 does it for bidirectional
encoders such as BERT too, because ``BertModel`` now hands ``position_ids`` to its mask builder). Built in full
that is a ``T x T`` mask for a packed row of ``T`` tokens (hundreds of MB for a BERT-base batch), and it arrives
next to the ``cu_seq_lens_*`` that already describe it. :func:`ptfast.patch` ``(unpad=True)`` runs BERT on such a
packed row, and ``DataCollatorWithFlattening`` produces one.

Recognizing the composition reads the closures of transformers' ``and_masks``, ``packed_sequence_mask_function``
and ``remap_positions_for_packed_sequence`` (the same structure from 5.0 to 5.25, with or without the position
remap). Anything that does not match exactly is built in full by the SDPA builder: correct, never dropped.
``tests/test_integration_transformers.py`` checks that the recognition engages on the installed release. Under
``torch.compile`` the closures cannot be read inside a graph, so that check (only for a batch of one without a 2-D
mask) runs outside it: one graph break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ptfast.integrations.transformers_interfaces import transformers_interfaces

__all__ = ["create_mask", "packed_sequence_base"]


def _made_by(fn: object, factory: object) -> bool:
    """Whether ``fn`` is a closure created by ``factory`` (its code is one of the factory's nested functions).
    Compares code objects, which torch.compile also exposes on the functions it traces."""
    code = getattr(fn, "__code__", None)
    outer = getattr(factory, "__code__", None)
    return code is not None and outer is not None and any(code is c for c in outer.co_consts)


def _closure(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return {}
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)}
    except ValueError:  # an empty cell
        return {}


def packed_sequence_base(mask_function: object) -> Callable | None:
    """The base pattern if ``mask_function`` is transformers' ``and_masks(base, packed_sequence_mask_function(...))``
    (``base`` possibly wrapped by ``remap_positions_for_packed_sequence``), else ``None``."""
    _, mu = transformers_interfaces()
    if not _made_by(mask_function, mu.and_masks):
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    base, overlay = parts
    if not _made_by(overlay, mu.packed_sequence_mask_function):
        return None
    remap = getattr(mu, "remap_positions_for_packed_sequence", None)
    if remap is not None and _made_by(base, remap):
        # Positions inside one packed sequence are consecutive, so a causal or bidirectional base gives the same
        # answer on remapped and on packed indices.
        base = _closure(base).get("mask_function")
    return base if callable(base) else None


# torch.compile cannot read a traced function's closure: there the check runs outside the graph (one graph break,
# only for a batch of one without a 2-D mask, where transformers may have composed the packed pattern).
_packed_sequence_base_eager = torch.compiler.disable(packed_sequence_base)


def create_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask builder registered with ``AttentionMaskInterface`` (transformers' mask-interface signature): see the
    module docstring for what each pattern gets."""
    _, masking_utils = transformers_interfaces()
    plain = (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)
    # Transformers passes everything by keyword; the positional fallback mirrors the builders' parameter order.
    if "mask_function" in kwargs:
        mask_function = kwargs["mask_function"]
    else:
        mask_function = args[5] if len(args) > 5 else masking_utils.causal_mask_function
    if mask_function in plain:
        return masking_utils.flash_attention_mask(*args, **kwargs)
    attention_mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[6] if len(args) > 6 else None)
    batch_size = kwargs["batch_size"] if "batch_size" in kwargs else (args[0] if args else None)
    if attention_mask is None and batch_size == 1 and _packed_sequence_base_eager(mask_function) in plain:
        # One row of packed sequences and no padding (transformers only packs when no 2-D mask is given). The
        # attention function splits the row at cu_seq_lens_* or where position_ids restart, like transformers'
        # flash path, which handles packing in a batch of one only; larger batches get the 4-D mask below.
        return None
    return masking_utils.sdpa_mask(*args, **kwargs)
