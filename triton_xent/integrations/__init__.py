"""Integrations with other libraries; each submodule imports its library only when used.

* :mod:`triton_xent.integrations.transformers`: ``patch(model)``, ``apply("llama")`` and
  ``AutoTritonXentForCausalLM`` make a Hugging Face causal LM compute its loss with triton_xent
  (fused with the LM head while training, without building the logits).
* :mod:`triton_xent.integrations.trl`: TRL's ``SFTTrainer`` with the loss left to the patched
  model (importing it imports TRL).
"""
