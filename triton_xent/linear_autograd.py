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

The aux lse is differentiable: when it carries a gradient the backward runs the chunks again
with both upstream gradients folded in (as for ``"none"``). Second derivatives go through
``F.linear`` and the reference formula (differentiable torch ops).

Under torch.compile and functorch transforms (vmap, ``torch.func.grad``) the same work runs in
two custom ops (``triton_xent::linear_ce_forward``, ``triton_xent::linear_ce_backward``), tied
by an autograd Function functorch composes with; their backward scales out of place (a custom
op may not keep a buffer aside), one pass over ``dW`` and ``dX``. Their vmap rules run one call
per batch element.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import parallel, pipeline
from ._options import CEOptions, compute_dtype
from .autograd import first_order_only, fold_z_grad, in_transform, requires_grad, vmap_loop
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
        # One launch on the Triton backend; a few torch ops on the torch backend.
        B = pipeline.backend_ops(lc.backend)
        return B.denominators(target, lc.weight, opts, divisor=lc.divisor, V=lc.W.shape[0],
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


def _forward_step(lc: LinearCall, dens: torch.Tensor, cdt, argmax: torch.Tensor | None):
    """The cross-entropy of one chunk of logits, over the whole vocabulary (or merged across the
    ranks), gradient written in place for an upstream gradient of 1; each row's arg-max goes
    into ``argmax`` (with ``opts.argmax``)."""
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
        if argmax is not None:
            argmax[rows] = out.argmax
        return out.ce, out.z, out.lse, out.stats, out.grad

    return step


def _recompute_step(lc: LinearCall, stats: torch.Tensor, dens: torch.Tensor, g_loss: torch.Tensor,
                    g_lse: torch.Tensor | None, cdt):
    """The backward's recompute: one chunk's gradient for the upstream gradients ``g_loss`` (0-d,
    or one per row for ``"none"``) and ``g_lse`` (per row, or None), from the forward's merged
    statistics and denominators (no communication)."""
    B = pipeline.backend_ops(lc.backend)
    tuning = pipeline._tuning(lc.backend)
    weight = _kernel_weight(lc)
    kdt = torch.float32 if lc.backend == "triton" else cdt
    dens = dens.to(kdt)
    offset, V = (0, lc.W.shape[0]) if lc.shard is None else (lc.shard.offset,
                                                              lc.shard.vocab_size)

    def step(logits, rows, compute_grad):
        st = stats[:, rows]
        B.ce_shard_finish(logits, lc.target[rows], weight, lc.opts, st.to(kdt).unsqueeze(-1),
                          None, dens=dens, rows=None, grad=logits, offset=offset, vocab_size=V,
                          upstream=g_loss if g_loss.dim() == 0 else g_loss[rows],
                          upstream_lse=None if g_lse is None else g_lse[rows], skip_unit=False,
                          **tuning)
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


class Forward(NamedTuple):
    """What :func:`forward` returns: the loss and aux outputs, what a backward keeps (``stats``,
    ``dens``) and the gradients for an upstream gradient of 1 (``"mean"``/``"sum"``, or None)."""

    loss: torch.Tensor
    lse: torch.Tensor
    z_term: torch.Tensor
    argmax: torch.Tensor  # (N,) int64 with opts.argmax, else empty
    stats: torch.Tensor
    dens: torch.Tensor
    dX: torch.Tensor | None
    dW: torch.Tensor | None
    db: torch.Tensor | None


def forward(lc: LinearCall, need: tuple[bool, bool, bool]) -> Forward:
    """The loss; gradients (of the reduced loss, upstream 1) only for ``"mean"``/``"sum"``
    (``"none"``: see the module docstring)."""
    cdt = compute_dtype(lc.x.dtype)
    grads = need if lc.opts.reduction != "none" else (False, False, False)
    N = lc.x.shape[0]
    # Rows skipped as ignored read -1, as every ignored row does in the aux argmax.
    argmax = torch.full((N if lc.opts.argmax else 0,), -1, dtype=torch.int64, device=lc.x.device)
    with _no_autocast(lc.x.device):
        dens = _dens(lc, cdt)
        ce, z, lse, stats, dX, dW, db = _chunks(
            lc, _forward_step(lc, dens, cdt, argmax if lc.opts.argmax else None), grads,
            grad_pass=lc.opts.reduction != "none")
        if dX is not None and lc.shard is not None:
            dX = parallel.all_reduce(dX, "sum", lc.shard.group)  # d(input) sums over the shards
    opts = lc.opts
    if opts.reduction == "none":
        loss, z_term = (ce + z if opts.z_loss else ce).to(lc.out_dtype), z
    else:
        B = pipeline.backend_ops(lc.backend)
        loss, z_term = B.ce_finalize(ce, z, dens.to(ce.dtype), has_z=opts.z_loss > 0.0,
                                     out_dtype=lc.out_dtype)
    return Forward(loss, lse, z_term, argmax, stats, dens, dX, dW, db)


def backward_recompute(lc: LinearCall, stats, dens, g_loss, g_lse, need):
    """``dX, dW, db`` for the upstream gradients ``g_loss`` (0-d, or per row for ``"none"``) and
    ``g_lse`` (the aux lse's, per row, or None): the chunks run again (4 GEMMs in all)."""
    cdt = compute_dtype(lc.x.dtype)
    g_loss = g_loss.reshape(-1) if g_loss.dim() else g_loss
    g_lse = None if g_lse is None else g_lse.reshape(-1)
    with _no_autocast(lc.x.device):
        _, _, _, _, dX, dW, db = _chunks(lc, _recompute_step(lc, stats, dens, g_loss, g_lse, cdt),
                                         need)
        if dX is not None and lc.shard is not None:
            dX = parallel.all_reduce(dX, "sum", lc.shard.group)
    return dX, dW, db


def _reference_grads(lc: LinearCall, x, W, b, g_loss, g_lse, g_z, need):
    """``create_graph=True``: the gradients through differentiable torch ops (F.linear and the
    reference cross-entropy), so second derivatives are PyTorch's."""
    from .reference import cross_entropy_reference

    opts = lc.opts
    with torch.enable_grad():
        logits = F.linear(x, W, b).to(compute_dtype(x.dtype))
        divisor = None
        if opts.reduction == "sum":
            divisor = lc.divisor if lc.divisor is not None else 1.0 / opts.inv_divisor
        loss, lse, z_term = cross_entropy_reference(
            logits, lc.target, None if lc.weight is None else lc.weight.to(logits.dtype),
            opts.ignore_index, opts.reduction, opts.label_smoothing, z_loss=opts.z_loss,
            softcap=opts.softcap, logit_scale=opts.logit_scale, divisor=divisor, return_aux=True)
        outputs, upstream = [loss], [g_loss.to(loss.dtype).expand(loss.shape)]
        if g_lse is not None:
            if lc.skip_ignored:  # a skipped row's lse is the constant 0
                g_lse = torch.where(lc.target == opts.ignore_index, 0.0, g_lse)
            outputs.append(lse)
            upstream.append(g_lse.to(lse.dtype))
        if g_z is not None and opts.z_loss:
            outputs.append(z_term)
            upstream.append(g_z.to(z_term.dtype).expand(z_term.shape))
        inputs = [t for t, n in zip((x, W, b), need) if n]
        # grad_outputs, not a scalar objective: see triton_xent.autograd._reference_grads.
        got = iter(torch.autograd.grad(outputs, inputs, upstream, create_graph=True))
    return tuple(next(got) if n else None for n in need)


def _no_second_order_parallel():
    return RuntimeError(
        "triton_xent: a second derivative (create_graph=True) of a vocabulary-parallel "
        "linear_cross_entropy is not supported (the first derivative lives on other ranks). "
        "Drop create_graph, or the process group for this loss.")


# ---------------------------------------------------------------------------------------------
# Eager path


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, target, weight, divisor, lc: LinearCall, need):
        lc = lc._replace(x=x, W=W, b=b, target=target, weight=weight, divisor=divisor)
        out = forward(lc, need)
        ctx.lc = lc._replace(x=None, W=None, b=None, target=None, weight=None, divisor=None)
        ctx.need = need
        ctx.grads = (out.dX, out.dW, out.db)
        ctx.set_materialize_grads(False)
        # References for a recompute and for second derivatives (no copies).
        ctx.save_for_backward(x, W, b, target, weight, divisor, out.stats, out.dens)
        ctx.mark_non_differentiable(out.argmax)
        return out.loss, out.lse, out.z_term, out.argmax

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, g_argmax):
        x, W, b, target, weight, divisor, stats, dens = ctx.saved_tensors
        lc = ctx.lc._replace(x=x, W=W, b=b, target=target, weight=weight, divisor=divisor)
        need = ctx.need
        if g_loss is None and g_lse is None and g_z is None:
            return (None,) * 8
        if g_loss is None:  # only the aux outputs carry a gradient
            g_loss = torch.zeros(stats.shape[1] if lc.opts.reduction == "none" else (),
                                 dtype=stats.dtype, device=stats.device)
        if torch.is_grad_enabled():  # create_graph=True
            if lc.shard is not None:
                raise _no_second_order_parallel()
            grads = _reference_grads(lc, x, W, b, g_loss, g_lse, g_z, need)
            return tuple(t if n else None for t, n in zip(grads, need)) + (None,) * 5
        g_lse = fold_z_grad(lc.opts, False, target, stats, dens, g_lse, g_z)
        if lc.opts.reduction == "none" or g_lse is not None:
            ctx.grads = None
            grads = backward_recompute(lc, stats, dens, g_loss, g_lse, need)
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
# Functional path: custom ops (torch.compile, functorch transforms)


