"""DTensor arguments (``triton_xent.dtensor``): logits sharded on the classes on a 1-D mesh and on
one dimension of a 2-D mesh, the fused head sharded ``Shard(0)``, the modules, every option, the
refusals, and torch.compile.

The parts run in the shared 4-rank gloo world (gloo_world.py): every rank builds the same full
problem from a seed, keeps its shard, and checks against ``cross_entropy_reference`` in float64
on the full problem, with a random upstream gradient.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)


import gloo
import pytest
import torch
import torch.nn.functional as F
from gloo_world import CTX, IGNORE, check, chunk_bounds, gen, problem, raises_input_error, together, upstream
from helpers import TOL

import triton_xent
from triton_xent.reference import cross_entropy_reference

part = gloo.Parts()


# ------------------------------------------------------------------------------------------------
# Item: DTensor arguments
# ------------------------------------------------------------------------------------------------


def dt_ce(rank, mesh, *, V, rows=(9,), layout="torch", dtype=torch.float64, probs=False,
          target_form="plain", weight=None, divisor=None, inplace=False, target_grad=False,
          sizes=None, loss_dtype=None, seed=0, backward=True, **opts):
    """cross_entropy on DTensor logits sharded on the classes vs the full float64 reference.

    ``layout``: "torch" (N, C, ...) sharded on dim 1, "1d" (C,), "last" (B, T, V) sharded on its
    last dim with (B, T) targets. ``target_form``: "plain" or "dtensor" (replicated class ids, or
    probabilities sharded like the logits). ``weight``: None, "plain", "replicate", "shard".
    ``divisor``: None, a number, "tensor" or "dtensor". ``sizes``: build the DTensor with
    DTensor.from_local from these shard sizes instead of distribute_tensor's torch.chunk (then
    ``backward=False``: DTensor's own to_local() backward needs torch.chunk's sizes)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    if layout == "1d":
        shape, cdim = (V,), 0
    elif layout == "last":
        shape, cdim = (*rows, V), len(rows)
    else:
        shape, cdim = (rows[0], V, *rows[1:]), 1
    x, t, w = problem(shape, seed=seed, probs=probs, weight=weight is not None, cdim=cdim,
                      ignore_frac=0 if layout == "1d" else 0.25)
    x = x.to(dtype)
    n, coord = mesh.size(0), mesh.get_local_rank(0)
    if sizes is None:
        lo, hi = chunk_bounds(V, n, coord)
        xd = distribute_tensor(x, mesh, [Shard(cdim)], src_data_rank=None)
    else:
        lo, hi = sum(sizes[:coord]), sum(sizes[: coord + 1])
        xd = DTensor.from_local(x.narrow(cdim, lo, hi - lo).contiguous(), mesh, [Shard(cdim)],
                                shape=x.shape, stride=x.stride())
    assert xd.to_local().shape[cdim] == hi - lo
    xd = xd.detach().requires_grad_()
    xin = xd * 1.0 if inplace else xd
    rep = [Replicate()]
    tr = t.clone().requires_grad_(target_grad) if probs else t
    if target_form == "dtensor":
        tin = distribute_tensor(t, mesh, [Shard(cdim)] if probs else rep, src_data_rank=None)
        tin = tin.detach().requires_grad_(target_grad)
    else:
        tin = t
    win = {None: None, "plain": w,
           "replicate": distribute_tensor(w, mesh, rep, src_data_rank=None) if w is not None else None,
           "shard": distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None) if w is not None else None,
           }[weight]
    div_in = div_ref = divisor
    if divisor in ("tensor", "dtensor"):
        div_ref = torch.tensor(6.5, dtype=torch.float64)
        div_in = div_ref if divisor == "tensor" else distribute_tensor(div_ref, mesh, rep, src_data_rank=None)
    loss, aux = triton_xent.cross_entropy(xin, tin, win, return_aux=True, inplace_backward=inplace, loss_dtype=loss_dtype,
                     divisor=div_in, **opts)
    xr = x.double().requires_grad_()
    if layout == "last":
        ref, lse, z = cross_entropy_reference(xr.flatten(0, -2), tr.flatten(), w, return_aux=True,
                                              divisor=div_ref, **opts)
        ref, lse = ref.view(rows) if ref.dim() else ref, lse.view(rows)
        z = z.view(rows) if z.dim() else z
    else:
        ref, lse, z = cross_entropy_reference(xr, tr, w, return_aux=True, divisor=div_ref, **opts)
    for name, out in (("loss", loss), ("lse", aux.lse), ("z", aux.z_loss)):
        assert isinstance(out, DTensor), f"{name} is a {type(out).__name__}, not a DTensor"
        assert all(isinstance(p, Replicate) for p in out.placements), out.placements
        assert out.device_mesh == mesh
    out_dtype = loss_dtype or dtype
    assert loss.dtype == out_dtype and loss.shape == ref.shape, (loss.dtype, loss.shape, ref.shape)
    tol = TOL[dtype] if loss_dtype is None else (TOL[torch.float32][0], TOL[dtype][1])
    check("loss", loss.to_local(), ref, tol[0])
    check("lse", aux.lse.to_local(), lse, 2e-5)
    check("z", aux.z_loss.to_local(), z, 2e-5)
    if not backward:
        return loss
    gup = upstream(ref, seed)
    loss.backward(DTensor.from_local(gup.to(loss.dtype), mesh, rep, run_check=False))
    ref.backward(gup)
    assert isinstance(xd.grad, DTensor) and xd.grad.placements == xd.placements, xd.grad
    check("d logits", xd.grad.to_local(), xr.grad.narrow(cdim, lo, hi - lo), tol[1])
    if target_grad:
        assert isinstance(tin.grad, DTensor) and tin.grad.placements == tin.placements
        check("d target", tin.grad.to_local(), tr.grad.narrow(cdim, lo, hi - lo), tol[1])
    return loss


