"""PyTorch's ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` with their self-attention on ptfast.

What this module holds:

* :func:`patch_encoders`, called by :func:`ptfast.patch` (``attention=True``): every supported
  ``nn.TransformerEncoderLayer`` inside a model becomes a :class:`PatchedTransformerEncoderLayer` and every
  ``nn.TransformerEncoder`` whose layers are patched becomes a :class:`PatchedTransformerEncoder`, in place.
* The two classes. Patching swaps the *instance's* ``__class__`` to the subclass: modules, ``Parameter`` objects,
  buffers, attributes and state_dict keys stay exactly what they were (old checkpoints load, optimizers keep
  their state, ``isinstance(layer, nn.TransformerEncoderLayer)`` stays True), and a patched model can be
  deep-copied, pickled with ``torch.save`` (loading it needs ptfast importable) and loaded into a stock model
  through its state_dict.

What the patched modules compute: the stock non-fast-path math of the layer (``norm_first`` True/False, any
activation, ``dropout`` / ``dropout1`` / ``dropout2``, ``bias=False``, ``batch_first`` True/False, unbatched
``(L, E)`` input), except that the self-attention block projects with ``self_attn``'s own ``in_proj_weight`` /
``in_proj_bias`` / ``out_proj`` and runs :func:`ptfast.attention` in between (attention dropout
``self_attn.dropout``, only while ``self_attn.training``).

PyTorch's fast paths are never taken (otherwise ptfast would silently not run): the patched layer never calls
``torch._transformer_encoder_layer_fwd`` nor ``self_attn`` (whose own ``torch._native_multi_head_attention`` fast
path is thereby skipped too), and the patched encoder never builds nested tensors: it runs its layers itself on
the padded batch, converting the masks once for all layers. **Padded positions** of the encoder's output
therefore hold what the stock encoder returns off its fast path (in training mode or with gradients): finite
values of padded queries attending to the real keys (then ``norm``). The stock encoder's nested-tensor path (eval
mode, no grad, left-aligned padding) returns 0 there instead; a loss should ignore those positions either way.
The patched modules run the stock forward (so ptfast does not run) for inputs it cannot or must not take: a
nested-tensor input (only possible when the caller builds one), and a float mask that requires grad while grad
is enabled (a learned additive bias: :func:`ptfast.attention` gives no gradient to masks and refuses it).

Mask conventions (PyTorch's MultiheadAttention -> ptfast.attention; ptfast's ``attn_mask`` bool is True = attend,
``key_mask`` bool ``(B, L)`` is True = real token, the opposite of PyTorch's):

================================  ============================================================================
PyTorch argument                  ptfast argument
================================  ============================================================================
``src_key_padding_mask`` bool     ``key_mask = ~src_key_padding_mask`` (PyTorch: True = padding); ptfast's fast
``(B, L)``                        key-span path, never a dense 4-D mask
``src_key_padding_mask`` float    additive ``attn_mask`` ``(B, 1, 1, L)`` (a view, nothing materialized)
``mask`` bool ``(L, L)``          ``attn_mask = ~mask`` ``(1, 1, L, L)`` (PyTorch: True = NOT allowed)
``mask`` bool ``(B*H, L, L)``     ``attn_mask = ~mask`` viewed ``(B, H, L, L)``
``mask`` float                    additive ``attn_mask``, ``(1, 1, L, L)`` or ``(B, H, L, L)``
``is_causal=True``                ``is_causal=True``; ``mask`` is then only a hint and is not read (PyTorch's
                                  SDPA path does the same when no padding mask is given); without ``mask`` it
                                  means causal (the stock layer raises there)
bool ``mask`` + float padding     one float ``attn_mask`` ``(B, 1|H, L, L)``: the padding plus ``-inf`` where
                                  ``mask`` is True (materialized, as PyTorch does)
float ``mask`` + float padding    their sum ``(B, 1|H, L, L)`` (materialized, as PyTorch does)
================================  ============================================================================

Bool masks combine with ``key_mask`` by AND and a float ``attn_mask`` is added, so every other combination needs
no materialization. Float masks are cast to the attention's dtype. The encoder's ``is_causal=None`` is *not*
turned into a causal flag by comparing ``mask`` against a causal mask as the stock encoder does (that comparison
syncs with the device and breaks ``torch.compile`` graphs): the mask is applied as given, which is the same
result.

Fully masked rows: where a row's every key is excluded by a *bool* mask (a sequence that is all padding), ptfast
returns 0 for the attention (finite layer output, zero attention gradient). PyTorch turns bool masks into ``-inf``
additive masks; its SDPA path then returns 0 too on torch 2.13's CPU kernels, while other PyTorch paths (the
``need_weights=True`` math, some kernels and versions) give NaN there. Rows with at least one allowed key agree.

Left alone (reported in ``skipped`` with the reason): subclasses of the two classes (their forward is unknown to
ptfast), modules with forward / backward hooks registered on them or on ``self_attn`` (the patched layer computes
the attention without calling ``self_attn``), ``self_attn`` that is not a plain ``nn.MultiheadAttention`` or uses
``kdim`` / ``vdim`` / ``add_bias_kv`` / ``add_zero_attn``, and encoders none of whose layers could be patched.
Hooks registered on ``self_attn`` *after* patching make that layer run the stock forward, so they still fire.
A stock encoder left alone (hooks) still calls its patched layers, except on its nested-tensor fast path, where
they run the stock forward; it hands them its padding mask already turned into a float ``-inf`` mask, so they
take the additive-mask path instead of the key-span one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.transformer import _detect_is_causal_mask

from ptfast.integrations import has_hooks
from ptfast.ops.attention import attention as _ptfast_attention

__all__ = ["PatchedTransformerEncoder", "PatchedTransformerEncoderLayer", "patch_encoders"]


class _Masks(NamedTuple):
    """The masks of one call in ptfast's form, built once by the encoder and shared by its layers."""

    attn_mask: Tensor | None  # bool (True = attend) or additive float, 4-D broadcastable to (B, H, L, L)
    key_mask: Tensor | None  # bool (B, L), True = real token
    is_causal: bool
    num_heads: int  # the layout they were built for: a layer with another one converts its own
    batch_first: bool


