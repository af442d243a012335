"""Vocabulary parallelism, by name: the ``process_group=`` of :func:`triton_xent.cross_entropy`
and :func:`triton_xent.linear_cross_entropy`.

The classes are sharded over the ranks of a ``torch.distributed`` group, in rank order, any
sizes: see :mod:`triton_xent.parallel` for the convention, the algorithm (it is the
single-process pipeline with its partial statistics merged across the ranks) and its
communication. These two functions are the same calls with the group as a named argument.
"""

from __future__ import annotations

from .functional import cross_entropy
from .linear import linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def vocab_parallel_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0, *, process_group=None, **extras):
    """:func:`triton_xent.cross_entropy` with the classes sharded over ``process_group``:
    ``input`` (and ``weight``, and class-probability targets) hold this rank's contiguous shard
    of the class dimension, class-index ``target`` is global and the same on every rank. Every
    rank gets the loss of the unsharded problem and the gradient of its shard.

    Examples::

        >>> # rank r of R holds logits[:, off_r : off_r + V_r] (same rows and targets everywhere)
        >>> loss = vocab_parallel_cross_entropy(logits_shard, target, process_group=group)
        >>> loss.backward()  # logits_shard.grad is this rank's shard of the full gradient
    """
    return cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, process_group=process_group, **extras)


def vocab_parallel_linear_cross_entropy(input, linear_weight, target, *, process_group=None,
                                        **extras):
    """:func:`triton_xent.linear_cross_entropy` with the head's rows (``linear_weight``
    ``(V_r, D)``, ``linear_bias`` and ``weight`` ``(V_r,)``) sharded over ``process_group``;
    ``input`` and ``target`` are the same on every rank, and every rank gets the full gradient of
    ``input``.

    Examples::

        >>> # rank r holds lm_head.weight[off_r : off_r + V_r]; hidden and labels are replicated
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, w_shard, labels, process_group=tp)
        >>> loss.backward()  # hidden.grad: full gradient; w_shard.grad: this rank's shard
    """
    return linear_cross_entropy(input, linear_weight, target, process_group=process_group,
                                **extras)
