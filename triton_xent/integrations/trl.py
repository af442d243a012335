"""TRL: supervised fine-tuning whose loss is triton_xent's.

TRL's ``SFTTrainer`` (1.x) gives the model its own fused LM head
(``trl.trainer.utils.add_fused_lm_head``: an instance ``forward`` that runs the base model and
TRL's chunked log-probability kernel) and computes the loss from it, so a model patched by
:mod:`triton_xent.integrations.transformers` would be bypassed (the patch warns, or refuses
when its loss options would be dropped). :class:`SFTTrainer` here is TRL's with the loss left
to the model, as ``transformers.Trainer`` does:

* TRL's fused head is removed again after TRL's setup, and the model (the base model inside a
  PEFT model) is patched with ``triton_xent_options`` (``patch``'s keywords) unless it already
  is (by :func:`~triton_xent.integrations.transformers.patch` or ``apply``);
* ``compute_loss`` is ``Trainer.compute_loss`` (the model's own loss: triton_xent's, with
  ``num_items_in_batch`` for gradient accumulation), with TRL's two input tweaks kept:
  ``use_cache=False`` and ``output_router_logits=True`` for MoE models (whose forward then adds
  its router loss, as it does under ``Trainer``).

TRL's ``entropy`` and ``mean_token_accuracy`` metrics need the logits and are not logged;
``loss_type`` must be ``"nll"``, and label smoothing goes through ``triton_xent_options``
(``label_smoothing=``), not ``label_smoothing_factor``. Everything else (datasets, packing,
PEFT, completion-only masks, collators) is TRL's. Importing this module imports TRL.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer as _TRLSFTTrainer

from . import _hf_patching as _hp
from .transformers import patch

__all__ = ["SFTTrainer"]


class SFTTrainer(_TRLSFTTrainer):
    """TRL's ``SFTTrainer`` with the loss computed by the (triton_xent-patched) model.

    Args:
        *args, **kwargs: those of ``trl.SFTTrainer``.
        triton_xent_options: keywords of :func:`triton_xent.integrations.transformers.patch`
            (``fused``, ``z_loss``, ``label_smoothing``, ...); default: patch with its defaults
            unless the model is patched already.

    Examples::

        >>> from triton_xent.integrations.trl import SFTTrainer
        >>> trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
        ...                      processing_class=tokenizer, triton_xent_options={"z_loss": 1e-4})
        >>> trainer.train()
    """

    def __init__(self, *args, triton_xent_options: dict | None = None, **kwargs):
        _hp.ALLOW_TRL_HEAD[0] += 1  # TRL's setup adds its head; it is removed just below
        try:
            super().__init__(*args, **kwargs)
        finally:
            _hp.ALLOW_TRL_HEAD[0] -= 1
        if self.compute_loss_func is not None:
            raise ValueError("triton_xent's SFTTrainer computes the loss in the model; drop "
                             "compute_loss_func (or use trl.SFTTrainer)")
        if getattr(self.args, "label_smoothing_factor", 0.0):
            raise ValueError("label_smoothing_factor smooths the logits, which the fused head "
                             "never builds: pass triton_xent_options={'label_smoothing': x}")
        if getattr(self.args, "loss_type", "nll") != "nll":
            raise ValueError(f"loss_type={self.args.loss_type!r} is computed by TRL's own head; "
                             "triton_xent's SFTTrainer computes the 'nll' loss only")
        base = _hp.unwrap(self.model)
        forward = vars(base).get("forward")
        if forward is not None and _hp.is_trl_fused_head(forward):
            del base.forward  # the class's (patched) forward shows again
        if triton_xent_options is not None or getattr(base, _hp.OPTIONS, None) is None:
            patch(base, **(triton_xent_options or {}))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
