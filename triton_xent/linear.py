"""``linear_cross_entropy``: the LM head and the loss in one op, without the ``(N, V)`` logits.

The functional API (PyTorch's signature, each check once, the ready call); the op layer is
:mod:`triton_xent.ops.linear_cross_entropy` and the chunk loop :mod:`triton_xent.ops.linear_chunks`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _validation as V
from . import dtensor, parallel
from .backends.protocol import Options
from .dispatch import choose_backend, dtensor_given, group_size, serialised
from .functional import LOCAL_ERRORS, CrossEntropyAux, cross_entropy, predictions
from .ops.linear_chunks import default_chunk_rows
from .ops.linear_cross_entropy import LinearCall, run


class _Problem(NamedTuple):
    x: torch.Tensor  # (N, D)
    target: torch.Tensor  # (N,) int64
    weight: torch.Tensor | None
    batch_shape: tuple[int, ...]


def _check_linear(input, linear_weight, linear_bias, target) -> None:
    """Shapes, dtypes and devices of the linear part; the messages say how to fix them."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise V.CrossEntropyInputError(f"{name} must be a tensor, got {type(t).__name__}.")
    if input.dtype not in V.FLOAT_DTYPES or input.dim() == 0:
        raise V.CrossEntropyInputError(
            f"input must be a floating-point tensor of shape (..., D) (the hidden states), got "
            f"{input.dtype} {V.shape_str(input.shape)}."
        )
    D = input.shape[-1]
    if linear_weight.dim() != 2:
        raise V.CrossEntropyInputError(
            f"linear_weight must be (V, D) = (num_classes, in_features), got "
            f"{V.shape_str(linear_weight.shape)}. K-dimensional heads (C, d1, ..., D) are not "
            "supported: use torch.nn.functional.linear_cross_entropy for those."
        )
    if linear_weight.shape[1] != D:
        hint = " It looks transposed: pass lm_head.weight, shape (V, D)." if (
            linear_weight.shape[0] == D) else ""
        raise V.CrossEntropyInputError(
            f"linear_weight {V.shape_str(linear_weight.shape)} does not match input "
            f"{V.shape_str(input.shape)}: its second dimension must be the input's last, D={D}.{hint}"
        )
    tensors = [("linear_weight", linear_weight)]
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (
                linear_weight.shape[0],):
            raise V.CrossEntropyInputError(
                f"linear_bias must have shape ({linear_weight.shape[0]},), one value per class, "
                f"got {V.shape_str(getattr(linear_bias, 'shape', ()))}."
            )
        tensors.append(("linear_bias", linear_bias))
    for name, t in tensors:
        if t.device != input.device:
            raise V.CrossEntropyInputError(
                f"{name} is on {t.device} but input is on {input.device}: move it."
            )
        if t.dtype != input.dtype:
            raise V.CrossEntropyInputError(
                f"{name} is {t.dtype} but input is {input.dtype}: the matmul needs one dtype. "
                f"Cast one of them, or run under torch.autocast."
            )


def _prepare(input, linear_weight, linear_bias, target, weight, ignore_index, check_values):
    _check_linear(input, linear_weight, linear_bias, target)
    batch_shape = tuple(input.shape[:-1])
    if tuple(target.shape) != batch_shape:
        hint = ""
        if target.dim() and tuple(target.shape[:-1]) == batch_shape and target.shape[-1] == 1:
            hint = " Remove the trailing dimension: target.squeeze(-1)."
        elif target.numel() == math.prod(batch_shape):
            hint = f" Reshape it: target.view{V.shape_str(batch_shape)}."
        raise V.CrossEntropyInputError(
            f"Expected target shape {V.shape_str(batch_shape)} (the input's shape without its last "
            f"dimension D) for input {V.shape_str(input.shape)}, got {V.shape_str(target.shape)}.{hint}"
        )
    N, D, Vn = math.prod(batch_shape), input.shape[-1], linear_weight.shape[0]
    # Checks of the target dtype, class weights and index range, on a zero-stride stand-in for
    # the (N, V) logits (no memory).
    logits_like = input.new_zeros(()).expand(N, Vn)
    p = V.prepare(logits_like, target.reshape(N), weight, ignore_index, check_values=check_values)
    return _Problem(input.reshape(N, D), p.target, p.weight, batch_shape)


