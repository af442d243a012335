"""The op layer of ``linear_policy_loss``: a token-level policy-gradient loss over the LM head
with its gradient written in the forward.

For the token-level losses of TRL's ``GRPOTrainer`` (``grpo``, ``dapo``, ``bnpo``, ``dr_grpo``,
``cispo``, ``sapo``, ``luspo``)
the loss is ``L = sum_t w_t * l_t(logp_t) - entropy_coef * sum_t e_t * H_t``: the per-token term
``l_t`` is a closed form of the token's log-prob ``logp_t`` and of values known before the pass
(advantage, old and reference log-probs), and the weights ``w_t`` (mask and normaliser) and
``e_t`` are known before it too. So each chunk of rows gets its whole gradient once its rows'
statistics are merged (:func:`token_terms`): per chunk one GEMM makes the logits, the
cross-entropy pipeline gives ``logp_t = -ce_t`` (reduction ``"none"``, no smoothing), its
backward entry point writes ``d L / d logits`` over the logits for the per-row upstream
``-dL/dlogp_t``, and two GEMMs give ``dX`` and ``dW``: 3 GEMMs in all, no per-token state saved,
no recompute in the backward, which only scales the gradients by the upstream scalar.

The chunk loop is :func:`triton_xent.ops.linear_chunks.linear_ce_chunks` with the step below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..backends.protocol import Options, compute_dtype, entropy_of
from . import cross_entropy as ce
from .linear_chunks import linear_ce_chunks


class PolicySpec(NamedTuple):
    """The loss's scalars, validated: TRL's ``GRPOConfig`` names."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    beta: float
    delta: float | None
    use_bias_correction_kl: bool
    entropy_coef: float
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


class Tokens(NamedTuple):
    """Per-token values ``(N,)`` in the compute dtype, known before the pass: the advantage,
    the old and reference log-probs (None: absent), the loss weight ``w`` (mask over the loss
    type's normaliser), the importance-sampling correction (or None), the entropy bonus's
    weight ``e`` (or None) and the mask (for the metrics)."""

    adv: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    w: torch.Tensor
    isr: torch.Tensor | None
    e: torch.Tensor | None
    mask: torch.Tensor


class PolicyCall(NamedTuple):
    x: torch.Tensor  # (N, D)
    W: torch.Tensor  # (V, D)
    b: torch.Tensor | None
    target: torch.Tensor  # (N,) int64
    tok: Tokens
    spec: PolicySpec
    opts: Options  # reduction "none"; chunking and the gradients to compute


def _min_grads(a: torch.Tensor, b: torch.Tensor):
    """The share of ``torch.minimum(a, b)``'s gradient going to ``a`` and to ``b``: torch's own
    rule (half each on a tie)."""
    tie = torch.where(a == b, 0.5, 1.0).to(a.dtype)
    return tie.masked_fill(a > b, 0.0), tie.masked_fill(a < b, 0.0)