def _check_mask_dtype(name: str, m: Tensor) -> None:
    if m.dtype != torch.bool and not m.is_floating_point():
        # Same rule as torch.nn.functional._canonical_mask: an integer 0/1 mask is ambiguous.
        raise TypeError(
            f"ptfast TransformerEncoder: only bool and floating types of {name} are supported, got {m.dtype}"
        )


def _convert_masks(
    src: Tensor,
    batch_first: bool,
    num_heads: int,
    src_mask: Tensor | None,
    src_key_padding_mask: Tensor | None,
    is_causal: bool,
) -> _Masks:
    """PyTorch's ``(mask, src_key_padding_mask, is_causal)`` -> ptfast's form (see the module docstring's table).

    Shape and dtype checks only, never a look at the values (no host sync, ``torch.compile`` friendly).
    """
    if src.dim() == 2:  # unbatched (L, E): one sequence
        B, L = 1, src.shape[0]
    else:
        B, L = (src.shape[0], src.shape[1]) if batch_first else (src.shape[1], src.shape[0])
    bool_attn: Tensor | None = None  # True = attend
    float_attn: Tensor | None = None
    if src_mask is not None:
        _check_mask_dtype("mask", src_mask)
    # With the causal hint the mask is not read: PyTorch's SDPA path does the same (is_causal=True and the mask
    # dropped), and ptfast then skips the blocks above the diagonal instead of reading an L x L mask.
    if src_mask is not None and not is_causal:
        if src_mask.dim() == 2:
            if tuple(src_mask.shape) != (L, L):
                raise ValueError(
                    f"ptfast TransformerEncoder: the 2-D mask must be (L, L) = {(L, L)}, got {tuple(src_mask.shape)}"
                )
            m4 = src_mask[None, None]
        elif src_mask.dim() == 3:
            if tuple(src_mask.shape) != (B * num_heads, L, L):
                raise ValueError(
                    f"ptfast TransformerEncoder: the 3-D mask must be (B * nhead, L, L) = {(B * num_heads, L, L)}, "
                    f"got {tuple(src_mask.shape)}"
                )
            m4 = src_mask.reshape(B, num_heads, L, L)  # a view unless the caller's strides forbid it
        else:
            raise ValueError(f"ptfast TransformerEncoder: mask must be 2-D or 3-D, got shape {tuple(src_mask.shape)}")
        if m4.dtype == torch.bool:
            bool_attn = m4.logical_not()  # PyTorch: True = NOT allowed; ptfast: True = attend
        else:
            float_attn = m4
    key_mask: Tensor | None = None
    if src_key_padding_mask is not None:
        kpm = src_key_padding_mask
        _check_mask_dtype("src_key_padding_mask", kpm)
        if src.dim() == 2 and kpm.dim() == 1:
            kpm = kpm[None]
        if tuple(kpm.shape) != (B, L):
            raise ValueError(
                f"ptfast TransformerEncoder: src_key_padding_mask must be (B, L) = {(B, L)}, "
                f"got {tuple(src_key_padding_mask.shape)}"
            )
        if kpm.dtype == torch.bool:
            key_mask = kpm.logical_not()  # PyTorch: True = padding; ptfast: True = real token
        else:
            pad = kpm[:, None, None, :]
            float_attn = pad if float_attn is None else float_attn + pad
    if bool_attn is not None and float_attn is not None:
        # One attn_mask only: fold the bool mask into the float one as -inf (what PyTorch's canonical mask does).
        float_attn = torch.where(bool_attn, float_attn, -math.inf)
        bool_attn = None
    attn_mask = float_attn if float_attn is not None else bool_attn
    if attn_mask is not None and attn_mask.requires_grad:
        # Only reached with grad disabled (callers run the stock forward when a mask needs a gradient), where views
        # of a leaf that requires grad still say so; ptfast.attention refuses such masks.
        attn_mask = attn_mask.detach()
    return _Masks(attn_mask, key_mask, bool(is_causal), num_heads, batch_first)


