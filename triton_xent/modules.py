"""``nn.Module`` wrappers: they store the arguments and call the functional API."""

from __future__ import annotations

import torch
from torch import nn

from .functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss`` with the extras of :func:`triton_xent.cross_entropy`.

    Examples::

        >>> loss_fn = triton_xent.CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_aux: bool = False,
        inplace_backward: bool = False,
        backend: str | None = None,
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_aux = return_aux
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.validate = validate

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, return_aux=self.return_aux,
            inplace_backward=self.inplace_backward, backend=self.backend, validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
        )
