"""Vocabulary parallelism, the rest of the single-process op, and DTensor arguments.

With a process group: class-probability targets (each rank holds its shard of the distribution),
``return_aux``, ``loss_dtype``, ``divisor``, ``logit_scale``, in-place gradients, and
``torch.compile(fullgraph=True)`` of both ops. With DTensor arguments (``triton_xent.dtensor``):
logits sharded on the classes on a 1-D mesh and on one dimension of a 2-D mesh, the fused head
sharded ``Shard(0)``, the modules, every option, the refusals, and torch.compile.

Every rank builds the same full problem from a seed, keeps its shard, and checks the loss, the aux
outputs and the gradients of its shard against ``cross_entropy_reference`` in float64 on the full
problem, with a random upstream gradient. One spawn of 4 gloo processes runs every part (spawning
and importing torch is what costs time); a part names how many ranks it uses (the first 2, 3 or
all 4), and gets the group and a 1-D mesh of those ranks.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)


import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TOL, rel_err

import triton_xent
from triton_xent.reference import cross_entropy_reference

IGNORE = -100
WORLD_SIZE = 4
part = gloo.Parts()
CTX: dict[str, object] = {}  # meshes every rank made (creating one is collective)


def _entry(rank, world, init_method, out_dir):
    # (a compile on a busy machine takes a while: a longer collective timeout)
    gloo.init(rank, world, init_method, timeout_s=240)
    try:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        groups = {n: dist.new_group(list(range(n))) for n in (2, 3)}
        groups[world] = dist.group.WORLD
        meshes = {n: DeviceMesh("cpu", torch.arange(n)) for n in (2, 3, world)}
        CTX["groups"] = groups
        CTX["mesh2d"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        CTX["permuted"] = DeviceMesh("cpu", torch.tensor([1, 0]))

        def call(fn, nranks):
            fn(rank, nranks, groups[nranks], meshes[nranks])
            return "ok"

        part.run(rank, out_dir, call)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    """Runs every part on a gloo group of CPU processes, once; ``{rank: {part: "ok" | traceback}}``."""
    return gloo.spawn(_entry, WORLD_SIZE)


# ------------------------------------------------------------------------------------------------
# The full problem and its float64 reference
# ------------------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def problem(shape, *, seed, probs=False, weight=False, ignore_frac=0.25, cdim=1):
    """Full float64 logits, targets (global class ids, or probabilities of the logits' shape)
    and class weights: the same on every rank."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    V = shape[cdim]
    if probs:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, dim=cdim)
    else:
        tshape = shape[:cdim] + shape[cdim + 1:]
        t = torch.randint(0, V, tshape, generator=g)
        if ignore_frac and t.dim():
            t = torch.where(torch.rand(tshape, generator=g) < ignore_frac, torch.full_like(t, IGNORE), t)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if weight else None
    return x, t, w


def upstream(ref, seed):
    """A random upstream gradient (for a 0-d loss, away from 1 so that the recompute path runs)."""
    return torch.randn(ref.shape, generator=_gen(seed + 7), dtype=torch.float64) + (0 if ref.dim() else 2)


def chunk_bounds(V, n, coord):
    """This rank's classes under DTensor's Shard (torch.chunk), computed independently."""
    chunks = list(torch.arange(V).chunk(n)) + [torch.arange(0)] * n
    sizes = [c.numel() for c in chunks[:n]]
    lo = sum(sizes[:coord])
    return lo, lo + sizes[coord]


def check(name, got, want, tol):
    e = rel_err(got, want)
    assert e <= tol, f"{name}: rel err {e:.3g} > {tol}"


def together(group, fn, *args, **kwargs):
    """Runs one case on every rank of ``group``; when it fails on one rank it fails on all: a
    rank that left early would leave the others waiting in the next case's collectives."""
    err = None
    try:
        fn(*args, **kwargs)
    except (Exception, pytest.fail.Exception) as exc:
        err = exc
    failed = torch.tensor([err is not None], dtype=torch.int64)
    dist.all_reduce(failed, group=group)
    what = f"{getattr(fn, '__name__', fn)}{args[1:]} {kwargs}"
    if err is not None:
        raise AssertionError(f"case {what}") from err
    if int(failed):
        raise AssertionError(f"case {what} failed on another rank")


# ------------------------------------------------------------------------------------------------
# Item: everything the single-process op has, with a process group (plain tensors)
# ------------------------------------------------------------------------------------------------


