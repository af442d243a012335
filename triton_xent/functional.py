"""The functional API of ``cross_entropy``: PyTorch's signature, each check once, the ready call.

``cross_entropy`` and ``explain`` take the same arguments and share one builder
(:func:`_build`): it runs every check once, chooses the backend, agrees on the vocabulary shard
with the other ranks of a process group, and returns the call the op layer
(:mod:`triton_xent.ops.cross_entropy`) runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as checks
from . import dtensor, parallel
from .backends.protocol import Options, compute_dtype
from .dispatch import (
    BackendChoice,
    BackendUnavailableError,
    choose_backend,
    dtensor_given,
    group_size,
    serialised,
)
from .ops.cross_entropy import Call, in_transform, run

# Errors a rank raises on its own arguments: with a process group they are raised on every rank.
LOCAL_ERRORS = (checks.CrossEntropyInputError, BackendUnavailableError, ValueError, TypeError)


class CrossEntropyAux(NamedTuple):
    """Extra outputs of ``return_aux=True``, computed in the same pass as the loss.

    ``lse``: float32 (float64 for float64 input) log-sum-exp of each row, shaped like a
    ``reduction="none"`` loss (after ``logit_scale``, ``softcap`` and ``temperature``; ignored
    rows included). It is differentiable: a z-loss or any function of it can be added to the
    loss and backpropagated (one more pass over the logits in the backward).
    ``z_loss``: the z-loss part of the loss, reduced like the loss (zero when ``z_loss=0``),
    differentiable too.
    ``argmax`` and ``accuracy`` (``return_argmax=True``, else None): the predicted class of each
    row (int64, shaped like ``lse``; the first maximal class on a tie, or the first NaN, as
    ``torch.argmax``, of the logits as the loss sees them, after ``logit_scale``, ``softcap``
    and ``temperature``; -1 on rows whose target is ``ignore_index``), and the token accuracy, the
    fraction of the kept rows whose prediction is the target (0-d, ``lse``'s dtype; NaN when
    every row is ignored, not class-weighted; None for class-probability targets).
    ``entropy`` (``return_entropy=True``, else None): each row's entropy
    ``-sum_c p_c log p_c`` (``0 log 0 = 0``) of the distribution the loss sees (after
    ``logit_scale``, ``softcap`` and ``temperature``), shaped and typed like ``lse``, ignored
    rows included, computed in the same pass (one more merged statistic) and differentiable:
    its gradient ``-p (log p + H)`` joins the loss's in one pass over the logits.
    """

    lse: torch.Tensor
    z_loss: torch.Tensor
    argmax: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def predictions(argmax: torch.Tensor, target: torch.Tensor, ignore_index: int, probs: bool,
                dtype: torch.dtype):
    """``(argmax, accuracy)`` of the aux tuple from the rows' arg-max (``target`` as rows)."""
    if probs:
        return argmax, None
    kept = target != ignore_index
    argmax = torch.where(kept, argmax, torch.full_like(argmax, -1))
    accuracy = ((argmax == target) & kept).sum().to(dtype) / kept.sum().to(dtype)
    return argmax, accuracy


class _Built(NamedTuple):
    """What :func:`_build` returns: the ready ``call`` (None when there are no classes: PyTorch's
    result needs no backend), the problem as rows, the backend choice and the in-place flag."""

    call: Call | None
    problem: checks.Problem
    choice: BackendChoice | None
    inplace: bool
    empty: tuple = ()  # no classes: (reduction, z_loss, loss_dtype, divisor, 1 / divisor)