def token_terms(logp: torch.Tensor, tok: Tokens, spec: PolicySpec):
    """``(l, dl, kl, low, high)`` per token: TRL's per-token loss (before the mask and the
    normaliser, KL term included), its derivative with respect to ``logp`` (torch's own rules
    at the kinks: half to each side of a ``minimum`` tie, a clamp passing its bounds), the KL
    (or None), and the clipped flags TRL logs (``cispo``: ``high`` is TRL's
    ``cispo_clip_ratio`` flag; ``sapo``: none). Torch ops on ``n`` values, no host sync."""
    old = logp if tok.old is None else tok.old  # TRL: old = logp.detach() (ratio 1)
    A = tok.adv
    coef_1 = torch.exp(logp - old)  # d coef_1 / d logp = coef_1
    lo, hi = 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high
    if spec.loss_type == "cispo":  # -clamp(ratio, max=epsilon_high).detach() * A * logp
        w = torch.clamp(coef_1, max=spec.epsilon_high) * A
        loss, dloss = -w * logp, -w
        low, high = torch.zeros_like(A, dtype=torch.bool), (coef_1 > spec.epsilon_high) & (A > 0)
    elif spec.loss_type == "sapo":  # a soft gate: -sigmoid(t (ratio - 1)) 4 / t * A
        t = torch.where(A > 0, spec.sapo_temperature_pos, spec.sapo_temperature_neg).to(A.dtype)
        sg = torch.sigmoid(t * (coef_1 - 1.0))
        loss, dloss = -sg * (4.0 / t) * A, -4.0 * sg * (1.0 - sg) * coef_1 * A
        low = high = torch.zeros_like(A, dtype=torch.bool)
    else:  # grpo, dapo, bnpo, dr_grpo, luspo: the clipped surrogate
        coef_2 = torch.clamp(coef_1, lo, hi)
        d2 = torch.where((coef_1 >= lo) & (coef_1 <= hi), coef_1, 0.0)  # clamp passes inside
        c1, d1 = coef_1, coef_1
        if spec.delta is not None:  # TRL's two-sided clipping: coef_1 capped at delta
            c1 = torch.clamp(coef_1, max=spec.delta)
            d1 = torch.where(coef_1 <= spec.delta, coef_1, 0.0)
        a, b = c1 * A, coef_2 * A
        wa, wb = _min_grads(a, b)
        loss = -torch.minimum(a, b)
        dloss = -(wa * d1 + wb * d2) * A
        low = (c1 < lo) & (A < 0)  # TRL's clip metrics, of the (delta-capped) ratio
        high = (c1 > hi) & (A > 0)
    if tok.isr is not None:  # TRL's vLLM importance-sampling correction (a constant factor)
        loss, dloss = loss * tok.isr, dloss * tok.isr
    kl = None
    if spec.beta != 0.0:
        r = tok.ref - logp
        er = torch.exp(r)
        kl, dkl = er - r - 1.0, 1.0 - er
        if spec.use_bias_correction_kl:
            kl, dkl = kl * coef_1, (dkl + kl) * coef_1
        loss, dloss = loss + spec.beta * kl, dloss + spec.beta * dkl
    return loss, dloss, kl, low, high


