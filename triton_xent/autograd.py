"""The op layer: autograd for the pipeline (``triton_xent.pipeline``), eager and compiled.

Three paths, one pipeline:

* eager, with a gradient: :class:`_CrossEntropyFunction`. The forward computes the gradient for
  an upstream gradient of 1 (one read of the logits, one write of the gradient); the backward
  returns it untouched when the upstream gradient is 1 (a tiny launch that reads it on the
  device: no host sync, CUDA-graph safe), and otherwise recomputes the rows that need it from
  the logits, once rounded. The buffer is kept on ``ctx`` (not ``save_for_backward``) and handed
  to autograd, which adopts it instead of cloning it.
* functional, under torch.compile and functorch transforms (vmap): the custom ops
  ``triton_xent::ce_forward`` (statistics and loss, one read) and ``triton_xent::ce_backward``
  (the gradient with the upstream folded in: one read, one write). A custom op may not write
  its input nor keep a buffer aside, so this path moves 3 passes where the eager one moves 2;
  it is exact for any upstream gradient.
* no gradient: the pipeline's forward alone (one read).

Second derivatives (``create_graph=True``) go through the float64-exact reference formula on the
saved logits, so gradient penalties get PyTorch's answer; an in-place gradient cannot (its
logits are gone) and says so.
"""

from __future__ import annotations

from typing import Optional

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


# ---------------------------------------------------------------------------------------------
# Second derivatives: the reference formula, differentiable.


def _reference_grads(call: Call, logits, target, g_loss, g_lse):
    """d(g_loss . loss + g_lse . lse)/d(logits, target) with differentiable torch ops, for
    ``create_graph=True`` (gradient penalties, Hessian-vector products)."""
    from .reference import cross_entropy_reference

    opts = call.opts
    with torch.enable_grad():
        x = logits.to(compute_dtype(logits.dtype))
        tgt = target.to(x.dtype) if call.probs else target
        divisor = None
        if opts.reduction == "sum":
            divisor = call.divisor if call.divisor is not None else 1.0 / opts.inv_divisor
        w = call.weight.to(x.dtype) if call.weight is not None else None
        loss, lse, _ = cross_entropy_reference(
            x, tgt, w, opts.ignore_index, opts.reduction, opts.label_smoothing,
            z_loss=opts.z_loss, softcap=opts.softcap, logit_scale=opts.logit_scale,
            divisor=divisor, return_aux=True)
        objective = (loss * g_loss.to(loss.dtype)).sum()
        if g_lse is not None:
            objective = objective + (lse * g_lse.to(lse.dtype)).sum()
        inputs = [logits] + ([target] if call.probs and target.requires_grad else [])
        grads = torch.autograd.grad(objective, inputs, create_graph=True, allow_unused=True)
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
        ctx.mark_non_differentiable(res.z_term)
        outs = (res.loss, res.lse, res.z_term, _empty_argmax(res, logits))
        ctx.mark_non_differentiable(outs[3])
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
            gx, gt = _reference_grads(call, logits, target, g_loss, g_lse)
            return gx, gt, None, None, None, None, None
        grad, ctx.grad = ctx.grad, None
        if ctx.used:
            raise RuntimeError(
                "triton_xent: backward through the same cross_entropy call a second time is not "
                "supported (the gradient is computed in the forward and reused). Compute the "
                "loss again, or pass retain_graph=False."
            )
        ctx.used = True
        if g_loss is None:  # only the aux lse carries a gradient
            g_loss = torch.zeros(stats.shape[1] if call.opts.reduction == "none" else (),
                                 device=stats.device)
        if g_lse is not None and ctx.inplace:
            raise RuntimeError(
                "triton_xent: the aux lse was differentiated, which needs the logits, but "
                "inplace_backward=True wrote the gradient over them. Drop inplace_backward."
            )
        gt = ctx.grad_target
        if gt is not None:
            gt.mul_(g_loss.to(gt.dtype).unsqueeze(-1) if g_loss.dim() else g_loss.to(gt.dtype))
        grad = pipeline.backward(call, stats, dens, grad, g_loss, g_lse, inplace=ctx.inplace)
        return grad, gt, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Functional path: custom ops (torch.compile, vmap)


def _call(logits, target, weight, divisor, opts, backend, probs, out_dtype, group_name) -> Call:
    # With a group (by name: a custom op takes no group object) the ranks agree on the shard
    # here, at run time: cached after the first call, so a compiled step has no host sync.
    shard = parallel.ce_shard_by_name(group_name, logits=logits, target=target, weight=weight,
                                      opts=opts, divisor=divisor, probs=probs)
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


_FWD_OPTS = slice(4, 13)  # ignore_index ... argmax in ce_forward's inputs


def _setup_context(ctx, inputs, output):
    logits, target, weight, divisor = inputs[:4]
    ctx.opts = inputs[_FWD_OPTS]
    ctx.backend, ctx.probs, ctx.group_name = inputs[13], inputs[14], inputs[16]
    ctx.target_grad = bool(inputs[14]) and target.requires_grad
    ctx.save_for_backward(logits, target, weight, divisor, output[4], output[5])


def _backward(ctx, g_loss, g_lse, g_z, g_argmax, g_stats, g_dens):
    logits, target, weight, divisor, stats, dens = ctx.saved_tensors
    opts = ctx.opts
    if g_loss is None:
        g_loss = torch.zeros(stats.shape[1] if opts[1] == "none" else (), device=stats.device)
    grad, gt = ce_backward_op(logits, target, weight, divisor, stats, dens, g_loss, g_lse,
                              *opts[:7], ctx.backend, ctx.probs, ctx.target_grad, ctx.group_name)
    return (grad, gt if ctx.target_grad else None) + (None,) * 15


ce_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "triton_xent: a second derivative (create_graph=True) of cross_entropy under "
        "torch.compile or vmap is not supported. Compute it eagerly (outside the compiled "
        "region), where it goes through the reference formula."
    )


ce_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _in_transform(t: torch.Tensor) -> bool:
    """True inside vmap/grad (functorch wraps the tensors)."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False


# ---------------------------------------------------------------------------------------------
# Entry point


def run(call: Call, *, inplace: bool):
    """Runs one call on the right path; returns ``loss, lse, z_term, argmax`` (argmax empty
    unless asked for)."""
    logits, target = call.logits, call.target
    target_grad = call.probs and target.requires_grad
    needs_grad = torch.is_grad_enabled() and (logits.requires_grad or target_grad)
    functional = torch.compiler.is_compiling() or _in_transform(logits) or _in_transform(target)
    if functional:
        o = call.opts
        loss, lse, z_term, argmax, _, _ = ce_forward_op(
            logits, target, call.weight, call.divisor, o.ignore_index, o.reduction,
            o.label_smoothing, o.z_loss, o.softcap, o.logit_scale, o.inv_divisor, o.all_rows,
            o.argmax, call.backend, call.probs, call.out_dtype, parallel.group_name(call.shard))
        return loss, lse, z_term, argmax
    if needs_grad:
        return _CrossEntropyFunction.apply(logits, target, call.weight, call.divisor, call,
                                           inplace, target_grad)
    res = pipeline.forward(call, compute_grad=False)
    return res.loss, res.lse, res.z_term, _empty_argmax(res, logits)