def dt_linear(rank, mesh, *, V, N=9, D=6, dtype=torch.float64, hidden="plain", bias=False,
              weight=None, seed=0, batch=None, aux=False, loss_dtype=None, **opts):
    """linear_cross_entropy with the head a DTensor sharded Shard(0) (ColwiseParallel) on
    ``mesh`` (its last dim shards, others replicate), hidden states plain or a replicated
    DTensor: loss, d(hidden) in the hidden states' form, the head's gradient in its own."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    g = gen(seed + 100)
    hid = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    Wf = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 3).to(dtype)
    bf = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    _, t, w = problem((N, V), seed=seed, weight=weight is not None)
    k = mesh.ndim - 1
    lo, hi = chunk_bounds(V, mesh.size(k), mesh.get_local_rank(k))
    rep = [Replicate()] * mesh.ndim
    head = [Replicate()] * k + [Shard(0)]
    Wd = distribute_tensor(Wf, mesh, head, src_data_rank=None).detach().requires_grad_()
    bd = distribute_tensor(bf, mesh, head, src_data_rank=None).detach().requires_grad_() if bias else None
    if hidden == "plain":
        hin = hid.clone().requires_grad_()
    else:
        hin = distribute_tensor(hid, mesh, rep, src_data_rank=None).detach().requires_grad_()
    win = {None: None, "plain": w,
           "shard": distribute_tensor(w, mesh, head, src_data_rank=None) if w is not None else None}[weight]
    tin = t if batch is None else t.view(batch)
    hcall = hin if batch is None else hin.view(*batch, D)
    out = triton_xent.linear_cross_entropy(hcall, Wd, tin, linear_bias=bd, weight=win, chunk_size=4,
                                           return_aux=aux, loss_dtype=loss_dtype, **opts)
    loss = out[0] if aux else out
    xr, Wr = hid.double().requires_grad_(), Wf.double().requires_grad_()
    br = bf.double().requires_grad_() if bias else None
    ref, lse, _ = cross_entropy_reference(F.linear(xr, Wr, br), t, w, return_aux=True, **opts)
    if batch is not None and ref.dim():
        ref = ref.view(batch)
    assert isinstance(loss, DTensor) and all(isinstance(p, Replicate) for p in loss.placements)
    assert loss.dtype == (loss_dtype or dtype)
    check("loss", loss.to_local(), ref, TOL[dtype][0])
    if aux:
        assert isinstance(out[1].lse, DTensor) and out[1].lse.placements == loss.placements
        kept = (t != IGNORE).view(-1)  # skipped ignored rows have lse = 0
        check("lse", out[1].lse.to_local().reshape(-1)[kept], lse[kept], 2e-5)
    gup = upstream(ref, seed)
    loss.backward(DTensor.from_local(gup.to(dtype), mesh, rep, run_check=False))
    ref.backward(gup)
    if hidden == "plain":
        assert type(hin.grad) is torch.Tensor
        check("d hidden", hin.grad, xr.grad, TOL[dtype][1])
    else:
        assert isinstance(hin.grad, DTensor) and hin.grad.placements == hin.placements
        check("d hidden", hin.grad.to_local(), xr.grad, TOL[dtype][1])
    assert isinstance(Wd.grad, DTensor) and Wd.grad.placements == Wd.placements
    check("d linear_weight", Wd.grad.to_local(), Wr.grad[lo:hi], TOL[dtype][1])
    if bias:
        check("d linear_bias", bd.grad.to_local(), br.grad[lo:hi], TOL[dtype][1])


DT_CASES = [  # (V, options); V=37: 19/18 on 2 ranks, 13/13/11 on 3
    (37, dict(reduction="mean")),
    (37, dict(reduction="sum", weight="plain", label_smoothing=0.1, z_loss=1e-2)),
    (37, dict(reduction="none", weight="replicate", softcap=4.0, logit_scale=0.8)),
    (37, dict(reduction="mean", weight="shard", label_smoothing=0.2, target_form="dtensor")),
    (37, dict(layout="torch", rows=(4, 3), reduction="none", label_smoothing=0.1)),  # (N, C, d)
    (37, dict(layout="1d", reduction="sum", label_smoothing=0.1)),
    (37, dict(layout="last", rows=(3, 4), reduction="none", weight="plain", z_loss=1e-3)),  # (B, T, V)
    (37, dict(layout="last", rows=(3, 4), reduction="mean", target_form="dtensor")),
    (37, dict(probs=True, reduction="mean", label_smoothing=0.1, target_form="dtensor", target_grad=True)),
    (37, dict(probs=True, reduction="none", weight="plain", target_form="plain")),
    (37, dict(reduction="sum", divisor=4.0, label_smoothing=0.1)),
    (37, dict(reduction="sum", divisor="tensor", weight="shard")),
    (37, dict(reduction="sum", divisor="dtensor", z_loss=1e-2)),
    (37, dict(reduction="mean", inplace=True, label_smoothing=0.1, weight="plain")),
    (37, dict(reduction="none", inplace=True, dtype=torch.float32, softcap=3.0)),
    (37, dict(reduction="mean", dtype=torch.bfloat16, loss_dtype=torch.float32, label_smoothing=0.1)),
    (4, dict(reduction="mean", weight="plain", label_smoothing=0.1)),  # 3 ranks: 2/2/0
    (4, dict(reduction="none", probs=True, target_form="dtensor")),
]


def _dt_grid(rank, mesh, cases):
    for i, (V, opts) in enumerate(cases):
        together(mesh.get_group(0), dt_ce, rank, mesh, V=V, seed=i, **opts)


@part(2)
def dtensor_two_ranks(rank, world, group, mesh):
    """DTensor logits on a 1-D mesh of 2 ranks: every layout and option of DT_CASES; the aux
    argmax of (B, T, V) logits (merged across the shards, back in (B, T))."""
    _dt_grid(rank, mesh, DT_CASES)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def argmax_case():
        x, t, _ = problem((3, 4, 37), seed=91, cdim=2)
        xd = distribute_tensor(x, mesh, [Shard(2)], src_data_rank=None)
        _, aux = triton_xent.cross_entropy(xd, t, return_aux=True, return_argmax=True)
        assert aux.argmax.placements == (Replicate(),) and aux.argmax.shape == (3, 4)
        want = torch.where(t != IGNORE, x.argmax(-1), -1)
        assert torch.equal(aux.argmax.to_local(), want), (aux.argmax.to_local(), want)

    together(group, argmax_case)


@part(3)
def dtensor_three_ranks(rank, world, group, mesh):
    """DTensor logits on 3 ranks: torch.chunk's uneven shards (13/13/11, 2/2/0), shards of any
    sizes from DTensor.from_local (20/0/17), the modules, the head."""
    _dt_grid(rank, mesh, DT_CASES)
    for kw in (dict(label_smoothing=0.1, z_loss=1e-3), dict(reduction="none", softcap=3.0)):
        together(group, dt_ce, rank, mesh, V=37, sizes=[20, 0, 17], backward=False, **kw)
    for kw in (dict(), dict(hidden="dtensor", bias=True, weight="plain", label_smoothing=0.1),
               dict(hidden="dtensor", weight="shard", reduction="none", z_loss=1e-3, softcap=3.0),
               dict(bias=True, reduction="sum", divisor=5.0, batch=(3, 3), aux=True),
               dict(dtype=torch.float32, loss_dtype=torch.float64, weight="shard", aux=True),
               dict(V=4, bias=True, label_smoothing=0.1)):
        together(group, dt_linear, rank, mesh, **{"V": 37, **kw})


@part(3)
def dtensor_modules(rank, world, group, mesh):
    """The modules: CrossEntropyLoss on DTensor logits; LinearCrossEntropyLoss with its head
    parallelized by ColwiseParallel (parallelize_module)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    V, N, D = 37, 8, 5
    x, t, w = problem((N, V), seed=31, weight=True)
    lo, hi = chunk_bounds(V, world, rank)

    def ce_module():
        xd = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
        loss = triton_xent.CrossEntropyLoss(w, label_smoothing=0.1)(xd, t)
        xr = x.clone().requires_grad_()
        ref = cross_entropy_reference(xr, t, w, label_smoothing=0.1)
        loss.backward()
        ref.backward()
        check("module loss", loss.to_local(), ref, 1e-10)
        check("module d logits", xd.grad.to_local(), xr.grad[:, lo:hi], 1e-10)

    together(group, ce_module)
    torch.manual_seed(0)  # the same head on every rank
    mod = triton_xent.LinearCrossEntropyLoss(D, V, bias=True, dtype=torch.float64, z_loss=1e-3)
    Wf, bf = mod.linear.weight.detach().clone(), mod.linear.bias.detach().clone()
    parallelize_module(mod, mesh, {"linear": ColwiseParallel()})
    assert isinstance(mod.linear.weight, DTensor)
    h = torch.randn(N, D, dtype=torch.float64, generator=gen(32)).requires_grad_()
    loss = mod(h, t)
    hr, Wr, br = (v.clone().requires_grad_() for v in (h.detach(), Wf, bf))
    ref = cross_entropy_reference(F.linear(hr, Wr, br), t, z_loss=1e-3)
    loss.backward()
    ref.backward()
    check("linear module loss", loss.to_local(), ref, 1e-10)
    check("linear module d hidden", h.grad, hr.grad, 1e-10)
    check("linear module d weight", mod.linear.weight.grad.to_local(), Wr.grad[lo:hi], 1e-10)
    check("linear module d bias", mod.linear.bias.grad.to_local(), br.grad[lo:hi], 1e-10)


