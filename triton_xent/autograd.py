"""The op layer: autograd for the pipeline (``triton_xent.pipeline``), eager and compiled.

Three paths, one pipeline:

* eager, with a gradient: :class:`_CrossEntropyFunction`. The forward computes the gradient for
  an upstream gradient of 1 (one read of the logits, one write of the gradient); the backward
  returns it untouched when the upstream gradient is 1 (a tiny launch that reads it on the
  device: no host sync, CUDA-graph safe), and otherwise recomputes the rows that need it from
  the logits, once rounded. The buffer is kept on ``ctx`` (not ``save_for_backward``) and handed
  to autograd, which adopts it instead of cloning it.
* functional, under torch.compile and functorch transforms (``vmap``, ``torch.func.grad``):
  the custom ops ``triton_xent::ce_forward`` (statistics and loss, one read) and
  ``triton_xent::ce_backward`` (the gradient with the upstream folded in: one read, one write),
  tied together by :class:`_FunctionalCrossEntropy`, an autograd Function in the form functorch
  composes with. A custom op may not write its input nor keep a buffer aside, so this path
  moves 3 passes where the eager one moves 2; it is exact for any upstream gradient. The ops
  carry vmap rules (the batch folded into the rows for ``"none"``, one call per batch element
  otherwise);
* no gradient: the pipeline's forward alone (one read).

Second derivatives (``create_graph=True``) go through the reference formula (differentiable
torch ops, fp32 math) on the saved logits, so gradient penalties get PyTorch's answer; an
in-place gradient cannot (its logits are gone), nor can the functional path (its gradient is an
opaque op): they say so.
Class weights that require grad (probability targets: PyTorch differentiates them) run the
reference formula in fp32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import parallel, pipeline
from ._options import CEOptions, compute_dtype
from .pipeline import Call

_LIB = "triton_xent"


def _to_opts(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, inv_divisor,
             all_rows, argmax) -> CEOptions:
    return CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                     inv_divisor, all_rows, argmax)


def _empty_argmax(res, logits):
    return res.argmax if res.argmax is not None else logits.new_empty(0, dtype=torch.int64)


def fold_z_grad(opts: CEOptions, probs: bool, target, stats, dens, g_lse, g_z):
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
    kept = torch.ones_like(lse, dtype=torch.bool) if probs else target != opts.ignore_index
    g = torch.where(kept, scale * lse, torch.zeros_like(lse))
    return g if g_lse is None else g_lse + g


# ---------------------------------------------------------------------------------------------
# Second derivatives: the reference formula, differentiable.


def _reference_grads(call: Call, logits, target, g_loss, g_lse, g_z=None):
    """d(g_loss . loss + g_lse . lse + g_z . z_term)/d(logits, target) with differentiable torch
    ops, for ``create_graph=True`` (gradient penalties, Hessian-vector products)."""
    from .reference import cross_entropy_reference

    opts = call.opts
    with torch.enable_grad():
        x = logits.to(compute_dtype(logits.dtype))
        tgt = target.to(x.dtype) if call.probs else target
        divisor = None
        if opts.reduction == "sum":
            divisor = call.divisor if call.divisor is not None else 1.0 / opts.inv_divisor
        w = call.weight.to(x.dtype) if call.weight is not None else None
        loss, lse, z_term = cross_entropy_reference(
            x, tgt, w, opts.ignore_index, opts.reduction, opts.label_smoothing,
            z_loss=opts.z_loss, softcap=opts.softcap, logit_scale=opts.logit_scale,
            divisor=divisor, return_aux=True)
        outputs, upstream = [loss], [g_loss.to(loss.dtype).expand(loss.shape)]
        for out, g in ((lse, g_lse), (z_term, g_z if opts.z_loss else None)):
            if g is not None:
                outputs.append(out)
                upstream.append(g.to(out.dtype).expand(out.shape))
        inputs = [logits] + ([target] if call.probs and target.requires_grad else [])
        # The upstream gradients as grad_outputs, not factors of a scalar: they may depend on
        # this op's own outputs (a penalty on loss**2, a z-loss on aux.lse), and the vector-
        # Jacobian product must not differentiate them; create_graph still records them.
        grads = torch.autograd.grad(outputs, inputs, upstream, create_graph=True,
                                    allow_unused=True)
    return grads[0], (grads[1] if len(grads) > 1 else None)


def _no_second_order(what: str):
    return RuntimeError(
        f"triton_xent: a second derivative (create_graph=True) of {what} is not supported: the "
        "first derivative was written over the logits (inplace_backward=True) or lives on other "
        "ranks. Drop inplace_backward / the process group for this loss, or compute it with "
        "triton_xent.reference.cross_entropy_reference."
    )


# ---------------------------------------------------------------------------------------------
# Eager path


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, divisor, call: Call, inplace: bool,
                target_grad: bool):
        call = call._replace(logits=logits, target=target, weight=weight, divisor=divisor)
        gt = torch.empty(target.shape, dtype=compute_dtype(logits.dtype),
                         device=target.device) if target_grad else None
        # "none": the rows' upstream gradients are rarely all 1 (a per-token weighting or a mean
        # follows), so the gradient is computed in the backward, with them folded in (2 passes
        # in all, not 2 + a recompute); in place, the logits are gone by then: in the forward.
        in_forward = inplace or call.opts.reduction != "none"
        res = pipeline.forward(call, compute_grad=in_forward, inplace=inplace, grad_target=gt)
        if inplace:
            # The kernels write through a raw pointer: tell autograd the logits changed, so a
            # later use of the old values (e.g. by the op that produced them) raises.
            torch.autograd.graph.increment_version(logits)
        ctx.call = call._replace(logits=None, target=None, weight=None, divisor=None)
        ctx.inplace = inplace
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        # detach(): with ``inplace`` the buffer is the logits tensor itself; a fresh alias lets
        # autograd adopt it as the gradient instead of copying it.
        ctx.grad = res.grad.detach() if in_forward else None
        ctx.used = False
        ctx.grad_target = gt
        ctx.save_for_backward(None if inplace else logits, target, weight, divisor, res.stats,
                              res.dens)
        outs = (res.loss, res.lse, res.z_term, _empty_argmax(res, logits))
        ctx.mark_non_differentiable(outs[3])  # (one call: a second one replaces the first)
        return outs

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, g_argmax):
        logits, target, weight, divisor, stats, dens = ctx.saved_tensors
        call = ctx.call._replace(logits=logits, target=target, weight=weight, divisor=divisor)
        if torch.is_grad_enabled():  # create_graph=True
            if ctx.inplace or call.shard is not None:
                raise _no_second_order("cross_entropy")
            if g_loss is None:
                g_loss = torch.zeros((), device=stats.device)
            gx, gt = _reference_grads(call, logits, target, g_loss, g_lse, g_z)
            return gx, gt, None, None, None, None, None
        grad, ctx.grad = ctx.grad, None
        if ctx.used:
            raise RuntimeError(
                "triton_xent: backward through the same cross_entropy call a second time is not "
                "supported (the gradient is computed in the forward and reused). Compute the "
                "loss again, or pass retain_graph=False."
            )
        ctx.used = True
        if g_loss is None:  # only the aux outputs carry a gradient
            g_loss = torch.zeros(stats.shape[1] if call.opts.reduction == "none" else (),
                                 device=stats.device)
        g_lse = fold_z_grad(call.opts, call.probs, target, stats, dens, g_lse, g_z)
        if g_lse is not None and ctx.inplace:
            raise RuntimeError(
                "triton_xent: the aux lse (or z-loss term) was differentiated, which needs the "
                "logits, but inplace_backward=True wrote the gradient over them. Drop "
                "inplace_backward."
            )
        gt = ctx.grad_target
        if gt is not None:
            gt.mul_(g_loss.to(gt.dtype).unsqueeze(-1) if g_loss.dim() else g_loss.to(gt.dtype))
        grad = pipeline.backward(call, stats, dens, grad, g_loss, g_lse, inplace=ctx.inplace)
        return grad, gt, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Functional path: custom ops (torch.compile, functorch transforms)


def _call(logits, target, weight, divisor, opts, backend, probs, out_dtype, group_name) -> Call:
    # With a group (by name: a custom op takes no group object) the ranks agree on the shard
    # here, at run time: cached after the first call, so a compiled step has no host sync.
    shard = parallel.ce_shard_by_name(group_name, logits=logits, target=target, weight=weight,
                                      opts=opts, divisor=divisor, probs=probs)
    if shard is not None and not probs and target.device.type == "cpu" and target.numel():
        # Global class ids, checked against the global vocabulary as an eager call does on the
        # CPU (free there; on an accelerator only validate=True checks, eagerly).
        from ._validation import check_target_range

        check_target_range(target, shard.vocab_size, opts.ignore_index)
    return Call(logits, target, weight, divisor, opts, backend, probs, out_dtype, shard)


@torch.library.custom_op(f"{_LIB}::ce_forward", mutates_args=())
def ce_forward_op(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    divisor: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: Optional[float], logit_scale: Optional[float], inv_divisor: float,
    all_rows: bool, argmax: bool, backend: str, probs: bool, out_dtype: torch.dtype,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _to_opts(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    inv_divisor, all_rows, argmax)
    call = _call(logits, target, weight, divisor, opts, backend, probs, out_dtype, group_name)
    res = pipeline.forward(call, compute_grad=False)
    return res.loss, res.lse, res.z_term, _empty_argmax(res, logits), res.stats, res.dens


@ce_forward_op.register_fake
def _(logits, target, weight, divisor, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, inv_divisor, all_rows, argmax, backend, probs, out_dtype, group_name):
    N = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    red = (N,) if reduction == "none" else ()
    return (logits.new_empty(red, dtype=out_dtype), logits.new_empty((N,), dtype=cdt),
            logits.new_empty(red, dtype=cdt),
            logits.new_empty((N,) if argmax else (0,), dtype=torch.int64),
            logits.new_empty((6, N), dtype=cdt), logits.new_empty((2,), dtype=cdt))


@torch.library.custom_op(f"{_LIB}::ce_backward", mutates_args=())
def ce_backward_op(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    divisor: Optional[torch.Tensor], stats: torch.Tensor, dens: torch.Tensor,
    g_loss: torch.Tensor, g_lse: Optional[torch.Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: Optional[float],
    logit_scale: Optional[float], inv_divisor: float, backend: str, probs: bool,
    target_grad: bool, group_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = _to_opts(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    inv_divisor, False, False)
    call = _call(logits, target, weight, divisor, opts, backend, probs, logits.dtype, group_name)
    gt = torch.empty(target.shape, dtype=compute_dtype(logits.dtype),
                     device=target.device) if target_grad else logits.new_empty(0)
    grad = pipeline.backward(call, stats, dens, None, g_loss, g_lse, inplace=False,
                             grad_target=gt if target_grad else None)
    return grad, gt


@ce_backward_op.register_fake
def _(logits, target, weight, divisor, stats, dens, g_loss, g_lse, ignore_index, reduction,
      label_smoothing, z_loss, softcap, logit_scale, inv_divisor, backend, probs, target_grad,
      group_name):
    gt = (torch.empty_like(target, dtype=compute_dtype(logits.dtype)) if target_grad
          else logits.new_empty(0))
    return torch.empty_like(logits, memory_format=torch.contiguous_format), gt


class _OpArgs(NamedTuple):
    """The non-tensor arguments of the custom ops, in their order (after ``logits, target,
    weight, divisor``): the options, then the backend, the target kind, the loss dtype and the
    process group's name ("" for none)."""

    opts: CEOptions
    backend: str
    probs: bool
    out_dtype: torch.dtype
    group_name: str

    def forward_args(self) -> tuple:
        return (*self.opts, self.backend, self.probs, self.out_dtype, self.group_name)

    def backward_args(self, target_grad: bool) -> tuple:
        return (*self.opts[:7], self.backend, self.probs, target_grad, self.group_name)


