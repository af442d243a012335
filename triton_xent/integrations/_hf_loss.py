"""The loss of a patched Hugging Face model: transformers' ``ForCausalLMLoss`` by triton_xent.

``causal_lm_loss`` computes it from the logits (:func:`triton_xent.cross_entropy`), ``fused_loss``
from the LM head's input, weight and bias, and the model's logit scale and soft-cap
(:func:`triton_xent.linear_cross_entropy`). Both shift the labels (position t predicts label
t + 1, ``ignore_index`` at the end) or take ``shift_labels`` as given, and take the mean over
kept tokens, or the sum divided by ``num_items_in_batch`` inside the op (the divisor), so the
loss the model returns is the op's output and its upstream gradient is exactly 1.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..functional import cross_entropy
from ._hf_forward import HeadLayout


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of a patch; see :func:`patch`."""

    fused: bool = True
    eval_logits: bool = True
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    reduction: str = "mean"
    chunk_size: int | None = None
    accum_dtype: torch.dtype | None = None
    backend: str | None = None
    fsdp_schedule: str = "gathered"


# Token metrics (TRL's SFT ``entropy`` and ``mean_token_accuracy``) from the loss's own pass:
# while a list is collecting, each loss asks its op for the rows' entropy and arg-max too
# (``return_aux``; detached) and appends ``(entropy sum, correct, kept)`` over the kept rows.
_SINKS: list[list] = []


@contextlib.contextmanager
def collect_metrics():
    """Collects ``(entropy_sum, num_correct, num_kept)`` (0-d tensors) of each loss computed
    inside, from the same pass as the loss."""
    sink: list = []
    _SINKS.append(sink)
    try:
        yield sink
    finally:
        _SINKS.remove(sink)


def _metric_kwargs() -> dict:
    return dict(return_aux=True, return_argmax=True, return_entropy=True) if _SINKS else {}


def _record(out, target, ignore_index):
    """The loss of ``out``, its metrics appended to the innermost collecting list."""
    if not _SINKS:
        return out
    loss, aux = out
    local = [x.to_local() if hasattr(x, "to_local") else x
             for x in (aux.entropy, aux.argmax)]  # a tensor-parallel head: the same everywhere
    entropy, argmax = (x.detach().reshape(-1) for x in local)
    kept = target.reshape(-1) != ignore_index
    _SINKS[-1].append((torch.where(kept, entropy, 0).sum(), (argmax == target.reshape(-1)).sum(),
                       kept.sum()))
    return loss


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))
DEFAULT_OPTIONS = LossOptions()


