"""Argument checks and shape normalisation shared by every public function (a leaf module).

Every error names the problem and the fix, in the words of the usual mistakes: a target of the
wrong shape, a class index out of range, one-hot float targets, softmax applied twice, a weight
of the wrong length. The checks that need the values of a tensor (range of the targets) run only
on the CPU, or on an accelerator when validation is asked for, because they cost a host sync.
The functional API (``triton_xent.functional``, ``triton_xent.linear``) runs each check once per
call and builds the ready call from the results.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

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


def shape_str(shape) -> str:
    """A shape as Python writes a tuple: ``(4,)``, ``(2, 3)``."""
    shape = tuple(getattr(shape, "shape", shape))
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape(t) -> str:
    return shape_str(t)


ENV_VALIDATE = "TRITON_XENT_VALIDATE"
_ENV_TRUE = ("1", "true", "yes", "on")
_ENV_FALSE = ("", "0", "false", "no", "off")


def validation_requested(validate: bool | None) -> bool:
    """``validate=None`` defers to ``TRITON_XENT_VALIDATE`` (``1``/``true``/``yes``/``on`` turn it
    on, ``0``/``false``/``no``/``off`` or unset leave it off; anything else raises)."""
    if validate is not None:
        if not isinstance(validate, bool):
            raise CrossEntropyInputError(
                f"validate={validate!r} must be True, False or None (None: {ENV_VALIDATE})."
            )
        return validate
    raw = os.environ.get(ENV_VALIDATE, "")
    value = raw.strip().lower()
    if value in _ENV_TRUE:
        return True
    if value in _ENV_FALSE:
        return False
    raise ValueError(
        f"{ENV_VALIDATE}={raw!r} is not understood: use 1 (or true/yes/on) to check class "
        "indices on accelerators too, 0 (or false/no/off, or unset it) not to."
    )


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average``/``reduce``: when either is given it decides the
    reduction (``reduction`` is then ignored), with PyTorch's own deprecation warning."""
    if size_average is None and reduce is None:
        return reduction
    for name, value in (("size_average", size_average), ("reduce", reduce)):
        if value is not None and not isinstance(value, bool):
            raise CrossEntropyInputError(
                f"{name}={value!r} must be a bool or None. The positional order is PyTorch's: "
                "(input, target, weight, size_average, ignore_index, reduce, reduction, "
                "label_smoothing), where size_average and reduce are deprecated bools; pass "
                "ignore_index=, reduction= and label_smoothing= by keyword."
            )
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)  # warns as F.cross_entropy does