@part(4)
def dtensor_2d_mesh(rank, world, group, mesh):
    """A (dp=2, tp=2) mesh: logits Replicate() on dp, Shard(1) on tp; the torchtitan layout
    (the tp submesh, different rows on each dp rank); the head (Replicate(), Shard(0))."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    m2 = CTX["mesh2d"]
    V, N = 37, 8
    lo, hi = chunk_bounds(V, 2, m2.get_local_rank("tp"))

    def replicated_on_dp():
        x, t, w = problem((N, V), seed=41, weight=True)
        xd = distribute_tensor(x, m2, [Replicate(), Shard(1)], src_data_rank=None).requires_grad_()
        loss = triton_xent.cross_entropy(xd, t, w, label_smoothing=0.1, reduction="sum")
        assert loss.placements == (Replicate(), Replicate())
        xr = x.clone().requires_grad_()
        ref = cross_entropy_reference(xr, t, w, label_smoothing=0.1, reduction="sum")
        loss.backward()
        ref.backward()
        check("2-D loss", loss.to_local(), ref, 1e-10)
        assert xd.grad.placements == xd.placements
        check("2-D d logits", xd.grad.to_local(), xr.grad[:, lo:hi], 1e-10)

    def tp_submesh():  # each dp rank its own rows (what a TP x FSDP model makes)
        x, t, _ = problem((N, V), seed=50 + m2.get_local_rank("dp"))
        xd = distribute_tensor(x, m2["tp"], [Shard(1)], src_data_rank=None).requires_grad_()
        loss = triton_xent.cross_entropy(xd, t, z_loss=1e-3)
        xr = x.clone().requires_grad_()
        ref = cross_entropy_reference(xr, t, z_loss=1e-3)
        loss.backward()
        ref.backward()
        assert loss.device_mesh == m2["tp"]
        check("tp submesh loss", loss.to_local(), ref, 1e-10)
        check("tp submesh d logits", xd.grad.to_local(), xr.grad[:, lo:hi], 1e-10)

    together(group, replicated_on_dp)
    together(group, tp_submesh)
    together(group, dt_linear, rank, m2, V=V, hidden="dtensor", bias=True, weight="plain",
             label_smoothing=0.1)
    x, t, _ = problem((N, V), seed=42)
    # Sharded on the batch (dp) too: refused, naming the way out.
    xd = distribute_tensor(x, m2, [Shard(0), Shard(1)], src_data_rank=None)
    raises_input_error("several mesh dims", lambda: triton_xent.cross_entropy(xd, t))
    assert isinstance(xd, DTensor)


@part(2)
def dtensor_refusals(rank, world, group, mesh):
    """What is not supported raises a clear error on every rank (and the group still works)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    V, N = 37, 6
    x, t, w = problem((N, V), seed=61, weight=True)
    lo, hi = chunk_bounds(V, world, rank)
    ce = triton_xent.cross_entropy
    xs = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None)
    raises_input_error("Partial placement", lambda: ce(DTensor.from_local(x, mesh, [Partial()]), t))
    raises_input_error(r"sharded on dim 0 .* not on the classes", lambda: ce(
        distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None), t))
    raises_input_error("target must be replicated", lambda: ce(
        xs, distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)))
    raises_input_error("full vector of the 37 classes", lambda: ce(xs, t, w[lo:hi]))
    assert mesh.get_group(0).group_name != CTX["groups"][2].group_name
    raises_input_error("process_group= is not the group", lambda: ce(xs, t, process_group=CTX["groups"][2]))
    raises_input_error("but input is not", lambda: ce(x, distribute_tensor(t, mesh, [Replicate()], src_data_rank=None)))
    # The language-model layout where the shapes do not say which dim holds the classes.
    x3 = torch.randn(2, 5, 5, dtype=torch.float64)
    t3 = torch.randint(0, 5, (2, 5))
    x3d = distribute_tensor(x3, mesh, [Shard(2)], src_data_rank=None)
    raises_input_error("Flatten both", lambda: ce(x3d, t3))
    raises_input_error("Flatten both", lambda: ce(x3d, torch.softmax(x3, -1)))
    # A plain full-size tensor to slice for shards that are not torch.chunk's.
    xo = DTensor.from_local(x[:, :30].contiguous() if rank == 0 else x[:, 30:].contiguous(), mesh,
                            [Shard(1)], shape=x.shape, stride=x.stride())
    raises_input_error("torch.chunk", lambda: ce(xo, t, w))
    # ... while without one the pipeline takes the shards' actual sizes.
    check("any sizes", ce(xo, t).to_local(), cross_entropy_reference(x, t), 1e-10)
    # A leaf DTensor in place.
    raises_input_error("leaf DTensor", lambda: ce(xs.detach().requires_grad_(), t, inplace_backward=True))
    # The head sharded on D (RowwiseParallel), hidden states not replicated, a replicated bias
    # that requires grad.
    h = torch.randn(N, 4, dtype=torch.float64)
    W = torch.randn(V, 4, dtype=torch.float64)
    lce = triton_xent.linear_cross_entropy
    Wd = distribute_tensor(W, mesh, [Shard(0)], src_data_rank=None)
    raises_input_error("RowwiseParallel", lambda: lce(h, distribute_tensor(W, mesh, [Shard(1)], src_data_rank=None), t))
    raises_input_error("redistribute", lambda: lce(distribute_tensor(h, mesh, [Shard(0)], src_data_rank=None), Wd, t))
    raises_input_error("only this rank's share", lambda: lce(h, Wd, t, linear_bias=torch.zeros(V, dtype=torch.float64,
                                                                                  requires_grad=True)))
    # A mesh whose coordinates are not the group's rank order: the shards' order is unknown.
    xp = distribute_tensor(x, CTX["permuted"], [Shard(1)], src_data_rank=None)
    raises_input_error("not in the order", lambda: ce(xp, t))
    # In place on a non-leaf: the DTensor's version moves, so an op that saved it raises.
    xn = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
    y = torch.tanh(xn)  # saves its output
    loss = ce(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # The group still works; explain() says what a DTensor call runs.
    check("after errors", ce(xs, t, w).to_local(), cross_entropy_reference(x, t, w), 1e-10)
    assert "vocabulary parallel over 2 ranks" in triton_xent.explain(xs, t, w).reason


@part(2)
def dtensor_compiled(rank, world, group, mesh):
    """torch.compile(fullgraph=True) on DTensor arguments (inductor, CPU): logits sharded on the
    classes, (B, T, V) logits sharded on their last dim, and the head sharded Shard(0), in one
    step; loss and gradients (in the arguments' placements) match the reference."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    V, N, D = 37, 6, 5
    lo, hi = chunk_bounds(V, world, rank)
    x, t, w = problem((N, V), seed=71, weight=True)
    x3, t3, _ = problem((2, 3, V), seed=72, cdim=2)
    g = gen(73)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)

    def step(xd, x3d, hd, Wd):
        a = triton_xent.cross_entropy(xd, t, w, label_smoothing=0.1)
        b = triton_xent.cross_entropy(x3d, t3, reduction="sum", z_loss=1e-3)
        c = triton_xent.linear_cross_entropy(hd, Wd, t, chunk_size=4, softcap=3.0)
        return a, b, c

    compiled = torch.compile(step, fullgraph=True)
    xr, x3r, hr, Wr = (v.clone().requires_grad_() for v in (x, x3, h, W))
    ra = cross_entropy_reference(xr, t, w, label_smoothing=0.1)
    rb = cross_entropy_reference(x3r.flatten(0, 1), t3.flatten(), reduction="sum", z_loss=1e-3)
    rc = cross_entropy_reference(F.linear(hr, Wr), t, softcap=3.0)
    (2.0 * ra + 0.5 * rb + 3.0 * rc).backward()
    for _ in range(2):
        xd = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
        x3d = distribute_tensor(x3, mesh, [Shard(2)], src_data_rank=None).requires_grad_()
        hd = distribute_tensor(h, mesh, [Replicate()], src_data_rank=None).requires_grad_()
        Wd = distribute_tensor(W, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        a, b, c = compiled(xd, x3d, hd, Wd)
        for out, ref in ((a, ra), (b, rb), (c, rc)):
            assert isinstance(out, DTensor) and out.placements == (Replicate(),)
            check("compiled loss", out.to_local(), ref, 1e-10)
        (2.0 * a + 0.5 * b + 3.0 * c).backward()
        for name, got, want in (("d logits", xd, xr.grad[:, lo:hi]), ("d (B, T, V)", x3d, x3r.grad[..., lo:hi]),
                                ("d hidden", hd, hr.grad), ("d head", Wd, Wr.grad[lo:hi])):
            assert got.grad.placements == got.placements, name
            check(name, got.grad.to_local(), want, 1e-10)


@pytest.mark.parametrize("name", list(part.parts))
def test_gloo(name, gloo_world_results):
    """One part of the gloo run (see the part's docstring); every rank that ran it passed."""
    gloo.check_part(gloo_world_results, part, name)
