"""The op layer of ``linear_cross_entropy``: the chunk loop driven by the cross-entropy pipeline,
with its autograd, eager and compiled.

Per chunk of token rows the logits are made by a GEMM and turned in place into their gradient by
the pipeline's entry points (:func:`triton_xent.ops.cross_entropy.rows` and ``backward``: with a
process group, their merge across ranks), then two GEMMs give ``dX`` and ``dW`` (the chunk loop:
:mod:`triton_xent.ops.linear_chunks`). For ``reduction="mean"``/``"sum"`` every gradient is
computed in the forward, for an upstream gradient of 1, and the backward returns them untouched
when the upstream gradient is 1 (one tiny launch per gradient reads it on the device), or scales
them in place otherwise. For ``reduction="none"``, when the aux lse carries a gradient, and for a
second backward (``retain_graph=True``), the backward runs the chunks again from the forward's
merged statistics (6 numbers per row) with the upstream gradients folded into the cross-entropy
step (4 GEMMs in all, no communication in the backward). Second derivatives go through
``F.linear`` and the reference formula (differentiable torch ops).

One Function (:class:`_LinearCrossEntropy`) and one backward body (:func:`_backward`) serve
eager calls, torch.compile and functorch transforms; under the last two the work runs in the
custom ops ``triton_xent::linear_ce_forward`` / ``linear_ce_backward`` (options as one string),
whose backward scales out of place (a custom op may not keep a buffer aside). Their vmap rules
run one call per batch element.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import parallel
from ..backends.protocol import NUM_FIELDS, Options, compute_dtype, entropy_of
from . import cross_entropy as ce
from .linear_chunks import linear_ce_chunks


class LinearCall(NamedTuple):
    """One call, normalised: ``x (N, D)``, ``W (V_local, D)``, ``b``, ``target (N,)``, class
    ``weight``, a 0-d ``divisor`` tensor, the options (chunking and the gradients to compute
    included), and the shard (or None)."""

    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor | None
    target: torch.Tensor
    weight: torch.Tensor | None
    divisor: torch.Tensor | None
    opts: Options
    shard: parallel.Shard | None = None


def _dens(lc: LinearCall, cdt) -> torch.Tensor:
    """The whole batch's denominators (every chunk's gradient is scaled by them)."""
    opts, target = lc.opts, lc.target
    if lc.shard is None or opts.reduction != "mean" or lc.weight is None:
        return ce.BACKENDS[opts.backend].denominators(target, lc.weight, opts,
                                                        divisor=lc.divisor, V=lc.W.shape[0],
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


def _chunk_call(lc: LinearCall, logits, rows, cdt) -> ce.Call:
    # A chunk's logits as a cross-entropy call; row outputs in the compute dtype.
    return ce.Call(logits, lc.target[rows], lc.weight, lc.divisor,
                   lc.opts._replace(out_dtype=cdt), lc.shard)


def _forward_step(lc: LinearCall, dens: torch.Tensor, cdt, argmax: torch.Tensor | None):
    """The cross-entropy of one chunk of logits, the gradient written in place for an upstream
    gradient of 1; each row's arg-max goes into ``argmax`` (with ``opts.argmax``)."""

    def step(logits, rows, compute_grad):
        out = ce.rows(_chunk_call(lc, logits, rows, cdt), compute_grad=compute_grad,
                      inplace=True, dens=dens)
        if argmax is not None:
            argmax[rows] = out.argmax
        return out.ce, out.z, out.lse, out.stats, out.grad

    return step


def _recompute_step(lc: LinearCall, stats, dens, g_loss, g_lse, g_ent, cdt):
    """The backward's recompute: one chunk's gradient for the upstream gradients ``g_loss`` (0-d,
    or one per row), ``g_lse`` and ``g_ent`` (per row, or None), from the forward's merged
    statistics and denominators (no communication)."""

    def step(logits, rows, compute_grad):
        st = stats[:, rows]
        ce.backward(_chunk_call(lc, logits, rows, cdt), st, dens, logits,
                    g_loss if g_loss.dim() == 0 else g_loss[rows],
                    None if g_lse is None else g_lse[rows],
                    g_ent=None if g_ent is None else g_ent[rows], recompute_all=True)
        return st[0], st[0], st[0], st, logits

    return step