def group_ce(rank, sizes, group, *, N=9, dtype=torch.float64, probs=False, weight=False, seed=0,
             inplace=False, target_grad=False, loss_dtype=None, divisor=None, **opts):
    """Sharded cross_entropy (plain tensors, a group) against the float64 reference."""
    V = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, t, w = problem((N, V), seed=seed, probs=probs, weight=weight)
    x = x.to(dtype)
    leaf = x[:, lo:hi].clone().requires_grad_()
    xs = leaf * 1.0 if inplace else leaf  # in place needs an op's output
    ts = t[:, lo:hi].clone().requires_grad_(target_grad) if probs else t
    ws = w[lo:hi] if weight else None
    loss, aux = triton_xent.cross_entropy(xs, ts, ws, return_aux=True, inplace_backward=inplace,
                                          process_group=group, loss_dtype=loss_dtype,
                                          divisor=divisor, **opts)
    xr = x.double().requires_grad_()
    tr = t.clone().requires_grad_(target_grad) if probs else t
    ref, lse, z = cross_entropy_reference(xr, tr, w, return_aux=True, divisor=divisor, **opts)
    out_dtype = loss_dtype or dtype
    assert loss.dtype == out_dtype and loss.shape == ref.shape, (loss.dtype, loss.shape)
    tol = TOL[dtype] if loss_dtype is None else (TOL[torch.float32][0], TOL[dtype][1])
    check("loss", loss, ref, tol[0] if out_dtype != torch.bfloat16 else TOL[torch.bfloat16][0])
    check("lse", aux.lse, lse, 2e-5)
    check("z", aux.z_loss, z, 2e-5)
    gup = upstream(ref, seed)
    loss.backward(gup.to(loss.dtype))
    ref.backward(gup)
    check("d logits", leaf.grad, xr.grad[:, lo:hi], tol[1])
    if target_grad:
        check("d target", ts.grad, tr.grad[:, lo:hi], tol[1])


def group_linear(rank, sizes, group, *, N=9, D=6, dtype=torch.float64, weight=False, bias=False,
                 seed=0, loss_dtype=None, divisor=None, chunk_size=4, **opts):
    """Sharded linear_cross_entropy against the reference: loss, full d(input), dW/db shards."""
    V = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    g = _gen(seed + 100)
    hid = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    Wf = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 3).to(dtype)
    bf = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    _, t, w = problem((N, V), seed=seed, weight=weight)
    xh = hid.clone().requires_grad_()
    Ws = Wf[lo:hi].clone().requires_grad_()
    bs = bf[lo:hi].clone().requires_grad_() if bias else None
    loss, aux = triton_xent.linear_cross_entropy(
        xh, Ws, t, linear_bias=bs, weight=w[lo:hi] if weight else None, return_aux=True,
        process_group=group, chunk_size=chunk_size, loss_dtype=loss_dtype, divisor=divisor, **opts)
    xr, Wr = hid.double().requires_grad_(), Wf.double().requires_grad_()
    br = bf.double().requires_grad_() if bias else None
    ref, lse, z = cross_entropy_reference(F.linear(xr, Wr, br), t, w, return_aux=True,
                                          divisor=divisor, **opts)
    out_dtype = loss_dtype or dtype
    assert loss.dtype == out_dtype and loss.shape == ref.shape
    tol = TOL[dtype]
    check("loss", loss, ref, tol[0])
    if dtype in (torch.float16, torch.bfloat16):
        # The loss of the same 16-bit logits (the GEMM's output): with loss_dtype=fp32 it is
        # unrounded, well below the 16-bit rounding of a loss (2**-9 relative for bf16).
        same, lse, z = cross_entropy_reference(F.linear(hid, Wf, bf).double(), t, w, divisor=divisor,
                                               return_aux=True, **opts)
        check("loss (same logits)", loss, same, 2e-4 if loss_dtype == torch.float32 else tol[0])
    kept = t != IGNORE  # skipped ignored rows have lse = 0
    check("lse", aux.lse[kept], lse[kept], 2e-5)
    check("z", aux.z_loss, z, 2e-5)
    gup = upstream(ref, seed)
    loss.backward(gup.to(loss.dtype))
    ref.backward(gup)
    check("d input", xh.grad, xr.grad, tol[1])
    check("d linear_weight", Ws.grad, Wr.grad[lo:hi], tol[1])
    if bias:
        check("d linear_bias", bs.grad, br.grad[lo:hi], tol[1])


PROB_CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", weight=True, label_smoothing=0.2, target_grad=True),
    dict(reduction="none", weight=True, z_loss=1e-2, softcap=4.0, target_grad=True),
    dict(reduction="mean", label_smoothing=0.1, logit_scale=0.7, inplace=True),
]


