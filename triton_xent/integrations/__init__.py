"""Integrations with other libraries; each submodule imports its library only when used.

* :mod:`triton_xent.integrations.transformers`: ``patch(model)`` makes a Hugging Face
  ``*ForCausalLM`` compute its training loss with triton_xent (optionally without logits).
"""