def _chunks(lc: LinearCall, step, need, *, grad_pass: bool = True):
    # With a group, d(input) is all-reduced: every rank computes it when some rank needs it, in
    # the pass that computes gradients (which one is agreed: the reduction decides).
    opts = lc.opts
    need_x = need[0] or (grad_pass and lc.shard is not None and lc.shard.need_dx)
    with torch.autocast(lc.x.device.type, enabled=False):  # the inputs were cast already
        ce_rows, z, lse, stats, dX, dW, db = linear_ce_chunks(
            lc.x, lc.W, lc.b, lc.target, step=step, ignore_index=opts.ignore_index,
            need_x=need_x, need_w=need[1], need_b=need[2], chunk_rows=opts.chunk_rows,
            fp32_accum=opts.fp32_accum, skip_ignored=opts.skip_ignored,
            stats_dtype=compute_dtype(lc.x.dtype))
        if dX is not None and lc.shard is not None:
            dX = parallel.all_reduce(dX, "sum", lc.shard.group)  # d(input) sums over the shards
    return ce_rows, z, lse, stats, dX, dW, db


def forward(lc: LinearCall):
    """``loss, lse, z_term, ent, argmax, stats, dens, dX, dW, db``: ``ent`` empty unless asked
    for; gradients (of the reduced loss, upstream 1) only for ``"mean"``/``"sum"``, else None."""
    opts = lc.opts
    cdt = compute_dtype(lc.x.dtype)
    grads = opts.need if opts.reduction != "none" else (False, False, False)
    # Rows skipped as ignored read -1, as every ignored row does in the aux argmax.
    argmax = torch.full((lc.x.shape[0] if opts.argmax else 0,), -1, dtype=torch.int64,
                        device=lc.x.device)
    dens = _dens(lc, cdt)
    ce_rows, z, lse, stats, dX, dW, db = _chunks(
        lc, _forward_step(lc, dens, cdt, argmax if opts.argmax else None), grads,
        grad_pass=opts.reduction != "none")
    if opts.reduction == "none":
        loss, z_term = (ce_rows + z if opts.z_loss else ce_rows).to(opts.out_dtype), z
    else:
        loss, z_term = ce.BACKENDS[opts.backend].finalize(ce_rows, z, dens.to(ce_rows.dtype),
                                                            opts)
    ent = entropy_of(stats) if opts.entropy else stats.new_empty(0)
    return loss, lse, z_term, ent, argmax, stats, dens, dX, dW, db


def backward_recompute(lc: LinearCall, stats, dens, g_loss, g_lse, g_ent=None):
    """``dX, dW, db`` for the upstream gradients ``g_loss`` (0-d, or per row for ``"none"``),
    ``g_lse`` and ``g_ent`` (per row, or None): the chunks run again (4 GEMMs in all)."""
    cdt = compute_dtype(lc.x.dtype)
    g_loss = g_loss.reshape(-1) if g_loss.dim() else g_loss
    g_lse = None if g_lse is None else g_lse.reshape(-1)
    g_ent = None if g_ent is None else g_ent.reshape(-1)
    return _chunks(lc, _recompute_step(lc, stats, dens, g_loss, g_lse, g_ent, cdt),
                   lc.opts.need)[4:]


# ---------------------------------------------------------------------------------------------
# Autograd: one Function, one backward body


