"""TRL: a ``GRPOTrainer`` whose policy loss is :func:`triton_xent.linear_policy_loss`.

TRL's ``GRPOTrainer`` (1.x) gives the policy its own fused LM head (an instance ``forward``
installed by ``trl.trainer.utils.add_fused_lm_head``) that returns per-token log-probs and
entropies, then computes the loss from them in torch (a 4th GEMM: its head recomputes the logits
in the backward). :class:`GRPOTrainer` here keeps everything of TRL's (generation, rewards,
advantages, old and reference log-probs, logging) and replaces the training loss: the model's
instance forward is wrapped so that a call with ``triton_xent_policy=...`` runs the backbone and
:func:`~triton_xent.linear_policy_loss` on the completion tokens' hidden states (the gradient
made in the same pass, 3 GEMMs, no ``(tokens, V)`` logits); every other call (TRL's own
log-probs, generation) goes to the forward it wraps. The call goes through the trainer's model
(DDP and other wrappers see their forward).

Covered: TRL's ``loss_type`` ``grpo``, ``dapo``, ``bnpo``, ``dr_grpo``, ``cispo``, ``sapo``,
``luspo`` with token-level importance sampling, ``beta`` (KL to the reference), ``delta``,
``use_bias_correction_kl``, vLLM's importance-sampling correction, a static ``entropy_coef``
(TRL's entropy bonus, its gradient in the same pass), temperature, soft-capped and logit-scaled
heads, ``cast_lm_head_to_fp32``. Anything else (``vespo``,
``importance_sampling_level="sequence"``, ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, adaptive entropy, MoE auxiliary losses, multimodal inputs, a
DTensor head) runs TRL's own ``_compute_loss``, saying why once on
the ``triton_xent`` logger. The metrics are TRL's, computed by TRL's formulas from the fused
pass. Under bf16 autocast the head's GEMMs run in bf16, as TRL's do; the weight's gradient is
accumulated in the head's dtype over the chunks (rounded once per chunk; TRL keeps an fp32
accumulator: ``triton_xent_options={"accum_dtype": torch.float32}`` does too, ``4 V D`` bytes
more). Importing this module imports TRL.
"""

from __future__ import annotations

import logging
import types
from contextlib import nullcontext

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer as _TRLGRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..policy import LOSS_TYPES, linear_policy_loss
from . import _hf_patching as _hp

__all__ = ["GRPOTrainer"]

_log = logging.getLogger("triton_xent")
_OPTIONS = ("chunk_size", "chunk_bytes", "accum_dtype", "backend")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
               "spatial_shapes", "num_tiles", "image_position_ids", "token_type_ids",
               "mm_token_type_ids")