def _resolve_chunk_rows(chunk_size, chunk_bytes, N: int, D: int, num_classes: int,
                        dtype: torch.dtype, weight_dtype: torch.dtype, fp32_accum: bool) -> int:
    if chunk_size is not None and chunk_bytes is not None:
        raise V.CrossEntropyInputError("pass chunk_size (rows) or chunk_bytes, not both.")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise V.CrossEntropyInputError(
                f"chunk_size={chunk_size!r} must be a positive int (rows per chunk), or None."
            )
        return chunk_size
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(
            chunk_bytes, int) or chunk_bytes < 1):
        raise V.CrossEntropyInputError(
            f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes of the logits chunk)."
        )
    return default_chunk_rows(N, D, num_classes, dtype, weight_dtype=weight_dtype,
                              fp32_accum=fp32_accum, chunk_bytes=chunk_bytes)


def _resolve_fp32_accum(accum_dtype, weight_dtype: torch.dtype) -> bool:
    if accum_dtype is None or accum_dtype == weight_dtype:
        return False
    if accum_dtype == torch.float32 and weight_dtype in V.HALF:
        return True
    raise V.CrossEntropyInputError(
        f"accum_dtype={accum_dtype} with a {weight_dtype} linear_weight: use None (the weight's "
        f"dtype), torch.float32 (an fp32 accumulator for 16-bit weights) or {weight_dtype}."
    )


def _autocast(input, linear_weight, linear_bias):
    """What ``F.linear`` does under ``torch.autocast``: the operands in the autocast dtype
    (float64 is not cast, as autocast leaves it alone)."""
    dev = input.device.type
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return input, linear_weight, linear_bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or t.dtype in (dt, torch.float64) or not t.is_floating_point():
            return t
        return t.to(dt)

    return cast(input), cast(linear_weight), cast(linear_bias)


def _linear_probs(a: dict, group):
    """Class-probability targets: unfused (the ``(N, V)`` logits are formed), exact."""
    if group is not None:
        raise V.CrossEntropyInputError(
            "class-probability targets are not supported by linear_cross_entropy with a "
            "process group: form the logits shard (F.linear) and call cross_entropy with the "
            "group and this rank's shard of the target distribution.")
    _checked_options(a)
    input, linear_weight, linear_bias = _autocast(a["input"], a["linear_weight"],
                                                  a["linear_bias"])
    target, reduction = a["target"], a["reduction"]
    _check_linear(input, linear_weight, linear_bias, target)
    logits = F.linear(input, linear_weight, linear_bias)
    Vn = linear_weight.shape[0]
    if tuple(target.shape) != tuple(logits.shape):
        raise V.CrossEntropyInputError(
            f"target is floating point ({target.dtype}), read as class probabilities, which must "
            f"have shape {V.shape_str(logits.shape)} (the input's batch dimensions, then V={Vn}); got "
            f"{V.shape_str(target.shape)}. For class indices pass an integer tensor (target.long())."
        )
    batch_shape = tuple(logits.shape[:-1])
    extras = {k: a[k] for k in ("z_loss", "softcap", "return_aux", "return_argmax",
                                "return_entropy", "backend", "validate", "loss_dtype", "divisor",
                                "logit_scale", "temperature")}
    if extras["loss_dtype"] is None:  # F.linear under autocast, then F.cross_entropy in fp32
        extras["loss_dtype"] = V.autocast_loss_dtype(a["input"], None, linear=True)
    out = cross_entropy(logits.reshape(-1, Vn), target.reshape(-1, Vn), a["weight"],
                        ignore_index=a["ignore_index"], reduction=reduction,
                        label_smoothing=a["label_smoothing"], **extras)
    if not a["return_aux"]:
        return out.view(batch_shape) if reduction == "none" else out
    loss, aux = out
    loss = loss.view(batch_shape) if reduction == "none" else loss
    z = aux.z_loss.view(batch_shape) if reduction == "none" else aux.z_loss
    am = None if aux.argmax is None else aux.argmax.view(batch_shape)
    ent = None if aux.entropy is None else aux.entropy.view(batch_shape)
    return loss, CrossEntropyAux(aux.lse.view(batch_shape), z, am, aux.accuracy, ent)