def _opts_of(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, inv_divisor,
             all_rows=False, argmax=False):
    return CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                     inv_divisor, all_rows, argmax)


def _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing, z_loss,
           softcap, logit_scale, inv_divisor, all_rows, argmax, backend, out_dtype, chunk_rows,
           fp32_accum, skip_ignored, group_name, need_x) -> LinearCall:
    opts = _opts_of(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    inv_divisor, all_rows, argmax)
    shard = parallel.linear_shard_by_name(group_name, x=x, W=W, b=b, weight=weight, opts=opts,
                                          divisor=divisor, chunk_rows=chunk_rows,
                                          skip_ignored=skip_ignored, need_x=need_x)
    if shard is not None:
        chunk_rows = shard.chunk_rows
        if target.device.type == "cpu" and target.numel():  # as an eager call checks on the CPU
            from ._validation import check_target_range

            check_target_range(target, shard.vocab_size, opts.ignore_index)
    return LinearCall(x, W, b, target, weight, divisor, opts, backend, out_dtype, chunk_rows,
                      fp32_accum, skip_ignored, shard)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op(f"{_LIB}::linear_ce_forward", mutates_args=())
def linear_ce_forward_op(
    x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], divisor: Optional[torch.Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    logit_scale: Optional[float], inv_divisor: float, all_rows: bool, argmax: bool, backend: str,
    out_dtype: torch.dtype, chunk_rows: int, fp32_accum: bool, skip_ignored: bool,
    group_name: str, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    lc = _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing,
                z_loss, softcap, logit_scale, inv_divisor, all_rows, argmax, backend, out_dtype,
                chunk_rows, fp32_accum, skip_ignored, group_name, need_x)
    out = forward(lc, (need_x, need_w, need_b))
    return (out.loss, out.lse, out.z_term, out.argmax, out.stats, out.dens,
            _or_empty(out.dX if need_x else None, x), _or_empty(out.dW, x), _or_empty(out.db, x))


