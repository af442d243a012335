"""TRL: triton_xent's fused LM head in every TRL trainer, and supervised fine-tuning whose loss is
the patched model's.

TRL's trainers (1.x: SFT, DPO, GRPO, RLOO, KTO, ...) give the model their own fused LM head
(``trl.trainer.utils.add_fused_lm_head``: an instance ``forward`` that runs the base model and
TRL's chunked log-probability kernel) and compute their losses from its per-token outputs, so a
model patched by :mod:`triton_xent.integrations.transformers` would be bypassed (the patch warns,
or refuses when its loss options would be dropped). Two ways in:

* :func:`install` (and :func:`uninstall`): every TRL trainer built afterwards gets triton_xent's
  head instead (:mod:`._trl_head`): ``log_probs``, ``entropy`` and ``is_top1`` from one
  :func:`triton_xent.linear_logprobs` pass, TRL's own losses and metrics on top (GRPO's policy
  and reference log-probs, KL and entropy; SFT's loss and metrics). The head's weight goes to
  :func:`~triton_xent.linear_cross_entropy` as it is: an FSDP2-sharded head is gathered with
  averaged gradients (TRL's own ``full_tensor()`` keeps each rank's slice of the gradient
  unaveraged), a tensor-parallel head stays sharded on the vocabulary. Refused, by name:
  ``log_sum_sq_probs`` (DPO with ``use_weighting``), ``mean_logits`` of a soft-capped head (DPO's
  and KTO's ``logits/*`` metrics; without a soft-cap it is computed exactly from linearity), a
  DeepSpeed ZeRO-3 partitioned head.
* :class:`GRPOTrainer`: TRL's GRPO with both: the policy's, old and reference log-probs come
  from triton_xent's head (installed for the trainer's own construction only), and the policy
  loss is :func:`triton_xent.linear_policy_loss` (its gradient written in the forward: 3 GEMMs,
  no ``(tokens, V)`` logits) where the configuration allows, TRL's loss on our head elsewhere
  (:mod:`.trl_grpo`).
* :class:`SFTTrainer`: TRL's SFT with the loss left to the model, as ``transformers.Trainer``
  does, for triton_xent's loss options (``z_loss``, label smoothing, the FSDP schedules):

  - TRL's fused head is removed again after TRL's setup, and the model (the base model inside
    a PEFT model) is patched with ``triton_xent_options`` (``patch``'s keywords) unless it
    already is (by :func:`~triton_xent.integrations.transformers.patch` or ``apply``);
  - ``compute_loss`` is ``Trainer.compute_loss`` (the model's own loss: triton_xent's, with
    ``num_items_in_batch`` for gradient accumulation), with TRL's two input tweaks kept:
    ``use_cache=False`` and ``output_router_logits=True`` for MoE models (whose forward then adds
    its router loss, as it does under ``Trainer``);
  - TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are logged as TRL logs them,
    from the loss's own pass (the op returns each row's entropy and arg-max with the loss).

  ``loss_type`` must be ``"nll"``, and label smoothing goes through ``triton_xent_options``
  (``label_smoothing=``), not ``label_smoothing_factor``. Everything else (datasets, packing,
  PEFT, completion-only masks, collators) is TRL's. TRL's own ``SFTTrainer`` after
  :func:`install` trains the same (TRL's loss on triton_xent's head), without those options.

Importing this module imports TRL.
"""

from __future__ import annotations

import sys

import torch
import trl.trainer.utils as _trl_utils
from transformers import Trainer
from trl import SFTTrainer as _TRLSFTTrainer

from . import _hf_loss, _trl_head, trl_grpo
from . import _hf_patching as _hp
from .transformers import patch

__all__ = ["GRPOTrainer", "SFTTrainer", "install", "is_installed", "uninstall"]

_NAME = "add_fused_lm_head"
_TRL_ADD_FUSED_LM_HEAD = getattr(_trl_utils, _NAME)  # TRL's own installer