def first_order_only(what: str):
    return RuntimeError(
        f"triton_xent: a second derivative of {what} under torch.compile or a functorch "
        "transform (torch.func.hessian, jacrev of jacrev) is not supported: its gradient is an "
        "opaque op. Compute second derivatives eagerly (torch.autograd.grad with "
        "create_graph=True, outside torch.compile and torch.func), where they are exact."
    )


class _FunctionalCrossEntropy(torch.autograd.Function):
    """Autograd of the custom ops, in the form functorch composes with (``setup_context``,
    a generated vmap rule): ``torch.func.grad``, ``vmap`` (also over a backward), and
    torch.compile. (A custom op's own ``register_autograd`` does not work under
    ``torch.func.grad``: pytorch/pytorch#168393.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, divisor, a: _OpArgs):
        return ce_forward_op(logits, target, weight, divisor, *a.forward_args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, divisor, a = inputs
        ctx.a = a
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[3:])
        ctx.save_for_backward(logits, target, weight, divisor, output[4], output[5])

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z, g_argmax, g_stats, g_dens):
        logits, target, weight, divisor, stats, dens = ctx.saved_tensors
        a = ctx.a
        g_lse = fold_z_grad(a.opts, a.probs, target, stats, dens, g_lse, g_z)
        if g_loss is None and g_lse is None:
            return None, None, None, None, None
        if g_loss is None:  # only the aux lse carries a gradient
            g_loss = torch.zeros(stats.shape[1] if a.opts.reduction == "none" else (),
                                 dtype=stats.dtype, device=stats.device)
        target_grad = a.probs and ctx.needs_input_grad[1]
        grad, gt = _FunctionalCrossEntropyBackward.apply(logits, target, weight, divisor, stats,
                                                         dens, g_loss, g_lse, a, target_grad)
        return grad, (gt if target_grad else None), None, None, None


class _FunctionalCrossEntropyBackward(torch.autograd.Function):
    """``ce_backward_op`` as a node that refuses to be differentiated (no silent zero)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, divisor, stats, dens, g_loss, g_lse, a: _OpArgs,
                target_grad: bool):
        return ce_backward_op(logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                              *a.backward_args(target_grad))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise first_order_only("cross_entropy")


