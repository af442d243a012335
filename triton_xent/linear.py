"""``linear_cross_entropy``: the LM head and the loss in one op, without the ``(N, V)`` logits.

Layers, as for ``cross_entropy``: the chunk loop is a plain torch function
(:func:`triton_xent.backends.torch_linear.linear_ce_chunks`); here are the op layer (a
``torch.library`` custom op with its fake and autograd formula, so that a model using it compiles
with ``fullgraph=True``; a leaner ``autograd.Function`` in eager mode) and the functional API.

Gradients are computed during the forward, for ``reduction="mean"``/``"sum"``: the chunk loop
writes ``dX``, ``dW``, ``db`` already scaled by the reduction (``reduction_scales``: device
tensors, known before the first chunk, no host sync), and the backward only multiplies them by
the scalar upstream gradient. For ``reduction="none"`` the per-token upstream gradient is not
known in the forward, so the forward computes the per-row losses only (one GEMM) and the backward
runs the loop again with that gradient folded in (logits recomputed: three GEMMs). ``"none"``
therefore costs 4 GEMMs of ``N x D x V`` and two softmax passes instead of 3 and one; it saves
no gradient between forward and backward, only references to the inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _config
from . import _validation as V
from .autograd import _compute_dtype, _reduce, reduction_scales
from .backends.torch_linear import default_chunk_rows, linear_ce_chunks
from .dispatch import choose_backend
from .functional import CrossEntropyAux, cross_entropy

_LIB = "triton_xent"
_HALF = (torch.float16, torch.bfloat16)


class _Cfg(NamedTuple):
    """The non-tensor arguments of the op, in the custom op's order."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    backend: str
    need_x: bool
    need_w: bool
    need_b: bool
    chunk_rows: int
    fp32_accum: bool
    skip_ignored: bool
    logit_scale: float | None
    inv_divisor: float


def _ce_step(cfg: _Cfg, weight, scales):
    """The CE launcher for one chunk, options bound: ``step(logits, target, compute_grad)``."""
    kw = dict(ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing,
              z_loss=cfg.z_loss, softcap=cfg.softcap, inplace=True, logit_scale=cfg.logit_scale)
    if cfg.backend == "triton":
        from .ops.cross_entropy import ce_forward

        w = weight.float() if weight is not None else None
        sc = scales.float()

        def step(logits, target, compute_grad):
            return ce_forward(logits, target, w, sc, compute_grad=compute_grad,
                              block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS,
                              **kw)
    else:
        from .backends import torch_ce

        def step(logits, target, compute_grad):
            return torch_ce.ce_forward(logits, target, weight, scales, compute_grad=compute_grad,
                                       chunk_rows=_config.TORCH_CHUNK_ROWS, **kw)
    return step


def _no_autocast(device: torch.device):
    # The inputs were cast already (see linear_cross_entropy); inside, every op runs as written.
    return torch.autocast(device.type, enabled=False)


def _forward(x, linear_weight, linear_bias, target, weight, divisor, cfg: _Cfg):
    """``loss, lse, z_term, dX, dW, db``; no gradients for ``"none"`` (see module docstring)."""
    N, V = x.shape[0], linear_weight.shape[0]
    cdt = _compute_dtype(x.dtype)
    grads = cfg.reduction != "none"
    scales = reduction_scales(target, weight, cfg.ignore_index, cfg.reduction, False, N, V, cdt,
                              divisor, cfg.inv_divisor)
    with _no_autocast(x.device):
        ce_rows, z_rows, lse, dX, dW, db = linear_ce_chunks(
            x, linear_weight, linear_bias, target, ce_step=_ce_step(cfg, weight, scales),
            ignore_index=cfg.ignore_index, need_x=grads and cfg.need_x,
            need_w=grads and cfg.need_w, need_b=grads and cfg.need_b, chunk_rows=cfg.chunk_rows,
            fp32_accum=cfg.fp32_accum, skip_ignored=cfg.skip_ignored,
        )
    scales = scales.to(ce_rows.dtype)
    loss = _reduce(ce_rows, cfg.reduction, scales[0])
    z_term = _reduce(z_rows, cfg.reduction, scales[1])
    if cfg.z_loss:
        loss = loss + z_term
    return loss, lse, z_term, dX, dW, db


