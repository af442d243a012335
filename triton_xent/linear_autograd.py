"""The op layer of ``linear_cross_entropy``: the chunk loop driven by the cross-entropy pipeline,
with its autograd, eager and compiled.

Per chunk of token rows the logits are made by a GEMM and turned in place into their gradient by
the pipeline (``triton_xent.pipeline``; with a process group, its merge across ranks,
``triton_xent.parallel``), then two GEMMs give ``dX`` and ``dW`` (see
:mod:`triton_xent.backends.torch_linear`). For ``reduction="mean"``/``"sum"`` every gradient is
computed in the forward, for an upstream gradient of 1, and the backward returns them untouched
when the upstream gradient is 1 (one tiny launch per gradient reads it on the device), or scales
them in place otherwise. For ``reduction="none"`` the per-row upstream gradient is not known in
the forward: the forward computes the losses and keeps each row's merged statistics (6 numbers),
and the backward runs the chunks again with the upstream folded into the cross-entropy step
(4 GEMMs in all, no communication in the backward).

Under torch.compile the same work runs in two custom ops (``triton_xent::linear_ce_forward``,
``triton_xent::linear_ce_backward``); their backward scales out of place (a custom op may not
keep a buffer aside), one pass over ``dW`` and ``dX``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import parallel, pipeline
from ._options import CEOptions, compute_dtype
from .backends.torch_ce import denominators
from .backends.torch_linear import linear_ce_chunks

_LIB = "triton_xent"


class LinearCall(NamedTuple):
    """One call, normalised: ``x (N, D)``, ``W (V_local, D)``, ``b``, ``target (N,)``, class
    ``weight``, a 0-d ``divisor`` tensor, the options, the chunking, the shard (or None)."""

    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor | None
    target: torch.Tensor
    weight: torch.Tensor | None
    divisor: torch.Tensor | None
    opts: CEOptions
    backend: str
    out_dtype: torch.dtype
    chunk_rows: int
    fp32_accum: bool
    skip_ignored: bool
    shard: parallel.Shard | None = None


def _kernel_weight(lc: LinearCall):
    if lc.weight is None or lc.backend != "triton":
        return lc.weight
    return lc.weight.float()


def _dens(lc: LinearCall, cdt) -> torch.Tensor:
    """The whole batch's denominators (every chunk's gradient is scaled by them)."""
    opts, target = lc.opts, lc.target
    if lc.shard is None or opts.reduction != "mean" or lc.weight is None:
        return denominators(target, lc.weight, opts, divisor=lc.divisor, V=lc.W.shape[0],
                            dtype=cdt)
    # A weighted mean over a sharded vocabulary: each rank sums the weights of the targets it
    # owns, one all-reduce adds them up.
    sh = lc.shard
    t_loc = target - sh.offset
    owned = (target != opts.ignore_index) & (t_loc >= 0) & (t_loc < sh.V_local)
    w = lc.weight.to(cdt)
    local = (torch.where(owned, w[t_loc.clamp(0, max(sh.V_local - 1, 0))], 0).sum()
             if sh.V_local else torch.zeros((), dtype=cdt, device=target.device))
    w_kept = parallel.all_reduce(local.reshape(1), "sum", sh.group)[0]
    n_kept = (target != opts.ignore_index).sum().to(cdt)
    return torch.stack([w_kept, n_kept])


def _forward_step(lc: LinearCall, dens: torch.Tensor, cdt):
    """The cross-entropy of one chunk of logits, over the whole vocabulary (or merged across the
    ranks), gradient written in place for an upstream gradient of 1."""
    B = pipeline.backend_ops(lc.backend)
    tuning = pipeline._tuning(lc.backend)
    weight = _kernel_weight(lc)
    dens_k = dens.float() if lc.backend == "triton" else dens

    def step(logits, rows, compute_grad):
        t = lc.target[rows]
        if lc.shard is None:
            out = B.ce_forward(logits, t, weight, lc.opts, dens=dens_k, compute_grad=compute_grad,
                               inplace=True, out_dtype=cdt, **tuning)
        else:
            call = pipeline.Call(logits, t, lc.weight, lc.divisor, lc.opts, lc.backend, False,
                                 cdt, lc.shard)
            out = parallel.shard_forward(B, call, weight, compute_grad=compute_grad, inplace=True,
                                         tuning=tuning, extra={}, dens=dens_k)
        return out.ce, out.z, out.lse, out.stats, out.grad

    return step


def _recompute_step(lc: LinearCall, stats: torch.Tensor, g_rows: torch.Tensor, cdt):
    """``reduction="none"`` backward: one chunk's gradient with each row's upstream gradient
    folded in, from the forward's merged statistics (no communication)."""
    B = pipeline.backend_ops(lc.backend)
    tuning = pipeline._tuning(lc.backend)
    weight = _kernel_weight(lc)
    dens = torch.ones(2, dtype=torch.float32 if lc.backend == "triton" else cdt,
                      device=lc.x.device)
    offset, V = (0, lc.W.shape[0]) if lc.shard is None else (lc.shard.offset,
                                                              lc.shard.vocab_size)

    def step(logits, rows, compute_grad):
        st = stats[:, rows]
        B.ce_shard_finish(logits, lc.target[rows], weight, lc.opts,
                          st.to(torch.float32 if lc.backend == "triton" else cdt).unsqueeze(-1),
                          None, dens=dens, rows=None, grad=logits, offset=offset, vocab_size=V,
                          upstream=g_rows[rows], skip_unit=False, **tuning)
        z = st[0]
        return z, z, z, st, logits

    return step