def _backward(ctx, g_loss, g_lse, g_z, g_ent):
    """The one backward of ``linear_cross_entropy`` (eager, compiled, functorch, the custom
    op's own autograd): ``(dX, dW, db)``."""
    x, W, b, target, weight, divisor, stats, dens = ctx.saved_tensors[:8]
    opts = ctx.opts
    if not opts.entropy:
        g_ent = None  # (an empty placeholder output)
    if g_loss is None and g_lse is None and g_z is None and g_ent is None:
        return None, None, None
    lc = LinearCall(x, W, b, target, weight, divisor, opts, ctx.shard)
    if ctx.eager and torch.is_grad_enabled():  # create_graph=True
        if lc.shard is not None:
            raise ce.no_second_order("a vocabulary-parallel linear_cross_entropy",
                                     "the first derivative lives on other ranks")
        with torch.enable_grad():
            loss, lse, z_term, ent = ce.reference(F.linear(x, W, b), target, weight, divisor,
                                                  opts)
            inputs = [t for t, n in zip((x, W, b), opts.need) if n]
            got = iter(ce.reference_grads((loss, lse, z_term, ent), (
                torch.zeros((), device=stats.device) if g_loss is None else g_loss, g_lse,
                g_z if opts.z_loss else None, g_ent), inputs))
        return tuple(next(got) if n else None for n in opts.need)
    if g_loss is None:  # only the aux outputs carry a gradient
        g_loss = torch.zeros(stats.shape[1] if opts.reduction == "none" else (),
                             dtype=stats.dtype, device=stats.device)
    g_lse = ce.fold_z_grad(opts, target, stats, dens, g_lse, g_z)
    if not ctx.eager:  # an opaque op, whose own derivative raises
        if any(n and not planned for n, planned in zip(ctx.needs_input_grad[:3], opts.need)):
            raise RuntimeError(  # never a silently missing gradient
                "triton_xent: linear_cross_entropy was asked for a gradient it did not plan for "
                f"(needed {ctx.needs_input_grad[:3]}, planned {opts.need}).")
        grads = _OpaqueBackward.apply(g_loss, g_lse, g_ent, stats, dens, x, W, b, target,
                                      weight, divisor, *ctx.saved_tensors[8:], opts)
    else:
        grads, ctx.grads = ctx.grads, None  # used once: a second backward recomputes them
        if opts.reduction == "none" or g_lse is not None or g_ent is not None or grads is None:
            grads = backward_recompute(lc, stats, dens, g_loss, g_lse, g_ent)
        else:
            B = ce.BACKENDS[opts.backend]
            grads = tuple(None if t is None else B.scale_(t, g_loss.detach()) for t in grads)
    dX, dW, db = (t if n else None for t, n in zip(grads, opts.need))
    return dX, dW, db if b is not None else None


def _grads_or_empty(grads, x):
    return tuple(t if t is not None else x.new_empty(0) for t in grads)


class _LinearCrossEntropy(torch.autograd.Function):
    """``(loss, lse, z_term, ent, argmax, stats, dens, dX, dW, db)``; ``eager`` runs the chunks here
    and keeps the forward's gradients aside, else the custom op runs (compile, functorch)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b, target, weight, divisor, opts: Options, shard, eager: bool):
        if not eager:
            return linear_ce_forward_op(x, W, b, target, weight, divisor, opts.encode())
        out = forward(LinearCall(x, W, b, target, weight, divisor, opts, shard))
        return out[:7] + _grads_or_empty(out[7:], x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, b, target, weight, divisor, opts, shard, eager = inputs
        ctx.opts, ctx.shard, ctx.eager = opts, shard, eager
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[4:])
        # Eager keeps the forward's gradients on ctx, to scale in place and hand to autograd.
        ctx.grads = (tuple(t if n else None for t, n in zip(output[7:], opts.need))
                     if eager and opts.reduction != "none" else None)
        ctx.save_for_backward(x, W, b, target, weight, divisor, output[5], output[6],
                              *(() if eager else output[7:]))

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, g_ent, *unused):
        return (*_backward(ctx, g_loss, g_lse, g_z, g_ent), None, None, None, None, None, None)


class _OpaqueBackward(torch.autograd.Function):
    """The gradients for the upstream gradients, out of place: the forward's scaled
    (``"mean"``/``"sum"``) or recomputed (``"none"``, or a gradient of the aux lse); a node that
    refuses to be differentiated (no silent zero)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g_loss, g_lse, g_ent, stats, dens, x, W, b, target, weight, divisor, dX, dW, db,
                opts: Options):
        if opts.reduction == "none" or g_lse is not None or g_ent is not None:
            return linear_ce_backward_op(g_loss, g_lse, g_ent, stats, dens, x, W, b, target,
                                         weight, divisor, opts.encode())
        return tuple(t * g_loss.to(t.dtype) for t in (dX, dW, db))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise ce.no_second_order("linear_cross_entropy", "under torch.compile or a functorch "
                                 "transform its gradient is an opaque op")


# ---------------------------------------------------------------------------------------------
# The custom ops (torch.compile, functorch)


def _op_call(x, W, b, target, weight, divisor, spec: str) -> LinearCall:
    lc = LinearCall(x, W, b, target, weight, divisor, Options.decode(spec))
    shard = parallel.shard_by_name(parallel.KIND_LINEAR, lc)
    if shard is not None:
        lc = lc._replace(shard=shard, opts=lc.opts._replace(chunk_rows=shard.chunk_rows))
    return lc