# The ops' own autograd, for direct callers of torch.ops.triton_xent.ce_forward (the package
# goes through the Functions above).
_FWD_OPTS = slice(4, 13)  # ignore_index ... argmax in ce_forward's inputs


def _setup_context(ctx, inputs, output):
    logits, target, weight, divisor = inputs[:4]
    ctx.a = _OpArgs(_to_opts(*inputs[_FWD_OPTS]), inputs[13], inputs[14], inputs[15], inputs[16])
    ctx.target_grad = bool(inputs[14]) and target.requires_grad
    ctx.save_for_backward(logits, target, weight, divisor, output[4], output[5])


def _backward(ctx, g_loss, g_lse, g_z, g_argmax, g_stats, g_dens):
    logits, target, weight, divisor, stats, dens = ctx.saved_tensors
    g_lse = fold_z_grad(ctx.a.opts, ctx.a.probs, target, stats, dens, g_lse, g_z)
    if g_loss is None:
        g_loss = torch.zeros(stats.shape[1] if ctx.a.opts.reduction == "none" else (),
                             device=stats.device)
    grad, gt = ce_backward_op(logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                              *ctx.a.backward_args(ctx.target_grad))
    return (grad, gt if ctx.target_grad else None) + (None,) * 15


ce_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise first_order_only("cross_entropy")