def trl_add_fused_lm_head():
    """TRL's own ``add_fused_lm_head`` (installed or not)."""
    return _TRL_ADD_FUSED_LM_HEAD


def _trl_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def _swap(old, new) -> None:
    # TRL's trainer modules hold their own reference (``from .utils import add_fused_lm_head``):
    # every loaded module's is swapped; those imported later read trl.trainer.utils's.
    for module in _trl_modules():
        if vars(module).get(_NAME) is old:
            setattr(module, _NAME, new)


def install() -> None:
    """Make every TRL trainer's fused LM head triton_xent's, process-wide (idempotent).

    TRL's trainers (SFT, DPO, GRPO, RLOO, KTO, ...) call ``trl.trainer.utils.add_fused_lm_head``
    while they are built; after ``install()`` that call gives the model triton_xent's head
    (:func:`triton_xent.linear_logprobs`: log-probs, entropy and ``is_top1`` in one fused pass;
    see :mod:`triton_xent.integrations._trl_head`). Call it before building the trainer. An
    FSDP2-sharded head is gathered with averaged gradients (TRL's own head keeps each rank's
    slice unaveraged); outputs triton_xent does not compute raise when a trainer asks for them.
    """
    _swap(_TRL_ADD_FUSED_LM_HEAD, _trl_head.add_fused_lm_head)


def uninstall() -> None:
    """Undo :func:`install` (idempotent): trainers built afterwards get TRL's own head. Models
    given triton_xent's head before keep it."""
    _swap(_trl_head.add_fused_lm_head, _TRL_ADD_FUSED_LM_HEAD)


def is_installed() -> bool:
    return getattr(_trl_utils, _NAME) is _trl_head.add_fused_lm_head


class GRPOTrainer(trl_grpo.GRPOTrainer):
    """TRL's ``GRPOTrainer`` on triton_xent's head and policy loss.

    The trainer's models (policy and reference) get triton_xent's fused head while the trainer
    is built (:func:`install` for that time only; left as it was after), so every log-prob and
    entropy TRL computes (old, reference, and the policy's where TRL's loss runs) comes from one
    :func:`triton_xent.linear_logprobs` pass; the training loss is
    :func:`triton_xent.linear_policy_loss` for the loss types it covers
    (:class:`triton_xent.integrations.trl_grpo.GRPOTrainer`, whose arguments it takes,
    ``triton_xent_options`` included).

    Examples::

        >>> from triton_xent.integrations.trl import GRPOTrainer
        >>> trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
        ...                       train_dataset=ds, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, *args, **kwargs):
        was = is_installed()
        install()
        try:
            super().__init__(*args, **kwargs)
        finally:
            if not was:
                uninstall()


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
        if forward is not None and (_hp.is_trl_fused_head(forward) or _trl_head.is_head(forward)):
            del base.forward  # the class's (patched) forward shows again
        if triton_xent_options is not None or getattr(base, _hp.OPTIONS, None) is None:
            patch(base, **(triton_xent_options or {}))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        with _hf_loss.collect_metrics() as rows:
            out = Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        self._log_token_metrics(mode, inputs, rows)
        return out

    def _log_token_metrics(self, mode, inputs, rows):
        """TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, as TRL's trainer logs
        them, from the loss's own pass (its rows' entropy and arg-max)."""
        if rows:
            entropy_sum, num_correct, num_valid = (torch.stack(x).sum() for x in zip(*rows))
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(num_valid).sum()
            entropy_sum, num_correct = gather(entropy_sum).sum(), gather(num_correct).sum()
            valid = num_valid > 0
            self._metrics[mode]["entropy"].append(
                (entropy_sum / num_valid).item() if valid else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(
                (num_correct / num_valid).item() if valid else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                count = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:  # padding-free: one packed row
                count = torch.tensor(inputs["position_ids"].size(1),
                                     device=inputs["position_ids"].device)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            tokens = self.accelerator.gather_for_metrics(count).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
