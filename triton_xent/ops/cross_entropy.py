"""The op layer of ``cross_entropy``: the pipeline and its autograd, eager and compiled, in one place.

The pipeline. Cross-entropy is ``partial statistics -> merge -> gradient``, one algorithm at
three scales, one formula per backend (:class:`~triton_xent.backends.protocol.Backend`): with one
process the backend's ``forward`` merges within each row (the Triton fused kernel block by block,
its split path across programs); with a process group each rank computes its shard's
``partials``, :func:`triton_xent.parallel.merge_ranks` merges them across the ranks, and the
backend's ``finish`` writes the row losses and the shard's gradient. :func:`forward` and
:func:`backward` are the two entry points; :data:`BACKENDS` maps a backend's name to its module.

Autograd. One :class:`_CrossEntropy` Function serves every mode with one backward body
(:func:`_backward`), also registered as the custom ops' own autograd:

* eager: the forward writes the gradient for an upstream gradient of 1 (one read of the logits,
  one write); the backward leaves it untouched when the upstream gradient is 1 (a tiny launch
  reads it on the device: no host sync, CUDA-graph safe), else recomputes the rows that need it
  from the logits (rounded once). A second backward (``retain_graph=True``) recomputes the whole
  gradient from the kept logits.
* torch.compile and functorch transforms (vmap, ``torch.func.grad``): the custom ops
  ``triton_xent::ce_forward`` (statistics and loss, one read) and ``triton_xent::ce_backward``
  (the gradient with the upstream folded in); a custom op may not keep a buffer aside, so this
  mode moves 3 passes where eager moves 2, exact for any upstream gradient. The options travel
  as one string (:meth:`Options.encode`). The ops carry vmap rules (the batch folded into the
  rows for ``"none"``, one call per batch element otherwise).

Second derivatives (``create_graph=True``) go through the reference formula (differentiable
torch ops) on the saved logits; class weights that require grad (probability targets) run the
reference formula in the forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import parallel
from ..backends.protocol import (
    NUM_FIELDS,
    Backend,
    Options,
    RowOutputs,
    compute_dtype,
    entropy_of,
)
from ..reference import reference, reference_grads

_LIB = "triton_xent"


class _Backends(dict):
    """``BACKENDS[name]``: the backend module of that name ("triton", "torch"), imported on first
    use (Triton only when asked for); later lookups are a dict's."""

    def __missing__(self, name: str) -> Backend:
        if name == "triton":
            from ..backends import triton_ce as backend
        else:
            from ..backends import torch_ce as backend
        self[name] = backend
        return backend


BACKENDS = _Backends()


