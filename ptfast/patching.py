"""``ptfast.patch(model)``: swap supported blocks of an existing model for fused ptfast modules, in place.

CNNs (any model whose modules' forwards torch.fx can read; see :mod:`ptfast.patching_cnn`): each chain
``Conv2d -> [BatchNorm2d] -> [+ residual] -> ReLU [-> MaxPool2d(2, 2)]`` found in the dataflow of a forward
(``nn.Sequential`` stacks, attribute-style models, ResNet blocks) is fused. A chain of modules called once
becomes one fused module (:class:`ptfast.nn.ConvReLUPool2d`, :class:`ptfast.nn.ConvReLU2d`,
``ConvBNReLU(Pool)2d``, ``ConvBN2d``) sharing the conv's parameters, with the ReLU / pool slots turned into
``nn.Identity`` so indices, parameter objects and state_dict keys stay what they were (old checkpoints load,
optimizers keep their state). The BatchNorm object stays in its slot (same keys) with an identity forward, and
the fused module folds it into the conv on the fly whenever it would use running statistics (eval mode), and
runs stock unfused math in training mode (see :mod:`ptfast.nn.conv`). Residual blocks (ResNet's
``BasicBlock`` / ``Bottleneck``) run their chains, residual add included, as fused steps
(:mod:`ptfast.nn.fused_block`). Convert to ``SyncBatchNorm`` *before* patching: converting afterwards would put
a normalizing module back in the BN slot and normalize twice. Modules that carry hooks (feature extractors tap
``relu1_2`` etc.) are left alone, as are convolutions the fused op does not support; the report says why for
every conv not fused. Patching is idempotent.

Hugging Face models (recognized only when transformers is already imported or the model's class comes from it;
``import ptfast`` never imports transformers): ``attn_implementation="ptfast"`` is registered and, with
``attention=True``, an ``"eager"`` / ``"sdpa"`` encoder is switched to it; a ``BertForMaskedLM`` /
``BertForPreTraining`` gets a forward on the instance that, in training with labels, runs the masked-LM head
only on masked rows and the fused loss, returning ``logits=None`` (see :mod:`ptfast.integrations.bert_mlm`).
With ``unpad=True`` every ``BertModel`` runs on the real tokens only (see :mod:`ptfast.integrations.bert_unpad`).

PyTorch's ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` (``attention=True``): the instances' classes
become subclasses whose self-attention runs :func:`ptfast.attention` and that never take PyTorch's fast paths
(see :mod:`ptfast.integrations.torch_transformer`); parameters and state_dict keys unchanged.
Modules, parameters and state_dict keys stay as they were.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from torch import nn

from ptfast.patching_cnn import patch_convs, switch_max_pools

log = logging.getLogger("ptfast")


@dataclass
class PatchReport:
    """What ``patch`` replaced and what it left alone (and why)."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"ptfast.patch: {len(self.replaced)} replaced, {len(self.skipped)} left alone"]
        lines += [f"  replaced {r}" for r in self.replaced]
        lines += [f"  kept     {s}" for s in self.skipped]
        return "\n".join(lines)


def _is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, decided without importing transformers unless the model needs it."""
    from_transformers = any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)
    if "transformers" not in sys.modules and not from_transformers:
        return False
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel)


def _outermost_transformers_models(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(qualified name + ".", model)`` of each Hugging Face model in ``module`` not nested in another one."""
    if _is_transformers_model(module):
        return [(prefix, module)]
    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        found += _outermost_transformers_models(child, f"{prefix}{name}.")
    return found


def patch(
    model: nn.Module,
    *,
    conv: bool = True,
    attention: bool = True,
    mlm: bool = True,
    mlm_row_budget: float | None = 0.2,
    unpad: bool = False,
    verbose: bool = False,
) -> nn.Module:
    """Swap supported blocks of ``model`` for fused ptfast modules, in place; returns ``model``.

    Args:
        model: any ``nn.Module``; CNN conv chains inside it are patched (VGG, ResNet, written as Sequentials,
            attribute-style or functional forwards), and so are Hugging Face BERT masked-LM models (see the module
            docstring).
        conv: set False to leave convolution blocks alone.
        attention: Hugging Face models: switch ``attn_implementation`` ``"eager"`` / ``"sdpa"`` to ``"ptfast"``
            (the same attention function, so the same results; ``output_attentions=True`` is then refused, and
            dropout masks come from ptfast's generator). Decoders and generative models keep theirs. PyTorch's
            ``nn.TransformerEncoder(Layer)``: self-attention through :func:`ptfast.attention` (see
            :mod:`ptfast.integrations.torch_transformer`).
        mlm: Hugging Face ``BertForMaskedLM`` / ``BertForPreTraining``: in training with labels, run the head
            only on masked rows and the fused loss; the output's logits are then None.
        mlm_row_budget: under ``torch.compile``, the static number of rows the masked-LM head runs on, as a
            fraction of the tokens (rounded up to a multiple of 8); a batch with more masked tokens runs the head
            on every row instead. None: every row.
        unpad: Hugging Face ``BertModel`` encoders (needs ``attention=True``): remove the padding once before
            the embeddings and run every layer on the real tokens only (:mod:`ptfast.integrations.bert_unpad`);
            outputs at padded positions are then 0. One host sync per forward; under ``torch.compile`` the unpad
            step breaks the graph.
        verbose: print the report (it is always logged at INFO on the ``ptfast`` logger).

    The report of the last call is kept on ``model.ptfast_patch_report``.
    """
    report = PatchReport()
    if conv:
        patch_convs(model, report.replaced, report.skipped)
        switch_max_pools(model, report.replaced)  # after the fusion, which takes the pools it fuses
    if attention:
        from ptfast.integrations import torch_transformer

        torch_transformer.patch_encoders(model, report.replaced, report.skipped)
    for prefix, hf_model in _outermost_transformers_models(model):
        from ptfast.integrations import bert_mlm

        bert_mlm.patch_model(
            hf_model,
            report.replaced,
            report.skipped,
            prefix=prefix,
            attention=attention,
            mlm=mlm,
            row_budget_fraction=mlm_row_budget,
        )
        if unpad:
            from ptfast.integrations import bert_unpad

            bert_unpad.patch_model(hf_model, report.replaced, report.skipped, prefix=prefix)
    model.ptfast_patch_report = report
    log.info("%s", report)
    if verbose:
        print(report)
    return model