def _build(a: dict, *, group) -> _Built:
    """Every check of one call, once, and the call as the op layer takes it (``a``: the public
    function's arguments, by name)."""
    input, target, weight, ignore_index = a["input"], a["target"], a["weight"], a["ignore_index"]
    reduction = a["reduction"]
    if a["size_average"] is not None or a["reduce"] is not None:
        reduction = checks.legacy_reduction(a["size_average"], a["reduce"], reduction)
    smoothing, z_loss, softcap = checks.check_options(
        reduction, a["label_smoothing"], a["z_loss"], a["softcap"], ignore_index)
    logit_scale, temperature = checks.check_extras(a)
    validating = checks.validation_requested(a["validate"])
    loss_dtype = checks.autocast_loss_dtype(input, a["loss_dtype"])
    is_tensor = isinstance(input, torch.Tensor)
    div_t, inv_div = None, 1.0
    if a["divisor"] is not None:
        div_t, inv_div = checks.check_divisor(a["divisor"], reduction,
                                              input.device if is_tensor else None)
    sharded = group is not None
    if sharded and is_tensor and input.dim() >= 1 and isinstance(weight, torch.Tensor) and (
            weight.dim() == 1 and weight.shape[0] != input.shape[min(1, input.dim() - 1)]):
        raise checks.CrossEntropyInputError(  # a clearer message than the shape check's
            f"weight has {weight.shape[0]} entries but this rank's logits have "
            f"V_local={input.shape[min(1, input.dim() - 1)]} classes: with a process group, "
            "weight is this rank's shard of the class weights (the same slice of the vocabulary "
            "as the logits).")
    # The range of class indices: always on the CPU (free), on an accelerator only with
    # validation on (a host sync); under torch.compile it runs when the graph runs. With a
    # process group the ids are global: checked once the ranks agree on the vocabulary.
    on_cpu = is_tensor and input.device.type == "cpu"
    p = checks.prepare(input, target, weight, ignore_index,
                       check_values=(validating or on_cpu) and not sharded)
    if p.probs and ignore_index >= 0:
        raise checks.CrossEntropyInputError(
            f"ignore_index={ignore_index} with class-probability targets: PyTorch refuses a "
            "non-negative ignore_index with floating-point targets ('ignore_index is not supported "
            "for floating point target'), as no row has a class to compare. Pass class indices, "
            "or leave ignore_index negative (it then has no effect, as in PyTorch).")
    if p.logits.shape[1] == 0 and not sharded:
        return _Built(None, p, None, False, (reduction, z_loss, loss_dtype, div_t, inv_div))
    if (p.weight is not None and not p.probs and p.weight.requires_grad
            and torch.is_grad_enabled()):
        raise checks.CrossEntropyInputError(
            "weight requires grad, but cross-entropy with class-index targets is not "
            "differentiable with respect to the class weights (PyTorch raises too: "
            "'nll_loss_forward is not differentiable with respect to argument weight'). "
            "Pass weight.detach().")
    choice = choose_backend(p.logits, probs=p.probs, backend=a["backend"])
    logits = p.logits
    if choice.backend == "triton" and logits.stride(-1) != 1:
        logits = logits.contiguous()
    # In place only where something is written: eagerly, with a gradient to make. Under
    # torch.compile and functorch transforms the gradient gets its own buffer.
    inplace = bool(a["inplace_backward"]) and torch.is_grad_enabled() and (
        logits.requires_grad and not torch.compiler.is_compiling()
        and not in_transform(logits, p.target))
    if inplace:
        checks.check_inplace(input, logits)
    # Ignored rows' statistics are made when a gradient may follow (grad mode: requires_grad
    # is not seen through vmap's batched tensors): an ignored row's gradient is PyTorch's
    # 0 x softmax, NaN where a logit is NaN or +inf.
    opts = Options(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                   z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, inv_divisor=inv_div,
                   all_rows=bool(a["return_aux"]) or torch.is_grad_enabled(),
                   argmax=bool(a["return_argmax"]),
                   backend=choice.backend, probs=p.probs, out_dtype=loss_dtype or input.dtype,
                   group="" if group is None else group.group_name, temperature=temperature,
                   entropy=bool(a["return_entropy"]))
    return _Built(Call(logits, p.target, p.weight, div_t, opts), p, choice, inplace)


