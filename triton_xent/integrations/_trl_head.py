"""triton_xent's fused LM head for TRL's trainers (``trl.trainer.utils.add_fused_lm_head``).

TRL's trainers (SFT, DPO, GRPO, RLOO, KTO, ...) call ``add_fused_lm_head(model, temperature,
cast_lm_head_to_fp32, outputs)``, which gives the model an instance ``forward``: with
``fused_lm_head=True`` it runs the backbone and scores the next-token labels with TRL's chunked
kernel, returning a ``FusedCausalLMOutput`` (per-token ``log_probs``, ``entropy``, ``is_top1``,
..., 0 on ignored labels, and the summed NLL ``loss``). :func:`add_fused_lm_head` here installs
the same forward computing those fields with :func:`triton_xent.linear_logprobs` in one fused
pass. TRL's own installer runs first and its reading of the model's config (soft-cap, logit
scale, the backbone's name, the original forward) is reused as is, so the two heads see the same
distribution by construction; only the head computation is replaced.

The head's weight goes to :func:`~triton_xent.linear_cross_entropy` as it is: an FSDP2-sharded
``DTensor`` is gathered there with averaged gradient placements (TRL's ``full_tensor()`` keeps
each rank's own slice of the gradient, unaveraged), a tensor-parallel ``Shard(0)`` head runs the
vocabulary-parallel path. A DeepSpeed ZeRO-3 partitioned head is refused (its backward would
read the released weight). Of TRL's outputs, ``log_probs``, ``entropy`` and ``is_top1`` come from
the fused pass; ``mean_logits`` (a metric, no gradient) is computed exactly from linearity,
``(hidden @ mean_v(W) + mean(b)) * logit_scale / T``, for heads without a soft-cap;
``log_sum_sq_probs`` (DPO's WPO weighting) and a soft-capped head's ``mean_logits`` are refused
when the trainer asks for them, naming them.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext

import torch

from ..logprobs import linear_logprobs
from . import _hf_patching as _hp

OURS = ("log_probs", "entropy", "is_top1")
NOT_OURS = ("log_sum_sq_probs",)
# What TRL's installer's closure holds that the forward needs (trl 1.x names).
_CLOSURE = ("original_forward", "text_config", "final_logit_softcapping", "logit_scale",
            "backbone_attr")


def _closure(forward) -> dict:
    fn = getattr(forward, "__func__", forward)
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    missing = [n for n in _CLOSURE if n not in cells]
    if missing:
        import trl

        raise RuntimeError(
            f"triton_xent's TRL head reads {missing} from trl.trainer.utils.add_fused_lm_head, "
            f"which trl {trl.__version__} does not define: this TRL version is not supported. "
            "Call triton_xent.integrations.trl.uninstall() to train with TRL's own head.")
    return {n: cells[n].cell_contents for n in _CLOSURE}


def _refuse(outputs, softcap):
    bad = [o for o in outputs if o in NOT_OURS]
    if softcap is not None and "mean_logits" in outputs:
        bad.append("mean_logits (of a soft-capped head)")
    if bad:
        raise ValueError(
            f"This TRL trainer asks its fused LM head for {bad}, which triton_xent's head does not "
            f"compute (it gives {list(OURS)}, and mean_logits without a soft-cap). Call "
            "triton_xent.integrations.trl.uninstall() before building this trainer to use TRL's "
            "own head (for DPO's WPO weighting: use_weighting=False keeps triton_xent's).")


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, _trl_installer=None) -> None:
    """TRL's ``add_fused_lm_head`` with triton_xent's head (same signature and outputs)."""
    from . import trl as front

    unknown = [o for o in outputs if o not in OURS + NOT_OURS + ("mean_logits",)]
    if unknown:
        raise ValueError(f"unknown fused-head outputs {unknown}")
    _check_patched(model)
    _hp.ALLOW_TRL_HEAD[0] += 1  # TRL's head is replaced by triton_xent's just below
    try:
        (_trl_installer or front.trl_add_fused_lm_head())(
            model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
            outputs=outputs)
    finally:
        _hp.ALLOW_TRL_HEAD[0] -= 1
    c = _closure(model.forward)
    softcap, scale, text_config = c["final_logit_softcapping"], c["logit_scale"], c["text_config"]
    _refuse(outputs, softcap)
    original_forward, backbone_attr = c["original_forward"], c["backbone_attr"]

    @functools.wraps(type(model).forward)
    def _triton_xent_fused_forward(self, *args, fused_lm_head=False, labels=None,
                                   shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels),
                         ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone_outputs.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden, labels = backbone_outputs.last_hidden_state, shift_labels
        lm_head = self.get_output_embeddings()
        fields = _head(lm_head, hidden, labels, temperature, softcap, scale, outputs,
                       cast_lm_head_to_fp32)
        mask = fields["label_mask"]
        loss = -fields["log_probs"].sum() / (
            mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_outputs, kwargs)
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        from trl.trainer.utils import FusedCausalLMOutput

        return FusedCausalLMOutput(loss=loss, aux_loss=aux_loss, **fields)

    model.forward = types.MethodType(_triton_xent_fused_forward, model)


def _check_patched(model) -> None:
    """A model patched with loss options: TRL's trainers compute their losses from the head's
    log-probs, so those options would be dropped: refuse, naming them."""
    options = getattr(model, _hp.OPTIONS, None)
    if options is None or _hp.ALLOW_TRL_HEAD[0]:  # triton_xent's SFTTrainer removes the head
        return
    changed = {k: getattr(options, k) for k in ("z_loss", "label_smoothing", "reduction")
               if getattr(options, k) != getattr(_hp.DEFAULT_OPTIONS, k)}
    if changed:
        raise ValueError(
            f"This {type(model).__name__} is patched with {changed}, but TRL's trainers compute "
            "their losses from the fused head's log-probabilities (triton_xent's, installed), "
            "so these options would be dropped. For supervised fine-tuning with them use "
            "triton_xent.integrations.trl.SFTTrainer; otherwise unpatch(model) or patch it "
            "without them.")


def is_head(forward) -> bool:
    """Whether ``forward`` is the one :func:`add_fused_lm_head` installs."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_triton_xent_fused_forward"