def _real(name: str, value, what: str) -> float:
    """A real number as PyTorch's float arguments take it: int, float, numpy scalar, 0-d tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise CrossEntropyInputError(
                f"{name} must be a number or a 0-d real tensor, got a {value.dtype} tensor of "
                f"shape {_shape(value)}. {what}"
            )
        if value.requires_grad:
            raise CrossEntropyInputError(
                f"{name} requires grad, but the loss is not differentiated with respect to it: "
                f"pass {name}.detach() or a number. {what}"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CrossEntropyInputError(f"{name}={value!r} must be a number. {what}")
    return float(value)


_SMOOTH_WHAT = ("It is the share of the target mass spread uniformly over the classes, in [0, 1] "
                "(0.1 is typical, 0.0 turns it off).")
_Z_WHAT = "It is the coefficient of lse**2 (1e-4 in PaLM; 0.0 turns it off)."
_CAP_WHAT = ("The logits become softcap * tanh(logits / softcap) (Gemma 2 uses 30.0); None turns "
             "it off.")


def check_options(
    reduction: str, label_smoothing, z_loss, softcap, ignore_index: int
) -> tuple[float, float, float | None]:
    """Checks the options; returns ``label_smoothing, z_loss, softcap`` as Python floats (any
    real number or 0-d tensor is taken, as PyTorch takes ``label_smoothing``)."""
    if reduction not in REDUCTIONS:
        raise CrossEntropyInputError(
            f"reduction={reduction!r} is not supported: use 'mean' (default), 'sum' or 'none'."
        )
    smoothing = (label_smoothing if type(label_smoothing) is float
                 else _real("label_smoothing", label_smoothing, _SMOOTH_WHAT))
    if smoothing > 1.0:  # as PyTorch: it refuses above 1 only, and smooths only above 0
        raise CrossEntropyInputError(
            f"label_smoothing={label_smoothing!r} is above 1 (PyTorch refuses it too). "
            f"{_SMOOTH_WHAT}")
    if not smoothing > 0.0:  # negative or NaN: no smoothing, PyTorch's result
        smoothing = 0.0
    z = z_loss if type(z_loss) is float else _real("z_loss", z_loss, _Z_WHAT)
    if not 0.0 <= z < math.inf:
        raise CrossEntropyInputError(
            f"z_loss={z_loss!r} must be a finite non-negative float. {_Z_WHAT}")
    cap = None
    if softcap is not None:
        cap = _real("softcap", softcap, _CAP_WHAT)
        if not 0.0 < cap < math.inf:
            hint = " For no cap pass None, not inf." if cap == math.inf else ""
            raise CrossEntropyInputError(
                f"softcap={softcap!r} must be a positive finite float or None.{hint} {_CAP_WHAT}")
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, int)):
        raise CrossEntropyInputError(f"ignore_index={ignore_index!r} must be an int (default -100).")
    return smoothing, z, cap


def check_loss_dtype(loss_dtype) -> torch.dtype | None:
    if loss_dtype is None or loss_dtype in FLOAT_DTYPES:
        return loss_dtype
    if not isinstance(loss_dtype, torch.dtype) or loss_dtype not in FLOAT_DTYPES:
        raise CrossEntropyInputError(
            f"loss_dtype={loss_dtype!r} must be a floating-point torch.dtype (torch.float32 "
            "returns the fp32 loss unrounded; also float64, bfloat16, float16) or None (the "
            "input's dtype, as PyTorch)."
        )
    return loss_dtype


HALF = (torch.float16, torch.bfloat16)


def autocast_loss_dtype(input, loss_dtype: torch.dtype | None, *, linear: bool = False):
    """The loss dtype under ``torch.autocast``, where the caller gave none.

    ``F.cross_entropy`` is on autocast's fp32 list: a 16-bit input is upcast and the loss is
    fp32 (its gradient keeps the input's dtype). We compute in fp32 anyway, so matching that
    needs only the loss's dtype, not an fp32 copy of the logits. With ``linear``, the logits are
    ``F.linear``'s output, which autocast computes in its own dtype (float64 is left alone).
    """
    if loss_dtype is not None or not isinstance(input, torch.Tensor):
        return check_loss_dtype(loss_dtype)
    dev = input.device.type
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    logits_dtype = input.dtype
    if linear and input.dtype != torch.float64 and input.is_floating_point():
        logits_dtype = torch.get_autocast_dtype(dev)
    return torch.float32 if logits_dtype in HALF else None


_POSITIVE = {
    "logit_scale": "The logits are multiplied by it before softcap and the softmax: Cohere's "
                   "config.logit_scale, or 1 / config.logits_scaling for Granite; None turns it "
                   "off.",
    "temperature": "The logits are divided by it last, after logit_scale and softcap, as a "
                   "sampler does (0.7 for a policy sampled at 0.7); None turns it off. For a "
                   "soft-capped head logit_scale=1/T is not the same: pass temperature=T.",
}


def check_positive(name: str, value) -> float | None:
    """``logit_scale`` or ``temperature`` as a Python float (a positive finite real number or
    0-d tensor, as the other options), or None."""
    if value is None:
        return None
    what = _POSITIVE[name]
    v = _real(name, value, what)
    if not 0.0 < v < math.inf:  # comparisons: torch.compile traces them on a SymFloat
        raise CrossEntropyInputError(f"{name}={value!r} must be a positive finite number. {what}")
    return v


def check_extras(a: dict) -> tuple:
    """The checks both ops' keyword extras share (``a``: a call's arguments by name):
    ``(logit_scale, temperature)`` checked, and ``return_argmax`` / ``return_entropy`` bools
    given only with ``return_aux``."""
    logit_scale = check_positive("logit_scale", a["logit_scale"])
    temperature = check_positive("temperature", a["temperature"])
    for name, fills in (("return_argmax", "CrossEntropyAux.argmax and .accuracy"),
                        ("return_entropy", "CrossEntropyAux.entropy")):
        value = a[name]
        if value is False:
            continue
        if not isinstance(value, bool):
            raise CrossEntropyInputError(f"{name}={value!r} must be a bool.")
        if not a["return_aux"]:
            raise CrossEntropyInputError(
                f"{name}=True fills {fills}: pass return_aux=True too (the call then returns "
                "(loss, aux)).")
    return logit_scale, temperature


def compile_check(validate: bool) -> None:
    """With a process group under torch.compile: ``validate=True`` cannot run (a host sync)."""
    if validate:
        raise CrossEntropyInputError(
            "validate=True with a process group under torch.compile: the ranks' targets (and the "
            "linear head's hidden states) are compared with a host sync, which a compiled graph "
            "cannot do. Validate in an eager call (outside the compiled region), or drop validate.")


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
    if not -math.inf < float(divisor) < math.inf or float(divisor) == 0.0:
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
        # Under autocast F.cross_entropy upcasts a 16-bit input and its targets to fp32: keep
        # the targets' precision (the torch backend reads them in fp32 either way).
        want = torch.float32 if autocast_loss_dtype(input, None) is not None else input.dtype
        if target.dtype != want:
            target = target.to(want)
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


def check_inplace(input: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuses, before anything is written, the inputs an in-place gradient would corrupt."""
    if logits.data_ptr() != input.data_ptr() or (logits.shape[1] > 1 and logits.stride(1) != 1):
        # the rows were copied (a write would be lost), or the kernels could not write them
        raise CrossEntropyInputError(
            "inplace_backward=True needs the logits as rows (N, C) with a unit-stride class "
            "dimension; this input needed a copy, so nothing would be saved. Pass "
            "input.view(-1, C) of a contiguous (B, T, C) tensor, or drop inplace_backward."
        )
    base = input._base if input._base is not None else input
    if input.is_leaf or (base.is_leaf and base.requires_grad):
        raise CrossEntropyInputError(
            "inplace_backward=True on a leaf tensor, or a view of one (a parameter or an input "
            "created with requires_grad=True): its values would be overwritten by its own "
            "gradient. Pass the "
            "output of an op (e.g. the LM head's logits), or drop inplace_backward."
        )
    if torch._debug_has_internal_overlap(logits) != 0:
        raise CrossEntropyInputError(
            "inplace_backward=True on a tensor whose elements overlap in memory (an expand() or "
            "as_strided() view): one element would receive several gradients. Pass a "
            "contiguous tensor (.contiguous()), or drop inplace_backward."
        )