class Call(NamedTuple):
    """One call, normalised to rows: ``logits (N, V_local)``, ``target (N,)`` (class ids) or
    ``(N, V_local)`` (probabilities), ``weight (V_local,)``, a 0-d ``divisor`` tensor or None,
    the options, and the shard (None: one process)."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    divisor: torch.Tensor | None
    opts: Options
    shard: parallel.Shard | None = None


class Result(NamedTuple):
    """``loss`` (0-d, or per row for ``"none"``), ``lse`` (per row), ``z_term`` (reduced like the
    loss), ``ent`` (per row, or None), ``argmax`` (or None), and what a backward needs: ``grad``
    (or None), ``stats``, ``dens``."""

    loss: torch.Tensor
    lse: torch.Tensor
    z_term: torch.Tensor
    ent: torch.Tensor | None
    argmax: torch.Tensor | None
    grad: torch.Tensor | None
    stats: torch.Tensor
    dens: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The pipeline


def rows(call: Call, *, compute_grad: bool, inplace: bool = False,
         grad_target: torch.Tensor | None = None, dens: torch.Tensor | None = None) -> RowOutputs:
    """Per-row losses, merged statistics and (with ``compute_grad``) dL/dlogits for an upstream
    gradient of 1, written over the logits with ``inplace``; ``grad_target`` receives
    d(loss)/d(target) of class-probability targets; ``dens``: the reduction's denominators
    (the fused head passes the whole batch's to each chunk), else computed here."""
    B = BACKENDS[call.opts.backend]
    if call.shard is None:
        return B.forward(call.logits, call.target, call.weight, call.opts, divisor=call.divisor,
                         dens=dens, compute_grad=compute_grad, inplace=inplace,
                         grad_target=grad_target)
    return parallel.shard_forward(B, call, compute_grad=compute_grad, inplace=inplace,
                                  grad_target=grad_target, dens=dens)


def forward(call: Call, *, compute_grad: bool, inplace: bool = False,
            grad_target: torch.Tensor | None = None) -> Result:
    """:func:`rows`, reduced as ``opts.reduction`` asks."""
    out = rows(call, compute_grad=compute_grad, inplace=inplace, grad_target=grad_target)
    opts = call.opts
    if opts.reduction == "none":
        loss, z_term = out.loss_rows, out.z
    else:
        loss, z_term = BACKENDS[opts.backend].finalize(out.ce, out.z, out.dens, opts)
    ent = entropy_of(out.stats) if opts.entropy else None
    return Result(loss, out.lse, z_term, ent, out.argmax, out.grad, out.stats, out.dens)


def backward(call: Call, stats: torch.Tensor, dens: torch.Tensor, grad: torch.Tensor | None,
             g_loss: torch.Tensor, g_lse: torch.Tensor | None, *,
             g_ent: torch.Tensor | None = None, inplace: bool = False,
             grad_target: torch.Tensor | None = None, recompute_all: bool = False
             ) -> torch.Tensor:
    """The gradient for the upstream gradients ``g_loss`` (0-d, or per row for ``"none"``),
    ``g_lse`` and ``g_ent`` (per row, the aux lse's and entropy's gradients, or None).

    ``grad`` is the forward's gradient (upstream 1): it is updated in place, recomputing from
    the logits and the forward's ``stats`` only the rows where ``g_loss != 1`` or an aux
    upstream is not 0
    (so each element is rounded once), with no pass at all in the usual case. With ``inplace``
    the logits are gone: the gradient is scaled (rounded twice where ``g != 1``). ``grad`` None:
    the whole gradient is computed here, upstream folded in; ``recompute_all``: likewise, into
    ``grad`` (the fused head's chunk of logits)."""
    B = BACKENDS[call.opts.backend]
    if inplace:
        return B.scale_(grad, g_loss.detach())
    fresh = grad is None
    if fresh:
        grad = torch.empty_like(call.logits, memory_format=torch.contiguous_format)
    offset, V = (0, call.logits.shape[1]) if call.shard is None else (
        call.shard.offset, call.shard.vocab_size)
    B.finish(call.logits, call.target, call.weight, call.opts, stats, None, dens=dens,
             rows=None, grad=grad, offset=offset, vocab_size=V, upstream=g_loss.detach(),
             upstream_lse=None if g_lse is None else g_lse.detach(),
             upstream_ent=None if g_ent is None else g_ent.detach(),
             skip_unit=not (fresh or recompute_all),
             grad_target=grad_target)
    return grad


def fold_z_grad(opts: Options, target, stats, dens, g_lse, g_z):
    """The aux z-loss term's upstream gradient ``g_z``, as one on the rows' lse (added to
    ``g_lse``): ``z_term = sum_kept z_loss lse_i**2 / D`` (``D``: the reduction's z-loss
    denominator; per row for ``"none"``), so ``d z_term / d lse_i = 2 z_loss lse_i / D`` on the
    kept rows. A few torch ops on N values."""
    if g_z is None or opts.z_loss == 0.0:
        return g_lse
    lse = stats[0] + stats[1].log()  # the kernels' M + log(s)
    scale = g_z.to(lse.dtype) * (2.0 * opts.z_loss)
    if opts.reduction != "none":
        scale = scale / dens[1].to(lse.dtype)
    kept = torch.ones_like(lse, dtype=torch.bool) if opts.probs else target != opts.ignore_index
    g = torch.where(kept, scale * lse, torch.zeros_like(lse))
    return g if g_lse is None else g_lse + g


def no_second_order(what: str, why: str):
    return RuntimeError(
        f"triton_xent: a second derivative (create_graph=True) of {what} is not supported: "
        f"{why}. Compute it eagerly (torch.autograd.grad with create_graph=True, outside "
        "torch.compile and torch.func), without inplace_backward or a process group, or with "
        "triton_xent.reference.cross_entropy_reference.")


# ---------------------------------------------------------------------------------------------
# Autograd: one Function, one backward body


def _backward(ctx, g_loss, g_lse, g_z, g_ent):
    """The one backward of ``cross_entropy`` (eager, compiled, functorch, the custom op's own
    autograd): ``(d logits, d target)``."""
    logits, target, weight, divisor, stats, dens = ctx.saved_tensors
    opts = ctx.opts
    if not opts.entropy:
        g_ent = None  # (an empty placeholder output)
    if g_loss is None and g_lse is None and g_z is None and g_ent is None:
        return None, None
    if ctx.eager and torch.is_grad_enabled():  # create_graph=True
        if ctx.inplace or ctx.shard is not None:
            raise no_second_order("cross_entropy", "the first derivative was written over the "
                                  "logits (inplace_backward=True) or lives on other ranks")
        with torch.enable_grad():
            loss, lse, z_term, ent = reference(logits, target, weight, divisor, opts)
            inputs = [logits] + ([target] if opts.probs and target.requires_grad else [])
            grads = reference_grads((loss, lse, z_term, ent), (
                torch.zeros((), device=stats.device) if g_loss is None else g_loss, g_lse,
                g_z if opts.z_loss else None, g_ent), inputs)
        return grads[0], (grads[1] if len(grads) > 1 else None)
    if g_loss is None:  # only the aux outputs carry a gradient
        g_loss = torch.zeros(stats.shape[1] if opts.reduction == "none" else (),
                             dtype=stats.dtype, device=stats.device)
    g_lse = fold_z_grad(opts, target, stats, dens, g_lse, g_z)
    if not ctx.eager:  # an opaque op, whose own derivative raises
        return _OpaqueBackward.apply(logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                                     g_ent, opts.encode(), ctx.target_grad)
    call = Call(logits, target, weight, divisor, opts, ctx.shard)
    # The forward's gradient (upstream 1) is used once: a second backward (retain_graph=True)
    # recomputes everything from the kept logits.
    grad, ctx.grad = ctx.grad, None
    gt, ctx.gt = ctx.gt, None
    if ctx.inplace:
        if grad is None or g_lse is not None or g_ent is not None:
            why = ("the call is differentiated a second time (retain_graph=True)" if grad is None
                   else "the aux lse, z-loss term or entropy carries a gradient")
            raise RuntimeError(
                f"triton_xent: this backward needs the logits, but inplace_backward=True wrote "
                f"the gradient over them, and {why}. Drop inplace_backward for this loss.")
        return backward(call, stats, dens, grad, g_loss, None, inplace=True), None
    fresh_gt = None
    if gt is not None:  # d(loss)/d(target) made in the forward for an upstream of 1
        gt.mul_(g_loss.to(gt.dtype).unsqueeze(-1) if g_loss.dim() else g_loss.to(gt.dtype))
    elif ctx.target_grad:  # computed with the whole gradient (grad is None here too)
        gt = fresh_gt = torch.empty(target.shape, dtype=compute_dtype(logits.dtype),
                                    device=target.device)
    return backward(call, stats, dens, grad, g_loss, g_lse, g_ent=g_ent,
                    grad_target=fresh_gt), gt


class _CrossEntropy(torch.autograd.Function):
    """``(loss, lse, z_term, ent, argmax)`` of one call (``ent`` empty unless asked for);
    ``eager`` runs the pipeline itself and keeps the forward's gradient (two more outputs), else
    the custom op runs (compile, functorch)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, divisor, opts: Options, shard, eager: bool,
                inplace: bool):
        if not eager:
            return ce_forward_op(logits, target, weight, divisor, opts.encode())
        target_grad = opts.probs and target.requires_grad
        gt = torch.empty(target.shape, dtype=compute_dtype(logits.dtype),
                         device=target.device) if target_grad else None
        # "none": the rows' upstream gradients are rarely all 1 (a per-token weighting or a mean
        # follows), so the gradient is made in the backward with them folded in (2 passes in
        # all); in place, the logits are gone by then: in the forward.
        in_forward = inplace or opts.reduction != "none"
        res = forward(Call(logits, target, weight, divisor, opts, shard),
                      compute_grad=in_forward, inplace=inplace, grad_target=gt)
        if inplace:
            # The kernels write through a raw pointer: tell autograd the logits changed, so a
            # later use of the old values (e.g. by the op that produced them) raises.
            torch.autograd.graph.increment_version(logits)
        empty = logits.new_empty(0) if not (in_forward and gt is not None) else None
        # detach(): with ``inplace`` the buffer is the logits tensor itself; a fresh alias lets
        # autograd adopt it as the gradient instead of copying it.
        return (res.loss, res.lse, res.z_term, _ent_or_empty(res.ent, logits),
                _argmax_or_empty(res.argmax, logits),
                res.stats, res.dens, res.grad.detach() if in_forward else empty,
                gt if gt is not None else empty)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, divisor, opts, shard, eager, inplace = inputs
        ctx.opts, ctx.shard, ctx.eager, ctx.inplace = opts, shard, eager, inplace
        ctx.target_grad = opts.probs and ctx.needs_input_grad[1]
        made_grad = eager and (inplace or opts.reduction != "none")  # as forward decided
        ctx.grad = output[7] if made_grad else None
        ctx.gt = output[8] if eager and opts.probs and target.requires_grad else None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[4:])
        ctx.save_for_backward(None if inplace else logits, target, weight, divisor, output[5],
                              output[6])

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, g_ent, *unused):
        return (*_backward(ctx, g_loss, g_lse, g_z, g_ent), None, None, None, None, None, None)


class _OpaqueBackward(torch.autograd.Function):
    """``ce_backward_op`` as a node that refuses to be differentiated (no silent zero; a custom
    op's own autograd does not run under ``torch.func.grad``: pytorch/pytorch#168393)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, divisor, stats, dens, g_loss, g_lse, g_ent, spec,
                target_grad):
        grad, gt = ce_backward_op(logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                                  g_ent, spec, target_grad)
        return grad, (gt if target_grad else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise no_second_order("cross_entropy", "under torch.compile or a functorch transform "
                              "its gradient is an opaque op")


def _argmax_or_empty(argmax, logits):
    return argmax if argmax is not None else logits.new_empty(0, dtype=torch.int64)


def _ent_or_empty(ent, logits):
    return ent if ent is not None else logits.new_empty(0, dtype=compute_dtype(logits.dtype))


# ---------------------------------------------------------------------------------------------
# The custom ops (torch.compile, functorch): the options as one string


def _op_call(logits, target, weight, divisor, spec: str) -> Call:
    # With a group (by name: a custom op takes no group object) the ranks agree on the shard
    # here, at run time: cached after the first call, so a compiled step has no host sync.
    call = Call(logits, target, weight, divisor, Options.decode(spec))
    return call._replace(shard=parallel.shard_by_name(parallel.KIND_CE, call))


@torch.library.custom_op(f"{_LIB}::ce_forward", mutates_args=())
def ce_forward_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                  divisor: torch.Tensor | None, spec: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor]:
    res = forward(_op_call(logits, target, weight, divisor, spec), compute_grad=False)
    return (res.loss, res.lse, res.z_term, _ent_or_empty(res.ent, logits),
            _argmax_or_empty(res.argmax, logits), res.stats, res.dens)


@ce_forward_op.register_fake
def _(logits, target, weight, divisor, spec):
    opts = Options.decode(spec)
    N = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    red = (N,) if opts.reduction == "none" else ()
    return (logits.new_empty(red, dtype=opts.out_dtype), logits.new_empty((N,), dtype=cdt),
            logits.new_empty(red, dtype=cdt),
            logits.new_empty((N,) if opts.entropy else (0,), dtype=cdt),
            logits.new_empty((N,) if opts.argmax else (0,), dtype=torch.int64),
            logits.new_empty((NUM_FIELDS, N), dtype=cdt), logits.new_empty((2,), dtype=cdt))


@torch.library.custom_op(f"{_LIB}::ce_backward", mutates_args=())
def ce_backward_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                   divisor: torch.Tensor | None, stats: torch.Tensor, dens: torch.Tensor,
                   g_loss: torch.Tensor, g_lse: torch.Tensor | None, g_ent: torch.Tensor | None,
                   spec: str, target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    call = _op_call(logits, target, weight, divisor, spec)
    gt = torch.empty(target.shape, dtype=compute_dtype(logits.dtype),
                     device=target.device) if target_grad else logits.new_empty(0)
    grad = backward(call, stats, dens, None, g_loss, g_lse, g_ent=g_ent,
                    grad_target=gt if target_grad else None)
    return grad, gt


@ce_backward_op.register_fake
def _(logits, target, weight, divisor, stats, dens, g_loss, g_lse, g_ent, spec, target_grad):
    gt = (torch.empty_like(target, dtype=compute_dtype(logits.dtype)) if target_grad
          else logits.new_empty(0))
    return torch.empty_like(logits, memory_format=torch.contiguous_format), gt


def _op_setup_context(ctx, inputs, output):
    logits, target, weight, divisor, spec = inputs
    ctx.opts, ctx.shard, ctx.eager, ctx.inplace, ctx.grad, ctx.gt = (
        Options.decode(spec), None, False, False, None, None)
    ctx.target_grad = ctx.opts.probs and target.requires_grad
    ctx.save_for_backward(logits, target, weight, divisor, output[5], output[6])


ce_forward_op.register_autograd(
    lambda ctx, g_loss, g_lse, g_z, g_ent, *unused: (*_backward(ctx, g_loss, g_lse, g_z, g_ent),
                                                     None, None, None),
    setup_context=_op_setup_context)


def _no_double_backward(ctx, *grads):
    raise no_second_order("cross_entropy", "its gradient is an opaque op")


ce_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# vmap rules: one launch over all the rows for reduction="none" (the batch folded into the rows,
# exact: rows are independent), one call per batch element otherwise (each is its own reduction).


def _select(x, d, i):
    return x if d is None or not isinstance(x, torch.Tensor) else x.select(d, i)


def vmap_loop(op, info, in_dims, args):
    """A vmap rule that calls ``op`` once per batch element and stacks the outputs."""
    if info.batch_size == 0:
        raise RuntimeError("triton_xent: vmap over an empty batch (size 0) is not supported.")
    outs = [op(*(_select(x, d, i) for x, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    stacked = tuple(torch.stack(list(o)) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


def _batched(x, d, B):
    """``x`` with its batch dimension first (expanded when it has none)."""
    return x.movedim(d, 0) if d is not None else x.expand(B, *x.shape)


@torch.library.register_vmap(f"{_LIB}::ce_forward")
def _ce_forward_vmap(info, in_dims, logits, target, weight, divisor, spec):
    args = (logits, target, weight, divisor, spec)
    opts = Options.decode(spec)
    if opts.reduction != "none" or in_dims[0] is None or any(d is not None for d in in_dims[2:]):
        return vmap_loop(ce_forward_op, info, in_dims, args)
    B = info.batch_size
    x = logits.movedim(in_dims[0], 0)
    t = _batched(target, in_dims[1], B)
    N = x.shape[1]
    loss, lse, z, ent, am, stats, dens = ce_forward_op(
        x.reshape(B * N, x.shape[2]), t.reshape(B * N, *t.shape[2:]), weight, divisor, spec)
    return ((loss.view(B, N), lse.view(B, N), z.view(B, N),
             ent.view(B, N) if opts.entropy else ent, am.view(B, N) if opts.argmax else am,
             stats.view(stats.shape[0], B, N), dens),
            (0, 0, 0, 0 if opts.entropy else None, 0 if opts.argmax else None, 1, None))


@torch.library.register_vmap(f"{_LIB}::ce_backward")
def _ce_backward_vmap(info, in_dims, logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                      g_ent, spec, target_grad):
    args = (logits, target, weight, divisor, stats, dens, g_loss, g_lse, g_ent, spec, target_grad)
    if (Options.decode(spec).reduction != "none" or in_dims[0] is None or in_dims[4] is None
            or any(in_dims[i] is not None for i in (2, 3, 5))):
        return vmap_loop(ce_backward_op, info, in_dims, args)
    B = info.batch_size
    x = logits.movedim(in_dims[0], 0)
    N, V = x.shape[1], x.shape[2]
    t = _batched(target, in_dims[1], B)
    st = stats.movedim(in_dims[4], 1)
    g = _batched(g_loss, in_dims[6], B).reshape(B * N)
    gl = None if g_lse is None else _batched(g_lse, in_dims[7], B).reshape(B * N)
    ge = None if g_ent is None else _batched(g_ent, in_dims[8], B).reshape(B * N)
    grad, gt = ce_backward_op(x.reshape(B * N, V), t.reshape(B * N, *t.shape[2:]), weight,
                              divisor, st.reshape(st.shape[0], B * N), dens, g, gl, ge, spec,
                              target_grad)
    return ((grad.view(B, N, V), gt.view(B, N, V) if target_grad else gt),
            (0, 0 if target_grad else None))


# ---------------------------------------------------------------------------------------------
# Entry point


def eager_apply(function, *args):
    """``function.apply(*args)`` outside functorch transforms and torch.compile: the C-level
    apply that ``Function.apply`` ends in, without its per-call ``inspect.signature`` binding of
    default arguments (our Functions have none; it was a third of the host time of a call)."""
    return super(torch.autograd.Function, function).apply(*args)


def in_transform(*tensors) -> bool:
    """True inside vmap/grad (functorch wraps the tensors)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if isinstance(t, torch.Tensor) and wrapped(t):
            return True
    return False


def requires_grad(t: torch.Tensor | None) -> bool:
    """``t.requires_grad``, also inside vmap (a batched tensor reads False even when what it
    wraps requires grad)."""
    if t is not None and torch.compiler.is_compiling():  # Dynamo traces no functorch query
        return t.requires_grad
    while t is not None:
        if t.requires_grad:
            return True
        if not torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        t = torch._C._functorch.get_unwrapped(t)
    return False


def run(call: Call, *, inplace: bool):
    """Runs one call on the right path; returns ``loss, lse, z_term, ent, argmax`` (ent and
    argmax empty unless asked for)."""
    logits, target, weight, divisor, opts = call[:5]
    if opts.probs and weight is not None and requires_grad(weight) and torch.is_grad_enabled():
        # PyTorch differentiates the class weights of probability targets: the reference runs.
        if call.shard is not None:
            raise RuntimeError("triton_xent: class weights that require grad are not supported "
                               "with a process group. Pass weight.detach().")
        loss, lse, z_term, ent = reference(logits, target, weight, divisor, opts)
        argmax = lse.new_empty(0, dtype=torch.int64)
        if opts.argmax:
            argmax = logits.argmax(1)
        return (loss.to(opts.out_dtype), lse, z_term.detach(), _ent_or_empty(ent, logits),
                argmax)
    if torch.compiler.is_compiling() or in_transform(logits, target, weight, divisor):
        return _CrossEntropy.apply(logits, target, weight, divisor, opts, call.shard, False,
                                   False)[:5]
    if torch.is_grad_enabled() and (logits.requires_grad or (opts.probs and target.requires_grad)):
        return eager_apply(_CrossEntropy, logits, target, weight, divisor, opts, call.shard, True,
                           inplace)[:5]
    res = forward(call, compute_grad=False)
    return (res.loss, res.lse, res.z_term, _ent_or_empty(res.ent, logits),
            _argmax_or_empty(res.argmax, logits))
