"""Vocabulary parallelism with a process group: the rest of the single-process op.

Class-probability targets (each rank holds its shard of the distribution), ``return_aux``,
``loss_dtype``, ``divisor``, ``logit_scale``, in-place gradients, ``torch.compile(fullgraph=True)``
of both ops and its checks, and the collectives' budget. DTensor arguments: test_dtensor.py.

The parts run in the shared 4-rank gloo world (gloo_world.py): every rank builds the same full
problem from a seed, keeps its shard, and checks the loss, the aux outputs and the gradients of
its shard against ``cross_entropy_reference`` in float64 on the full problem, with a random
upstream gradient.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)


import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_world import CTX, IGNORE, check, gen, problem, raises_input_error, together, upstream
from helpers import TOL

import triton_xent
from triton_xent.reference import cross_entropy_reference

part = gloo.Parts()


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
    g = gen(seed + 100)
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
    g = gen(22)
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
        h = torch.randn(N, D, generator=gen(82)).requires_grad_()
        W = torch.randn(hi - lo, D, generator=gen(83 + rank)).requires_grad_()
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
    raises_input_error(r"Target \d+ is out of bounds",
            lambda: torch.compile(ce, fullgraph=True, dynamic=False)(x[:, lo:hi], bad))
    h = torch.randn(6, 4, generator=gen(32), dtype=torch.float64)
    W = torch.randn(V, 4, generator=gen(33), dtype=torch.float64)
    raises_input_error(r"Target \d+ is out of bounds",
            lambda: torch.compile(lce, fullgraph=True, dynamic=False)(h, W[lo:hi], bad))


@pytest.mark.parametrize("name", list(part.parts))
def test_gloo(name, gloo_world_results):
    """One part of the gloo run (see the part's docstring); every rank that ran it passed."""
    gloo.check_part(gloo_world_results, part, name)
