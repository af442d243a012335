"""The functional API: PyTorch's signatures, validation, dispatch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validation as V
from .autograd import run_rows
from .dispatch import BackendChoice, choose_backend


class CrossEntropyAux(NamedTuple):
    """Extra outputs of ``return_aux=True``, for logging; they carry no gradient.

    ``lse``: float32 (float64 for float64 input) log-sum-exp of each row, shaped like a
    ``reduction="none"`` loss (after ``softcap``). ``z_loss``: the z-loss part of the loss,
    reduced like the loss (zero when ``z_loss=0``).
    """

    lse: torch.Tensor
    z_loss: torch.Tensor


def _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             validate):
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    # Checking the range of class indices needs their values: free on the CPU, a host sync on
    # an accelerator (only with validation on), impossible inside a torch.compile graph.
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check_values = V.validation_requested(validate) or (
        on_cpu and not torch.compiler.is_compiling()
    )
    return V.prepare(input, target, weight, ignore_index, check_values=check_values)


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
    V.check_logit_scale(logit_scale)
    div_t, inv_div = V.check_divisor(
        divisor, reduction, input.device if isinstance(input, torch.Tensor) else None)
    if process_group is not None:
        from .distributed import vocab_parallel_cross_entropy

        if logit_scale is not None or divisor is not None:
            raise V.CrossEntropyInputError(
                "logit_scale and divisor are not supported with a process group yet: scale the "
                "logits shard and divide the summed loss yourself."
            )

        # A group of one rank comes back here with process_group=None.
        return vocab_parallel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
            softcap=softcap, return_aux=return_aux, inplace_backward=inplace_backward,
            process_group=process_group, backend=backend, validate=validate,
            loss_dtype=loss_dtype,
        )
    p = _prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 validate)
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