def _chunks(lc: LinearCall, step, need, *, grad_pass: bool = True):
    # With a group, d(input) is all-reduced: every rank computes it when some rank needs it, in
    # the pass that computes gradients (which one is agreed: the reduction decides).
    need_x = need[0] or (grad_pass and lc.shard is not None and lc.shard.need_dx)
    return linear_ce_chunks(
        lc.x, lc.W, lc.b, lc.target, step=step, ignore_index=lc.opts.ignore_index,
        need_x=need_x, need_w=need[1], need_b=need[2], chunk_rows=lc.chunk_rows,
        fp32_accum=lc.fp32_accum, skip_ignored=lc.skip_ignored,
        stats_dtype=compute_dtype(lc.x.dtype))


def _no_autocast(device: torch.device):
    # The inputs were cast already (see linear_cross_entropy); inside, every op runs as written.
    return torch.autocast(device.type, enabled=False)


def forward(lc: LinearCall, need: tuple[bool, bool, bool]):
    """``loss, lse, z_term, stats, dX, dW, db``; gradients (of the reduced loss, upstream 1) only
    for ``"mean"``/``"sum"`` (``"none"``: see the module docstring)."""
    cdt = compute_dtype(lc.x.dtype)
    grads = need if lc.opts.reduction != "none" else (False, False, False)
    with _no_autocast(lc.x.device):
        dens = _dens(lc, cdt)
        ce, z, lse, stats, dX, dW, db = _chunks(lc, _forward_step(lc, dens, cdt), grads,
                                                grad_pass=lc.opts.reduction != "none")
        if dX is not None and lc.shard is not None:
            dX = parallel.all_reduce(dX, "sum", lc.shard.group)  # d(input) sums over the shards
    opts = lc.opts
    if opts.reduction == "none":
        loss, z_term = (ce + z if opts.z_loss else ce).to(lc.out_dtype), z
    else:
        B = pipeline.backend_ops("torch")  # N values: torch ops whatever the backend
        loss, z_term = B.ce_finalize(ce, z, dens.to(ce.dtype), has_z=opts.z_loss > 0.0,
                                     out_dtype=lc.out_dtype)
    return loss, lse, z_term, stats, dX, dW, db


def backward_none(lc: LinearCall, stats, g_rows, need):
    """``reduction="none"``: ``dX, dW, db`` for the per-row upstream gradient ``g_rows``."""
    cdt = compute_dtype(lc.x.dtype)
    with _no_autocast(lc.x.device):
        _, _, _, _, dX, dW, db = _chunks(lc, _recompute_step(lc, stats, g_rows.reshape(-1), cdt),
                                         need)
        if dX is not None and lc.shard is not None:
            dX = parallel.all_reduce(dX, "sum", lc.shard.group)
    return dX, dW, db


