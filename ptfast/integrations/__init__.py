"""Integrations of ptfast with other libraries.

* :mod:`ptfast.integrations.transformers`: ``attn_implementation="ptfast"`` for Hugging Face models
  (``register()`` first; ``ptfast.patch`` does it for you).
* :mod:`ptfast.integrations.bert_mlm`: the masked-LM head patch ``ptfast.patch`` applies to ``BertForMaskedLM`` /
  ``BertForPreTraining`` (transform on masked rows only, then the fused loss; ``mlm_head_loss``).
* :mod:`ptfast.integrations.bert_unpad`: unpadded ``BertModel`` execution (``ptfast.patch(model, unpad=True)``).
* :mod:`ptfast.integrations.torch_transformer`: PyTorch's ``nn.TransformerEncoder(Layer)`` on ptfast attention.

Nothing here is imported by ``import ptfast``, and importing a submodule does not import the library it
integrates with until it is used.
"""

from torch import nn


def has_hooks(m: nn.Module) -> bool:
    """Forward / backward hooks registered on ``m`` itself: a patch that bypasses ``m``'s forward leaves it alone
    (state-dict hooks do not matter there: the module object stays)."""
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
    )