@serialised
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
    return_argmax: bool = False,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    accum_dtype: torch.dtype | None = None,
    skip_ignored: bool | None = None,
    backend: str | None = None,
    validate: bool | None = None,
    process_group=None,
    loss_dtype: torch.dtype | None = None,
    divisor: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
    temperature: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, CrossEntropyAux]:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without the logits.

    The signature of torch's ``F.linear_cross_entropy`` (without ``options``) plus the extras of
    :func:`triton_xent.cross_entropy`. The rows are processed in chunks: per chunk one GEMM makes
    the logits, the cross-entropy step (Triton kernel on CUDA or under ``TRITON_INTERPRET=1``,
    the torch backend otherwise) turns them in place into their gradient, and two GEMMs give the
    input's and the weight's gradients, so that only one ``(chunk, V)`` buffer is ever live.
    Gradients for any subset of ``input``, ``linear_weight``, ``linear_bias``; they are computed
    in the forward for ``"mean"``/``"sum"``, and in the backward (logits recomputed: one more
    GEMM) for ``"none"``.

    Args:
        input: ``(..., D)`` hidden states; fp32, bf16, fp16 or fp64.
        linear_weight: ``(V, D)`` (``lm_head.weight``), the input's dtype and device. Or a
            ``DTensor`` sharded ``Shard(0)`` (a ``ColwiseParallel`` head): the group comes from
            its mesh and the loss is a ``Replicate()`` DTensor; see :mod:`triton_xent.dtensor`.
        target: ``(...)`` class indices (the input's shape without ``D``), or class
            probabilities ``(..., V)``: those run unfused (the ``(N, V)`` logits are formed and
            passed to :func:`cross_entropy`; the chunk options do not apply).
        linear_bias: ``(V,)`` or None.
        weight: ``(V,)`` class weights (PyTorch's weighted mean).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shaped like ``target``).
        ignore_index: targets equal to it add nothing to the loss or the gradients; their rows
            cost no GEMM (see ``skip_ignored``). None means -100, as in torch.
        label_smoothing, z_loss, softcap: as in :func:`triton_xent.cross_entropy` (softcap acts
            on the logits, bias included).
        return_aux: also return :class:`CrossEntropyAux` (per-row lse and z-loss term, both
            differentiable), every row's log-sum-exp, ignored rows included (so with
            ``return_aux`` ignored rows are not skipped: see ``skip_ignored``).
        return_argmax: with ``return_aux``, also fill ``aux.argmax`` and ``aux.accuracy``
            (see :class:`CrossEntropyAux`), tracked with the maximum in the same pass.
        return_entropy: with ``return_aux``, also fill ``aux.entropy`` (each row's entropy,
            differentiable, from the same pass; see :class:`CrossEntropyAux`).
        chunk_size: rows per chunk. Default: as many as fit ``chunk_bytes``.
        chunk_bytes: bytes of the ``(chunk, V)`` logits buffer. Default: a fifth of the
            gradients' bytes, at most 1 GiB, at least the rows the GEMMs need (832 rows at
            N=8192, D=4096, V=128256 in bf16; see ``ops.linear_chunks.default_chunk_rows``).
            Pass one of ``chunk_size``, ``chunk_bytes``.
        accum_dtype: dtype of the dW accumulator. None (default): the weight's dtype: each
            chunk's GEMM accumulates in fp32 and adds its product into dW once (a 16-bit dW is
            rounded once per chunk; chunks are large). ``torch.float32`` for 16-bit weights keeps
            an fp32 accumulator (exact to fp32; ``4 V D`` more bytes during the call).
        skip_ignored: gather the rows to keep first so ignored rows cost no GEMM. That takes
            one ``nonzero``: free on the CPU, a host sync on an accelerator. None (default):
            on for CPU tensors, off on accelerators (no sync, CUDA-graph safe: fixed chunks over
            all rows, ignored ones computed and given zero gradients). Pass True on a GPU when
            many targets are ignored (prompt tokens in fine-tuning): the saved GEMMs outweigh
            the sync. With ``return_aux`` no row is skipped (the aux lse of every row is
            returned, ignored rows included, as :func:`cross_entropy` returns it).
        backend: ``"auto"`` (default, or ``TRITON_XENT_BACKEND``), ``"triton"`` or ``"torch"``:
            which cross-entropy step runs; the GEMMs are torch's (cuBLAS, MKL) everywhere.
        validate: check class indices on an accelerator too (a host sync).
        process_group: a ``torch.distributed`` group over which the classes are sharded:
            ``linear_weight`` (and ``linear_bias``, ``weight``) hold this rank's contiguous
            shard of the vocabulary, in rank order; ``input`` and ``target`` are the same on
            every rank, and every rank gets the full gradient of ``input``. See
            :mod:`triton_xent.parallel`.
        loss_dtype: dtype of the returned loss (a floating ``torch.dtype``); default the
            input's, and fp32 under ``torch.autocast`` (``F.linear`` runs in the autocast dtype,
            ``F.cross_entropy`` upcasts: torch's result). It is computed in fp32 either way;
            ``torch.float32`` returns it unrounded.
        divisor: with ``reduction="sum"``, the loss and every gradient are divided by this
            number or 0-d tensor inside the op (no extra pass), e.g. Hugging Face's
            ``num_items_in_batch``. See :func:`triton_xent.cross_entropy`.
        logit_scale: the logits (bias included) are multiplied by it before ``softcap``
            (Cohere, Granite heads).
        temperature: the logits are divided by it last, after ``logit_scale`` and ``softcap``
            (a sampler's temperature); see :func:`triton_xent.cross_entropy`.

    Returns:
        The loss (0-d, or shaped like ``target`` for ``"none"``) in the input's dtype (fp32
        under autocast), and the aux tuple when asked.

    Examples::

        >>> hidden = torch.randn(4, 128, 512, requires_grad=True)   # (B, T, D)
        >>> lm_head = torch.nn.Linear(512, 32000, bias=False)
        >>> labels = torch.randint(0, 32000, (4, 128))
        >>> loss = triton_xent.linear_cross_entropy(hidden, lm_head.weight, labels)
        >>> loss.backward()
    """
    a = dict(locals())
    if dtensor_given(input, linear_weight, linear_bias, target, weight, divisor):
        return dtensor.call_linear_cross_entropy(linear_cross_entropy, a)
    if ignore_index is None:
        a["ignore_index"] = ignore_index = -100
    group = None
    if process_group is not None and group_size(process_group) > 1:
        group = process_group
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return _linear_probs(a, group)
    lc = error = batch_shape = None
    try:
        lc, batch_shape = _build(a, sharded=group is not None)
    except LOCAL_ERRORS as exc:
        if group is None:
            raise
        error = exc  # raised on every rank by the agreement below
    if group is not None:
        shard = parallel.agree_call(
            group, parallel.KIND_LINEAR, lc, error, validate=V.validation_requested(validate),
            device=input.device if isinstance(input, torch.Tensor) else torch.device("cpu"))
        lc = lc._replace(shard=shard, opts=lc.opts._replace(chunk_rows=shard.chunk_rows))
    loss, lse, z_term, ent, argmax = run(lc)
    if reduction == "none":
        loss, z_term = loss.view(batch_shape), z_term.view(batch_shape)
    if not return_aux:
        return loss
    aux = CrossEntropyAux(lse.view(batch_shape), z_term)
    if return_argmax:
        am, acc = predictions(argmax, lc.target, lc.opts.ignore_index, False, lse.dtype)
        aux = aux._replace(argmax=am.view(batch_shape), accuracy=acc)
    if return_entropy:
        aux = aux._replace(entropy=ent.view(batch_shape))
    return loss, aux


def _checked_options(a: dict):
    """The keyword checks shared by the fused path and the probabilities' unfused one:
    ``(label_smoothing, z_loss, softcap, logit_scale, loss_dtype, temperature)``."""
    smoothing, z_loss, softcap = V.check_options(a["reduction"], a["label_smoothing"], a["z_loss"],
                                                 a["softcap"], a["ignore_index"])
    logit_scale, temperature = V.check_extras(a)
    V.validation_requested(a["validate"])  # a bad value, or environment variable, raises here
    # F.linear runs in autocast's dtype, then F.cross_entropy (autocast's fp32 list) in fp32.
    loss_dtype = V.autocast_loss_dtype(a["input"], a["loss_dtype"], linear=True)
    return smoothing, z_loss, softcap, logit_scale, loss_dtype, temperature


def _build(a: dict, *, sharded: bool):
    """Every check of one call, once: ``(LinearCall, batch_shape)``."""
    smoothing, z_loss, softcap, logit_scale, loss_dtype, temperature = _checked_options(a)
    input, reduction = a["input"], a["reduction"]
    out_dtype = loss_dtype or (input.dtype if isinstance(input, torch.Tensor) else None)
    x, W, b = _autocast(input, a["linear_weight"], a["linear_bias"])
    div_t, inv_div = None, 1.0
    if a["divisor"] is not None:
        div_t, inv_div = V.check_divisor(a["divisor"], reduction,
                                         input.device if isinstance(input, torch.Tensor) else None)
    # The range of class indices: always on the CPU, with validation on accelerators; under
    # torch.compile it runs when the graph runs. With a group: after the ranks agree.
    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check = not sharded and (V.validation_requested(a["validate"]) or on_cpu)
    p = _prepare(x, W, b, a["target"], a["weight"], a["ignore_index"], check)
    if p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled():
        raise V.CrossEntropyInputError(
            "weight (the class weights) requires grad, but the loss is not differentiated with "
            "respect to them (PyTorch raises too). Pass weight.detach().")
    choice = choose_backend(p.x, probs=False, backend=a["backend"])
    on = torch.is_grad_enabled()
    need = (on and p.x.requires_grad, on and W.requires_grad,
            on and b is not None and b.requires_grad)
    fp32_accum = _resolve_fp32_accum(a["accum_dtype"], W.dtype)
    N, D = p.x.shape
    chunk_rows = _resolve_chunk_rows(a["chunk_size"], a["chunk_bytes"], N, D, W.shape[0],
                                     p.x.dtype, W.dtype, fp32_accum)
    # Ignored rows are skipped (no GEMM) unless their lse is returned (return_aux).
    skip = on_cpu if a["skip_ignored"] is None else bool(a["skip_ignored"])
    opts = Options(ignore_index=a["ignore_index"], reduction=reduction, label_smoothing=smoothing,
                   z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, inv_divisor=inv_div,
                   # ignored rows' statistics when a gradient may follow (PyTorch's 0 x softmax)
                   all_rows=bool(a["return_aux"]) or on, argmax=bool(a["return_argmax"]),
                   backend=choice.backend, out_dtype=out_dtype,
                   group=parallel.group_name(a["process_group"]) if sharded else "",
                   chunk_rows=chunk_rows, fp32_accum=fp32_accum,
                   skip_ignored=skip and not a["return_aux"], need=need, temperature=temperature,
                   entropy=bool(a["return_entropy"]))
    return LinearCall(p.x, W, b, p.target, p.weight, div_t, opts), p.batch_shape