def _reference_grads(lc: LinearCall, x, W, b, g_loss, need):
    """``create_graph=True``: the gradients through differentiable torch ops (F.linear and the
    reference cross-entropy), so second derivatives are PyTorch's."""
    from .reference import cross_entropy_reference

    opts = lc.opts
    with torch.enable_grad():
        logits = F.linear(x, W, b).to(compute_dtype(x.dtype))
        divisor = None
        if opts.reduction == "sum":
            divisor = lc.divisor if lc.divisor is not None else 1.0 / opts.inv_divisor
        loss = cross_entropy_reference(
            logits, lc.target, None if lc.weight is None else lc.weight.to(logits.dtype),
            opts.ignore_index, opts.reduction, opts.label_smoothing, z_loss=opts.z_loss,
            softcap=opts.softcap, logit_scale=opts.logit_scale, divisor=divisor)
        inputs = [t for t, n in zip((x, W, b), need) if n]
        got = iter(torch.autograd.grad((loss * g_loss.to(loss.dtype)).sum(), inputs,
                                       create_graph=True))
    return tuple(next(got) if n else None for n in need)


# ---------------------------------------------------------------------------------------------
# Eager path


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, target, weight, divisor, lc: LinearCall, need):
        lc = lc._replace(x=x, W=W, b=b, target=target, weight=weight, divisor=divisor)
        loss, lse, z_term, stats, dX, dW, db = forward(lc, need)
        ctx.lc = lc._replace(x=None, W=None, b=None, target=None, weight=None, divisor=None)
        ctx.need = need
        ctx.grads = (dX, dW, db)
        # References for a "none" backward and for second derivatives (no copies).
        ctx.save_for_backward(x, W, b, target, weight, divisor, stats)
        ctx.mark_non_differentiable(lse, z_term)
        return loss, lse, z_term

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z):
        x, W, b, target, weight, divisor, stats = ctx.saved_tensors
        lc = ctx.lc._replace(x=x, W=W, b=b, target=target, weight=weight, divisor=divisor)
        need = ctx.need
        if torch.is_grad_enabled():  # create_graph=True
            if lc.shard is not None:
                raise RuntimeError(
                    "triton_xent: a second derivative (create_graph=True) of a vocabulary-"
                    "parallel linear_cross_entropy is not supported.")
            grads = _reference_grads(lc, x, W, b, g_loss, need)
        elif lc.opts.reduction == "none":
            grads = backward_none(lc, stats, g_loss, need)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "triton_xent: backward through the same linear_cross_entropy call a second "
                    "time is not supported with reduction='mean'/'sum' (the gradients are "
                    "computed in the forward and reused). Compute the loss again."
                )
            B = pipeline.backend_ops(lc.backend)
            grads = tuple(None if t is None else B.scale_(t, g_loss.detach()) for t in grads)
        grads = tuple(t if n else None for t, n in zip(grads, need))
        return grads + (None,) * 5


# ---------------------------------------------------------------------------------------------
# Functional path: custom ops (torch.compile)


def _opts_of(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, inv_divisor):
    return CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                     inv_divisor)


def _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing, z_loss,
           softcap, logit_scale, inv_divisor, backend, out_dtype, chunk_rows, fp32_accum,
           skip_ignored, group_name, need_x) -> LinearCall:
    opts = _opts_of(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    inv_divisor)
    shard = parallel.linear_shard_by_name(group_name, x=x, W=W, b=b, weight=weight, opts=opts,
                                          divisor=divisor, chunk_rows=chunk_rows,
                                          skip_ignored=skip_ignored, need_x=need_x)
    if shard is not None:
        chunk_rows = shard.chunk_rows
    return LinearCall(x, W, b, target, weight, divisor, opts, backend, out_dtype, chunk_rows,
                      fp32_accum, skip_ignored, shard)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op(f"{_LIB}::linear_ce_forward", mutates_args=())
def linear_ce_forward_op(
    x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], divisor: Optional[torch.Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    logit_scale: Optional[float], inv_divisor: float, backend: str, out_dtype: torch.dtype,
    chunk_rows: int, fp32_accum: bool, skip_ignored: bool, group_name: str, need_x: bool,
    need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    lc = _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing,
                z_loss, softcap, logit_scale, inv_divisor, backend, out_dtype, chunk_rows,
                fp32_accum, skip_ignored, group_name, need_x)
    loss, lse, z_term, stats, dX, dW, db = forward(lc, (need_x, need_w, need_b))
    return (loss, lse, z_term, stats, _or_empty(dX if need_x else None, x),
            _or_empty(dW, x), _or_empty(db, x))


