"""``linear_policy_loss``: TRL's token-level GRPO-family losses over the LM head, with the
gradient written in the forward and no ``(N, V)`` logits.

The functional API (TRL's ``GRPOConfig`` names, each check once); the op layer is
:mod:`triton_xent.ops.policy_loss`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _validation as V
from .backends.protocol import Options, compute_dtype
from .dispatch import choose_backend, dtensor_given, serialised
from .linear import _autocast, _prepare, _resolve_chunk_rows, _resolve_fp32_accum
from .ops import cross_entropy as ce
from .ops.policy_loss import PolicyCall, PolicySpec, Tokens, run

#: The loss types computed here: token-level importance sampling, a per-token loss that is a
#: closed form of the token's log-prob, and a normaliser known before the pass.
LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo")
_OTHER_TRL_TYPES = ("vespo",)  # a weight per sequence, from its whole log-ratio


class PolicyLossMetrics(NamedTuple):
    """What TRL's ``GRPOTrainer`` logs, detached, from the same pass.

    ``logprobs``: each token's log-prob under the policy at the temperature (fp32; fp64 for
    fp64 input), shaped like ``target``; ``entropy``: each token's entropy at the temperature
    (None with ``return_entropy=False`` and no ``entropy_coef``); ``kl``: the per-token KL to
    the reference (None when ``beta == 0``; TRL's ``k3`` estimator, times the ratio with
    ``use_bias_correction_kl``);
    ``is_low_clipped`` / ``is_high_clipped``: TRL's per-token flags; ``clip_ratio_low``,
    ``clip_ratio_high``, ``clip_ratio_region``: their masked means over the batch (TRL's
    ``clip_ratio/low_mean``, ``high_mean``, ``region_mean`` on one process);
    ``clip_ratio_low_min`` / ``clip_ratio_high_max``: the min / max over sequences of the
    per-sequence means (``(B, T, D)`` input only, else None); for ``cispo`` ``is_high_clipped``
    is TRL's ``(coef_1 > epsilon_high) & (A > 0)`` and ``clip_ratio_high`` its
    ``cispo_clip_ratio`` (nothing is clipped low); ``sapo`` clips nothing. ``policy_loss``: the
    loss without the entropy bonus."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    kl: torch.Tensor | None
    is_low_clipped: torch.Tensor
    is_high_clipped: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    clip_ratio_low_min: torch.Tensor | None
    clip_ratio_high_max: torch.Tensor | None
    policy_loss: torch.Tensor


def _err(msg: str):
    return V.CrossEntropyInputError(msg)


def _number(name: str, value, *, low=-math.inf, high=math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            low <= float(value) <= high):
        raise _err(f"{name}={value!r} must be a real number in [{low}, {high}].")
    return float(value)


def _spec(loss_type, epsilon_low, epsilon_high, beta, delta, use_bias_correction_kl,
          entropy_coef, top_entropy_quantile, importance_sampling_level, sapo_pos,
          sapo_neg) -> PolicySpec:
    if loss_type not in LOSS_TYPES:
        why = ("its weight is one per sequence, from the sequence's whole log-ratio: a token's "
               "gradient is known only after the pass" if loss_type in _OTHER_TRL_TYPES
               else "it is not a loss type of TRL's GRPOTrainer")
        raise _err(f"loss_type={loss_type!r} is not supported by linear_policy_loss ({why}). "
                   f"Supported: {', '.join(LOSS_TYPES)}; for others compute the log-probs "
                   "(triton_xent.linear_cross_entropy with reduction='none') and the loss in torch.")
    if importance_sampling_level != "token":
        raise _err(f"importance_sampling_level={importance_sampling_level!r} (GSPO's sequence-"
                   "level ratio) is not supported: a token's gradient depends on its whole "
                   "sequence's log-probs, which takes two passes. Use 'token'.")
    if top_entropy_quantile != 1.0:
        raise _err(f"top_entropy_quantile={top_entropy_quantile!r} is not supported: TRL's "
                   "entropy mask is a quantile of the batch's entropies, known only after the "
                   "whole pass, while the gradient is written during it. Use 1.0.")
    eps_lo = _number("epsilon_low", epsilon_low, low=0.0)
    eps_hi = eps_lo if epsilon_high is None else _number("epsilon_high", epsilon_high, low=0.0)
    beta = _number("beta", beta, low=0.0)
    if delta is not None:
        delta = _number("delta", delta, low=0.0)
    coef = _number("entropy_coef", entropy_coef)
    if delta is not None and loss_type in ("cispo", "sapo"):
        raise _err(f"delta (two-sided clipping) is not part of loss_type={loss_type!r} in TRL: "
                   "drop it.")
    pos = _number("sapo_temperature_pos", sapo_pos, low=1e-12)
    neg = _number("sapo_temperature_neg", sapo_neg, low=1e-12)
    return PolicySpec(loss_type, eps_lo, eps_hi, beta, delta, bool(use_bias_correction_kl), coef,
                      pos, neg)


