"""``nn.Module`` wrappers: they store the arguments and call the functional API.

Each module stores the keywords of its function once, as attributes named like the function's
parameters (PyTorch's modules do the same: ``loss_fn.reduction``); the names are read from the
function's signature, so a keyword added there reaches the module through its ``__init__``
signature alone.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ._validation import legacy_reduction
from .functional import cross_entropy
from .linear import linear_cross_entropy


def _keywords(fn, skip: tuple[str, ...]) -> tuple[str, ...]:
    """The parameters of ``fn`` a module stores (all but its tensors and the per-call ones)."""
    return tuple(n for n in inspect.signature(fn).parameters if n not in skip)


def _store(module: nn.Module, names: tuple[str, ...], values: dict) -> None:
    for name in names:
        setattr(module, name, values[name])


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss`` with the extras of :func:`triton_xent.cross_entropy`.

    PyTorch's positional order, with its deprecated ``size_average``/``reduce`` mapped to
    ``reduction`` (and its warning) as ``nn.CrossEntropyLoss`` does.

    Examples::

        >>> loss_fn = triton_xent.CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

    _keywords = _keywords(cross_entropy, ("input", "target", "weight", "size_average", "reduce",
                                           "divisor"))

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_aux: bool = False,
        return_argmax: bool = False,
        return_entropy: bool = False,
        inplace_backward: bool = False,
        backend: str | None = None,
        validate: bool | None = None,
        process_group=None,
        loss_dtype: torch.dtype | None = None,
        logit_scale: float | None = None,
        temperature: float | None = None,
    ) -> None:
        values = dict(locals(), reduction=legacy_reduction(size_average, reduce, reduction))
        super().__init__()
        self.register_buffer("weight", weight)
        _store(self, self._keywords, values)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, divisor=None):
        """``divisor``: with ``reduction="sum"``, divide the loss by it inside the op (a number
        or a 0-d tensor, e.g. ``num_items_in_batch``); see :func:`triton_xent.cross_entropy`."""
        return cross_entropy(input, target, self.weight, divisor=divisor,
                             **{k: getattr(self, k) for k in self._keywords})

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.LinearCrossEntropyLoss``: owns the head ``self.linear`` (``(V, D)``
    weight, optional bias) and calls :func:`triton_xent.linear_cross_entropy`, with its extras.

    Examples::

        >>> loss_fn = triton_xent.LinearCrossEntropyLoss(4096, 128256, z_loss=1e-4)
        >>> loss = loss_fn(hidden_states, labels)   # (B, T, 4096), (B, T)
    """

    _keywords = _keywords(linear_cross_entropy, ("input", "linear_weight", "target",
                                                  "linear_bias", "weight", "divisor"))

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_aux: bool = False,
        return_argmax: bool = False,
        return_entropy: bool = False,
        chunk_size: int | None = None,
        chunk_bytes: int | None = None,
        accum_dtype: torch.dtype | None = None,
        skip_ignored: bool | None = None,
        backend: str | None = None,
        validate: bool | None = None,
        process_group=None,
        loss_dtype: torch.dtype | None = None,
        logit_scale: float | None = None,
        temperature: float | None = None,
    ) -> None:
        values = locals()
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        _store(self, self._keywords, values)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, divisor=None):
        """``divisor``: as in :meth:`CrossEntropyLoss.forward`."""
        return linear_cross_entropy(input, self.linear.weight, target,
                                    linear_bias=self.linear.bias, weight=self.weight,
                                    divisor=divisor, **{k: getattr(self, k) for k in self._keywords})

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}"
        )