def _grads_fake(x, W, b, need_x, need_w, need_b, grads: bool):
    dX = torch.empty_like(x) if grads and need_x else x.new_empty(0)
    dW = torch.empty_like(W) if grads and need_w else x.new_empty(0)
    db = torch.empty_like(b) if grads and need_b and b is not None else x.new_empty(0)
    return dX, dW, db


@linear_ce_forward_op.register_fake
def _(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, inv_divisor, all_rows, argmax, backend, out_dtype, chunk_rows, fp32_accum,
      skip_ignored, group_name, need_x, need_w, need_b):
    N = x.shape[0]
    cdt = compute_dtype(x.dtype)
    red = (N,) if reduction == "none" else ()
    return ((x.new_empty(red, dtype=out_dtype), x.new_empty((N,), dtype=cdt),
             x.new_empty(red, dtype=cdt), x.new_empty((N if argmax else 0,), dtype=torch.int64),
             x.new_empty((6, N), dtype=cdt), x.new_empty((2,), dtype=cdt))
            + _grads_fake(x, W, b, need_x, need_w, need_b, reduction != "none"))


@torch.library.custom_op(f"{_LIB}::linear_ce_backward", mutates_args=())
def linear_ce_backward_op(
    g_loss: torch.Tensor, g_lse: Optional[torch.Tensor], stats: torch.Tensor, dens: torch.Tensor,
    x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], divisor: Optional[torch.Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
    logit_scale: Optional[float], inv_divisor: float, all_rows: bool, argmax: bool, backend: str,
    out_dtype: torch.dtype, chunk_rows: int, fp32_accum: bool, skip_ignored: bool,
    group_name: str, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lc = _lc_of(x, W, b, target, weight, divisor, ignore_index, reduction, label_smoothing,
                z_loss, softcap, logit_scale, inv_divisor, all_rows, argmax, backend, out_dtype,
                chunk_rows, fp32_accum, skip_ignored, group_name, need_x)
    dX, dW, db = backward_recompute(lc, stats, dens, g_loss, g_lse, (need_x, need_w, need_b))
    return _or_empty(dX if need_x else None, x), _or_empty(dW, x), _or_empty(db, x)


@linear_ce_backward_op.register_fake
def _(g_loss, g_lse, stats, dens, x, W, b, target, weight, divisor, ignore_index, reduction,
      label_smoothing, z_loss, softcap, logit_scale, inv_divisor, all_rows, argmax, backend,
      out_dtype, chunk_rows, fp32_accum, skip_ignored, group_name, need_x, need_w, need_b):
    return _grads_fake(x, W, b, need_x, need_w, need_b, True)


class _LinearOpArgs(NamedTuple):
    """The non-tensor arguments of the linear custom ops, in their order (after the tensors)."""

    opts: CEOptions
    backend: str
    out_dtype: torch.dtype
    chunk_rows: int
    fp32_accum: bool
    skip_ignored: bool
    group_name: str
    need: tuple[bool, bool, bool]

    def args(self) -> tuple:
        return (*self.opts, self.backend, self.out_dtype, self.chunk_rows, self.fp32_accum,
                self.skip_ignored, self.group_name, *self.need)


class _FunctionalLinearCrossEntropy(torch.autograd.Function):
    """Autograd of the linear custom ops, in the form functorch composes with (see
    ``triton_xent.autograd._FunctionalCrossEntropy``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b, target, weight, divisor, a: _LinearOpArgs):
        return linear_ce_forward_op(x, W, b, target, weight, divisor, *a.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.a = inputs[6]
        ctx.has_b = inputs[2] is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[3:])
        # The inputs for a recompute ("none", or a gradient of the aux lse); the forward's
        # gradients for "mean"/"sum".
        ctx.save_for_backward(*inputs[:6], output[4], output[5], *output[6:])

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, *unused):
        x, W, b, target, weight, divisor, stats, dens, dX, dW, db = ctx.saved_tensors
        a = ctx.a
        g_lse = fold_z_grad(a.opts, False, target, stats, dens, g_lse, g_z)
        if g_loss is None and g_lse is None:
            return (None,) * 7
        if g_loss is None:
            g_loss = torch.zeros(stats.shape[1] if a.opts.reduction == "none" else (),
                                 dtype=stats.dtype, device=stats.device)
        if any(n and not computed for n, computed in zip(ctx.needs_input_grad[:3], a.need)):
            raise RuntimeError(  # never a silently missing gradient
                "triton_xent: linear_cross_entropy was asked for a gradient it did not plan for "
                f"(needed {ctx.needs_input_grad[:3]}, planned {a.need}).")
        grads = _FunctionalLinearBackward.apply(g_loss, g_lse, stats, dens, x, W, b, target,
                                                weight, divisor, dX, dW, db, a)
        dX, dW, db = (t if n else None for t, n in zip(grads, a.need))
        return dX, dW, db if ctx.has_b else None, None, None, None, None


class _FunctionalLinearBackward(torch.autograd.Function):
    """The gradients for the upstream gradients: the forward's scaled (``"mean"``/``"sum"``), or
    recomputed (``"none"``, or a gradient of the aux lse); a node that refuses to be
    differentiated (no silent zero)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g_loss, g_lse, stats, dens, x, W, b, target, weight, divisor, dX, dW, db,
                a: _LinearOpArgs):
        if a.opts.reduction == "none" or g_lse is not None:
            return linear_ce_backward_op(g_loss, g_lse, stats, dens, x, W, b, target, weight,
                                         divisor, *a.args())
        return tuple(t * g_loss.to(t.dtype) for t in (dX, dW, db))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise first_order_only("linear_cross_entropy")