def _per_token(name, t, batch_shape, cdt, dev, *, per_sequence: bool):
    """``t`` as ``(N,)`` in ``cdt``: shaped like ``target``, or one value per sequence
    (``(B,)`` or ``(B, 1)``) where ``per_sequence``."""
    if not isinstance(t, torch.Tensor):
        raise _err(f"{name} must be a tensor, got {type(t).__name__}.")
    if t.requires_grad:
        raise _err(f"{name} requires grad, but the loss is not differentiated with respect to "
                   f"it (TRL's are computed without gradient): pass {name}.detach().")
    if t.device != dev:
        raise _err(f"{name} is on {t.device} but input is on {dev}: move it.")
    shape = tuple(t.shape)
    if per_sequence and len(batch_shape) == 2 and shape in ((batch_shape[0],),
                                                              (batch_shape[0], 1)):
        t = t.reshape(batch_shape[0], 1).expand(batch_shape)
    elif shape != tuple(batch_shape):
        seq = (f", or one per sequence ({batch_shape[0]},)" if per_sequence
               and len(batch_shape) == 2 else "")
        raise _err(f"{name} has shape {V.shape_str(shape)}; expected the target's "
                   f"{V.shape_str(batch_shape)}{seq}.")
    if t.dtype == torch.bool:
        t = t.to(cdt)
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16,
                                                 torch.int8, torch.uint8)):
        raise _err(f"{name} must be real, got {t.dtype}.")
    return t.reshape(-1).to(cdt)


def _weights(spec: PolicySpec, mask, batch_shape, num_items_in_batch, max_completion_length,
             cdt):
    """The loss weight of each token: the mask over the loss type's normaliser (TRL's)."""
    lt = spec.loss_type
    if lt in ("grpo", "sapo", "dr_grpo", "luspo") and len(batch_shape) != 2:
        raise _err(f"loss_type={lt!r} normalises per sequence: pass input (B, T, D) with target, "
                   f"mask (B, T); got target {V.shape_str(batch_shape)}.")
    if num_items_in_batch is not None and lt not in ("dapo", "cispo"):
        raise _err(f"num_items_in_batch is the normaliser of loss_type 'dapo' and 'cispo'; "
                   f"{lt!r} normalises by the mask (TRL ignores it there): drop it.")
    if max_completion_length is not None and lt != "dr_grpo":
        raise _err(f"max_completion_length is the normaliser of loss_type='dr_grpo' only; drop "
                   f"it for {lt!r}.")
    if lt in ("grpo", "sapo"):
        B, T = batch_shape
        m = mask.view(B, T)
        return (m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)).reshape(-1)
    if lt == "luspo":  # each sequence's sum, then the mean over sequences
        return mask / float(batch_shape[0])
    if lt == "dr_grpo":
        if max_completion_length is None:
            raise _err("loss_type='dr_grpo' divides by batch_size * max_completion_length: pass "
                       "max_completion_length (GRPOConfig.max_completion_length).")
        if isinstance(max_completion_length, bool) or not isinstance(
                max_completion_length, int) or max_completion_length < 1:
            raise _err(f"max_completion_length={max_completion_length!r} must be a positive int.")
        return mask / float(batch_shape[0] * max_completion_length)
    if lt in ("dapo", "cispo") and num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise _err("num_items_in_batch must be a number or a one-element tensor, got "
                           f"shape {V.shape_str(num_items_in_batch.shape)}.")
            return mask / num_items_in_batch.detach().reshape(()).to(device=mask.device,
                                                                     dtype=cdt)
        n = _number("num_items_in_batch", num_items_in_batch, low=0.0)
        if n == 0.0:
            raise _err("num_items_in_batch=0 would divide the loss by 0 (TRL clamps it to at "
                       "least 1): pass a positive count.")
        return mask / n
    return mask / mask.sum().clamp(min=1.0)  # bnpo, and dapo / cispo on this batch's tokens


