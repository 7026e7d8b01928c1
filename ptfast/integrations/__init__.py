"""Integrations of ptfast with other libraries.

* :mod:`ptfast.integrations.transformers`: ``attn_implementation="ptfast"`` for Hugging Face models
  (``register()`` first; ``ptfast.patch`` does it for you).

Nothing here is imported by ``import ptfast``, and importing a submodule does not import the library it
integrates with until it is used.
"""