def _grads_fake(x, W, b, need_x, need_w, need_b, grads: bool):
    dX = torch.empty_like(x) if grads and need_x else x.new_empty(0)
    dW = torch.empty_like(W) if grads and need_w else x.new_empty(0)
    db = torch.empty_like(b) if grads and need_b and b is not None else x.new_empty(0)
    return dX, dW, db


@linear_ce_forward_op.register_fake
def _(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, inv_divisor, backend, out_dtype, chunk_rows, fp32_accum, skip_ignored,
      group_name, need_x, need_w, need_b):
    N = x.shape[0]
    cdt = compute_dtype(x.dtype)
    red = (N,) if reduction == "none" else ()
    return ((x.new_empty(red, dtype=out_dtype), x.new_empty((N,), dtype=cdt),
             x.new_empty(red, dtype=cdt), x.new_empty((6, N), dtype=cdt))
            + _grads_fake(x, W, b, need_x, need_w, need_b, reduction != "none"))


@torch.library.custom_op(f"{_LIB}::linear_ce_backward", mutates_args=())
def linear_ce_backward_op(
    g_rows: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, W: torch.Tensor,
    b: Optional[torch.Tensor], target: torch.Tensor, weight: Optional[torch.Tensor],
    divisor: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: Optional[float], logit_scale: Optional[float], inv_divisor: float,
    backend: str, out_dtype: torch.dtype, chunk_rows: int, fp32_accum: bool, skip_ignored: bool,
    group_name: str, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lc = _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing,
                z_loss, softcap, logit_scale, inv_divisor, backend, out_dtype, chunk_rows,
                fp32_accum, skip_ignored, group_name, need_x)
    dX, dW, db = backward_none(lc, stats, g_rows, (need_x, need_w, need_b))
    return _or_empty(dX if need_x else None, x), _or_empty(dW, x), _or_empty(db, x)


@linear_ce_backward_op.register_fake
def _(g_rows, stats, x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing,
      z_loss, softcap, logit_scale, inv_divisor, backend, out_dtype, chunk_rows, fp32_accum,
      skip_ignored, group_name, need_x, need_w, need_b):
    return _grads_fake(x, W, b, need_x, need_w, need_b, True)


_N_FWD = 22


def _setup_context(ctx, inputs, output):
    ctx.args = inputs[6:]
    ctx.has_b = inputs[2] is not None
    ctx.reduction = inputs[7]
    if ctx.reduction == "none":
        ctx.save_for_backward(*inputs[:6], output[3])
    else:
        ctx.save_for_backward(*output[4:])


def _backward(ctx, g_loss, g_lse, g_z, g_stats, g_dx, g_dw, g_db):
    need = ctx.args[-3:]
    if g_loss is None:
        return (None,) * _N_FWD
    if ctx.reduction == "none":
        x, W, b, target, weight, divisor, stats = ctx.saved_tensors
        grads = linear_ce_backward_op(g_loss, stats, x, W, b, target, weight, divisor, *ctx.args)
    else:
        grads = tuple(t * g_loss.to(t.dtype) for t in ctx.saved_tensors)
    dX, dW, db = (t if n else None for t, n in zip(grads, need))
    return (dX, dW, db if ctx.has_b else None) + (None,) * (_N_FWD - 3)


linear_ce_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point


def run(lc: LinearCall, need: tuple[bool, bool, bool]):
    """Runs one call on the right path: ``loss, lse, z_term``."""
    if torch.compiler.is_compiling():
        o = lc.opts
        group_name = parallel.group_name(lc.shard)
        return linear_ce_forward_op(
            lc.x, lc.W, lc.b, lc.target, lc.weight, lc.divisor, o.ignore_index, o.reduction,
            o.label_smoothing, o.z_loss, o.softcap, o.logit_scale, o.inv_divisor, lc.backend,
            lc.out_dtype, lc.chunk_rows, lc.fp32_accum, lc.skip_ignored, group_name, *need)[:3]
    if any(need):
        return _LinearCrossEntropyFunction.apply(lc.x, lc.W, lc.b, lc.target, lc.weight,
                                                 lc.divisor, lc, need)
    return forward(lc, need)[:3]
