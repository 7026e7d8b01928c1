"""Integrations of ptfast with other libraries.

* :mod:`ptfast.integrations.transformers`: ``attn_implementation="ptfast"`` for Hugging Face models
  (``register()`` first; ``ptfast.patch`` does it for you).
* :mod:`ptfast.integrations.bert_mlm`: the masked-LM head patch ``ptfast.patch`` applies to ``BertForMaskedLM`` /
  ``BertForPreTraining`` (transform on masked rows only, then the fused loss; ``mlm_head_loss``).

Nothing here is imported by ``import ptfast``, and importing a submodule does not import the library it
integrates with until it is used.
"""
