"""The functional API: PyTorch's signatures, validation, dispatch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as V
from ._options import CEOptions
from .autograd import run
from .dispatch import BackendChoice, BackendUnavailableError, choose_backend
from .parallel import KIND_CE, Shard, agree, ce_options, world_size
from .pipeline import Call


class CrossEntropyAux(NamedTuple):
    """Extra outputs of ``return_aux=True``, for logging; they carry no gradient.

    ``lse``: float32 (float64 for float64 input) log-sum-exp of each row, shaped like a
    ``reduction="none"`` loss (after ``softcap``). ``z_loss``: the z-loss part of the loss,
    reduced like the loss (zero when ``z_loss=0``).
    """

    lse: torch.Tensor
    z_loss: torch.Tensor


def _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             validate, check_values=True):
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    # Checking the range of class indices needs their values: free on the CPU, a host sync on
    # an accelerator (only with validation on), impossible inside a torch.compile graph. With a
    # process group the ids are global: checked after the ranks agree on the vocabulary.
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check_values = check_values and (V.validation_requested(validate) or (
        on_cpu and not torch.compiler.is_compiling()))
    return V.prepare(input, target, weight, ignore_index, check_values=check_values)


_LOCAL_ERRORS = (V.CrossEntropyInputError, BackendUnavailableError, ValueError, TypeError)


def _build_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                return_aux, inplace_backward, backend, validate, loss_dtype, divisor, logit_scale,
                *, check_values: bool):
    """Validates the arguments and normalises them to rows: ``(Call, Problem)``."""
    V.check_logit_scale(logit_scale)
    div_t, inv_div = V.check_divisor(
        divisor, reduction, input.device if isinstance(input, torch.Tensor) else None)
    if not check_values and isinstance(input, torch.Tensor) and input.dim() >= 1 and isinstance(
            weight, torch.Tensor) and weight.dim() == 1:
        c_local = input.shape[0] if input.dim() == 1 else input.shape[1]
        if weight.shape[0] != c_local:  # sharded: a clearer message than the shape check's
            raise V.CrossEntropyInputError(
                f"weight has {weight.shape[0]} entries but this rank's logits have "
                f"V_local={c_local} classes: with a process group, weight is this rank's shard of "
                "the class weights (the same slice of the vocabulary as the logits).")
    p = _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 validate if check_values else False, check_values=check_values)
    if p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled():
        raise V.CrossEntropyInputError(
            "weight requires grad, but cross-entropy is not differentiated with respect to the "
            "class weights (PyTorch raises too: 'the derivative for weight is not implemented'). "
            "Pass weight.detach()."
        )
    choice = choose_backend(p.logits, probs=p.probs, backend=backend)
    logits = p.logits
    if choice.backend == "triton" and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if inplace_backward and logits.requires_grad:
        V.check_inplace(input, logits)
    opts = CEOptions(ignore_index, reduction, float(label_smoothing), float(z_loss),
                     None if softcap is None else float(softcap),
                     None if logit_scale is None else float(logit_scale), inv_div,
                     all_rows=bool(return_aux))
    call = Call(logits, p.target, p.weight, div_t, opts, choice.backend, p.probs,
                loss_dtype or input.dtype)
    return call, p


def _with_shard(call, group, error, input, target, validate):
    """Agrees on the shard with the other ranks (raising there too on a local error) and checks
    class ids against the global vocabulary."""
    if torch.compiler.is_compiling():  # the op agrees at run time (see parallel.py)
        return call._replace(shard=Shard(group, -1, -1, -1))
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    ok = call is not None
    opts = call.opts if ok else None
    options = ce_options(opts, divisor=call.divisor, weight=call.weight,
                         probs=call.probs) if ok else ()
    shard = agree(group, device, kind=KIND_CE, error=error,
                  N=call.logits.shape[0] if ok else -1, V_local=call.logits.shape[1] if ok else -1,
                  weight_len=call.weight.shape[0] if ok and call.weight is not None else -1,
                  bias_len=-1, D=-1, dtype=call.logits.dtype if ok else None, options=options,
                  validate=V.validation_requested(validate), target=call.target if ok else None)
    on_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
    if (V.validation_requested(validate) or on_cpu) and not call.probs and call.target.numel():
        V.check_target_range(call.target, shard.vocab_size, opts.ignore_index)
    return call._replace(shard=shard)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
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
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, CrossEntropyAux]:
    """Cross-entropy between logits and targets, a drop-in for ``F.cross_entropy``.

    Same positional arguments, defaults and results as :func:`torch.nn.functional.cross_entropy`
    (class-index or class-probability targets, class weights with the weighted mean, ignore_index,
    the three reductions, label smoothing; an all-ignored or empty ``"mean"`` is NaN, as in
    PyTorch). Internals are fp32 (fp64 for fp64 input); the loss has the input's dtype.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; fp32, fp16, bf16 or fp64.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64; other integer
            dtypes are converted), or class probabilities with the input's shape.
        weight: ``(C,)`` rescaling factor per class.
        ignore_index: targets equal to it add nothing to the loss or the gradient.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``.
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
            its row; on the CPU targets are always checked.
        process_group: a ``torch.distributed`` group over which the classes are sharded
            (vocabulary parallelism): ``input`` then holds this rank's contiguous shard of the
            class dimension, in rank order, and ``weight`` the matching shard; ``target`` holds
            global class ids, the same on every rank. See :mod:`triton_xent.distributed`.
        loss_dtype: dtype of the returned loss; default the input's, as PyTorch. The loss is
            computed in fp32 either way: ``torch.float32`` keeps it unrounded for bf16 logits
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
    group = process_group if world_size(process_group) > 1 else None
    error = call = None
    try:
        call, p = _build_call(input, target, weight, ignore_index, reduction, label_smoothing,
                              z_loss, softcap, return_aux, inplace_backward, backend, validate,
                              loss_dtype, divisor, logit_scale, check_values=group is None)
    except _LOCAL_ERRORS as exc:
        if group is None:
            raise
        error = exc  # raised on every rank by the agreement below
    if group is not None:
        call = _with_shard(call, group, error, input, target, validate)
    loss, lse, z_term, _ = run(call, inplace=bool(inplace_backward))
    if reduction == "none":
        loss = loss.view(p.batch_shape)
        z_term = z_term.view(p.batch_shape)
    if return_aux:
        return loss, CrossEntropyAux(lse.view(p.batch_shape), z_term)
    return loss


def explain(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str | None = None,
    **extras,
) -> BackendChoice:
    """Which backend ``cross_entropy`` would run for these arguments, and why; runs nothing.

    Raises the same argument errors as the call would. Examples::

        >>> triton_xent.explain(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
        BackendChoice(backend='torch', reason='input is on cpu; the Triton kernel needs ...')
    """
    unknown = set(extras) - {"z_loss", "softcap", "return_aux", "inplace_backward", "validate",
                             "divisor", "logit_scale"}
    if unknown:
        raise TypeError(f"explain() got unexpected keyword arguments {sorted(unknown)}")
    p = _prepare(input, target, weight, ignore_index, reduction, label_smoothing,
                 extras.get("z_loss", 0.0), extras.get("softcap"), extras.get("validate"))
    return choose_backend(p.logits, probs=p.probs, backend=backend)