@part(3)
def group_probability_targets(rank, world, group, mesh):
    """Class probabilities, each rank holding its shard of the distribution (2 and 3 ranks,
    uneven and empty shards): loss, aux, d(logits) and d(target)."""
    def cases(sizes):
        if rank < len(sizes):
            g = CTX["groups"][len(sizes)]
            for i, opts in enumerate(PROB_CASES):
                together(g, group_ce, rank, sizes, g, probs=True, seed=i, **opts)

    for sizes in ([19, 18], [13, 12, 12], [20, 0, 17]):
        together(group, cases, sizes)  # every rank of the part, also those without a shard


@part(3)
def group_options(rank, world, group, mesh):
    """loss_dtype, divisor (a number, a 0-d tensor), logit_scale, in-place gradients, with a
    group of 3 ranks (13/12/12), both ops."""
    sizes = [13, 12, 12]
    cases = [
        (group_ce, dict(dtype=torch.bfloat16, loss_dtype=torch.float32, label_smoothing=0.1, weight=True)),
        (group_ce, dict(dtype=torch.float32, loss_dtype=torch.float64, z_loss=1e-3)),
        (group_ce, dict(reduction="sum", divisor=7.0, weight=True, label_smoothing=0.1)),
        (group_ce, dict(reduction="sum", divisor=torch.tensor(5.5, dtype=torch.float64), z_loss=1e-2, seed=3)),
        (group_ce, dict(logit_scale=0.3, softcap=2.0, label_smoothing=0.1, weight=True)),
        (group_ce, dict(reduction="none", inplace=True, weight=True, dtype=torch.float32,
                        label_smoothing=0.1, logit_scale=1.5, seed=4)),
        (group_ce, dict(reduction="sum", inplace=True, divisor=3.0, seed=5)),
        (group_linear, dict(dtype=torch.bfloat16, loss_dtype=torch.float32, weight=True, label_smoothing=0.1)),
        (group_linear, dict(reduction="sum", divisor=torch.tensor(6.0, dtype=torch.float64), bias=True,
                            z_loss=1e-3, seed=1)),
        (group_linear, dict(reduction="sum", divisor=4.0, weight=True, seed=2)),
        (group_linear, dict(logit_scale=0.5, softcap=3.0, bias=True, reduction="none", seed=3)),
    ]
    for fn, kw in cases:
        together(group, fn, rank, sizes, group, **kw)


@part(2)
def group_compiled(rank, world, group, mesh):
    """torch.compile(fullgraph=True) of a step calling both ops with a process group (inductor):
    loss and gradients match the reference; after the first call the ranks' agreement is cached
    (no all_gather, no host sync, per step)."""
    sizes = [19, 18]
    V, N, D = sum(sizes), 10, 5
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, t, w = problem((N, V), seed=21, weight=True)
    g = _gen(22)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)

    def step(xs, ts, ws, hs, Wsh):
        a = triton_xent.cross_entropy(xs, ts, ws, process_group=group, **opts)
        b = triton_xent.linear_cross_entropy(hs, Wsh, ts, reduction="none", process_group=group,
                                             softcap=3.0, chunk_size=4)
        return a, b

    compiled = torch.compile(step, fullgraph=True)
    gb = torch.randn(N, generator=g, dtype=torch.float64)
    xr, hr, Wr = (v.clone().requires_grad_() for v in (x, h, W))
    ra = cross_entropy_reference(xr, t, w, **opts)
    rb = cross_entropy_reference(F.linear(hr, Wr), t, reduction="none", softcap=3.0)
    (3.0 * ra + (rb * gb).sum()).backward()
    gathers = []
    real = dist.all_gather
    dist.all_gather = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
    try:
        for it in range(2):
            xs = x[:, lo:hi].clone().requires_grad_()
            hs, Ws = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_()
            a, b = compiled(xs, t, w[lo:hi], hs, Ws)
            (3.0 * a + (b * gb).sum()).backward()
            check("loss", a, ra, 1e-10)
            check("linear loss rows", b, rb, 1e-10)
            check("d logits", xs.grad, xr.grad[:, lo:hi], 1e-10)
            check("d hidden", hs.grad, hr.grad, 1e-10)
            check("d linear_weight", Ws.grad, Wr.grad[lo:hi], 1e-10)
            if it == 0:
                first = len(gathers)
        assert first >= 1 and len(gathers) == first, (first, gathers)
    finally:
        dist.all_gather = real