ce_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# vmap rules of the custom ops: one launch over all the rows for reduction="none" (the batch is
# folded into the rows, exact: rows are independent), one call per batch element otherwise
# (each element is its own reduction).


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
def _ce_forward_vmap(info, in_dims, logits, target, weight, divisor, *rest):
    args = (logits, target, weight, divisor, *rest)
    reduction, argmax = rest[1], rest[8]
    if reduction != "none" or in_dims[0] is None or any(d is not None for d in in_dims[2:]):
        return vmap_loop(ce_forward_op, info, in_dims, args)
    B = info.batch_size
    x = logits.movedim(in_dims[0], 0)
    t = _batched(target, in_dims[1], B)
    N = x.shape[1]
    loss, lse, z, am, stats, dens = ce_forward_op(
        x.reshape(B * N, x.shape[2]), t.reshape(B * N, *t.shape[2:]), weight, divisor, *rest)
    return ((loss.view(B, N), lse.view(B, N), z.view(B, N), am.view(B, N) if argmax else am,
             stats.view(stats.shape[0], B, N), dens), (0, 0, 0, 0 if argmax else None, 1, None))


@torch.library.register_vmap(f"{_LIB}::ce_backward")
def _ce_backward_vmap(info, in_dims, logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                      *rest):
    args = (logits, target, weight, divisor, stats, dens, g_loss, g_lse, *rest)
    reduction, target_grad = rest[1], rest[9]
    if (reduction != "none" or in_dims[0] is None or in_dims[4] is None
            or any(in_dims[i] is not None for i in (2, 3, 5))):
        return vmap_loop(ce_backward_op, info, in_dims, args)
    B = info.batch_size
    x = logits.movedim(in_dims[0], 0)
    N, V = x.shape[1], x.shape[2]
    t = _batched(target, in_dims[1], B)
    st = stats.movedim(in_dims[4], 1)
    g = _batched(g_loss, in_dims[6], B).reshape(B * N)
    gl = None if g_lse is None else _batched(g_lse, in_dims[7], B).reshape(B * N)
    grad, gt = ce_backward_op(x.reshape(B * N, V), t.reshape(B * N, *t.shape[2:]), weight,
                              divisor, st.reshape(st.shape[0], B * N), dens, g, gl, *rest)
    return ((grad.view(B, N, V), gt.view(B, N, V) if target_grad else gt),
            (0, 0 if target_grad else None))