@serialised
@torch.compiler.disable
def linear_policy_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    importance_sampling_level: str = "token",
    importance_sampling_ratio: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    temperature: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    linear_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    accum_dtype: torch.dtype | None = None,
    return_entropy: bool = True,
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, PolicyLossMetrics]:
    """TRL ``GRPOTrainer``'s policy loss of ``softmax(softcap(logit_scale * (input @
    linear_weight.T + linear_bias)) / temperature)``, without the logits, its gradient made in
    the same pass: per chunk of rows 3 GEMMs (logits, ``dX``, ``dW``) and nothing kept per
    token; the backward only scales the gradients by the upstream scalar.

    It is TRL 1.16's ``_compute_loss`` with token-level importance sampling, ``coef_1 =
    exp(logp - old)``, for the loss types whose per-token term is a closed form of ``logp``:

    * ``grpo``, ``dapo``, ``bnpo``, ``dr_grpo``, ``luspo``: ``l_t = -min(coef_1 A, coef_2 A)``,
      ``coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)`` (``coef_1`` capped at
      ``delta`` when given);
    * ``cispo``: ``l_t = -clamp(coef_1, max=epsilon_high).detach() A logp``;
    * ``sapo``: ``l_t = -sigmoid(tau (coef_1 - 1)) 4 / tau A`` (``tau``: ``sapo_temperature_pos``
      where ``A > 0``, else ``sapo_temperature_neg``);

    times ``importance_sampling_ratio`` when given, ``+ beta kl_t`` with ``kl_t = exp(ref - logp)
    - (ref - logp) - 1`` (times ``coef_1`` with ``use_bias_correction_kl``), masked and
    normalised as TRL does:

    * ``grpo``, ``sapo``: per sequence by its token count (at least 1), then the mean over
      sequences;
    * ``bnpo``: by the batch's token count (at least 1);
    * ``dr_grpo``: by ``B * max_completion_length``;
    * ``luspo``: each sequence's sum, then the mean over sequences;
    * ``dapo``, ``cispo``: by ``num_items_in_batch`` as given (TRL's normaliser for this
      micro-batch), or the batch's token count (at least 1) when None;

    then ``- entropy_coef * sum(H * mask) / max(1, sum(mask))`` (TRL's entropy bonus). TRL's
    gradient-accumulation factor is the caller's (divide the loss: the backward scales).

    Args:
        input: ``(B, T, D)`` (or ``(N, D)`` for ``dapo``, ``bnpo``, ``cispo``: the others
            normalise per sequence) hidden states of the completion tokens (those predicting ``target``).
        linear_weight: ``(V, D)``, the input's dtype. ``linear_bias``: ``(V,)`` or None.
        target: ``(B, T)`` / ``(N,)`` the sampled token ids (TRL's ``completion_ids``); a
            target of -100 counts as masked.
        advantages: ``(B,)`` (one per sequence) or like ``target``.
        mask: TRL's completion mask (bool, int or float), like ``target``; None: all ones.
        old_logprobs: the sampling policy's log-probs (TRL's ``old_per_token_logps``); None:
            the current ones, detached (ratio 1, as TRL does with one iteration).
        ref_logprobs: the reference model's log-probs; needed when ``beta > 0``.
        loss_type, epsilon_low (TRL's ``epsilon``), epsilon_high (None: ``epsilon_low``),
            beta, delta, use_bias_correction_kl, entropy_coef, top_entropy_quantile (1.0 only),
            importance_sampling_level (``"token"`` only), max_completion_length,
            sapo_temperature_pos, sapo_temperature_neg: as in TRL's
            ``GRPOConfig``; other loss types and levels raise, naming why.
        importance_sampling_ratio: TRL's vLLM correction factor per token (or per sequence),
            or None.
        num_items_in_batch: the normaliser of ``dapo`` and ``cispo`` (a number or one-element
            tensor).
        temperature, logit_scale, softcap: as in :func:`triton_xent.linear_cross_entropy`
            (TRL divides the logits by its sampling temperature: pass it here).
        return_entropy: also compute each token's entropy (a metric; one more statistic in the
            same pass); ``entropy_coef != 0`` computes it anyway (its gradient is in the pass).
        chunk_size, chunk_bytes, accum_dtype, backend, validate: as in
            :func:`triton_xent.linear_cross_entropy`.

    Returns:
        ``(loss, PolicyLossMetrics)``: the loss (0-d, fp32; fp64 for fp64 input) and the
        detached metrics.
    """
    if dtensor_given(input, linear_weight, linear_bias, target):
        raise _err("linear_policy_loss does not take DTensors (a vocabulary-sharded head): "
                   "gather the head, or use linear_cross_entropy's process_group.")
    spec = _spec(loss_type, epsilon_low, epsilon_high, beta, delta, use_bias_correction_kl,
                 entropy_coef, top_entropy_quantile, importance_sampling_level,
                 sapo_temperature_pos, sapo_temperature_neg)
    if spec.beta != 0.0 and ref_logprobs is None:
        raise _err("beta > 0 adds the KL to the reference model: pass ref_logprobs.")
    _, _, softcap = V.check_options("none", 0.0, 0.0, softcap, -100)
    logit_scale = V.check_positive("logit_scale", logit_scale)
    temperature = V.check_positive("temperature", temperature)
    x, W, b = _autocast(input, linear_weight, linear_bias)
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    p = _prepare(x, W, b, target, None, -100, V.validation_requested(validate) or on_cpu)
    if ce.in_transform(p.x, W, target, advantages):
        raise _err("linear_policy_loss does not run under functorch transforms (vmap, grad): "
                   "its gradient is made in the forward.")
    batch_shape, dev = p.batch_shape, p.x.device
    cdt = compute_dtype(p.x.dtype)

    def tok(name, t, per_sequence=False):
        return None if t is None else _per_token(name, t, batch_shape, cdt, dev,
                                                 per_sequence=per_sequence)

    m = (torch.ones(p.target.shape, dtype=cdt, device=dev) if mask is None
         else tok("mask", mask))
    m = m * (p.target != -100).to(cdt)
    w = _weights(spec, m, batch_shape, num_items_in_batch, max_completion_length, cdt)
    e = m / m.sum().clamp(min=1.0) if spec.entropy_coef != 0.0 else None
    tokens = Tokens(tok("advantages", advantages, True), tok("old_logprobs", old_logprobs),
                    tok("ref_logprobs", ref_logprobs) if spec.beta != 0.0 else None, w,
                    tok("importance_sampling_ratio", importance_sampling_ratio, True), e, m)
    choice = choose_backend(p.x, probs=False, backend=backend)
    on = torch.is_grad_enabled()
    need = (on and p.x.requires_grad, on and W.requires_grad,
            on and b is not None and b.requires_grad)
    fp32_accum = _resolve_fp32_accum(accum_dtype, W.dtype)
    N, D = p.x.shape
    chunk_rows = _resolve_chunk_rows(chunk_size, chunk_bytes, N, D, W.shape[0], p.x.dtype,
                                     W.dtype, fp32_accum)
    opts = Options(reduction="none", softcap=softcap, logit_scale=logit_scale, all_rows=True,
                   backend=choice.backend, out_dtype=cdt, chunk_rows=chunk_rows,
                   fp32_accum=fp32_accum, need=need, temperature=temperature,
                   entropy=bool(return_entropy) or spec.entropy_coef != 0.0)
    loss, policy_loss, logp, ent, kl, low, high = run(
        PolicyCall(p.x, W, b, p.target, tokens, spec, opts))
    return loss, _metrics(logp, ent if opts.entropy else None, kl if spec.beta != 0.0 else None,
                          low, high, m, batch_shape, policy_loss)