def _range_message(num_classes: int, ignore_index: int) -> str:
    if num_classes == 0:
        return (
            f"there are no classes (C=0), so every target must equal ignore_index={ignore_index}."
        )
    return (
        f"with C={num_classes} classes, class indices must be in [0, {num_classes - 1}] or equal "
        f"ignore_index={ignore_index}. Check the tokenizer's vocabulary size against the model's "
        "output size, and the padding label (ignore_index)."
    )


def _check_range_now(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Reads the targets (a host sync on an accelerator) and raises naming the first bad one."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        flat = bad.reshape(-1)
        idx = int(flat.nonzero()[0, 0])
        value = int(target.reshape(-1)[idx])
        count = int(flat.sum())
        raise CrossEntropyInputError(
            f"Target {value} is out of bounds (at flattened position {idx}; {count} such "
            f"target{'s' if count > 1 else ''}): {_range_message(num_classes, ignore_index)}"
        )


# The same check as an opaque op with no output, for where values cannot be read while the call
# is traced: torch.compile (it runs when the graph runs), FakeTensorMode (the fake does nothing)
# and vmap (the rule checks the whole batch at once). Marked side-effectful so that the compiler
# keeps it although nothing uses its (absent) output.
@torch.library.custom_op("triton_xent::check_target_range", mutates_args=())
def _check_range_op(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if target.device.type != "cpu" and torch.cuda.is_available() and (
            torch.cuda.is_current_stream_capturing()):
        # Inside a CUDA graph nothing may sync: a device-side assert (fatal to the context).
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        torch._assert_async(
            ~bad.any(),
            f"triton_xent: a target is out of bounds: {_range_message(num_classes, ignore_index)}",
        )
        return
    _check_range_now(target, num_classes, ignore_index)


@_check_range_op.register_fake
def _(target, num_classes, ignore_index):
    return None


@_check_range_op.register_vmap
def _(info, in_dims, target, num_classes, ignore_index):
    _check_range_op(target, num_classes, ignore_index)  # the physical tensor: every batch
    return None, None


torch.fx.node.has_side_effect(torch.ops.triton_xent.check_target_range.default)


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises :class:`CrossEntropyInputError` if a class index (other than ``ignore_index``) is
    outside ``[0, C-1]``, naming the first one.

    Eager, it reads the targets at once (a host sync on an accelerator). Where values cannot be
    read while the call is traced -- under torch.compile, FakeTensorMode, vmap (and vmap inside
    torch.compile) -- the check is an opaque op in the graph that raises the same error when the
    graph runs, for the whole batch under vmap; FakeTensorMode runs nothing, so checks nothing.
    Inside a CUDA graph capture (eager or compiled) nothing may sync: there it is a device-side
    assert (``torch._assert_async``), fatal to the CUDA context when it fires.
    """
    if (torch.compiler.is_compiling() or is_fake(target) or target.device.type == "meta"
            or torch._C._functorch.is_functorch_wrapped_tensor(target)
            or (target.is_cuda and torch.cuda.is_current_stream_capturing())):
        _check_range_op(target, num_classes, ignore_index)
    else:
        _check_range_now(target, num_classes, ignore_index)
