"""The plain-torch reference: obviously correct, memory-hungry, differentiable by autograd.

It is the test oracle (run it on float64 inputs) and the benchmark's "what training code writes"
baseline. It defines the extras the same way the kernels do:

* ``logit_scale``: logits are multiplied by it first; ``divisor``: a ``"sum"`` divided by it.
* ``softcap``: logits become ``softcap * tanh(logits / softcap)`` before everything else.
* ``temperature``: the logits are divided by it last (after ``logit_scale`` and ``softcap``, as
  samplers do).
* ``z_loss``: each kept row adds ``z_loss * lse**2`` (PaLM); the term is not class-weighted, and
  with ``reduction="mean"`` it is averaged over the kept rows (rows whose target is not
  ``ignore_index``), while the cross-entropy part keeps PyTorch's weighted mean.
* entropy: ``H = -sum_c p_c log p_c`` of the distribution the loss sees (after the transforms),
  with ``0 log 0 = 0`` (a -inf logit adds nothing, where ``-(softmax * log_softmax)`` is NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends.protocol import compute_dtype


def cross_entropy_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
    logit_scale: float | None = None,
    divisor=None,
    temperature: float | None = None,
    return_entropy: bool = False,
):
    """Cross-entropy by composition of torch ops, with the same arguments as ``cross_entropy``.

    Returns the loss, or ``(loss, lse, z_term)`` with ``return_aux=True`` where ``lse`` has the
    shape of a ``reduction="none"`` result and ``z_term`` is the z-loss part of the loss, reduced
    like the loss; ``(loss, lse, z_term, entropy)`` with ``return_entropy`` too (per row).
    """
    x = input
    if logit_scale is not None:
        x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if temperature is not None:
        x = x / temperature
    loss = F.cross_entropy(
        x, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(x, dim=0 if x.dim() == 1 else 1)
    if target.is_floating_point():
        keep = torch.ones_like(lse, dtype=torch.bool)
    else:
        keep = target != ignore_index
    z_rows = torch.where(keep, z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        z_term = z_rows
    elif reduction == "sum":
        z_term = z_rows.sum()
    else:
        z_term = z_rows.sum() / keep.sum()
    if z_loss:
        loss = loss + z_term.to(loss.dtype)
    if divisor is not None:
        loss, z_term = loss / divisor, z_term / divisor
    if return_aux and return_entropy:
        return loss, lse, z_term, entropy_reference(x)
    if return_aux:
        return loss, lse, z_term
    return loss


def entropy_reference(x: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c log p_c`` over the last dimension of (transformed) logits, ``0 log 0 = 0``;
    differentiable (the masked log keeps NaN out of the gradient too)."""
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    safe = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * safe).sum(-1)


# ---------------------------------------------------------------------------------------------
# The op layer's differentiable path: second derivatives (create_graph=True), and class weights
# that require grad (probability targets), in the compute dtype.


def reference(logits, target, weight, divisor, opts):
    """``(loss, lse, z_term, entropy)`` by differentiable torch ops in fp32 (fp64 for fp64);
    ``entropy`` None unless ``opts.entropy``."""
    x = logits.to(compute_dtype(logits.dtype))
    if opts.reduction == "sum" and divisor is None:
        divisor = 1.0 / opts.inv_divisor
    out = cross_entropy_reference(
        x, target.to(x.dtype) if opts.probs else target,
        None if weight is None else weight.to(x.dtype), opts.ignore_index, opts.reduction,
        opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        logit_scale=opts.logit_scale, divisor=divisor if opts.reduction == "sum" else None,
        temperature=opts.temperature, return_aux=True, return_entropy=True)
    return out if opts.entropy else (*out[:3], None)


def reference_grads(outputs, upstreams, inputs):
    """The vector-Jacobian product with ``create_graph=True``: the upstream gradients as
    grad_outputs, not factors of a scalar (they may depend on the op's own outputs, a penalty
    on loss**2, a z-loss on aux.lse, and must not be differentiated)."""
    pairs = [(o, g.to(o.dtype).expand(o.shape)) for o, g in zip(outputs, upstreams)
             if g is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                               create_graph=True, allow_unused=True)