def in_transform(*tensors) -> bool:
    """True inside vmap/grad (functorch wraps the tensors)."""
    return any(isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


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


# ---------------------------------------------------------------------------------------------
# Class weights that require grad (probability targets): the reference formula


def _reference_run(call: Call):
    """The loss by differentiable torch ops (fp32 math, fp64 for fp64), for what the kernels do
    not differentiate: the class weights of probability targets (PyTorch does)."""
    from .reference import cross_entropy_reference

    if call.shard is not None:
        raise RuntimeError(
            "triton_xent: class weights that require grad are not supported with a process "
            "group. Pass weight.detach()."
        )
    opts = call.opts
    x = call.logits.to(compute_dtype(call.logits.dtype))
    divisor = None
    if opts.reduction == "sum":
        divisor = call.divisor if call.divisor is not None else 1.0 / opts.inv_divisor
    loss, lse, z_term = cross_entropy_reference(
        x, call.target.to(x.dtype), call.weight.to(x.dtype), opts.ignore_index, opts.reduction,
        opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
        logit_scale=opts.logit_scale, divisor=divisor, return_aux=True)
    argmax = x.argmax(1) if opts.argmax else x.new_empty(0, dtype=torch.int64)
    return loss.to(call.out_dtype), lse, z_term.detach(), argmax


# ---------------------------------------------------------------------------------------------
# Entry point


def run(call: Call, *, inplace: bool):
    """Runs one call on the right path; returns ``loss, lse, z_term, argmax`` (argmax empty
    unless asked for)."""
    logits, target, weight = call.logits, call.target, call.weight
    if call.probs and weight is not None and requires_grad(weight) and torch.is_grad_enabled():
        return _reference_run(call)
    if torch.compiler.is_compiling() or in_transform(logits, target, weight, call.divisor):
        a = _OpArgs(call.opts, call.backend, call.probs, call.out_dtype,
                    parallel.group_name(call.shard))
        return _FunctionalCrossEntropy.apply(logits, target, weight, call.divisor, a)[:4]
    target_grad = call.probs and target.requires_grad
    if torch.is_grad_enabled() and (logits.requires_grad or target_grad):
        return _CrossEntropyFunction.apply(logits, target, weight, call.divisor, call,
                                           inplace, target_grad)
    res = pipeline.forward(call, compute_grad=False)
    return res.loss, res.lse, res.z_term, _empty_argmax(res, logits)