def _mask_needs_grad(*masks: Tensor | None) -> bool:
    """A float mask that needs a gradient (a learned additive bias): ptfast.attention refuses those."""
    return torch.is_grad_enabled() and any(m is not None and m.requires_grad for m in masks)


class PatchedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose self-attention runs :func:`ptfast.attention`.

    Never constructed directly: :func:`patch_encoders` swaps a stock layer's ``__class__`` to this one, so
    parameters and state_dict keys are the stock layer's. ``forward`` has the stock signature and math (the
    non-fast path); see the module docstring for the masks.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        _ptfast_masks: _Masks | None = None,
    ) -> Tensor:
        sa = self.self_attn
        if src.is_nested or has_hooks(sa) or _mask_needs_grad(src_mask, src_key_padding_mask):
            # The stock forward (which calls self_attn) for what ptfast cannot or must not take over: a nested
            # tensor (only from a caller that built one, e.g. a stock encoder left alone), hooks registered on
            # self_attn after patching (they must fire), a float mask that needs a gradient (ptfast.attention
            # gives no gradient to masks).
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        if src.dim() not in (2, 3) or src.shape[-1] != sa.embed_dim:
            raise ValueError(
                f"ptfast TransformerEncoderLayer: src must be (B, L, E), (L, B, E) or (L, E) with E = d_model = "
                f"{sa.embed_dim}, got {tuple(src.shape)}"
            )
        masks = _ptfast_masks
        if masks is None or masks.num_heads != sa.num_heads or masks.batch_first != sa.batch_first:
            masks = _convert_masks(src, sa.batch_first, sa.num_heads, src_mask, src_key_padding_mask, is_causal)
        unbatched = src.dim() == 2
        x = src[None] if unbatched else src  # unbatched input runs as a batch of one, batch first
        batch_first = sa.batch_first or unbatched
        # see Fig. 1 of https://arxiv.org/pdf/2002.04745v1.pdf (the stock layer's order of operations)
        if self.norm_first:
            x = x + self.dropout1(self._ptfast_self_attention(self.norm1(x), masks, batch_first))
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self.dropout1(self._ptfast_self_attention(x, masks, batch_first)))
            x = self.norm2(x + self._ff_block(x))
        return x[0] if unbatched else x

    def _ptfast_self_attention(self, x: Tensor, masks: _Masks, batch_first: bool) -> Tensor:
        """``self_attn(x, x, x)[0]`` with its own weights: in-projection, ptfast.attention, out-projection."""
        sa = self.self_attn
        H, D = sa.num_heads, sa.head_dim
        # One GEMM for q, k and v (like MultiheadAttention's packed self-attention path), then views: ptfast takes
        # any strides, so q/k/v are never copied into (B, H, L, D) order.
        qkv = F.linear(x, sa.in_proj_weight, sa.in_proj_bias).unflatten(-1, (3, H, D))
        order = (2, 0, 3, 1, 4) if batch_first else (2, 1, 3, 0, 4)  # -> (3, B, H, L, D)
        q, k, v = qkv.permute(order).unbind(0)
        attn_mask = masks.attn_mask
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # PyTorch's SDPA wants the query's dtype; ptfast's kernels agree
        dropout_p = sa.dropout if sa.training else 0.0  # MultiheadAttention drops only in training mode
        out = _ptfast_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=masks.is_causal, key_mask=masks.key_mask
        )  # (B, H, L, D)
        out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
        out = out.reshape(*out.shape[:2], H * D)
        return F.linear(out, sa.out_proj.weight, sa.out_proj.bias)


class PatchedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` that runs its layers itself on the padded batch (never nested tensors).

    Never constructed directly: :func:`patch_encoders` swaps a stock encoder's ``__class__`` to this one. The masks
    are converted once and handed to every patched layer; ``norm`` is applied as in the stock encoder. The output
    is padded like the stock one's; at padded positions it holds the stock off-fast-path values (module docstring).
    """

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        first: PatchedTransformerEncoderLayer | None = None
        for m in self.layers:  # a plain loop (not next(generator)): simplest for dynamo to trace
            if isinstance(m, PatchedTransformerEncoderLayer):
                first = m
                break
        if first is None or src.is_nested or _mask_needs_grad(mask, src_key_padding_mask):
            # No patched layer left (the user swapped them out), a nested input, or a learned float mask (the
            # patched layers then run stock too): the stock forward is the contract.
            return super().forward(src, mask, src_key_padding_mask, is_causal)
        sa = first.self_attn
        causal = is_causal is True
        masks = _convert_masks(src, sa.batch_first, sa.num_heads, mask, src_key_padding_mask, causal)
        stock_causal: bool | None = None
        output = src
        for mod in self.layers:
            if isinstance(mod, PatchedTransformerEncoderLayer):
                # The stock arguments go along for hooks that read them; the layer uses the converted masks.
                output = mod(
                    output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=causal,
                    _ptfast_masks=masks,
                )  # fmt: skip
            else:
                if stock_causal is None:  # what the stock encoder hands its layers (detection syncs: only here)
                    seq_len = src.shape[1] if sa.batch_first and src.dim() == 3 else src.shape[0]
                    stock_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
                output = mod(output, src_mask=mask, is_causal=stock_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


def _self_attn_reason(sa: nn.Module) -> str | None:
    if type(sa) is not nn.MultiheadAttention:
        return f"self_attn is a {type(sa).__name__}, not nn.MultiheadAttention (its forward is unknown to ptfast)"
    if has_hooks(sa):
        return "a hook is registered on self_attn (the patched layer computes attention without calling it)"
    if not sa._qkv_same_embed_dim or sa.in_proj_weight is None:
        return "self_attn has kdim / vdim != d_model (separate q/k/v projections: not self-attention shaped)"
    if sa.bias_k is not None or sa.bias_v is not None:
        return "self_attn uses add_bias_kv"
    if sa.add_zero_attn:
        return "self_attn uses add_zero_attn"
    return None


def _layer_reason(layer: nn.TransformerEncoderLayer) -> str | None:
    if type(layer) is not nn.TransformerEncoderLayer:
        return f"a subclass ({type(layer).__name__}) of TransformerEncoderLayer: its forward is unknown to ptfast"
    if has_hooks(layer):
        return "a hook is registered on the layer"
    return _self_attn_reason(layer.self_attn)


def _where(prefix: str, name: str) -> str:
    return (prefix + name).rstrip(".") or "<root>"


def patch_encoders(model: nn.Module, replaced: list[str], skipped: list[str], *, prefix: str = "") -> None:
    """Patch every nn.TransformerEncoderLayer (and nn.TransformerEncoder) inside `model`, in place.

    Args:
        model: any module; it may itself be a layer or an encoder (``nn.Transformer``'s encoder is found too).
        replaced / skipped: the report's lines, appended to (one per patched / left-alone module; modules patched
            by an earlier call are listed in ``skipped`` as "already patched", so a second call replaces nothing).
        prefix: ``model``'s qualified name inside the module ``ptfast.patch`` was called on ("" or ending in ".").

    An encoder is patched only when at least one of its layers is (now or by an earlier call): otherwise patching it
    would only give up its nested-tensor fast path. See the module docstring for what is left alone and why.
    """
    modules = list(model.named_modules())
    for name, m in modules:
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        where = _where(prefix, name)
        if type(m) is PatchedTransformerEncoderLayer:
            skipped.append(f"{where} (TransformerEncoderLayer): already patched")
            continue
        reason = _layer_reason(m)
        if reason is not None:
            skipped.append(f"{where} (TransformerEncoderLayer): {reason}")
            continue
        m.__class__ = PatchedTransformerEncoderLayer
        replaced.append(f"{where}: TransformerEncoderLayer -> ptfast attention")
    for name, m in modules:
        if not isinstance(m, nn.TransformerEncoder):
            continue
        where = _where(prefix, name)
        if type(m) is PatchedTransformerEncoder:
            skipped.append(f"{where} (TransformerEncoder): already patched")
            continue
        if type(m) is not nn.TransformerEncoder:
            reason = f"a subclass ({type(m).__name__}) of TransformerEncoder: its forward is unknown to ptfast"
        elif not any(isinstance(layer, PatchedTransformerEncoderLayer) for layer in m.layers):
            reason = "none of its layers could be patched (kept stock, nested-tensor fast path included)"
        elif has_hooks(m):
            reason = (
                "a hook is registered on the encoder (kept stock; its patched layers run ptfast except on the stock "
                "nested-tensor path: eval mode, no grad, a padding mask)"
            )
        else:
            reason = None
        if reason is not None:
            skipped.append(f"{where} (TransformerEncoder): {reason}")
            continue
        m.__class__ = PatchedTransformerEncoder
        replaced.append(
            f"{where}: TransformerEncoder -> ptfast (runs its layers on the padded batch, masks converted once; "
            "no nested-tensor fast path)"
        )
