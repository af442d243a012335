"""Integrations with other libraries; each submodule imports its library only when used.

* :mod:`triton_xent.integrations.transformers`: ``patch(model)``, ``apply("llama")`` and
  ``AutoTritonXentForCausalLM`` make a Hugging Face causal LM compute its loss with triton_xent
  (fused with the LM head while training, without building the logits).
* :mod:`triton_xent.integrations.trl`: ``install()`` gives every TRL trainer (GRPO, RLOO, DPO,
  SFT, ...) triton_xent's fused LM head; its ``SFTTrainer`` leaves the loss to the patched model
  (importing it imports TRL).
"""
