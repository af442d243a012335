"""The functional API: PyTorch's signatures, validation, dispatch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as V
from . import dtensor
from ._options import CEOptions
from .autograd import run
from .dispatch import (
    BackendChoice,
    BackendUnavailableError,
    choose_backend,
    requested_backend,
    serialised,
)
from .parallel import KIND_CE, Shard, agree, ce_options, world_size
from .pipeline import Call


class CrossEntropyAux(NamedTuple):
    """Extra outputs of ``return_aux=True``, computed in the same pass as the loss.

    ``lse``: float32 (float64 for float64 input) log-sum-exp of each row, shaped like a
    ``reduction="none"`` loss (after ``logit_scale`` and ``softcap``; ignored rows included). It
    is differentiable: a z-loss or any function of it can be added to the loss and
    backpropagated (one more pass over the logits in the backward).
    ``z_loss``: the z-loss part of the loss, reduced like the loss (zero when ``z_loss=0``),
    differentiable too.
    ``argmax`` and ``accuracy`` (``return_argmax=True``, else None): the predicted class of each
    row (int64, shaped like ``lse``; the first maximal class on a tie, or the first NaN, as
    ``torch.argmax``, of the logits as the loss sees them, after ``logit_scale`` and
    ``softcap``; -1 on rows whose target is ``ignore_index``), and the token accuracy, the
    fraction of the kept rows whose prediction is the target (0-d, ``lse``'s dtype; NaN when
    every row is ignored, not class-weighted; None for class-probability targets).
    """

    lse: torch.Tensor
    z_loss: torch.Tensor
    argmax: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


def predictions(argmax: torch.Tensor, target: torch.Tensor, ignore_index: int, probs: bool,
                dtype: torch.dtype):
    """``(argmax, accuracy)`` of the aux tuple from the rows' arg-max (``target`` as rows)."""
    if probs:
        return argmax, None
    kept = target != ignore_index
    argmax = torch.where(kept, argmax, torch.full_like(argmax, -1))
    accuracy = ((argmax == target) & kept).sum().to(dtype) / kept.sum().to(dtype)
    return argmax, accuracy


def check_return_argmax(return_argmax, return_aux) -> None:
    if not isinstance(return_argmax, bool):
        raise V.CrossEntropyInputError(f"return_argmax={return_argmax!r} must be a bool.")
    if return_argmax and not return_aux:
        raise V.CrossEntropyInputError(
            "return_argmax=True fills CrossEntropyAux.argmax and .accuracy: pass return_aux=True "
            "too (the call then returns (loss, aux)).")


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
    return _Args(reduction, label_smoothing, z_loss, softcap, loss_dtype, div_t, inv_div)


def _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             validate, sharded=False):
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    if sharded and isinstance(input, torch.Tensor) and input.dim() >= 1 and isinstance(
            weight, torch.Tensor) and weight.dim() == 1:
        c_local = input.shape[0] if input.dim() == 1 else input.shape[1]
        if weight.shape[0] != c_local:  # a clearer message than the shape check's
            raise V.CrossEntropyInputError(
                f"weight has {weight.shape[0]} entries but this rank's logits have "
                f"V_local={c_local} classes: with a process group, weight is this rank's shard of "
                "the class weights (the same slice of the vocabulary as the logits).")
    # The range of class indices: always on the CPU (free), on an accelerator only with
    # validation on (a host sync); under torch.compile it runs when the graph runs. With a
    # process group the ids are global: checked once the ranks agree on the vocabulary.
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check_values = (V.validation_requested(validate) or on_cpu) and not sharded
    return V.prepare(input, target, weight, ignore_index, check_values=check_values)


_LOCAL_ERRORS = (V.CrossEntropyInputError, BackendUnavailableError, ValueError, TypeError)


def _build_call(input, target, weight, ignore_index, a, return_aux, inplace_backward, backend,
                validate, logit_scale, sharded, return_argmax=False):
    """The validated call, as rows: ``(Call, Problem)``, or ``(None, Problem)`` when there are
    no classes at all (one process)."""
    p = _prepare(input, target, weight, ignore_index, a.reduction, a.label_smoothing, a.z_loss,
                 a.softcap, validate, sharded)
    if p.logits.shape[1] == 0 and not sharded:
        return None, p
    if p.probs and ignore_index != -100:
        raise V.CrossEntropyInputError(
            f"ignore_index={ignore_index} with class-probability targets: PyTorch refuses it "
            "too ('ignore_index is not supported for floating point target'), as no row has a "
            "class to compare. Drop ignore_index, or pass class indices.")
    if (p.weight is not None and not p.probs and p.weight.requires_grad
            and torch.is_grad_enabled()):
        raise V.CrossEntropyInputError(
            "weight requires grad, but cross-entropy with class-index targets is not "
            "differentiable with respect to the class weights (PyTorch raises too: "
            "'nll_loss_forward is not differentiable with respect to argument weight'). "
            "Pass weight.detach()."
        )
    choice = choose_backend(p.logits, probs=p.probs, backend=backend)
    logits = p.logits
    if choice.backend == "triton" and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if inplace_backward and logits.requires_grad:
        V.check_inplace(input, logits)
    # Ignored rows' statistics are made when a gradient may follow (grad mode: requires_grad
    # is not seen through vmap's batched tensors): an ignored row's gradient is PyTorch's
    # 0 x softmax, NaN where a logit is NaN or +inf.
    all_rows = bool(return_aux) or torch.is_grad_enabled()
    opts = CEOptions(ignore_index, a.reduction, float(a.label_smoothing), float(a.z_loss),
                     None if a.softcap is None else float(a.softcap),
                     None if logit_scale is None else float(logit_scale), a.inv_divisor,
                     all_rows=all_rows, argmax=bool(return_argmax))
    call = Call(logits, p.target, p.weight, a.divisor, opts, choice.backend, p.probs,
                a.loss_dtype or input.dtype)
    return call, p


