"""The op layer's pipeline: cross-entropy as ``partial statistics -> merge -> gradient``.

One algorithm at three scales, one formula per backend. The merge is a parameter:

* none: one process holds the whole vocabulary; the backend's ``ce_forward`` runs it (the Triton
  fused kernel merges block by block; its split path merges across programs of one GPU);
* ranks: each rank of a process group holds a contiguous shard of the classes
  (:class:`~triton_xent.parallel.Shard`); the backend computes the shard's partials
  (``ce_shard_partials``), :func:`triton_xent.parallel.merge_ranks` merges them across the
  ranks (two all-reduces of a few values per row), and the backend writes the row losses and
  the shard's gradient from the merged statistics (``ce_shard_finish``).

Both backends (``triton_xent.backends.triton_ce``, ``triton_xent.backends.torch_ce``) provide the
same entry points; this module picks one and never computes anything itself. The gradient is
written during the forward for an upstream gradient of 1; :func:`backward` recomputes, from the
logits and the merged statistics the forward kept, the rows whose upstream gradient is not 1
(so their gradient is rounded once), or scales an in-place gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _config
from ._options import CEOptions, RowOutputs


def backend_ops(backend: str):
    """The backend's launchers (Triton imported only when asked for)."""
    if backend == "triton":
        from .backends import triton_ce as ops

        return ops
    from .backends import torch_ce

    return torch_ce


def _tuning(backend: str) -> dict:
    """Process-wide overrides of the launch plans (tests force small blocks and splits)."""
    if backend == "triton":
        return dict(block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS)
    return dict(chunk_rows=_config.TORCH_CHUNK_ROWS)


class Call(NamedTuple):
    """The arguments of one call, normalised to rows: ``logits (N, V_local)``, ``target (N,)``
    (class ids) or ``(N, V_local)`` (probabilities), ``weight (V_local,)``, a 0-d ``divisor``
    tensor or None, the options, the backend, the loss dtype and the shard (None: one process)."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    divisor: torch.Tensor | None
    opts: CEOptions
    backend: str
    probs: bool
    out_dtype: torch.dtype
    shard: object = None  # a triton_xent.parallel.Shard, or None


class Result(NamedTuple):
    """``loss`` (0-d, or per row for ``"none"``, in ``out_dtype``), ``lse`` (per row),
    ``z_term`` (reduced like the loss, fp32), ``argmax`` (or None), and what a backward needs:
    ``grad`` (or None), ``stats`` and ``dens``."""

    loss: torch.Tensor
    lse: torch.Tensor
    z_term: torch.Tensor
    argmax: torch.Tensor | None
    grad: torch.Tensor | None
    stats: torch.Tensor
    dens: torch.Tensor


def _kernel_weight(call: Call):
    # The Triton kernels read fp32 class weights; the torch backend any float dtype.
    if call.weight is None or call.backend != "triton":
        return call.weight
    return call.weight.float()


def forward(call: Call, *, compute_grad: bool, inplace: bool = False,
            grad_target: torch.Tensor | None = None) -> Result:
    """Loss, row statistics and (with ``compute_grad``) dL/dlogits for an upstream gradient of 1,
    written over the logits with ``inplace``; ``grad_target`` receives d(loss)/d(target) of
    class-probability targets (torch backend)."""
    B = backend_ops(call.backend)
    extra = dict(probs=call.probs, grad_target=grad_target) if call.backend == "torch" else {}
    weight = _kernel_weight(call)
    if call.shard is None:
        out = B.ce_forward(call.logits, call.target, weight, call.opts, divisor=call.divisor,
                           compute_grad=compute_grad, inplace=inplace, out_dtype=call.out_dtype,
                           **extra, **_tuning(call.backend))
    else:
        from .parallel import shard_forward

        out = shard_forward(B, call, weight, compute_grad=compute_grad, inplace=inplace,
                            tuning=_tuning(call.backend), extra=extra)
    return _reduced(B, call, out)


def _reduced(B, call: Call, out: RowOutputs) -> Result:
    opts = call.opts
    if opts.reduction == "none":
        loss, z_term = out.loss_rows, out.z
    else:
        loss, z_term = B.ce_finalize(out.ce, out.z, out.dens, has_z=opts.z_loss > 0.0,
                                     out_dtype=call.out_dtype)
    return Result(loss, out.lse, z_term, out.argmax, out.grad, out.stats, out.dens)


def backward(call: Call, stats: torch.Tensor, dens: torch.Tensor, grad: torch.Tensor | None,
             g_loss: torch.Tensor, g_lse: torch.Tensor | None, *, inplace: bool,
             grad_target: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient for the upstream gradients ``g_loss`` (0-d, or per row for ``"none"``) and
    ``g_lse`` (per row, the aux lse's gradient, or None).

    ``grad`` is the forward's gradient (upstream 1): it is updated in place, recomputing from
    the logits and the forward's ``stats`` only the rows where ``g_loss != 1`` or ``g_lse != 0``
    (so each element is rounded once), with no pass at all in the usual case. With ``inplace``
    the logits are gone: the gradient is scaled (rounded twice where ``g != 1``). ``grad`` None:
    the functional path (torch.compile) computes the whole gradient here, upstream folded in."""
    B = backend_ops(call.backend)
    if inplace:
        return B.scale_(grad, g_loss.detach())
    fresh = grad is None
    if fresh:
        grad = torch.empty_like(call.logits, memory_format=torch.contiguous_format)
    extra = dict(probs=call.probs, grad_target=grad_target) if call.backend == "torch" else {}
    offset, V = (0, call.logits.shape[1]) if call.shard is None else (
        call.shard.offset, call.shard.vocab_size)
    B.ce_shard_finish(call.logits, call.target, _kernel_weight(call), call.opts,
                      stats.unsqueeze(-1), None, dens=dens, rows=None, grad=grad, offset=offset,
                      vocab_size=V, upstream=g_loss.detach(),
                      upstream_lse=None if g_lse is None else g_lse.detach(),
                      skip_unit=not fresh, **extra, **_tuning(call.backend))
    return grad