class CollectiveLog:
    """Counts the pipeline's all-reduces (op, elements, bytes) and the agreement's all_gathers,
    by patching ``triton_xent.parallel.all_reduce`` and ``dist.all_gather`` (both looked up at
    call time)."""

    def __init__(self):
        import triton_xent.parallel as parallel

        self.parallel, self.reduces, self.gathers = parallel, [], 0
        self._reduce, self._gather = parallel.all_reduce, dist.all_gather

    def __enter__(self):
        def reduce(t, op, group):
            self.reduces.append((op, t.numel(), t.numel() * t.element_size()))
            return self._reduce(t, op, group)

        def gather(*a, **k):
            self.gathers += 1
            return self._gather(*a, **k)

        self.parallel.all_reduce, dist.all_gather = reduce, gather
        return self

    def __exit__(self, *exc):
        self.parallel.all_reduce, dist.all_gather = self._reduce, self._gather

    def take(self):
        out, self.reduces, self.gathers = (self.reduces, self.gathers), [], 0
        return out


@part(2)
def group_collective_budget(rank, world, group, mesh):
    """The communication docs/scaling.md states, counted: per cross_entropy forward a MAX of N
    values and one SUM of 5 N (24 B per row in fp32), nothing in the backward; one all_gather the
    first time a configuration is seen, none after, one per call with validate=True; the fused
    head: per chunk the same two, plus one all-reduce of the weighted mean's denominator and one
    of d(input) (N x D, the input's dtype); reduction="none" all-reduces d(input) in the backward."""
    sizes, N, D = [19, 18], 12, 5
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, t, w = problem((N, sum(sizes)), seed=81, weight=True)
    x = x.float()
    xs = x[:, lo:hi].clone().requires_grad_()
    with CollectiveLog() as log:
        loss = triton_xent.cross_entropy(xs, t, w[lo:hi].float(), label_smoothing=0.1, process_group=group)
        assert log.take() == ([("max", N, 4 * N), ("sum", 5 * N, 20 * N)], 1)
        loss.backward()
        assert log.take() == ([], 0)
        triton_xent.cross_entropy(xs, t, w[lo:hi].float(), label_smoothing=0.1, process_group=group)
        assert log.take()[1] == 0  # agreed already: no exchange, no host sync
        triton_xent.cross_entropy(xs, t, w[lo:hi].float(), label_smoothing=0.1, process_group=group,
                                  validate=True)
        assert log.take()[1] == 1
        h = torch.randn(N, D, generator=_gen(82)).requires_grad_()
        W = torch.randn(hi - lo, D, generator=_gen(83 + rank)).requires_grad_()
        loss = triton_xent.linear_cross_entropy(h, W, t, weight=w[lo:hi].float(), chunk_size=5,
                                                skip_ignored=False, process_group=group)
        chunks = -(-N // 5)
        reduces, gathers = log.take()
        assert gathers == 1
        assert reduces == [("sum", 1, 4)] + [("max", n, 4 * n) if i % 2 == 0 else ("sum", 5 * n, 20 * n)
                                             for n in (5, 5, 2) for i in range(2)] + [("sum", N * D, 4 * N * D)], reduces
        assert chunks == 3
        loss.backward()
        assert log.take() == ([], 0)
        loss = triton_xent.linear_cross_entropy(h, W, t, reduction="none", chunk_size=N,
                                                skip_ignored=False, process_group=group)
        reduces = log.take()[0]
        assert reduces == [("max", N, 4 * N), ("sum", 5 * N, 20 * N)], reduces
        loss.sum().backward()
        assert log.take()[0] == [("sum", N * D, 4 * N * D)]


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

    g = _gen(seed + 100)
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
    h = torch.randn(N, D, dtype=torch.float64, generator=_gen(32)).requires_grad_()
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
    _raises("several mesh dims", lambda: triton_xent.cross_entropy(xd, t))
    assert isinstance(xd, DTensor)


def _raises(match, fn):
    with pytest.raises(triton_xent.CrossEntropyInputError, match=match):
        fn()


@part(2)
def group_compiled_checks(rank, world, group, mesh):
    """Compiled with a group: validate=True refuses clearly at trace time (its exchange is a host
    sync), and a class id outside the global vocabulary raises on the CPU when the graph runs,
    as an eager call does."""
    sizes = [19, 18]
    V = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, t, _ = problem((6, V), seed=31)

    def ce(xs, ts, **kw):
        return triton_xent.cross_entropy(xs, ts, process_group=group, **kw)

    def lce(hs, Ws, ts, **kw):
        return triton_xent.linear_cross_entropy(hs, Ws, ts, process_group=group, **kw)

    torch._dynamo.reset()
    # (raised while Dynamo traces: it re-raises it under its own exception type, message kept)
    with pytest.raises(Exception, match="validate=True with a process group under torch.compile"):
        torch.compile(ce, fullgraph=True)(x[:, lo:hi], t, validate=True)
    bad = t.clone()
    bad[2] = V  # global V: out of range on every rank, though inside no rank's shard count
    _raises(r"Target \d+ is out of bounds",
            lambda: torch.compile(ce, fullgraph=True, dynamic=False)(x[:, lo:hi], bad))
    h = torch.randn(6, 4, generator=_gen(32), dtype=torch.float64)
    W = torch.randn(V, 4, generator=_gen(33), dtype=torch.float64)
    _raises(r"Target \d+ is out of bounds",
            lambda: torch.compile(lce, fullgraph=True, dynamic=False)(h, W[lo:hi], bad))


@part(2)
def dtensor_refusals(rank, world, group, mesh):
    """What is not supported raises a clear error on every rank (and the group still works)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    V, N = 37, 6
    x, t, w = problem((N, V), seed=61, weight=True)
    lo, hi = chunk_bounds(V, world, rank)
    ce = triton_xent.cross_entropy
    xs = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None)
    _raises("Partial placement", lambda: ce(DTensor.from_local(x, mesh, [Partial()]), t))
    _raises(r"sharded on dim 0 .* not on the classes", lambda: ce(
        distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None), t))
    _raises("target must be replicated", lambda: ce(
        xs, distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)))
    _raises("full vector of the 37 classes", lambda: ce(xs, t, w[lo:hi]))
    assert mesh.get_group(0).group_name != CTX["groups"][2].group_name
    _raises("process_group= is not the group", lambda: ce(xs, t, process_group=CTX["groups"][2]))
    _raises("but input is not", lambda: ce(x, distribute_tensor(t, mesh, [Replicate()], src_data_rank=None)))
    # The language-model layout where the shapes do not say which dim holds the classes.
    x3 = torch.randn(2, 5, 5, dtype=torch.float64)
    t3 = torch.randint(0, 5, (2, 5))
    x3d = distribute_tensor(x3, mesh, [Shard(2)], src_data_rank=None)
    _raises("Flatten both", lambda: ce(x3d, t3))
    _raises("Flatten both", lambda: ce(x3d, torch.softmax(x3, -1)))
    # A plain full-size tensor to slice for shards that are not torch.chunk's.
    xo = DTensor.from_local(x[:, :30].contiguous() if rank == 0 else x[:, 30:].contiguous(), mesh,
                            [Shard(1)], shape=x.shape, stride=x.stride())
    _raises("torch.chunk", lambda: ce(xo, t, w))
    # ... while without one the pipeline takes the shards' actual sizes.
    check("any sizes", ce(xo, t).to_local(), cross_entropy_reference(x, t), 1e-10)
    # A leaf DTensor in place.
    _raises("leaf DTensor", lambda: ce(xs.detach().requires_grad_(), t, inplace_backward=True))
    # The head sharded on D (RowwiseParallel), hidden states not replicated, a replicated bias
    # that requires grad.
    h = torch.randn(N, 4, dtype=torch.float64)
    W = torch.randn(V, 4, dtype=torch.float64)
    lce = triton_xent.linear_cross_entropy
    Wd = distribute_tensor(W, mesh, [Shard(0)], src_data_rank=None)
    _raises("RowwiseParallel", lambda: lce(h, distribute_tensor(W, mesh, [Shard(1)], src_data_rank=None), t))
    _raises("redistribute", lambda: lce(distribute_tensor(h, mesh, [Shard(0)], src_data_rank=None), Wd, t))
    _raises("only this rank's share", lambda: lce(h, Wd, t, linear_bias=torch.zeros(V, dtype=torch.float64,
                                                                                  requires_grad=True)))
    # A mesh whose coordinates are not the group's rank order: the shards' order is unknown.
    xp = distribute_tensor(x, CTX["permuted"], [Shard(1)], src_data_rank=None)
    _raises("not in the order", lambda: ce(xp, t))
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
    g = _gen(73)
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


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(part.parts))
def test_gloo(name, gloo_results):
    """One part of the gloo run (see the part's docstring); every rank that ran it passed."""
    gloo.check_part(gloo_results, part, name)