def _head_options(model) -> dict:
    """TRL's reading of the head's soft-cap and logit scale (``add_fused_lm_head``)."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        ls = cfg.logits_scaling
        scale = ls if cfg.model_type == "hyperclovax" else 1 / ls
    return {"softcap": softcap, "logit_scale": None if scale in (None, 1.0) else scale}


def _policy_forward(wrapped, head_options: dict, cast_fp32: bool):
    """The model's instance forward: ``triton_xent_policy`` given, the policy loss; otherwise
    the forward it wraps (TRL's fused head or the class's)."""

    def forward(self, *args, triton_xent_policy=None, **kwargs):
        if triton_xent_policy is None:
            return wrapped(*args, **kwargs)
        p = dict(triton_xent_policy)
        completion_ids = p.pop("completion_ids")
        keep = completion_ids.shape[1]
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, -keep - 1:-1]
        head = self.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        ctx = torch.autocast(hidden.device.type, enabled=False) if cast_fp32 else nullcontext()
        if cast_fp32:
            hidden = hidden.float()
        with ctx:
            return linear_policy_loss(hidden, head.weight, completion_ids.to(hidden.device),
                                      linear_bias=head.bias, **head_options, **p)

    return forward


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` with the policy loss of :func:`triton_xent.linear_policy_loss`
    where it covers the configuration (see the module docstring), TRL's own loss elsewhere.

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``.
        triton_xent_options: keywords of :func:`triton_xent.linear_policy_loss` for the head:
            ``chunk_size``, ``chunk_bytes``, ``accum_dtype`` (``torch.float32`` keeps an fp32
            weight-gradient accumulator for a 16-bit head, as TRL's head does, ``4 V D`` bytes
            more), ``backend``.

    ``triton_xent_policy_steps`` counts the loss computations that ran the fused loss, and
    ``triton_xent_fallback`` says why the others did not (None when they all did).

    Examples::

        >>> from triton_xent.integrations.trl_grpo import GRPOTrainer
        >>> trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
        ...                       train_dataset=ds, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(self, *args, triton_xent_options: dict | None = None, **kwargs):
        options = dict(triton_xent_options or {})
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"triton_xent_options takes {', '.join(_OPTIONS)}; got "
                             f"{', '.join(sorted(unknown))}")
        self.triton_xent_options = options
        _hp.ALLOW_TRL_HEAD[0] += 1  # TRL's head stays: TRL's own log-probs use it
        try:
            super().__init__(*args, **kwargs)
        finally:
            _hp.ALLOW_TRL_HEAD[0] -= 1
        self.triton_xent_policy_steps = 0
        self.triton_xent_fallback = self._static_fallback()
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        wrapped = base.forward  # TRL's fused head, bound to the instance
        if self.triton_xent_fallback is None:
            base.forward = types.MethodType(
                _policy_forward(wrapped, _head_options(base),
                                bool(getattr(self.args, "cast_lm_head_to_fp32", False))), base)

    def _static_fallback(self) -> str | None:
        """Why this configuration runs TRL's own loss, or None."""
        if self.loss_type not in LOSS_TYPES:
            return f"loss_type={self.loss_type!r} (covered: {', '.join(LOSS_TYPES)})"
        if self.importance_sampling_level != "token":
            return f"importance_sampling_level={self.importance_sampling_level!r}"
        if self.top_entropy_quantile < 1.0:
            return "top_entropy_quantile < 1 (its mask is known only after the pass)"
        if self.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold (a sequence-level mask of the current log-probs)"
        if getattr(self, "use_adaptive_entropy", False):
            return "use_adaptive_entropy"
        if self.aux_loss_enabled:
            return "a MoE router's auxiliary loss"
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        head = base.get_output_embeddings()
        if not isinstance(getattr(head, "weight", None), torch.Tensor) or type(
                head.weight) is not torch.nn.Parameter:
            return f"an LM head {type(head).__name__} whose weight is not a plain parameter"
        return None

    def _compute_loss(self, model, inputs):
        why = self.triton_xent_fallback
        if why is None and any(inputs.get(k) is not None for k in _MULTIMODAL):
            why = "multimodal inputs"
        if why is not None:
            if getattr(self, "_triton_xent_told", None) != why:
                _log.info("triton_xent GRPOTrainer: TRL's own loss runs: %s", why)
                self._triton_xent_told = why
            return super()._compute_loss(model, inputs)
        return self._fused_loss(model, inputs)

    def _fused_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kw = dict(completion_ids=completion_ids, mask=mask, advantages=inputs["advantages"],
                  old_logprobs=inputs.get("old_per_token_logps"), loss_type=self.loss_type,
                  epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
                  entropy_coef=self.entropy_coef,
                  use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
                  temperature=self.temperature, **self.triton_xent_options)
        if self.loss_type in ("cispo", "sapo"):  # TRL's delta acts on the clipped surrogate only
            kw.update(sapo_temperature_pos=self.args.sapo_temperature_pos,
                      sapo_temperature_neg=self.args.sapo_temperature_neg)
        else:
            kw["delta"] = self.args.delta
        if self.beta != 0.0:
            kw["ref_logprobs"] = inputs["ref_per_token_logps"]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            kw["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
        if self.loss_type == "dr_grpo":
            kw["max_completion_length"] = self.max_completion_length
        if self.loss_type in ("dapo", "cispo"):
            # TRL's normaliser over one accumulation window; the entropy bonus is divided by the
            # accumulation factor instead: both come out of loss / accum below.
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            kw["num_items_in_batch"] = norm / accum
        with self.accelerator.autocast():
            loss, m = model(input_ids=input_ids, attention_mask=attention_mask,
                            triton_xent_policy=kw)
        loss = loss / accum
        self.triton_xent_policy_steps += 1
        # TRL logs the policy loss after its own normaliser, before the accumulation factor
        # (which dapo's and cispo's normaliser holds).
        policy_loss = m.policy_loss / accum if "num_items_in_batch" in kw else m.policy_loss
        self._log_metrics(mode, m, mask, policy_loss)
        return loss

    def _log_metrics(self, mode, m, mask, policy_loss):
        """TRL's ``_compute_loss`` logging, from the fused pass's metrics."""
        metrics = self._metrics[mode]
        if self._entropy_bonus_enabled:
            metrics["policy_loss"].append(
                self.accelerator.gather(policy_loss.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)

        def masked_seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]),
                                             reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            metrics["kl"].append(global_masked_mean(m.kl))
        if m.entropy is not None:
            metrics["entropy"].append(global_masked_mean(m.entropy))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_masked_mean(m.is_high_clipped.float()))
            return
        if self.loss_type == "sapo":  # TRL logs no clip ratio for it
            return
        low, high = m.is_low_clipped.float(), m.is_high_clipped.float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(
            global_masked_mean((m.is_low_clipped | m.is_high_clipped).float()))
        metrics["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