@torch.library.custom_op("triton_xent::linear_ce_forward", mutates_args=())
def linear_ce_forward_op(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor,
    weight: torch.Tensor | None, divisor: torch.Tensor | None, spec: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = forward(_op_call(x, W, b, target, weight, divisor, spec))
    return out[:7] + _grads_or_empty(out[7:], x)


def _grads_fake(x, W, b, opts: Options, made: bool):
    need_x, need_w, need_b = opts.need
    return (torch.empty_like(x) if made and need_x else x.new_empty(0),
            torch.empty_like(W) if made and need_w else x.new_empty(0),
            torch.empty_like(b) if made and need_b and b is not None else x.new_empty(0))


@linear_ce_forward_op.register_fake
def _(x, W, b, target, weight, divisor, spec):
    opts = Options.decode(spec)
    N = x.shape[0]
    cdt = compute_dtype(x.dtype)
    red = (N,) if opts.reduction == "none" else ()
    return ((x.new_empty(red, dtype=opts.out_dtype), x.new_empty((N,), dtype=cdt),
             x.new_empty(red, dtype=cdt), x.new_empty((N if opts.entropy else 0,), dtype=cdt),
             x.new_empty((N if opts.argmax else 0,), dtype=torch.int64),
             x.new_empty((NUM_FIELDS, N), dtype=cdt), x.new_empty((2,), dtype=cdt))
            + _grads_fake(x, W, b, opts, opts.reduction != "none"))


@torch.library.custom_op("triton_xent::linear_ce_backward", mutates_args=())
def linear_ce_backward_op(
    g_loss: torch.Tensor, g_lse: torch.Tensor | None, g_ent: torch.Tensor | None,
    stats: torch.Tensor, dens: torch.Tensor, x: torch.Tensor, W: torch.Tensor,
    b: torch.Tensor | None, target: torch.Tensor, weight: torch.Tensor | None,
    divisor: torch.Tensor | None, spec: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lc = _op_call(x, W, b, target, weight, divisor, spec)
    return _grads_or_empty(backward_recompute(lc, stats, dens, g_loss, g_lse, g_ent), x)


@linear_ce_backward_op.register_fake
def _(g_loss, g_lse, g_ent, stats, dens, x, W, b, target, weight, divisor, spec):
    return _grads_fake(x, W, b, Options.decode(spec), True)


def _op_setup_context(ctx, inputs, output):
    x, W, b, target, weight, divisor, spec = inputs
    ctx.opts, ctx.shard, ctx.eager, ctx.grads = Options.decode(spec), None, False, None
    ctx.save_for_backward(x, W, b, target, weight, divisor, output[5], output[6], *output[7:])


linear_ce_forward_op.register_autograd(
    lambda ctx, g_loss, g_lse, g_z, g_ent, *unused: (*_backward(ctx, g_loss, g_lse, g_z, g_ent),
                                                     None, None, None, None),
    setup_context=_op_setup_context)


def _no_double_backward(ctx, *grads):
    raise ce.no_second_order("linear_cross_entropy", "its gradient is an opaque op")


linear_ce_backward_op.register_autograd(_no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)


@torch.library.register_vmap("triton_xent::linear_ce_forward")
def _linear_forward_vmap(info, in_dims, *args):
    return ce.vmap_loop(linear_ce_forward_op, info, in_dims, args)


@torch.library.register_vmap("triton_xent::linear_ce_backward")
def _linear_backward_vmap(info, in_dims, *args):
    return ce.vmap_loop(linear_ce_backward_op, info, in_dims, args)


# ---------------------------------------------------------------------------------------------
# Entry point


def run(lc: LinearCall):
    """Runs one call on the right path: ``loss, lse, z_term, ent, argmax`` (ent and argmax empty
    unless asked for)."""
    tensors = lc[:6]
    compiling = torch.compiler.is_compiling()
    transform = not compiling and ce.in_transform(*tensors)
    opts = lc.opts
    if transform:  # requires_grad reads False on a batched tensor: look through it
        on = torch.is_grad_enabled()
        opts = opts._replace(need=(on and ce.requires_grad(lc.x), on and ce.requires_grad(lc.W),
                                   on and lc.b is not None and ce.requires_grad(lc.b)))
    if compiling or transform:
        return _LinearCrossEntropy.apply(*tensors, opts, lc.shard, False)[:5]
    if any(opts.need):
        return ce.eager_apply(_LinearCrossEntropy, *tensors, opts, lc.shard, True)[:5]
    return forward(lc)[:5]