def make_options(fused, eval_logits, z_loss, label_smoothing, reduction, chunk_size, accum_dtype,
                 backend, fsdp_schedule="gathered") -> LossOptions:
    """Checked options (the same errors as the op's, and one for head options without fusion)."""
    V.check_options(reduction, label_smoothing, z_loss, None, -100)
    if not fused and (chunk_size is not None or accum_dtype is not None):
        raise ValueError("chunk_size and accum_dtype configure the fused head; fused=False "
                         "builds the logits and has no use for them")
    if backend not in (None, "auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    from ..fsdp import SCHEDULES

    if fsdp_schedule not in SCHEDULES:
        raise ValueError(f"fsdp_schedule must be one of {SCHEDULES}, not {fsdp_schedule!r}")
    return LossOptions(bool(fused), bool(eval_logits), float(z_loss), float(label_smoothing),
                       reduction, chunk_size, accum_dtype, backend, fsdp_schedule)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    options: LossOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss`` computed by :func:`triton_xent.cross_entropy`.

    Same signature and result; the other keyword arguments a model forwards are ignored, as
    transformers does. ``options`` (default: none) adds z-loss, label smoothing, another
    reduction or backend. Usable directly as ``model.loss_function``.
    """
    options = options or DEFAULT_OPTIONS
    target, shape = _targets(labels, shift_labels, ignore_index)
    target = target.to(logits.device)
    loss = _record(cross_entropy(
        logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
        reduction=_op_reduction(options, num_items_in_batch), label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, backend=options.backend, loss_dtype=torch.float32,
        divisor=_divisor(num_items_in_batch, logits.device), **_metric_kwargs(),
    ), target, ignore_index)
    return loss.view(shape) if options.reduction == "none" else loss


def fused_loss(model, layout: HeadLayout, head, hidden, labels, vocab_size, num_items_in_batch,
               ignore_index, shift_labels, options):
    """The same loss from the head's input ``hidden`` (as captured), ``head.weight``/``bias``
    and the model's logit scale and soft-cap, by :func:`triton_xent.linear_cross_entropy`."""
    from ..fsdp import schedule as fsdp_schedule

    weight, bias = head.weight, head.bias
    check_weight(model, layout.head, weight, hidden.shape[-1])
    if isinstance(vocab_size, int) and vocab_size != weight.shape[0]:
        raise ValueError(
            f"{type(model).__name__}.{layout.head} has {weight.shape[0]} outputs but the model's "
            f"loss reads vocab_size={vocab_size}; triton_xent cannot fuse it (use fused=False)."
        )
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    target, shape = _targets(labels, shift_labels, ignore_index)
    target = target.to(weight.device)
    if hidden.shape[0] != target.numel():
        raise ValueError(
            f"{hidden.shape[0]} positions of hidden states (after logits_to_keep) but "
            f"{target.numel()} labels: they must match, as for the logits."
        )
    scale, softcap = head_values(model, layout)
    args = (hidden, weight, target, bias, ignore_index, options, num_items_in_batch, scale, softcap)
    if options.fsdp_schedule == "gathered":  # the default; nothing to set (nor to trace)
        loss = _fused(*args)
    else:
        with fsdp_schedule(options.fsdp_schedule):  # an FSDP2-sharded head, never gathered
            loss = _fused(*args)
    if hasattr(loss, "to_local"):  # a tensor-parallel head: the same loss on every rank
        loss = loss.to_local()
    return loss.view(shape) if options.reduction == "none" else loss


def _fused(hidden, weight, target, bias, ignore_index, options, num_items_in_batch, scale,
           softcap):
    from ..linear import linear_cross_entropy

    return _record(linear_cross_entropy(
        hidden, weight, target, linear_bias=bias, ignore_index=ignore_index,
        reduction=_op_reduction(options, num_items_in_batch), softcap=softcap,
        logit_scale=None if scale == 1.0 else scale, label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, chunk_size=options.chunk_size, accum_dtype=options.accum_dtype,
        backend=options.backend,
        loss_dtype=torch.float32,  # as transformers: an fp32 loss, not a bf16-rounded sum
        # the Trainer's normaliser divides inside the op: the loss's upstream gradient stays 1
        divisor=_divisor(num_items_in_batch, weight.device), **_metric_kwargs(),
    ), target, ignore_index)


def head_values(model, layout: HeadLayout):
    """(logit scale, soft-cap) of the model now, as its forward reads them."""
    scale = 1.0
    if layout.scale is not None:
        path, invert = layout.scale
        value = _read_path(model, path, optional=layout.scale_optional)
        if value is not None:
            value = _number(model, path, value)
            scale = 1.0 / value if invert else value
    softcap = None
    if layout.softcap is not None:
        value = _read_path(model, layout.softcap, optional=layout.softcap_optional)
        softcap = None if value is None else _number(model, layout.softcap, value)
    return scale, softcap


def _read_path(model, path, optional):
    if len(path) == 1 and isinstance(path[0], float):
        return path[0]
    obj = model
    for step in path:
        if isinstance(step, str):
            obj = getattr(obj, step)
        elif step[0] == "getattr":
            obj = getattr(obj, *step[1])
        else:
            name, args, kwargs = step
            obj = getattr(obj, name)(*args, **dict(kwargs))
    if obj is None and not optional:
        raise ValueError(f"{type(model).__name__}: {_path_str(path)} is None but the model's "
                         "forward uses it unconditionally")
    return obj


def _number(model, path, value):
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: {_path_str(path)} is a tensor; the fused head takes it as "
            "a Python number. Use fused=False (or set it to a float)."
        )
    return float(value)


def _path_str(path):
    return "self." + ".".join(s if isinstance(s, str) else f"{s[0]}(...)" for s in path)


def check_weight(model, name, weight, in_features):
    """The head's weight must be whole where the fused path reads it (outside its forward), or
    a DTensor (FSDP2's shards: :mod:`triton_xent.fsdp`; transformers' tensor-parallel head,
    the vocabulary-parallel path: :mod:`triton_xent.dtensor`)."""
    if weight.dim() != 2 or weight.shape[1] != in_features or weight.is_meta:
        raise RuntimeError(
            f"{type(model).__name__}.{name}.weight has shape {tuple(weight.shape)} on "
            f"{weight.device} outside the head's forward, not (vocab, {in_features}): it "
            "looks partitioned or offloaded (DeepSpeed ZeRO-3 releasing it, accelerate "
            "offloading?). The fused path reads the whole weight; use patch(model, fused=False)."
        )


def _targets(labels, shift_labels, ignore_index):
    """The flat targets of ``ForCausalLMLoss`` (position t predicts label t + 1), and their shape."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1), shift_labels.shape


def _op_reduction(options, num_items_in_batch):
    if options.reduction != "mean" and num_items_in_batch is not None:
        raise ValueError(
            f"reduction={options.reduction!r} returns the loss without normalising it, but "
            "num_items_in_batch was passed (the Trainer does, to normalise the loss over "
            "gradient accumulation): use reduction='mean', which divides the sum by it."
        )
    if options.reduction == "mean" and num_items_in_batch is not None:
        return "sum"
    return options.reduction


def _divisor(num_items_in_batch, device):
    """num_items_in_batch as the op's divisor: a number, or a 0-d tensor on the loss's device."""
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device, non_blocking=True)
    return num_items_in_batch
