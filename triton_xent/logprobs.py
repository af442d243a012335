"""``linear_logprobs``: per-token log-probabilities (and entropy, arg-max) of an LM head, without
the ``(N, V)`` logits: what reinforcement-learning trainers need for every sampled token.

It is :func:`triton_xent.linear_cross_entropy` with ``reduction="none"`` read the other way
round: ``log p(target) = -loss``, a negation, so the values and their gradients are the fused
head's, rounded once. The entropy and the arg-max come from the same pass (``aux.entropy``,
``aux.argmax``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as V
from .linear import linear_cross_entropy

__all__ = ["LogProbs", "linear_logprobs"]


class LogProbs(NamedTuple):
    """What :func:`linear_logprobs` returns.

    ``logprobs``: ``log p(target)`` of each row under the distribution the head defines (after
    ``logit_scale``, ``softcap`` and ``temperature``), float32 (float64 for float64 input),
    shaped like ``target``, 0 where the target is ``ignore_index``; differentiable.
    ``entropy``: the entropy of each row's distribution, same dtype and shape, differentiable
    (``return_entropy=True``; else None). Ignored rows hold their row's entropy too, as
    ``aux.lse`` does: mask them yourself if they must not count.
    ``argmax``: the most likely class of each row, int64 (the first on a tie, as
    ``torch.argmax``), -1 where the target is ignored (``return_argmax=True``; else None).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None


def linear_logprobs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_argmax: bool = False,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str | None = None,
    process_group=None,
    validate: bool | None = None,
) -> LogProbs:
    """Per-token ``log softmax(head(input))[target]`` of a linear head, never forming the logits.

    The logits are ``z = input @ linear_weight.T + linear_bias``, seen by the distribution as
    ``softcap * tanh(logit_scale * z / softcap) / temperature`` (each step only when given: the
    distribution a sampler at ``temperature`` draws from). The rows run in chunks through one
    ``(chunk, V)`` buffer, as :func:`triton_xent.linear_cross_entropy` (which this calls with
    ``reduction="none"``): under ``torch.no_grad()`` (old-policy and reference log-probs) nothing
    else of size ``V`` per row is allocated and no gradient is made; with gradients, the
    backward recomputes each chunk's logits once and folds the upstream gradients of the
    log-probs and of the entropy (any per-token values, e.g. a policy loss's) into one gradient
    per chunk, rounded once to the input's dtype.

    Args:
        input: ``(..., D)`` hidden states (fp32, bf16, fp16, fp64).
        linear_weight: ``(V, D)``, or a ``DTensor`` as :func:`linear_cross_entropy` takes it
            (an FSDP2-managed head is gathered for the call; a tensor-parallel ``Shard(0)`` head
            runs the vocabulary-parallel path and the outputs are DTensors).
        target: ``(...)`` class indices (the sampled tokens), the input's shape without ``D``.
            Class-probability targets have no per-token log-probability: they are refused.
        linear_bias: ``(V,)`` or None.
        temperature, logit_scale, softcap: as in :func:`triton_xent.cross_entropy`
            (``temperature`` applied last).
        ignore_index: rows whose target equals it get log-prob 0 and arg-max -1, and no gradient
            from the log-probs.
        return_entropy: also return each row's entropy (same pass, differentiable).
        return_argmax: also return each row's arg-max (same pass; e.g. ``argmax == target`` is
            TRL's ``is_top1``).
        chunk_size, chunk_bytes, accum_dtype, backend, validate, process_group: as in
            :func:`linear_cross_entropy`.

    Returns:
        :class:`LogProbs` ``(logprobs, entropy, argmax)``.

    Examples::

        >>> out = triton_xent.linear_logprobs(hidden, lm_head.weight, completion_ids,
        ...                                   temperature=0.7, return_entropy=True)
        >>> ratio = torch.exp(out.logprobs - old_logprobs)
        >>> with torch.no_grad():
        ...     ref = triton_xent.linear_logprobs(hidden_ref, ref_head.weight, completion_ids,
        ...                                       temperature=0.7).logprobs
    """
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise V.CrossEntropyInputError(
            f"linear_logprobs takes class indices (the sampled tokens), got a {target.dtype} "
            "target: class probabilities have no per-token log-probability. Pass target.long(), "
            "or linear_cross_entropy for a cross-entropy against a distribution.")
    for name, flag in (("return_entropy", return_entropy), ("return_argmax", return_argmax)):
        if not isinstance(flag, bool):
            raise V.CrossEntropyInputError(f"{name} must be a bool, got {flag!r}.")
    extra = {"return_entropy": True} if return_entropy else {}
    aux_wanted = return_entropy or return_argmax
    fp64 = isinstance(input, torch.Tensor) and input.dtype == torch.float64
    out = linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, reduction="none",
        ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        temperature=temperature, return_aux=aux_wanted, return_argmax=return_argmax,
        chunk_size=chunk_size, chunk_bytes=chunk_bytes, accum_dtype=accum_dtype,
        backend=backend, validate=validate, process_group=process_group,
        loss_dtype=torch.float64 if fp64 else torch.float32, **extra)
    loss, aux = out if aux_wanted else (out, None)
    # 0 - loss: the exact negation, +0.0 on ignored rows (the loss holds 0 there)
    return LogProbs(0.0 - loss,
                    aux.entropy if return_entropy else None,
                    aux.argmax if return_argmax else None)
