"""The op layer: one ``torch.library`` custom op with its autograd formula, for every backend.

``triton_xent::cross_entropy_rows`` takes rows of logits ``(N, V)`` and computes the reduced loss,
the per-row log-sum-exp, the reduced z-loss term and, when the logits need a gradient, that
gradient already (gradient in the forward: one pass over the logits instead of two). The
backward only multiplies the stored gradient by the upstream gradient (a scalar, or one value
per row for ``reduction="none"``), in place outside torch.compile.

Being a custom op with a fake (meta) implementation, it is opaque to torch.compile: a model that
calls ``cross_entropy`` compiles with ``fullgraph=True`` and the op can be captured in a CUDA
graph (it never syncs with the host). ``inplace_backward=True`` uses a plain autograd.Function
instead, because it writes the gradient over the logits, which a functional op may not do.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _config

_LIB = "triton_xent"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_scales(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, reduction: str,
    probs: bool, num_rows: int, V: int, dtype: torch.dtype,
    divisor: torch.Tensor | None = None, inv_divisor: float = 1.0,
) -> torch.Tensor:
    """``[ce_scale, z_scale]`` on the device, without a host sync.

    A weighted mean divides the cross-entropy part by the summed weights of the kept targets (as
    PyTorch does) and the z-loss part by the number of kept rows; probability targets divide both
    by the number of rows. An empty or all-ignored mean divides by zero: NaN, as in PyTorch.
    A ``"sum"`` with a divisor (a tensor, or ``1 / inv_divisor`` for a number) divides both by it.
    """
    dev = target.device
    if reduction != "mean":
        if divisor is not None:
            return divisor.to(dtype).reciprocal().expand(2)
        return torch.full((2,), inv_divisor, dtype=dtype, device=dev)
    if probs:
        return torch.full((2,), 1.0 / num_rows if num_rows else float("nan"), dtype=dtype, device=dev)
    keep = target != ignore_index
    n_kept = keep.sum().to(dtype)
    if weight is None:
        w_kept = n_kept
    else:
        w_kept = torch.where(keep, weight.to(dtype)[target.clamp(0, max(V - 1, 0))], 0).sum()
    return torch.stack([w_kept, n_kept]).reciprocal()


def _reduce(rows: torch.Tensor, reduction: str, scale: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() * scale  # scale: 1 for a plain sum


def forward_rows(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    compute_grad: bool, backend: str, probs: bool, inplace: bool,
    logit_scale: float | None = None, divisor: torch.Tensor | None = None, inv_divisor: float = 1.0,
):
    """Runs one backend on rows; returns ``loss, lse, z_term, grad`` (grad may be None)."""
    N, V = logits.shape
    cdt = _compute_dtype(logits.dtype)
    scales = reduction_scales(target, weight, ignore_index, reduction, probs, N, V, cdt,
                              divisor, inv_divisor)
    kwargs = dict(
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        compute_grad=compute_grad, inplace=inplace, logit_scale=logit_scale,
    )
    if backend == "triton":
        from .ops.cross_entropy import ce_forward

        w = weight.float() if weight is not None else None
        ce_rows, z_rows, lse, grad = ce_forward(
            logits, target, w, scales.float(), ignore_index=ignore_index,
            block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS, **kwargs,
        )
    else:
        from .backends import torch_ce

        if probs:
            ce_rows, z_rows, lse, grad = torch_ce.ce_forward_probs(
                logits, target, weight, scales, chunk_rows=_config.TORCH_CHUNK_ROWS, **kwargs
            )
        else:
            ce_rows, z_rows, lse, grad = torch_ce.ce_forward(
                logits, target, weight, scales, ignore_index=ignore_index,
                chunk_rows=_config.TORCH_CHUNK_ROWS, **kwargs,
            )
    scales = scales.to(ce_rows.dtype)
    loss_ce = _reduce(ce_rows, reduction, scales[0])
    z_term = _reduce(z_rows, reduction, scales[1])
    loss = loss_ce + z_term if z_loss else loss_ce
    return loss, lse, z_term, grad


@torch.library.custom_op(f"{_LIB}::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    compute_grad: bool, backend: str, probs: bool, logit_scale: Optional[float],
    divisor: Optional[torch.Tensor], inv_divisor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, lse, z_term, grad = forward_rows(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        compute_grad, backend, probs, inplace=False, logit_scale=logit_scale, divisor=divisor,
        inv_divisor=inv_divisor,
    )
    if grad is None:
        grad = logits.new_empty(0)
    return loss, lse, z_term, grad


@cross_entropy_rows.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      compute_grad, backend, probs, logit_scale, divisor, inv_divisor):
    N = logits.shape[0]
    cdt = _compute_dtype(logits.dtype)
    red_shape = (N,) if reduction == "none" else ()
    loss = logits.new_empty(red_shape, dtype=cdt)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, logits.new_empty((N,), dtype=cdt), logits.new_empty(red_shape, dtype=cdt), grad


_N_INPUTS = 14


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[4]
    ctx.compute_grad = inputs[8]
    ctx.save_for_backward(output[3])


def _backward(ctx, g_loss, g_lse, g_z, g_grad):
    # Functional (out of place): this path runs under torch.compile, which owns the buffers.
    (grad,) = ctx.saved_tensors
    if g_loss is None or not ctx.compute_grad:
        return (None,) * _N_INPUTS
    g = g_loss.unsqueeze(1) if ctx.reduction == "none" else g_loss
    return (grad * g.to(grad.dtype),) + (None,) * (_N_INPUTS - 1)


cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


class _CrossEntropyFunction(torch.autograd.Function):
    """The eager path: the gradient is kept on ``ctx`` (not ``save_for_backward``) and released
    as it is returned, so autograd's gradient accumulation adopts the buffer instead of cloning
    it: fwd+bwd holds one N x V gradient, or none with ``inplace`` (written over the logits)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, backend, probs, logit_scale, divisor, inv_divisor, inplace):
        loss, lse, z_term, grad = forward_rows(
            logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
            True, backend, probs, inplace=inplace, logit_scale=logit_scale, divisor=divisor,
            inv_divisor=inv_divisor,
        )
        ctx.reduction = reduction
        # detach(): with ``inplace`` the buffer is the logits tensor itself; a fresh alias lets
        # autograd adopt it as the gradient instead of copying it.
        ctx.grad = grad.detach()
        ctx.mark_non_differentiable(lse, z_term)
        return loss, lse, z_term

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "triton_xent: backward through the same cross_entropy call a second time is not "
                "supported (the gradient is computed in the forward and scaled in place). "
                "Compute the loss again for a second backward."
            )
        g = g_loss.unsqueeze(1) if ctx.reduction == "none" else g_loss
        return (grad.mul_(g),) + (None,) * 14


def run_rows(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             backend, probs, logit_scale, divisor, inv_divisor, inplace):
    """Picks the autograd path: ``loss, lse, z_term``.

    Eager calls that need a gradient use :class:`_CrossEntropyFunction` (leanest); under
    torch.compile, or without a gradient, the custom op (opaque to the compiler, functional).
    ``inplace`` is eager only: under torch.compile the gradient gets its own buffer.
    """
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    if compute_grad and not torch.compiler.is_compiling():
        return _CrossEntropyFunction.apply(logits, target, weight, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap, backend, probs,
                                           logit_scale, divisor, inv_divisor, inplace)
    loss, lse, z_term, _ = cross_entropy_rows(logits, target, weight, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, compute_grad,
                                              backend, probs, logit_scale, divisor, inv_divisor)
    return loss, lse, z_term