class Outputs(NamedTuple):
    """The forward's results: ``loss`` (0-d), ``policy_loss`` (without the entropy bonus), the
    per-token ``logp``, ``ent`` (or None), ``kl`` (or None), ``low``/``high`` clipped flags, and
    the gradients (None where not asked for)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    logp: torch.Tensor
    ent: torch.Tensor | None
    kl: torch.Tensor | None
    low: torch.Tensor
    high: torch.Tensor
    dX: torch.Tensor | None
    dW: torch.Tensor | None
    db: torch.Tensor | None


def _step(pc: PolicyCall, dens, cdt, bufs):
    """One chunk: statistics and ``logp``, the per-token upstream in closed form, and the
    gradient written over the logits for it (``backward(..., recompute_all=True)``)."""
    opts, tok, spec = pc.opts._replace(out_dtype=cdt), pc.tok, pc.spec
    want_ent = opts.entropy

    def step(logits, rows, compute_grad):
        t = Tokens(*(None if v is None else v[rows] for v in tok))
        call = ce.Call(logits, pc.target[rows], None, None, opts, None)
        out = ce.rows(call, compute_grad=False, dens=dens)
        logp = -out.ce
        loss, dloss, kl, low, high = token_terms(logp, t, spec)
        bufs["logp"][rows] = logp
        bufs["loss"][rows] = t.w * loss
        bufs["low"][rows], bufs["high"][rows] = low, high
        if kl is not None:
            bufs["kl"][rows] = kl
        g_ent = None
        if want_ent:  # from the merged statistics; its gradient in the same write below
            bufs["ent"][rows] = entropy_of(out.stats)
            if t.e is not None:
                g_ent = t.e * (-spec.entropy_coef)
        if compute_grad:  # d(-logp)/dz with upstream -dL/dlogp: the pipeline's cross-entropy
            ce.backward(call, out.stats, dens, logits, -(t.w * dloss), None, g_ent=g_ent,
                        recompute_all=True)
        return out.ce, out.z, out.lse, out.stats, logits

    return step


def forward(pc: PolicyCall) -> Outputs:
    """Runs the chunks once: the loss, the metrics and (``opts.need``) the gradients of the
    loss for an upstream gradient of 1."""
    x, opts = pc.x, pc.opts
    N, cdt, dev = x.shape[0], compute_dtype(x.dtype), x.device
    need_ent = opts.entropy
    bufs = {"logp": torch.empty(N, dtype=cdt, device=dev),
            "loss": torch.empty(N, dtype=cdt, device=dev),
            "low": torch.empty(N, dtype=torch.bool, device=dev),
            "high": torch.empty(N, dtype=torch.bool, device=dev),
            "kl": torch.empty(N, dtype=cdt, device=dev) if pc.spec.beta != 0.0 else None,
            "ent": torch.empty(N, dtype=cdt, device=dev) if need_ent else None}
    dens = ce.BACKENDS[opts.backend].denominators(pc.target, None, opts, divisor=None,
                                                   V=pc.W.shape[0], dtype=cdt)
    with torch.autocast(dev.type, enabled=False):  # the inputs were cast already
        _, _, _, _, dX, dW, db = linear_ce_chunks(
            x, pc.W, pc.b, pc.target, step=_step(pc, dens, cdt, bufs),
            ignore_index=opts.ignore_index, need_x=opts.need[0], need_w=opts.need[1],
            need_b=opts.need[2], chunk_rows=opts.chunk_rows, fp32_accum=opts.fp32_accum,
            skip_ignored=False, stats_dtype=cdt)
    policy_loss = bufs["loss"].sum()
    loss = policy_loss.clone()  # two outputs, one differentiable: two tensors
    if pc.tok.e is not None:
        loss = policy_loss - pc.spec.entropy_coef * (pc.tok.e * bufs["ent"]).sum()
    return Outputs(loss, policy_loss, bufs["logp"], bufs["ent"], bufs["kl"], bufs["low"],
                   bufs["high"], dX, dW, db)


class _PolicyLoss(torch.autograd.Function):
    """``loss`` (differentiable) and the metrics (not); the gradients are the forward's, kept
    on ctx and scaled in place by the upstream gradient (used once)."""

    @staticmethod
    def forward(ctx, x, W, b, pc: PolicyCall):
        out = forward(pc._replace(x=x, W=W, b=b))
        ctx.grads = (out.dX, out.dW, out.db)
        ctx.backend = pc.opts.backend
        empty = x.new_empty(0, dtype=out.logp.dtype)
        metrics = (out.policy_loss, out.logp, empty if out.ent is None else out.ent,
                   empty if out.kl is None else out.kl, out.low, out.high)
        ctx.mark_non_differentiable(*metrics)
        return (out.loss, *metrics)

    @staticmethod
    def backward(ctx, g, *unused):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "triton_xent: linear_policy_loss was differentiated a second time "
                "(retain_graph=True): its gradients are made in the forward and handed to the "
                "first backward. Call linear_policy_loss again for a second gradient.")
        if torch.is_grad_enabled():
            raise ce.no_second_order("linear_policy_loss", "its gradient is made in the forward")
        if g is None:
            return None, None, None, None
        B = ce.BACKENDS[ctx.backend]
        dX, dW, db = (None if t is None else B.scale_(t, g.detach()) for t in grads)
        return dX, dW, db, None


def run(pc: PolicyCall):
    """``loss, policy_loss, logp, ent, kl, low, high`` (ent/kl empty when absent)."""
    if any(pc.opts.need):
        return ce.eager_apply(_PolicyLoss, pc.x, pc.W, pc.b, pc)
    out = forward(pc)
    empty = pc.x.new_empty(0, dtype=out.logp.dtype)
    return (out.loss, out.policy_loss, out.logp, empty if out.ent is None else out.ent,
            empty if out.kl is None else out.kl, out.low, out.high)
