"""``nn.Module`` wrappers: they store the arguments and call the functional API."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import legacy_reduction
from .functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss`` with the extras of :func:`triton_xent.cross_entropy`.

    PyTorch's positional order, with its deprecated ``size_average``/``reduce`` mapped to
    ``reduction`` (and its warning) as ``nn.CrossEntropyLoss`` does.

    Examples::

        >>> loss_fn = triton_xent.CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

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
        inplace_backward: bool = False,
        backend: str | None = None,
        validate: bool | None = None,
        process_group=None,
        loss_dtype: torch.dtype | None = None,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.logit_scale = logit_scale
        self.process_group = process_group
        self.loss_dtype = loss_dtype
        self.ignore_index = ignore_index
        self.reduction = legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_aux = return_aux
        self.return_argmax = return_argmax
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.validate = validate

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, divisor=None):
        """``divisor``: with ``reduction="sum"``, divide the loss by it inside the op (a number
        or a 0-d tensor, e.g. ``num_items_in_batch``); see :func:`triton_xent.cross_entropy`."""
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            return_aux=self.return_aux, return_argmax=self.return_argmax,
            inplace_backward=self.inplace_backward,
            backend=self.backend, validate=self.validate, process_group=self.process_group,
            loss_dtype=self.loss_dtype, divisor=divisor,
            logit_scale=self.logit_scale,
        )

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
        chunk_size: int | None = None,
        chunk_bytes: int | None = None,
        accum_dtype: torch.dtype | None = None,
        skip_ignored: bool | None = None,
        backend: str | None = None,
        validate: bool | None = None,
        process_group=None,
        loss_dtype: torch.dtype | None = None,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.logit_scale = logit_scale
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_aux = return_aux
        self.return_argmax = return_argmax
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.accum_dtype = accum_dtype
        self.skip_ignored = skip_ignored
        self.backend = backend
        self.validate = validate
        self.process_group = process_group
        self.loss_dtype = loss_dtype

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, divisor=None):
        """``divisor``: as in :meth:`CrossEntropyLoss.forward`."""
        from .linear import linear_cross_entropy

        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            return_aux=self.return_aux, return_argmax=self.return_argmax,
            chunk_size=self.chunk_size, chunk_bytes=self.chunk_bytes,
            accum_dtype=self.accum_dtype, skip_ignored=self.skip_ignored, backend=self.backend,
            validate=self.validate, process_group=self.process_group, loss_dtype=self.loss_dtype,
            divisor=divisor, logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}"
        )