def _no_classes(built: _Built, a: dict):
    """C=0: PyTorch's results, with nothing for a backend to compute. A row's loss is 0 when its
    target is ignored (or for probabilities: an empty sum), NaN for an unchecked out-of-range
    target; ``"mean"`` is NaN (0/0, as PyTorch); the gradient is empty."""
    p = built.problem
    reduction, z_loss, loss_dtype, div_t, inv_div = built.empty
    input = a["input"]
    cdt = compute_dtype(input.dtype)
    rows = p.logits.to(cdt).sum(1)  # zeros, on the autograd graph of the input
    if not p.probs:
        rows = rows.masked_fill(p.target != a["ignore_index"], float("nan"))
    if reduction == "none":
        loss = rows.view(p.batch_shape)
    elif reduction == "sum":
        loss = rows.sum() / div_t.to(cdt) if div_t is not None else rows.sum() * inv_div
    else:
        loss = rows.sum() * float("nan")
    loss = loss.to(loss_dtype or input.dtype)
    if not a["return_aux"]:
        return loss
    lse = torch.full(p.batch_shape, float("-inf"), dtype=cdt, device=rows.device)
    aux = CrossEntropyAux(lse, torch.zeros_like(loss, dtype=cdt).detach())
    if a["return_argmax"]:  # no class to predict
        am, acc = predictions(torch.full_like(p.target, -1), p.target, a["ignore_index"], p.probs,
                              cdt)
        aux = aux._replace(argmax=am.view(p.batch_shape), accuracy=acc)
    if a["return_entropy"]:  # an empty sum
        aux = aux._replace(entropy=torch.zeros_like(lse))
    return loss, aux


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
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
    validate: bool | None = None,
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
    temperature: float | None = None,
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
        return_entropy: with ``return_aux``, also fill ``aux.entropy`` (each row's entropy,
            differentiable; see :class:`CrossEntropyAux`). Off by default.
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
            global class ids, the same on every rank. See :mod:`triton_xent.parallel`.
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
        temperature: divide the logits by this last, as a sampler does:
            ``softcap * tanh(logit_scale * x / softcap) / temperature`` (a positive number or
            0-d tensor). With a softcap, ``logit_scale=1/T`` is a different function; this is
            the distribution sampled at temperature ``T``. ``aux.lse`` and ``aux.argmax`` are
            those of the logits as the loss sees them (the argmax does not change).

    Returns:
        The loss (0-d, or shaped like the target for ``"none"``), and the aux tuple when asked.

    Examples::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(0, 32000, (8,))
        >>> loss = triton_xent.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    a = dict(locals())
    if dtensor_given(input, target, weight, divisor):  # local shards, the mesh's group
        return dtensor.call_cross_entropy(cross_entropy, a)
    group = None
    if process_group is not None and group_size(process_group) > 1:
        group = process_group
    built = error = None
    try:
        built = _build(a, group=group)
    except LOCAL_ERRORS as exc:
        if group is None:
            raise
        error = exc  # raised on every rank by the agreement below
    call = built.call if built is not None else None
    if group is not None:
        shard = parallel.agree_call(
            group, parallel.KIND_CE, call, error, validate=checks.validation_requested(validate),
            device=input.device if isinstance(input, torch.Tensor) else torch.device("cpu"))
        call = call._replace(shard=shard)
    elif call is None:
        return _no_classes(built, a)
    loss, lse, z_term, ent, argmax = run(call, inplace=built.inplace)
    shape = built.problem.batch_shape
    if call.opts.reduction == "none":
        loss, z_term = loss.view(shape), z_term.view(shape)
    if not return_aux:
        return loss
    aux = CrossEntropyAux(lse.view(shape), z_term)
    if return_argmax:
        am, acc = predictions(argmax, call.target, ignore_index, call.opts.probs, lse.dtype)
        aux = aux._replace(argmax=am.view(shape), accuracy=acc)
    if return_entropy:
        aux = aux._replace(entropy=ent.view(shape))
    return loss, aux


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
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
    validate: bool | None = None,
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
    temperature: float | None = None,
) -> BackendChoice:
    """Which backend ``cross_entropy`` would run for these arguments, and why; runs nothing.

    Takes every argument of :func:`cross_entropy` and raises the same argument errors as the
    call would. With a ``process_group`` of several ranks the choice is each rank's, for its
    shard of the logits.

    Examples::

        >>> triton_xent.explain(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
        BackendChoice(backend='torch', reason='input is on cpu; the Triton kernel needs ...')
    """
    a = dict(locals())
    if dtensor_given(input, target, weight, divisor):
        return dtensor.call_cross_entropy(explain, a)
    world = group_size(process_group)
    built = _build(a, group=process_group if world > 1 else None)
    if built.call is None:
        return BackendChoice("torch", "no classes (C=0): PyTorch's result needs no kernel")
    if world > 1:
        return BackendChoice(built.choice.backend,
                             f"{built.choice.reason}; vocabulary parallel over {world} ranks")
    return built.choice