def _backward_none(grad_rows, x, linear_weight, linear_bias, target, weight, divisor, cfg: _Cfg):
    """``reduction="none"``: the chunks again, each row's gradient times ``grad_rows``."""
    cdt = _compute_dtype(x.dtype)
    ones = torch.ones(2, dtype=cdt, device=x.device)
    with _no_autocast(x.device):
        _, _, _, dX, dW, db = linear_ce_chunks(
            x, linear_weight, linear_bias, target, ce_step=_ce_step(cfg, weight, ones),
            ignore_index=cfg.ignore_index, need_x=cfg.need_x, need_w=cfg.need_w,
            need_b=cfg.need_b, chunk_rows=cfg.chunk_rows, fp32_accum=cfg.fp32_accum,
            skip_ignored=cfg.skip_ignored, grad_rows=grad_rows,
        )
    return dX, dW, db


# ---------------------------------------------------------------------------------------------
# The custom op (torch.compile) and its autograd formula.


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A custom op returns tensors only: an absent gradient is an empty one.
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op(f"{_LIB}::linear_cross_entropy_rows", mutates_args=())
def linear_cross_entropy_rows(
    x: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
    target: torch.Tensor, weight: torch.Tensor | None, divisor: torch.Tensor | None,
    ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float | None, backend: str, need_x: bool,
    need_w: bool, need_b: bool, chunk_rows: int, fp32_accum: bool, skip_ignored: bool,
    logit_scale: float | None, inv_divisor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _Cfg(ignore_index, reduction, label_smoothing, z_loss, softcap, backend, need_x, need_w,
               need_b, chunk_rows, fp32_accum, skip_ignored, logit_scale, inv_divisor)
    loss, lse, z_term, dX, dW, db = _forward(x, linear_weight, linear_bias, target, weight,
                                             divisor, cfg)
    return loss, lse, z_term, _or_empty(dX, x), _or_empty(dW, x), _or_empty(db, x)


def _grad_shapes_fake(x, linear_weight, linear_bias, need_x, need_w, need_b, grads: bool):
    dX = x.new_empty(x.shape) if grads and need_x else x.new_empty(0)
    dW = linear_weight.new_empty(linear_weight.shape) if grads and need_w else x.new_empty(0)
    has_b = grads and need_b and linear_bias is not None
    db = linear_bias.new_empty(linear_bias.shape) if has_b else x.new_empty(0)
    return dX, dW, db


@linear_cross_entropy_rows.register_fake
def _(x, linear_weight, linear_bias, target, weight, divisor, ignore_index, reduction,
      label_smoothing, z_loss, softcap, backend, need_x, need_w, need_b, chunk_rows, fp32_accum,
      skip_ignored, logit_scale, inv_divisor):
    N = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    red_shape = (N,) if reduction == "none" else ()
    loss = x.new_empty(red_shape, dtype=cdt)
    grads = _grad_shapes_fake(x, linear_weight, linear_bias, need_x, need_w, need_b,
                              reduction != "none")
    return (loss, x.new_empty((N,), dtype=cdt), x.new_empty(red_shape, dtype=cdt)) + grads


@torch.library.custom_op(f"{_LIB}::linear_cross_entropy_rows_backward", mutates_args=())
def linear_cross_entropy_rows_backward(
    grad_rows: torch.Tensor, x: torch.Tensor, linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None, target: torch.Tensor, weight: torch.Tensor | None,
    divisor: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float | None, backend: str, need_x: bool, need_w: bool,
    need_b: bool, chunk_rows: int, fp32_accum: bool, skip_ignored: bool,
    logit_scale: float | None, inv_divisor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _Cfg(ignore_index, reduction, label_smoothing, z_loss, softcap, backend, need_x, need_w,
               need_b, chunk_rows, fp32_accum, skip_ignored, logit_scale, inv_divisor)
    dX, dW, db = _backward_none(grad_rows, x, linear_weight, linear_bias, target, weight, divisor,
                                cfg)
    return _or_empty(dX, x), _or_empty(dW, x), _or_empty(db, x)


@linear_cross_entropy_rows_backward.register_fake
def _(grad_rows, x, linear_weight, linear_bias, target, weight, divisor, ignore_index, reduction,
      label_smoothing, z_loss, softcap, backend, need_x, need_w, need_b, chunk_rows, fp32_accum,
      skip_ignored, logit_scale, inv_divisor):
    return _grad_shapes_fake(x, linear_weight, linear_bias, need_x, need_w, need_b, True)


_N_INPUTS = 20


def _setup_context(ctx, inputs, output):
    ctx.cfg = _Cfg(*inputs[6:])
    ctx.has_bias = inputs[2] is not None
    if ctx.cfg.reduction == "none":
        ctx.save_for_backward(*inputs[:6])
    else:
        ctx.save_for_backward(*output[3:])


def _backward(ctx, g_loss, g_lse, g_z, g_dx, g_dw, g_db):
    # Functional (out of place): this path runs under torch.compile, which owns the buffers.
    cfg = ctx.cfg
    if g_loss is None:
        return (None,) * _N_INPUTS
    if cfg.reduction == "none":
        dX, dW, db = linear_cross_entropy_rows_backward(g_loss, *ctx.saved_tensors, *cfg)
    else:
        dX, dW, db = (t * g_loss.to(t.dtype) for t in ctx.saved_tensors)
    return (dX if cfg.need_x else None, dW if cfg.need_w else None,
            db if cfg.need_b and ctx.has_bias else None) + (None,) * (_N_INPUTS - 3)


linear_cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """The eager path. ``"mean"``/``"sum"``: the gradients are kept on ``ctx`` and scaled in
    place by the backward, which hands the buffers to autograd (no copies). ``"none"``: the
    inputs are saved and the backward recomputes (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, divisor, cfg):
        loss, lse, z_term, dX, dW, db = _forward(x, linear_weight, linear_bias, target, weight,
                                                 divisor, cfg)
        ctx.cfg = cfg
        if cfg.reduction == "none":
            ctx.save_for_backward(x, linear_weight, linear_bias, target, weight, divisor)
        else:
            ctx.grads = (dX, dW, db)
        ctx.mark_non_differentiable(lse, z_term)
        return loss, lse, z_term

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z):
        cfg = ctx.cfg
        if cfg.reduction == "none":
            grads = _backward_none(g_loss, *ctx.saved_tensors, cfg)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "triton_xent: backward through the same linear_cross_entropy call a second "
                    "time is not supported with reduction='mean'/'sum' (the gradients are "
                    "computed in the forward and scaled in place). Compute the loss again."
                )
            grads = tuple(None if t is None else t.mul_(g_loss.to(t.dtype)) for t in grads)
        return grads + (None, None, None, None)


# ---------------------------------------------------------------------------------------------
# The functional API.


class _Problem(NamedTuple):
    x: torch.Tensor  # (N, D)
    target: torch.Tensor  # (N,) int64
    weight: torch.Tensor | None
    batch_shape: tuple[int, ...]


def _shape(shape) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_linear(input, linear_weight, linear_bias, target) -> None:
    """Shapes, dtypes and devices of the linear part; the messages say how to fix them."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise V.CrossEntropyInputError(f"{name} must be a tensor, got {type(t).__name__}.")
    if input.dtype not in V.FLOAT_DTYPES or input.dim() == 0:
        raise V.CrossEntropyInputError(
            f"input must be a floating-point tensor of shape (..., D) (the hidden states), got "
            f"{input.dtype} {_shape(input.shape)}."
        )
    D = input.shape[-1]
    if linear_weight.dim() != 2:
        raise V.CrossEntropyInputError(
            f"linear_weight must be (V, D) = (num_classes, in_features), got "
            f"{_shape(linear_weight.shape)}. K-dimensional heads (C, d1, ..., D) are not "
            "supported: use torch.nn.functional.linear_cross_entropy for those."
        )
    if linear_weight.shape[1] != D:
        hint = " It looks transposed: pass lm_head.weight, shape (V, D)." if (
            linear_weight.shape[0] == D) else ""
        raise V.CrossEntropyInputError(
            f"linear_weight {_shape(linear_weight.shape)} does not match input "
            f"{_shape(input.shape)}: its second dimension must be the input's last, D={D}.{hint}"
        )
    tensors = [("linear_weight", linear_weight)]
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (
                linear_weight.shape[0],):
            raise V.CrossEntropyInputError(
                f"linear_bias must have shape ({linear_weight.shape[0]},), one value per class, "
                f"got {_shape(getattr(linear_bias, 'shape', ()))}."
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
            hint = f" Reshape it: target.view{_shape(batch_shape)}."
        raise V.CrossEntropyInputError(
            f"Expected target shape {_shape(batch_shape)} (the input's shape without its last "
            f"dimension D) for input {_shape(input.shape)}, got {_shape(target.shape)}.{hint}"
        )
    N, D, Vn = math.prod(batch_shape), input.shape[-1], linear_weight.shape[0]
    # Checks of the target dtype, class weights and index range, on a zero-stride stand-in for
    # the (N, V) logits (no memory).
    logits_like = input.new_zeros(()).expand(N, Vn)
    p = V.prepare(logits_like, target.reshape(N), weight, ignore_index, check_values=check_values)
    return _Problem(input.reshape(N, D), p.target, p.weight, batch_shape)


def _resolve_chunk_rows(chunk_size, chunk_bytes, num_classes: int, dtype: torch.dtype) -> int:
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
    return default_chunk_rows(num_classes, dtype, chunk_bytes)


def _resolve_fp32_accum(accum_dtype, weight_dtype: torch.dtype) -> bool:
    if accum_dtype is None:
        return weight_dtype in _HALF
    if accum_dtype == weight_dtype:
        return False
    if accum_dtype == torch.float32 and weight_dtype in _HALF:
        return True
    raise V.CrossEntropyInputError(
        f"accum_dtype={accum_dtype} with a {weight_dtype} linear_weight: use None (fp32 for 16-bit "
        f"weights), torch.float32 or {weight_dtype}."
    )


def _autocast(input, linear_weight, linear_bias):
    """What ``F.linear`` does under ``torch.autocast``: the operands in the autocast dtype."""
    dev = input.device.type
    if not torch.is_autocast_enabled(dev):
        return input, linear_weight, linear_bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t if t is None or t.dtype == dt or not t.is_floating_point() else t.to(dt)

    return cast(input), cast(linear_weight), cast(linear_bias)


def _linear_probs(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                  label_smoothing, **extras):
    """Class-probability targets: unfused (the ``(N, V)`` logits are formed), exact."""
    logits = F.linear(input, linear_weight, linear_bias)
    Vn = linear_weight.shape[0]
    if tuple(target.shape) != tuple(logits.shape):
        raise V.CrossEntropyInputError(
            f"target is floating point ({target.dtype}), read as class probabilities, which must "
            f"have shape {_shape(logits.shape)} (the input's batch dimensions, then V={Vn}); got "
            f"{_shape(target.shape)}. For class indices pass an integer tensor (target.long())."
        )
    batch_shape = tuple(logits.shape[:-1])
    out = cross_entropy(logits.reshape(-1, Vn), target.reshape(-1, Vn), weight, ignore_index,
                        reduction, label_smoothing, **extras)
    if not extras.get("return_aux"):
        return out.view(batch_shape) if reduction == "none" else out
    loss, aux = out
    loss = loss.view(batch_shape) if reduction == "none" else loss
    z = aux.z_loss.view(batch_shape) if reduction == "none" else aux.z_loss
    return loss, CrossEntropyAux(aux.lse.view(batch_shape), z)


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
        linear_weight: ``(V, D)`` (``lm_head.weight``), the input's dtype and device.
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
        return_aux: also return :class:`CrossEntropyAux` (per-row lse, z-loss term). Skipped
            ignored rows have ``lse = 0``.
        chunk_size: rows per chunk. Default: as many as fit ``chunk_bytes``.
        chunk_bytes: bytes of the ``(chunk, V)`` logits buffer; default 128 MiB (512 rows at
            V=128k in bf16). Pass one of ``chunk_size``, ``chunk_bytes``.
        accum_dtype: dtype of the dW accumulator. None: fp32 for bf16/fp16 weights (summing
            many chunks in bf16 drifts; costs ``V * D * 4`` bytes during the call), else the
            weight's dtype. ``linear_weight.dtype`` accumulates in place, no extra buffer.
        skip_ignored: gather the rows to keep first so ignored rows cost no GEMM. That takes
            one ``nonzero``: free on the CPU, a host sync on an accelerator. None (default):
            on for CPU tensors, off on accelerators (no sync, CUDA-graph safe: fixed chunks over
            all rows, ignored ones computed and given zero gradients). Pass True on a GPU when
            many targets are ignored (prompt tokens in fine-tuning): the saved GEMMs outweigh
            the sync.
        backend: ``"auto"`` (default, or ``TRITON_XENT_BACKEND``), ``"triton"`` or ``"torch"``:
            which cross-entropy step runs; the GEMMs are torch's (cuBLAS, MKL) everywhere.
        validate: check class indices on an accelerator too (a host sync).
        process_group: a ``torch.distributed`` group over which the classes are sharded:
            ``linear_weight`` (and ``linear_bias``, ``weight``) hold this rank's contiguous
            shard of the vocabulary, in rank order; ``input`` and ``target`` are the same on
            every rank, and every rank gets the full gradient of ``input``. See
            :mod:`triton_xent.distributed`.
        loss_dtype: dtype of the returned loss; default the input's (before autocast). It is
            computed in fp32 either way; ``torch.float32`` returns it unrounded.
        divisor: with ``reduction="sum"``, the loss and every gradient are divided by this
            number or 0-d tensor inside the op (no extra pass), e.g. Hugging Face's
            ``num_items_in_batch``. See :func:`triton_xent.cross_entropy`.
        logit_scale: the logits (bias included) are multiplied by it before ``softcap``
            (Cohere, Granite heads).

    Returns:
        The loss (0-d, or shaped like ``target`` for ``"none"``) in the input's dtype (its dtype
        before autocast), and the aux tuple when asked.

    Examples::

        >>> hidden = torch.randn(4, 128, 512, requires_grad=True)   # (B, T, D)
        >>> lm_head = torch.nn.Linear(512, 32000, bias=False)
        >>> labels = torch.randint(0, 32000, (4, 128))
        >>> loss = triton_xent.linear_cross_entropy(hidden, lm_head.weight, labels)
        >>> loss.backward()
    """
    if process_group is not None:
        from .distributed import vocab_parallel_linear_cross_entropy

        if logit_scale is not None or divisor is not None:
            raise V.CrossEntropyInputError(
                "logit_scale and divisor are not supported with a process group yet: scale the "
                "weight shard and divide the summed loss yourself."
            )

        # A group of one rank comes back here with process_group=None.
        return vocab_parallel_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, return_aux=return_aux, chunk_size=chunk_size,
            chunk_bytes=chunk_bytes, accum_dtype=accum_dtype, skip_ignored=skip_ignored,
            process_group=process_group, backend=backend, validate=validate,
            loss_dtype=loss_dtype,
        )
    if ignore_index is None:
        ignore_index = -100
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    V.check_logit_scale(logit_scale)
    div_t, inv_div = V.check_divisor(
        divisor, reduction, input.device if isinstance(input, torch.Tensor) else None)
    out_dtype = loss_dtype or (input.dtype if isinstance(input, torch.Tensor) else None)
    if isinstance(input, torch.Tensor):
        input, linear_weight, linear_bias = _autocast(input, linear_weight, linear_bias)
    extras = dict(z_loss=z_loss, softcap=softcap, return_aux=return_aux, backend=backend,
                  validate=validate, loss_dtype=loss_dtype, divisor=divisor,
                  logit_scale=logit_scale)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        _check_linear(input, linear_weight, linear_bias, target)
        return _linear_probs(input, linear_weight, target, linear_bias, weight, reduction,
                             ignore_index, label_smoothing, **extras)

    on_cpu = isinstance(input, torch.Tensor) and input.device.type == "cpu"
    check_values = V.validation_requested(validate) or (
        on_cpu and not torch.compiler.is_compiling()
    )
    p = _prepare(input, linear_weight, linear_bias, target, weight, ignore_index, check_values)
    choice = choose_backend(p.x, probs=False, backend=backend)
    Vn = linear_weight.shape[0]
    grad_on = torch.is_grad_enabled()
    cfg = _Cfg(
        ignore_index, reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), choice.backend,
        grad_on and p.x.requires_grad, grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
        _resolve_chunk_rows(chunk_size, chunk_bytes, Vn, p.x.dtype),
        _resolve_fp32_accum(accum_dtype, linear_weight.dtype),
        on_cpu if skip_ignored is None else bool(skip_ignored),
        None if logit_scale is None else float(logit_scale), inv_div,
    )
    args = (p.x, linear_weight, linear_bias, p.target, p.weight, div_t)
    if torch.compiler.is_compiling():
        loss, lse, z_term = linear_cross_entropy_rows(*args, *cfg)[:3]
    elif cfg.need_x or cfg.need_w or cfg.need_b:
        loss, lse, z_term = _LinearCrossEntropyFunction.apply(*args, cfg)
    else:
        loss, lse, z_term = _forward(*args, cfg)[:3]
    if reduction == "none":
        loss = loss.view(p.batch_shape)
        z_term = z_term.view(p.batch_shape)
    loss = loss.to(out_dtype)
    if return_aux:
        return loss, CrossEntropyAux(lse.view(p.batch_shape), z_term)
    return loss
