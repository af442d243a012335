"""Hugging Face ``transformers``: compute a ``*ForCausalLM``'s training loss with triton_xent.

``patch(model)`` changes one model instance (not its class) and returns it:

* ``fused=True`` (default) replaces the instance's ``forward``. With ``labels`` it runs the base
  model (``model.model``) for the last hidden states and hands them with ``lm_head.weight`` (and
  bias) to :func:`triton_xent.linear_cross_entropy`, so the ``(tokens, vocab)`` logits are never
  built; the output's ``logits`` is then ``None``. Without ``labels`` it calls the model's own
  forward (generation, evaluation without labels). Only models whose forward is exactly "base
  model, slice by ``logits_to_keep``, ``lm_head``, [Gemma 2's final logit soft-capping],
  ``ForCausalLMLoss``" are accepted (the Llama layout: Llama, Mistral, Qwen2/3, Gemma, Phi,
  OLMo, ... and Gemma 2/3 with ``config.final_logit_softcapping`` passed as ``softcap``).
* ``fused=False`` keeps the logits and only replaces the model's ``loss_function`` (the hook
  transformers itself offers) by one that calls :func:`triton_xent.cross_entropy` on them. It
  works for any model whose loss is ``ForCausalLMLoss``, MoE models with an auxiliary loss
  included; the logits are not upcast to fp32 first (triton_xent computes in fp32 anyway).

Both follow ``ForCausalLMLoss``: labels shifted left by one with ``ignore_index`` (-100, or the
``ignore_index`` keyword) padding the end, or ``shift_labels`` used as given; a mean over the
kept tokens, or with ``num_items_in_batch`` the sum divided by it (correct gradient
accumulation, as the ``Trainer`` passes it). The loss is returned as fp32, as transformers does;
for a bf16/fp16 model its value is rounded to that dtype first (triton_xent returns losses in
the input's dtype), while the gradients are those of the fp32 loss.

transformers is imported only by these functions. Tested with transformers 5.24.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import cross_entropy

_STATE = "_triton_xent_patch"

# *ForCausalLM classes whose forward body is, token for token, LlamaForCausalLM's (first set)
# or Gemma2ForCausalLM's (second set: the same plus final logit soft-capping), checked in
# transformers 5.24 by comparing syntax trees. Other classes (MoE models adding a router loss,
# Cohere/Granite logit scaling, encoder-decoders, ...) are refused by the fused path.
_LLAMA_LAYOUT = frozenset({
    "ApertusForCausalLM", "ArceeForCausalLM", "BitNetForCausalLM", "CwmForCausalLM",
    "DiffLlamaForCausalLM", "DoryForCausalLM", "Emu3ForCausalLM", "Ernie4_5ForCausalLM",
    "Exaone4ForCausalLM", "GemmaForCausalLM", "Glm4ForCausalLM", "GlmForCausalLM",
    "HeliumForCausalLM", "HunYuanDenseV1ForCausalLM", "Jais2ForCausalLM", "Lfm2ForCausalLM",
    "Lfm3ForCausalLM", "LlamaForCausalLM", "Ministral3ForCausalLM", "MinistralForCausalLM",
    "MistralForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoForCausalLM",
    "OlmoHybridForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Qwen3_5ForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM",
    "Starcoder2ForCausalLM", "YoutuForCausalLM",
})
_SOFTCAP_LAYOUT = frozenset({
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "NanoChatForCausalLM",
    "VaultGemmaForCausalLM",
})


def patch(model: nn.Module, fused: bool = True) -> nn.Module:
    """Make a transformers ``*ForCausalLM`` compute its training loss with triton_xent.

    Losses and gradients equal the model's own (within fp32 rounding). Patching a patched model
    replaces the earlier patch; :func:`unpatch` undoes it.

    Args:
        model: a transformers causal LM, e.g. ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
            ``Gemma2ForCausalLM``.
        fused: ``True``: with labels, never build the logits (``output.logits`` is ``None``;
            use ``fused=False`` where evaluation needs them). ``False``: keep the logits and
            replace only the loss.

    Returns:
        ``model`` itself, patched.

    Raises:
        ValueError: the model is not a supported causal LM (see the module docstring).
        RuntimeError: ``fused=True`` but ``triton_xent.linear_cross_entropy`` is missing.

    Examples::

        >>> from triton_xent.integrations.transformers import patch
        >>> model = patch(AutoModelForCausalLM.from_pretrained(name))
        >>> model(input_ids=ids, labels=ids).loss.backward()
    """
    if getattr(model, _STATE, None) is not None:
        unpatch(model)
    causal_lm_loss_fn = _transformers_causal_lm_loss()
    name = type(model).__name__
    if getattr(model, "loss_function", None) is not causal_lm_loss_fn:
        raise ValueError(
            f"{name}'s loss_function is not transformers' ForCausalLMLoss: triton_xent patches "
            "causal LMs with the standard loss only."
        )
    if not fused:
        had_own = "_loss_function" in vars(model)
        previous = vars(model).get("_loss_function")
        model.loss_function = causal_lm_loss
        setattr(model, _STATE, ("loss_function", had_own, previous))
        return model

    # The class that defines the forward decides (a subclass that keeps it is fine).
    owner = next(c for c in type(model).__mro__ if "forward" in vars(c)).__name__
    if owner not in _LLAMA_LAYOUT | _SOFTCAP_LAYOUT:
        raise ValueError(
            f"patch(fused=True) supports causal LMs with the Llama layout (Llama, Mistral, "
            f"Qwen2/3, Gemma 1/2/3, Phi, OLMo, ...), not {name} (forward of {owner}). Use "
            "fused=False to keep the model's forward and replace only its loss."
        )
    head = getattr(model, "lm_head", None)
    if not isinstance(getattr(model, "model", None), nn.Module) or head is None or (
        type(head).forward is not nn.Linear.forward or not head.weight.is_floating_point()
    ):
        raise ValueError(
            f"{name} has no plain floating-point nn.Linear lm_head next to its base model "
            "(quantized or adapter-wrapped heads are not supported by the fused path); use "
            "fused=False."
        )
    linear_ce = _linear_cross_entropy()
    forward = _fused_forward(type(model).forward, linear_ce, softcap=owner in _SOFTCAP_LAYOUT)
    model.forward = types.MethodType(forward, model)
    setattr(model, _STATE, ("forward",))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` (a no-op on an unpatched model); returns ``model``."""
    state = vars(model).pop(_STATE, None)
    if state is None:
        return model
    if state[0] == "forward":
        del model.forward  # the instance attribute; the class's forward shows again
    else:
        _, had_own, previous = state
        if had_own:
            model.loss_function = previous
        else:
            del model._loss_function
    return model


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss`` computed by :func:`triton_xent.cross_entropy`.

    Same signature and result; the other keyword arguments a model forwards are ignored, as
    transformers does. Usable directly as ``model.loss_function``.
    """
    target = _shift(labels, shift_labels, ignore_index).to(logits.device)
    loss = cross_entropy(
        logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum", loss_dtype=torch.float32,
    )
    return _normalize(loss, num_items_in_batch)


def _shift(labels, shift_labels, ignore_index):
    """The targets of ``ForCausalLMLoss``, flat: position t predicts label t + 1."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalize(loss, num_items_in_batch):
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_forward(class_forward, linear_ce, *, softcap: bool):
    """A forward for one model instance: the class's own without labels, fused loss with them."""
    sig = inspect.signature(class_forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    keep_name = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in sig.parameters),
                     None)
    output_cls, slice_hidden = _transformers_helpers()
    passthrough = [f.name for f in dataclasses.fields(output_cls) if f.name not in ("loss", "logits")]

    # wraps() keeps the class forward's signature visible (inspect follows __wrapped__): the
    # Trainer looks there for **kwargs to pass num_items_in_batch, generate() for logits_to_keep.
    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        arguments = dict(sig.bind(self, *args, **kwargs).arguments)
        labels = arguments.get("labels")
        if labels is None:
            return class_forward(self, *args, **kwargs)
        del arguments["self"], arguments["labels"]
        extra = arguments.pop(var_kw, {}) if var_kw else {}
        keep = arguments.pop(keep_name, 0) if keep_name else 0
        return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        # ForCausalLMLoss's keywords: the model forwards them to the loss, the base model has no
        # use for them.
        num_items_in_batch = extra.pop("num_items_in_batch", None)
        shift_labels = extra.pop("shift_labels", None)
        ignore_index = extra.pop("ignore_index", -100)

        outputs = self.model(**arguments, **extra, return_dict=True)
        hidden = slice_hidden(outputs.last_hidden_state, keep)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise RuntimeError(
                f"lm_head.weight has shape {tuple(weight.shape)} outside lm_head's forward, not "
                f"(vocab, {hidden.shape[-1]}): it looks partitioned (DeepSpeed ZeRO-3?). The fused "
                "path reads the whole weight; use patch(model, fused=False)."
            )
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
        target = _shift(labels, shift_labels, ignore_index).to(weight.device)
        if hidden.shape[0] != target.numel():
            raise ValueError(
                f"{hidden.shape[0]} positions of hidden states (after logits_to_keep={keep!r}) "
                f"but {target.numel()} labels: they must match, as for the logits."
            )
        cap = getattr(self.config, "final_logit_softcapping", None) if softcap else None
        loss = linear_ce(
            hidden, weight, target, linear_bias=bias, ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum", softcap=cap,
            loss_dtype=torch.float32,  # as transformers: an fp32 loss, not a bf16-rounded sum
        )
        loss = _normalize(loss, num_items_in_batch)
        out = output_cls(loss=loss, logits=None, **{k: getattr(outputs, k, None) for k in passthrough})
        return out if return_dict else out.to_tuple()

    return forward


def _transformers_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError as exc:
        raise ImportError(
            "triton_xent.integrations.transformers needs a transformers with "
            "transformers.loss.loss_utils (4.46 or later; tested with 5.24): "
            "pip install -U transformers"
        ) from exc
    return LOSS_MAPPING["ForCausalLM"]


def _transformers_helpers():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers 4.x inlines it in each forward

        def slice_logits_to_keep(hidden, keep):
            return hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]

    return CausalLMOutputWithPast, slice_logits_to_keep


def _linear_cross_entropy():
    try:
        from ..linear import linear_cross_entropy
    except ImportError as exc:
        raise RuntimeError(
            "patch(model, fused=True) needs triton_xent.linear_cross_entropy, which this "
            f"installation of triton_xent lacks ({exc}); use patch(model, fused=False)."
        ) from exc
    return linear_cross_entropy