def _nan_if(x, bad: float):
    return torch.where(x == bad, math.nan, x)


def _metrics(logp, ent, kl, low, high, m, batch_shape, policy_loss) -> PolicyLossMetrics:
    """TRL's logged values (``global_masked_mean`` and ``masked_seq_mean``, one process)."""
    den = m.sum().clamp(min=1.0)
    lowf, highf = low.to(m.dtype), high.to(m.dtype)

    def mean(x):
        return (x * m).sum() / den

    low_min = high_max = None
    if len(batch_shape) == 2:
        mb = m.view(batch_shape)
        n_seq = mb.sum(-1)
        # TRL's nanmin / nanmax of the per-sequence means (NaN for a sequence without tokens;
        # NaN when none has any): the NaNs and a sentinel read as +-inf, which then reads NaN.
        def seq_ext(flags, fill, ext):
            v = torch.nan_to_num((flags.view(batch_shape) * mb).sum(-1) / n_seq, nan=fill)
            return _nan_if(ext(torch.cat([v, v.new_full((1,), fill)])), fill)

        low_min = seq_ext(lowf, math.inf, torch.min)
        high_max = seq_ext(highf, -math.inf, torch.max)
    shape = batch_shape
    return PolicyLossMetrics(
        logp.view(shape), None if ent is None else ent.view(shape),
        None if kl is None else kl.view(shape),
        low.view(shape), high.view(shape), mean(lowf), mean(highf),
        mean((low | high).to(m.dtype)), low_min, high_max, policy_loss)