# The ops' own autograd, for direct callers of torch.ops.triton_xent.linear_ce_forward (the
# package goes through the Functions above).
_N_FWD = 24


def _op_setup_context(ctx, inputs, output):
    ctx.a = _LinearOpArgs(_opts_of(*inputs[6:15]), *inputs[15:21], tuple(inputs[21:24]))
    ctx.has_b = inputs[2] is not None
    ctx.save_for_backward(*inputs[:6], output[4], output[5], *output[6:])


def _op_backward(ctx, g_loss, g_lse, g_z, *unused):
    x, W, b, target, weight, divisor, stats, dens, dX, dW, db = ctx.saved_tensors
    a = ctx.a
    g_lse = fold_z_grad(a.opts, False, target, stats, dens, g_lse, g_z)
    if g_loss is None:
        g_loss = torch.zeros(stats.shape[1] if a.opts.reduction == "none" else (),
                             dtype=stats.dtype, device=stats.device)
    if a.opts.reduction == "none" or g_lse is not None:
        grads = linear_ce_backward_op(g_loss, g_lse, stats, dens, x, W, b, target, weight,
                                      divisor, *a.args())
    else:
        grads = tuple(t * g_loss.to(t.dtype) for t in (dX, dW, db))
    dX, dW, db = (t if n else None for t, n in zip(grads, a.need))
    return (dX, dW, db if ctx.has_b else None) + (None,) * (_N_FWD - 3)