def _head(lm_head, hidden, labels, temperature, softcap, scale, outputs, fp32):
    """The per-token fields of ``FusedCausalLMOutput`` (0 / False on ignored labels)."""
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "ds_id"):
        raise ValueError(
            "triton_xent's TRL head does not run on a DeepSpeed ZeRO-3 partitioned lm_head (its "
            "backward would read the released weight): call "
            "triton_xent.integrations.trl.uninstall() for TRL's own head under ZeRO-3.")
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    ctx = nullcontext()
    if fp32:  # TRL's cast_lm_head_to_fp32: the head's GEMM in fp32, outside autocast
        hidden = hidden.float()
        ctx = torch.autocast(hidden.device.type, enabled=False)
        if weight.dtype != torch.float32:
            if hasattr(weight, "to_local"):
                raise ValueError("cast_lm_head_to_fp32 with a sharded (DTensor) 16-bit lm_head: "
                                 "not supported by triton_xent's TRL head; keep the head in fp32 "
                                 "or set cast_lm_head_to_fp32=False.")
            weight = weight.float()
            bias = None if bias is None else bias.float()
    # Only the scored positions, as TRL's head does on Triton devices (boolean indexing: a host
    # sync on an accelerator, which saves the prompt rows' GEMMs).
    h, t = hidden[mask], labels[mask]
    with ctx:
        out = linear_logprobs(
            h, weight, t, linear_bias=bias, temperature=temperature, softcap=softcap,
            logit_scale=None if scale == 1.0 else scale,
            return_entropy="entropy" in outputs, return_argmax="is_top1" in outputs)

    def full(x, fill=0):
        if x is None:
            return None
        if hasattr(x, "to_local"):  # tensor parallelism: the same values on every rank
            x = x.to_local()
        return torch.full(mask.shape, fill, dtype=x.dtype, device=x.device).masked_scatter(mask, x)

    fields = dict(log_probs=full(out.logprobs), entropy=full(out.entropy), label_mask=mask)
    if out.argmax is not None:
        fields["is_top1"] = full(out.argmax, -1) == labels  # -1 on ignored labels: False
    if "mean_logits" in outputs:
        fields["mean_logits"] = _mean_logits(hidden, weight, bias, scale, temperature, mask)
    return fields


@torch.no_grad()
def _mean_logits(hidden, weight, bias, scale, temperature, mask):
    """``mean_v(logit_v)`` without the logits: ``(h . mean_v W_v + mean(b)) * scale / T``."""
    def total(t, dim):  # a sum: exact over shards of any sizes (a mean of means is not)
        s = t.detach().float().sum(dim)
        return s.full_tensor() if hasattr(s, "full_tensor") else s

    m = hidden.detach().float() @ total(weight, 0)
    if bias is not None:
        m = m + total(bias, 0)
    return (m * (scale / (temperature * weight.shape[0]))).masked_fill(~mask, 0)


def _router_aux_loss(model, text_config, backbone_outputs, kwargs):
    """The MoE load-balancing loss, as TRL's head adds it (Mixtral's function)."""
    import transformers
    from packaging.version import Version
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    v = Version(transformers.__version__)
    if v < Version("5.0.0"):
        num_experts, k = model.num_experts, model.num_experts_per_tok
    elif text_config.model_type == "gpt_oss" and v < Version("5.6.0"):
        num_experts, k = model.num_experts, text_config.num_experts_per_tok
    else:
        num_experts, k = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, k,
                                    kwargs.get("attention_mask"))
