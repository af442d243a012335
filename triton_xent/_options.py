"""The options of one cross-entropy call, as they travel through the layers (one named tuple, not
a dozen positionals repeated in every signature)."""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = ("none", "sum", "mean")


class CEOptions(NamedTuple):
    """Non-tensor options of a cross-entropy call (already validated).

    ``inv_divisor`` is ``1 / divisor`` for a number divisor of a ``"sum"`` (a tensor divisor
    travels as a tensor); ``all_rows`` asks for the statistics of ignored rows too: their lse,
    or their gradient (PyTorch's ``0 x softmax``, NaN where a logit is NaN or +inf), which a
    backward recompute writes from them (their logits are not read otherwise, and a gradient
    written later from such statistics is 0: the kernels mark them unread); ``argmax`` asks for
    each row's predicted class.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float | None = None
    inv_divisor: float = 1.0
    all_rows: bool = False
    argmax: bool = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowOutputs(NamedTuple):
    """Per-row results of a forward (either backend): ``ce``, ``z``, ``lse`` (fp32, fp64 for
    fp64); ``loss_rows`` in the output dtype (``"none"`` only); ``argmax`` (int64, when asked);
    ``stats`` (merged statistics, field-major ``(6, N)``) and ``dens`` ``(2,)`` (the reduction's
    denominators), both kept for a backward recompute; ``grad`` (or None)."""

    ce: torch.Tensor
    z: torch.Tensor
    lse: torch.Tensor
    loss_rows: torch.Tensor | None
    argmax: torch.Tensor | None
    stats: torch.Tensor
    dens: torch.Tensor
    grad: torch.Tensor | None