def _with_shard(call, group, error, input, validate):
    """Agrees on the shard with the other ranks (raising there too on a local error) and checks
    class ids against the global vocabulary."""
    if torch.compiler.is_compiling():
        # The exchange is a host sync, which a graph cannot trace: the op agrees at run time
        # (cached), and a local error raises here, on this rank (the others wait).
        if error is not None:
            raise error
        if V.validation_requested(validate):
            raise V.CrossEntropyInputError(
                "validate=True with a process group under torch.compile: the ranks' targets are "
                "compared with a host sync, which a compiled graph cannot do. Validate in an "
                "eager call (outside the compiled region), or drop validate.")
        return call._replace(shard=Shard(group, -1, -1, -1))
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    ok = call is not None
    options = ce_options(call.opts, divisor=call.divisor, weight=call.weight,
                         probs=call.probs) if ok else ()
    validating = V.validation_requested(validate)
    shard = agree(group, device, kind=KIND_CE, error=error,
                  N=call.logits.shape[0] if ok else -1, V_local=call.logits.shape[1] if ok else -1,
                  weight_len=call.weight.shape[0] if ok and call.weight is not None else -1,
                  bias_len=-1, D=-1, dtype=call.logits.dtype if ok else None, options=options,
                  validate=validating, target=call.target if ok else None)
    if (validating or device.type == "cpu") and not call.probs and call.target.numel():
        V.check_target_range(call.target, shard.vocab_size, call.opts.ignore_index)
    return call._replace(shard=shard)


def _no_classes(p, input, ignore_index, reduction, z_loss, loss_dtype, return_aux, div_t, inv_div,
                return_argmax=False):
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
        aux = CrossEntropyAux(lse, torch.zeros_like(loss, dtype=cdt).detach())
        if return_argmax:  # no class to predict
            am, acc = predictions(torch.full_like(p.target, -1), p.target, ignore_index, p.probs,
                                  cdt)
            aux = aux._replace(argmax=am.view(p.batch_shape), accuracy=acc)
        return loss, aux
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
    return_argmax: bool = False,
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
            Or a ``DTensor`` sharded on the classes (tensor parallelism): the group comes from
            its mesh and the loss is a ``Replicate()`` DTensor; see :mod:`triton_xent.dtensor`.
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
        return_aux: also return :class:`CrossEntropyAux`: per-row lse and the z-loss term,
            both differentiable.
        return_argmax: with ``return_aux``, also fill ``aux.argmax`` (each row's predicted
            class) and ``aux.accuracy`` (token accuracy over the kept rows), computed in the
            same pass (the kernels track the arg-max with the maximum). Off by default.
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
    if dtensor.given(input, target, weight, divisor):  # local shards, the mesh's group
        return dtensor.call_cross_entropy(cross_entropy, dict(locals()))
    group = process_group if world_size(process_group) > 1 else None
    error = call = p = None
    try:
        a = _check_args(input, ignore_index, size_average, reduce, reduction, label_smoothing,
                        z_loss, softcap, validate, process_group, loss_dtype, divisor, logit_scale,
                        backend)
        check_return_argmax(return_argmax, return_aux)
        call, p = _build_call(input, target, weight, ignore_index, a, return_aux,
                              inplace_backward, backend, validate, logit_scale, group is not None,
                              return_argmax)
    except _LOCAL_ERRORS as exc:
        if group is None:
            raise
        error = exc  # raised on every rank by the agreement below
    if group is not None:
        call = _with_shard(call, group, error, input, validate)
    elif call is None:
        return _no_classes(p, input, ignore_index, a.reduction, a.z_loss, a.loss_dtype,
                           return_aux, a.divisor, a.inv_divisor, return_argmax)
    loss, lse, z_term, argmax = run(call, inplace=bool(inplace_backward))
    if a.reduction == "none":
        loss = loss.view(p.batch_shape)
        z_term = z_term.view(p.batch_shape)
    if return_aux:
        aux = CrossEntropyAux(lse.view(p.batch_shape), z_term)
        if return_argmax:
            am, acc = predictions(argmax, call.target, ignore_index, call.probs, lse.dtype)
            aux = aux._replace(argmax=am.view(p.batch_shape), accuracy=acc)
        return loss, aux
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
    return_argmax: bool = False,
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
    if dtensor.given(input, target, weight, divisor):
        return dtensor.call_cross_entropy(explain, dict(locals()))
    a = _check_args(input, ignore_index, size_average, reduce, reduction, label_smoothing, z_loss,
                    softcap, validate, process_group, loss_dtype, divisor, logit_scale,
                    backend)
    check_return_argmax(return_argmax, return_aux)
    world = world_size(process_group)
    p = _prepare(input, target, weight, ignore_index, a.reduction, a.label_smoothing, a.z_loss,
                 a.softcap, validate, sharded=world > 1)
    if p.logits.shape[1] == 0 and world == 1:
        return BackendChoice("torch", "no classes (C=0): PyTorch's result needs no kernel")
    choice = choose_backend(p.logits, probs=p.probs, backend=backend)
    if world > 1:
        return BackendChoice(choice.backend,
                             f"{choice.reason}; vocabulary parallel over {world} ranks")
    return choice