def _op_no_double_backward(ctx, *grads):
    raise first_order_only("linear_cross_entropy")


linear_ce_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)
linear_ce_backward_op.register_autograd(_op_no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)


@torch.library.register_vmap(f"{_LIB}::linear_ce_forward")
def _linear_forward_vmap(info, in_dims, *args):
    return vmap_loop(linear_ce_forward_op, info, in_dims, args)


@torch.library.register_vmap(f"{_LIB}::linear_ce_backward")
def _linear_backward_vmap(info, in_dims, *args):
    return vmap_loop(linear_ce_backward_op, info, in_dims, args)


# ---------------------------------------------------------------------------------------------
# Entry point


def run(lc: LinearCall, need: tuple[bool, bool, bool]):
    """Runs one call on the right path: ``loss, lse, z_term, argmax`` (argmax empty unless
    asked for)."""
    tensors = (lc.x, lc.W, lc.b, lc.target, lc.weight, lc.divisor)
    compiling = torch.compiler.is_compiling()
    transform = not compiling and in_transform(*tensors)
    if compiling or transform:
        if transform:  # requires_grad reads False on a batched tensor: look through it
            on = torch.is_grad_enabled()
            need = (on and requires_grad(lc.x), on and requires_grad(lc.W),
                    on and lc.b is not None and requires_grad(lc.b))
        a = _LinearOpArgs(lc.opts, lc.backend, lc.out_dtype, lc.chunk_rows, lc.fp32_accum,
                          lc.skip_ignored, parallel.group_name(lc.shard), need)
        return _FunctionalLinearCrossEntropy.apply(*tensors, a)[:4]
    if any(need):
        return _LinearCrossEntropyFunction.apply(*tensors, lc, need)
    out = forward(lc, need)
    return out.loss, out.lse, out.z_term, out.argmax
