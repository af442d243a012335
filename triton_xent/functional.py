"""The functional API: PyTorch's signatures, validation, dispatch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as V
from .autograd import run_rows
from .dispatch import BackendChoice, choose_backend, requested_backend, serialised


class CrossEntropyAux(NamedTuple):
    """Extra outputs of ``return_aux=True``, for logging; they carry no gradient.

    ``lse``: float32 (float64 for float64 input) log-sum-exp of each row, shaped like a
    ``reduction="none"`` loss (after ``softcap``). ``z_loss``: the z-loss part of the loss,
    reduced like the loss (zero when ``z_loss=0``).
    """

    lse: torch.Tensor
    z_loss: torch.Tensor


class _Args(NamedTuple):
    """The keyword arguments after the checks, as the op takes them."""

    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    loss_dtype: torch.dtype | None
    divisor: torch.Tensor | None  # a tensor divisor, or None
    inv_divisor: float  # 1 / a number divisor, else 1.0


def _check_args(input, ignore_index, size_average, reduce, reduction, label_smoothing, z_loss,
                softcap, validate, process_group, loss_dtype, divisor, logit_scale,
                backend) -> _Args:
    """Every check of the keywords, shared by ``cross_entropy`` and ``explain``: PyTorch's legacy
    ``size_average``/``reduce``, option ranges, ``TRITON_XENT_VALIDATE``, the loss dtype (fp32
    under autocast for 16-bit logits, as ``F.cross_entropy``), ``logit_scale``, ``divisor``."""
    reduction = V.legacy_reduction(size_average, reduce, reduction)
    label_smoothing, z_loss, softcap = V.check_options(
        reduction, label_smoothing, z_loss, softcap, ignore_index)
    V.validation_requested(validate)  # a bad value, or environment variable, raises here
    requested_backend(backend)  # likewise
    loss_dtype = V.autocast_loss_dtype(input, V.check_loss_dtype(loss_dtype))
    V.check_logit_scale(logit_scale)
    div_t, inv_div = V.check_divisor(
        divisor, reduction, input.device if isinstance(input, torch.Tensor) else None)
    if process_group is not None and (logit_scale is not None or divisor is not None):
        raise V.CrossEntropyInputError(
            "logit_scale and divisor are not supported with a process group yet: scale the "
            "logits shard and divide the summed loss yourself."
        )
    return _Args(reduction, label_smoothing, z_loss, softcap, loss_dtype, div_t, inv_div)


def _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             validate):
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    # The range of class indices: always on the CPU (free), on an accelerator only with
    # validation on (a host sync); under torch.compile it runs when the graph runs.
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check_values = V.validation_requested(validate) or on_cpu
    return V.prepare(input, target, weight, ignore_index, check_values=check_values)


def _no_classes(p, input, ignore_index, reduction, z_loss, loss_dtype, return_aux, div_t, inv_div):
    """C=0: PyTorch's results, with nothing for a backend to compute. A row's loss is 0 when its
    target is ignored (or for probabilities: an empty sum), NaN for an unchecked out-of-range
    target; ``"mean"`` is NaN (0/0, as PyTorch); the gradient is empty."""
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
    rows = p.logits.to(cdt).sum(1)  # zeros, on the autograd graph of the input
    if not p.probs:
        rows = rows.masked_fill(p.target != ignore_index, float("nan"))
    if reduction == "none":
        loss = rows.view(p.batch_shape)
    elif reduction == "sum":
        loss = rows.sum() / div_t.to(cdt) if div_t is not None else rows.sum() * inv_div
    else:
        loss = rows.sum() * float("nan")
    loss = loss.to(loss_dtype or input.dtype)
    if return_aux:
        lse = torch.full(p.batch_shape, float("-inf"), dtype=cdt, device=rows.device)
        return loss, CrossEntropyAux(lse, torch.zeros_like(loss, dtype=cdt).detach())
    return loss


@serialised
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
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
    inplace_backward: bool = False,
    backend: str | None = None,
    validate: bool | None = None,
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, CrossEntropyAux]:
    """Cross-entropy between logits and targets, a drop-in for ``F.cross_entropy``.

    Same positional arguments, defaults and results as :func:`torch.nn.functional.cross_entropy`
    (class-index or class-probability targets, class weights with the weighted mean, ignore_index,
    the three reductions, label smoothing; an all-ignored or empty ``"mean"`` is NaN, as in
    PyTorch). Internals are fp32 (fp64 for fp64 input); the loss has the input's dtype, or fp32
    for 16-bit logits under ``torch.autocast`` (as ``F.cross_entropy``, without an fp32 copy).

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; fp32, fp16, bf16 or fp64.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64; other integer
            dtypes are converted), or class probabilities with the input's shape.
        weight: ``(C,)`` rescaling factor per class.
        size_average: deprecated, as in PyTorch: with ``reduce``, when either is given, it
            decides the reduction by PyTorch's legacy rule (with its deprecation warning).
            Only bools: an int here is taken for an ``ignore_index`` passed in another order.
        ignore_index: targets equal to it add nothing to the loss or the gradient.
        reduce: deprecated, see ``size_average``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``; a number or a 0-d tensor.
        z_loss: coefficient of ``lse**2`` added per kept row (PaLM's auxiliary loss); with
            ``"mean"`` it is averaged over the kept rows and not class-weighted.
        softcap: logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        return_aux: also return :class:`CrossEntropyAux` (per-row lse, z-loss term).
        inplace_backward: write the gradient over ``input``'s storage (no N x C buffer).
            ``input`` must not be read after the call, nor be a tensor that the op producing it
            saved for its own backward (a matmul's output is fine). Eager only.
        backend: ``"auto"`` (default, or ``TRITON_XENT_BACKEND``), ``"triton"`` or ``"torch"``.
        validate: check class indices on an accelerator too (a host sync; default from
            ``TRITON_XENT_VALIDATE``). Without it an out-of-range target gives a NaN loss for
            its row; on the CPU targets are always checked. Under torch.compile, vmap or
            FakeTensorMode the check is an op that raises when the graph runs.
        process_group: a ``torch.distributed`` group over which the classes are sharded
            (vocabulary parallelism): ``input`` then holds this rank's contiguous shard of the
            class dimension, in rank order, and ``weight`` the matching shard; ``target`` holds
            global class ids, the same on every rank. See :mod:`triton_xent.distributed`.
        loss_dtype: dtype of the returned loss (a floating ``torch.dtype``); default the
            input's, as PyTorch, and fp32 for 16-bit logits under ``torch.autocast``. The loss
            is computed in fp32 either way: ``torch.float32`` keeps it unrounded for bf16 logits
            (what a logged loss, or a sum later divided by a token count, wants).
        divisor: with ``reduction="sum"``, divide the loss (cross-entropy and z-loss) by this
            number or 0-d tensor on the logits' device, inside the op: the gradient is computed
            already divided, so ``loss.backward()`` costs no extra pass over the logits. Pass
            Hugging Face's ``num_items_in_batch`` here (gradient accumulation).
        logit_scale: multiply the logits by this (in fp32, before ``softcap`` and the softmax),
            as Cohere (``config.logit_scale``) and Granite (``1 / config.logits_scaling``) heads
            do; the gradient is with respect to the unscaled input.

    Returns:
        The loss (0-d, or shaped like the target for ``"none"``), and the aux tuple when asked.

    Examples::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(0, 32000, (8,))
        >>> loss = triton_xent.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    a = _check_args(input, ignore_index, size_average, reduce, reduction, label_smoothing, z_loss,
                    softcap, validate, process_group, loss_dtype, divisor, logit_scale,
                    backend)
    reduction, label_smoothing, z_loss, softcap = a.reduction, a.label_smoothing, a.z_loss, a.softcap
    loss_dtype, div_t, inv_div = a.loss_dtype, a.divisor, a.inv_divisor
    if process_group is not None:
        from .distributed import vocab_parallel_cross_entropy

        # A group of one rank comes back here with process_group=None.
        return vocab_parallel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
            softcap=softcap, return_aux=return_aux, inplace_backward=inplace_backward,
            process_group=process_group, backend=backend, validate=validate,
            loss_dtype=loss_dtype,
        )
    p = _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 validate)
    if p.logits.shape[1] == 0:
        return _no_classes(p, input, ignore_index, reduction, z_loss, loss_dtype, return_aux,
                           div_t, inv_div)
    choice = choose_backend(p.logits, probs=p.probs, backend=backend)
    logits = p.logits
    if choice.backend == "triton" and logits.stride(-1) != 1:
        logits = logits.contiguous()
    args = (logits, p.target, p.weight, ignore_index, reduction, float(label_smoothing),
            float(z_loss), None if softcap is None else float(softcap), choice.backend, p.probs,
            None if logit_scale is None else float(logit_scale), div_t, inv_div)
    if inplace_backward and logits.requires_grad and logits.data_ptr() != input.data_ptr():
        raise V.CrossEntropyInputError(
            "inplace_backward=True needs the logits as rows (N, C) with a unit-stride class "
            "dimension; this input needed a copy, so nothing would be saved. Pass "
            "input.view(-1, C) of a contiguous (B, T, C) tensor, or drop inplace_backward."
        )
    loss, lse, z_term = run_rows(*args, inplace_backward)
    if reduction == "none":
        loss = loss.view(p.batch_shape)
        z_term = z_term.view(p.batch_shape)
    loss = loss.to(loss_dtype or input.dtype)
    if return_aux:
        return loss, CrossEntropyAux(lse.view(p.batch_shape), z_term)
    return loss


