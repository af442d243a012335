"""Argument checks and shape normalisation shared by every public function.

Every error names the problem and the fix, in the words of the usual mistakes: a target of the
wrong shape, a class index out of range, one-hot float targets, softmax applied twice, a weight
of the wrong length. The checks that need the values of a tensor (range of the targets) run only
on the CPU, or on an accelerator when validation is asked for, because they cost a host sync.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class CrossEntropyInputError(ValueError):
    """A cross-entropy argument is invalid; the message says what is wrong and how to fix it."""


@dataclass
class Problem:
    """The arguments of one call, normalised to rows of classes.

    ``logits`` is ``(N, C)`` (a view or a copy of the input with the class dimension last);
    ``target`` is ``(N,)`` int64 class indices or ``(N, C)`` class probabilities;
    ``batch_shape`` is the shape of a ``reduction="none"`` result.
    """

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    batch_shape: tuple[int, ...]
    probs: bool


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def validation_requested(validate: bool | None) -> bool:
    """``validate=None`` defers to ``TRITON_XENT_VALIDATE`` (``1``/``true`` turns it on)."""
    if validate is not None:
        return bool(validate)
    return os.environ.get("TRITON_XENT_VALIDATE", "").strip().lower() in ("1", "true", "yes", "on")


def check_options(
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, ignore_index: int
) -> None:
    if reduction not in REDUCTIONS:
        raise CrossEntropyInputError(
            f"reduction={reduction!r} is not supported: use 'mean' (default), 'sum' or 'none'."
        )
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise CrossEntropyInputError(
            f"label_smoothing={label_smoothing!r} is outside [0, 1]: it is the share of the target "
            "mass spread uniformly over the classes (0.1 is typical, 0.0 turns it off)."
        )
    if not isinstance(z_loss, (int, float)) or float(z_loss) < 0.0:
        raise CrossEntropyInputError(
            f"z_loss={z_loss!r} must be a non-negative float (the coefficient of lse**2, "
            "1e-4 in PaLM; 0.0 turns it off)."
        )
    if softcap is not None and (not isinstance(softcap, (int, float)) or not float(softcap) > 0.0):
        raise CrossEntropyInputError(
            f"softcap={softcap!r} must be a positive float (logits become "
            "softcap * tanh(logits / softcap); Gemma 2 uses 30.0) or None to turn it off."
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise CrossEntropyInputError(f"ignore_index={ignore_index!r} must be an int (default -100).")


def check_logit_scale(logit_scale) -> None:
    if logit_scale is None:
        return
    ok = isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool)
    if not ok or not math.isfinite(float(logit_scale)) or not float(logit_scale) > 0.0:
        raise CrossEntropyInputError(
            f"logit_scale={logit_scale!r} must be a positive finite float (the logits are "
            "multiplied by it before softcap and the softmax: Cohere's config.logit_scale, or "
            "1 / config.logits_scaling for Granite) or None to turn it off."
        )


def check_divisor(divisor, reduction: str, device: torch.device | None):
    """Returns ``(divisor tensor or None, 1 / divisor for a number)``: what the op takes."""
    if divisor is None:
        return None, 1.0
    if reduction != "sum":
        raise CrossEntropyInputError(
            f"divisor= needs reduction='sum' (the summed loss is divided by it), got "
            f"reduction={reduction!r}. For a token-count normaliser such as Hugging Face's "
            "num_items_in_batch pass reduction='sum', divisor=num_items_in_batch."
        )
    if isinstance(divisor, torch.Tensor):
        if divisor.numel() != 1 or divisor.dim() > 1:
            raise CrossEntropyInputError(
                f"divisor must be a number or a 0-d tensor, got a tensor of shape "
                f"{_shape(divisor)}."
            )
        if divisor.requires_grad:
            raise CrossEntropyInputError(
                "divisor requires grad: the loss is not differentiated with respect to its "
                "normaliser; pass divisor.detach()."
            )
        if divisor.dtype == torch.bool or divisor.is_complex():
            raise CrossEntropyInputError(f"divisor has dtype {divisor.dtype}: pass a number.")
        if device is not None and divisor.device != device:
            raise CrossEntropyInputError(
                f"divisor is on {divisor.device} but the logits are on {device}: pass it on the "
                "logits' device (a host tensor would need a copy each call)."
            )
        return divisor.detach().reshape(()), 1.0
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
        raise CrossEntropyInputError(
            f"divisor={divisor!r} must be a number or a 0-d tensor (e.g. num_items_in_batch)."
        )
    if not math.isfinite(float(divisor)) or float(divisor) == 0.0:
        raise CrossEntropyInputError(
            f"divisor={divisor!r} must be finite and non-zero."
        )
    return None, 1.0 / float(divisor)


def prepare(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    *,
    check_values: bool,
) -> Problem:
    """Checks shapes and dtypes and returns the problem as rows ``(N, C)``.

    ``check_values`` also checks the range of class indices (a host sync).
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise CrossEntropyInputError(
            f"input and target must be tensors, got {type(input).__name__} and "
            f"{type(target).__name__}."
        )
    if input.dtype not in FLOAT_DTYPES:
        raise CrossEntropyInputError(
            f"input has dtype {input.dtype}; cross_entropy expects floating-point logits "
            "(float32, float16, bfloat16 or float64). Pass the model's raw scores, not class ids."
        )
    if input.dim() == 0:
        raise CrossEntropyInputError(
            "input is a 0-d tensor: it needs a class dimension, shape (C,), (N, C) or "
            "(N, C, d1, ..., dk). For a single binary score use binary_cross_entropy_with_logits."
        )
    if target.device != input.device:
        raise CrossEntropyInputError(
            f"target is on {target.device} but input is on {input.device}: move both to the same "
            "device (target.to(input.device))."
        )

    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    probs = target.is_floating_point()

    if probs:
        if target.shape != input.shape:
            hint = ""
            if target.dim() == input.dim() - 1 or (input.dim() == 1 and target.dim() == 0):
                hint = (
                    " It has the shape of class indices: convert it with target.long()"
                    " (class indices must be an integer dtype)."
                )
            raise CrossEntropyInputError(
                f"target is floating point ({target.dtype}) with shape {_shape(target)}, so it is "
                f"read as class probabilities, which must have the input's shape "
                f"{_shape(input)}.{hint}"
            )
        if target.dtype != input.dtype:
            target = target.to(input.dtype)
    else:
        if target.dtype == torch.bool or target.dtype not in _INT_DTYPES:
            raise CrossEntropyInputError(
                f"target has dtype {target.dtype}; class-index targets must be an integer tensor "
                "(torch.long; int32/int16/uint8 are converted), class-probability targets a float "
                "tensor with the input's shape."
            )
        if tuple(target.shape) != batch_shape:
            expected = "(" + ", ".join(str(s) for s in batch_shape)
            expected += ("," if len(batch_shape) == 1 else "") + ")"
            hint = ""
            if target.dim() == input.dim() and target.shape[-1] == C or (
                input.dim() >= 2 and tuple(target.shape) == tuple(input.shape)
            ):
                hint = (
                    " It looks one-hot encoded: pass class indices (target.argmax(dim=-1)) or "
                    "float class probabilities."
                )
            elif target.dim() == len(batch_shape) + 1 and target.shape[-1] == 1:
                hint = " Remove the extra trailing dimension (target.squeeze(-1))."
            elif input.dim() == 2 and target.numel() == input.shape[0]:
                hint = f" Reshape it with target.view({input.shape[0]})."
            raise CrossEntropyInputError(
                f"Expected target size {expected} for input of shape {_shape(input)} (class "
                f"dimension {'0' if input.dim() == 1 else '1'} with C={C}), got {_shape(target)}."
                f"{hint} For (B, T, C) language-model logits, flatten both: "
                "input.view(-1, C), target.view(-1)."
            )
        target = target.long()

    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise CrossEntropyInputError(f"weight must be a tensor of shape ({C},) or None.")
        if weight.dim() != 1 or weight.shape[0] != C:
            raise CrossEntropyInputError(
                f"weight has shape {_shape(weight)} but there are C={C} classes: pass one "
                f"rescaling factor per class, a 1-D tensor of shape ({C},)."
            )
        if not weight.is_floating_point():
            raise CrossEntropyInputError(
                f"weight has dtype {weight.dtype}; class weights must be floating point "
                "(weight.float())."
            )
        if weight.device != input.device:
            raise CrossEntropyInputError(
                f"weight is on {weight.device} but input is on {input.device}: move it "
                "(weight.to(input.device))."
            )

    if input.dim() == 1:
        logits = input.unsqueeze(0)
        target = target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:
        # (N, C, d1, ..., dk) -> (N * d1 * ... * dk, C): class dimension last.
        logits = input.movedim(1, -1).reshape(-1, C)
        target = target.movedim(1, -1).reshape(-1, C) if probs else target.reshape(-1)

    if check_values and not probs and target.numel() > 0:
        check_target_range(target, C, ignore_index)
    return Problem(logits=logits, target=target, weight=weight, batch_shape=batch_shape, probs=probs)


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises if a class index (other than ``ignore_index``) is outside ``[0, C-1]``. Syncs."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        value = int(target[idx])
        count = int(bad.sum())
        raise CrossEntropyInputError(
            f"Target {value} is out of bounds (at flattened position {idx}; {count} such "
            f"target{'s' if count > 1 else ''}): with C={num_classes} classes, class indices must "
            f"be in [0, {num_classes - 1}] or equal ignore_index={ignore_index}. Check the "
            "tokenizer's vocabulary size against the model's output size, and the padding "
            "label (ignore_index)."
        )