def explain(
    input: torch.Tensor,
    target: torch.Tensor,
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
    inplace_backward: bool = False,
    backend: str | None = None,
    validate: bool | None = None,
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> BackendChoice:
    """Which backend ``cross_entropy`` would run for these arguments, and why; runs nothing.

    Takes every argument of :func:`cross_entropy` and raises the same argument errors as the
    call would. With a ``process_group`` of several ranks the choice is each rank's, for its
    shard of the logits.

    Examples::

        >>> triton_xent.explain(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
        BackendChoice(backend='torch', reason='input is on cpu; the Triton kernel needs ...')
    """
    a = _check_args(input, ignore_index, size_average, reduce, reduction, label_smoothing, z_loss,
                    softcap, validate, process_group, loss_dtype, divisor, logit_scale,
                    backend)
    p = _prepare(input, target, weight, ignore_index, a.reduction, a.label_smoothing, a.z_loss,
                 a.softcap, validate)
    if p.logits.shape[1] == 0:
        return BackendChoice("torch", "no classes (C=0): PyTorch's result needs no kernel")
    world = 1
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        if world > 1 and p.probs:
            raise V.CrossEntropyInputError(
                "class-probability targets are not supported with a process group: pass class "
                "ids (global, the same on every rank)."
            )
    choice = choose_backend(p.logits, probs=p.probs, backend=backend)
    if world > 1:
        return BackendChoice(choice.backend,
                             f"{choice.reason}; vocabulary parallel over {world} ranks")
    return choice
