"""Vocabulary parallelism through the public API: ``cross_entropy(..., process_group=...)``,
``linear_cross_entropy(..., process_group=...)`` and the modules, against float64 PyTorch.

One spawn of a gloo group of 3 CPU processes runs every part below (spawning and importing torch
per process is the slow part). Every rank builds the same full problem from a seed, keeps its
contiguous shard of the classes, and compares the loss, the aux outputs and the gradient of its
shard (the full gradient of the hidden states for the linear variant) with the unsharded float64
reference, element by element (helpers.py), with a seeded random upstream gradient.
``tests/test_vocab_parallel.py`` tests the ``process_group=`` path itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)

import contextlib
import json
import tempfile
import traceback

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import GRAD_TOL, LOSS_TOL, assert_close, upstream_like

import triton_xent
import triton_xent._config as config
from triton_xent.reference import cross_entropy_reference

IGNORE = -100
WORLD_SIZE = 3
part = gloo.Parts()  # each part uses the first 2 or all 3 ranks
GROUPS: dict[str, object] = {}
FAILURES: list[str] = []  # this rank's failed checks in the running part


@contextlib.contextmanager
def soft(what: str):
    """Records a failed check and carries on: a rank that stopped at its first wrong value would
    leave the others waiting in the part's next collective (or pair it with the wrong one).
    Checks only: no collective may run inside."""
    try:
        yield
    except AssertionError:
        FAILURES.append(f"{what}:\n{traceback.format_exc()}")


def _entry(rank, world, init_method, out_dir):
    gloo.init(rank, world, init_method)
    try:
        GROUPS["pair"] = dist.new_group([0, 1])  # every rank creates every group
        GROUPS["single"] = [dist.new_group([r]) for r in range(world)][rank]

        def call(fn, nranks):
            saved = config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS
            FAILURES.clear()
            try:
                fn(rank, nranks, dist.group.WORLD if nranks == world else GROUPS["pair"])
                return "\n".join(FAILURES) or "ok"
            except (Exception, pytest.fail.Exception):
                return "\n".join(FAILURES + [traceback.format_exc()])
            finally:
                config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS = saved

        part.run(rank, out_dir, call)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    """Runs every part on a gloo group of CPU processes, once: ``{rank: {part: "ok" | traceback}}``."""
    return gloo.spawn(_entry, WORLD_SIZE)


_bounds = gloo.bounds


def _problem(N, V, *, seed, dtype=torch.float32, ignore_frac=0.25, weight=False):
    """Full logits (N, V), global targets, class weights: the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(t, IGNORE), t)
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weight else None
    return x, t, w


def check_ce(rank, sizes, group, *, N=6, dtype=torch.float32, backend="torch", weight=False,
             inplace=False, seed=0, loss_dtype=None, x=None, t=None, ignore_frac=0.25, **opts):
    """``cross_entropy(shard, process_group=group)`` against float64 on the full problem: the
    loss, aux lse and z term, and this rank's shard of the gradient."""
    V = sum(sizes)
    x0, t0, w = _problem(N, V, seed=seed, dtype=dtype, weight=weight, ignore_frac=ignore_frac)
    x = x0 if x is None else x
    t = t0 if t is None else t
    lo, hi = _bounds(sizes, dist.get_rank(group))  # the rank in the group
    leaf = x[:, lo:hi].detach().clone().requires_grad_()
    # In place needs an op's output (a leaf is refused); its gradient reaches the leaf unchanged.
    xs = leaf * 1.0 if inplace else leaf
    seen = []
    if inplace:
        xs.register_hook(lambda grad: seen.append(grad.data_ptr()))
    ptr = xs.data_ptr()
    loss, aux = triton_xent.cross_entropy(
        xs, t, None if w is None else w[lo:hi], return_aux=True, inplace_backward=inplace,
        backend=backend, process_group=group, loss_dtype=loss_dtype, **opts)
    xr = x.detach().double().clone().requires_grad_()
    ref, lse, z = cross_entropy_reference(xr, t, None if w is None else w.double(), return_aux=True,
                                          **opts)
    what = f"rank {rank} sizes={sizes} {dtype} {backend} inplace={inplace} {opts}"
    out_dtype = loss_dtype or dtype
    with soft(what):  # the backward runs no collective
        assert loss.dtype == out_dtype and loss.shape == ref.shape, what
        assert_close(loss, ref, LOSS_TOL[out_dtype], what=f"loss: {what}")
        assert_close(aux.lse, lse, LOSS_TOL[torch.float32], what=f"lse: {what}")
        assert_close(aux.z_loss, z, LOSS_TOL[torch.float32], what=f"z term: {what}")
        g = upstream_like(ref, out_dtype, seed)
        loss.backward(g.to(out_dtype))
        ref.backward(g)
        assert leaf.grad is not None, f"no gradient: {what}"
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype, (leaf.grad.shape, what)
        assert_close(leaf.grad, xr.grad[:, lo:hi], GRAD_TOL[dtype], dim=1, what=f"gradient: {what}")
        if inplace and hi > lo:
            assert seen == [ptr], f"inplace_backward: the gradient is not in the logits: {what}"
    return loss


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

OPTS = dict(label_smoothing=0.1, z_loss=1e-2, softcap=5.0)


@part(2)
def public_api_and_modules(rank, world, group):
    """cross_entropy, linear_cross_entropy and both modules with ``process_group=``."""
    sizes = [19, 18]
    V = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    for reduction in ("mean", "none"):
        check_ce(rank, sizes, group, weight=True, reduction=reduction, seed=1, **OPTS)
    x, t, w = _problem(8, V, seed=11, dtype=torch.float64, weight=True)
    mod = triton_xent.CrossEntropyLoss(w[lo:hi], label_smoothing=0.1, reduction="sum", process_group=group)
    xs, xr = x[:, lo:hi].clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = mod(xs, t), cross_entropy_reference(xr, t, w, label_smoothing=0.1, reduction="sum")
    with soft(f"rank {rank} module"):
        assert_close(out, ref, LOSS_TOL[torch.float64], what="module loss")
        out.backward()
        ref.backward()
        assert_close(xs.grad, xr.grad[:, lo:hi], GRAD_TOL[torch.float64], dim=1, what="module gradient")

    # linear_cross_entropy and its module: the head's rows are sharded, the hidden states are not.
    gen = torch.Generator().manual_seed(12)
    h = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    W = torch.randn(V, 5, dtype=torch.float64, generator=gen)
    hs, Ws = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_()
    loss = triton_xent.linear_cross_entropy(hs, Ws, t, z_loss=1e-3, reduction="none",
                                            label_smoothing=0.1, process_group=group)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = cross_entropy_reference(hr @ Wr.T, t, z_loss=1e-3, reduction="none", label_smoothing=0.1)
    with soft(f"rank {rank} linear"):  # the linear backward ("none") runs no collective either
        assert_close(loss, ref, LOSS_TOL[torch.float64], what="linear loss")
        g = upstream_like(ref, torch.float64)
        loss.backward(g)
        ref.backward(g)
        assert_close(hs.grad, hr.grad, GRAD_TOL[torch.float64], what="linear d(input)")
        assert_close(Ws.grad, Wr.grad[lo:hi], GRAD_TOL[torch.float64], what="linear d(weight)")
    mod = triton_xent.LinearCrossEntropyLoss(5, hi - lo, dtype=torch.float64, process_group=group)
    with torch.no_grad():
        mod.linear.weight.copy_(W[lo:hi])
    assert_close(mod(h, t), cross_entropy_reference(h @ W.T, t), LOSS_TOL[torch.float64],
                 what="linear module loss")


@part(3)
def size_one_group(rank, world, group):
    """A group of one rank: the single-process answer, checked against float64 (not against the
    single-process call, which would compare the code with itself)."""
    single = GROUPS["single"]
    check_ce(rank, [30], single, N=7, weight=True, seed=9, label_smoothing=0.1, z_loss=1e-3)
    check_ce(rank, [30], single, N=7, backend="triton", reduction="none", seed=9, **OPTS)
    gen = torch.Generator().manual_seed(10)
    h = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    W = torch.randn(30, 5, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 30, (7,), generator=gen)
    hs, Ws = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = triton_xent.linear_cross_entropy(hs, Ws, t, label_smoothing=0.1, process_group=single)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = cross_entropy_reference(hr @ Wr.T, t, label_smoothing=0.1)
    assert_close(loss, ref, LOSS_TOL[torch.float64], what="linear loss")
    loss.backward()
    ref.backward()
    assert_close(hs.grad, hr.grad, GRAD_TOL[torch.float64], what="linear d(input)")
    assert_close(Ws.grad, Wr.grad, GRAD_TOL[torch.float64], what="linear d(weight)")


@part(3)
def triton_with_an_empty_shard(rank, world, group):
    """The Triton local phases (interpreter), fused and split, with a rank that holds no class;
    in place too."""
    config.TRITON_BLOCK_V = 8  # several blocks per shard
    for splits in (1, 2):
        config.TRITON_NUM_SPLITS = splits
        sizes = [40, 0, 35]
        check_ce(rank, sizes, group, backend="triton", weight=True, seed=2, **OPTS)
        check_ce(rank, sizes, group, backend="triton", reduction="none", inplace=True, seed=3,
                 label_smoothing=0.2)


@part(3)
def inplace_with_an_empty_shard(rank, world, group):
    """inplace_backward on the torch backend with an empty shard (first, middle and last). Each
    sharding has its own row count: see test_sharding_changes_between_calls."""
    for i, sizes in enumerate(([0, 20, 17], [20, 0, 17], [20, 17, 0])):
        check_ce(rank, sizes, group, N=6 + i, inplace=True, reduction="none", weight=True, seed=4,
                 **OPTS)
        check_ce(rank, sizes, group, N=6 + i, inplace=True, reduction="mean", seed=5,
                 label_smoothing=0.1)


@part(3)
def no_rows_on_every_rank(rank, world, group):
    """N = 0 everywhere: mean is NaN (0/0, as PyTorch), sum 0, none empty; the gradient of the
    shard is an empty (0, V_r) tensor."""
    sizes = [13, 12, 12]
    lo, hi = _bounds(sizes, rank)
    for backend in ("torch", "triton"):
        for reduction in ("mean", "sum", "none"):
            xs = torch.randn(0, hi - lo, requires_grad=True)
            t = torch.zeros(0, dtype=torch.long)
            loss = triton_xent.cross_entropy(xs, t, reduction=reduction, label_smoothing=0.1,
                                             backend=backend, process_group=group)
            ref = torch.nn.functional.cross_entropy(torch.randn(0, sum(sizes)), t, reduction=reduction,
                                                    label_smoothing=0.1)
            with soft(f"rank {rank} N=0 {backend} {reduction}"):
                assert loss.shape == ref.shape, (backend, reduction, loss.shape)
                assert_close(loss, ref, LOSS_TOL[torch.float32], what=f"{backend} {reduction}")
                loss.sum().backward()
                assert xs.grad is not None and xs.grad.shape == (0, hi - lo)


@part(3)
def loss_dtype_with_a_group(rank, world, group):
    """bf16 logit shards, loss_dtype=torch.float32: the fp32 loss, unrounded, on both backends."""
    for backend in ("torch", "triton"):
        for reduction in ("sum", "none"):
            check_ce(rank, [13, 12, 12], group, N=16, dtype=torch.bfloat16, backend=backend,
                     loss_dtype=torch.float32, reduction=reduction, seed=6, label_smoothing=0.1)


@part(3)
def no_grad_and_neg_inf_shard(rank, world, group):
    """Without grad: loss and aux against float64, nothing requires grad. A shard of -inf logits
    (a masked vocabulary): finite loss, zero gradient on that shard, the rest as float64."""
    sizes = [13, 12, 12]
    V = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    x, t, _ = _problem(6, V, seed=3, dtype=torch.float64)
    with torch.no_grad():
        loss, aux = triton_xent.cross_entropy(x[:, lo:hi], t, label_smoothing=0.1, z_loss=1e-3,
                                              reduction="none", return_aux=True, process_group=group)
    ref, lse, z = cross_entropy_reference(x, t, label_smoothing=0.1, z_loss=1e-3, reduction="none",
                                          return_aux=True)
    with soft(f"rank {rank} no grad"):
        assert not loss.requires_grad
        assert_close(loss, ref, LOSS_TOL[torch.float64], what="no-grad loss")
        assert_close(aux.lse, lse, LOSS_TOL[torch.float64], what="no-grad lse")
        assert_close(aux.z_loss, z, LOSS_TOL[torch.float64], what="no-grad z term")

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, V, dtype=torch.float64, generator=g)
    x[:, 13:25] = float("-inf")  # all of rank 1's shard
    t = torch.randint(0, 13, (6,), generator=g)
    t[2] = IGNORE
    for backend in ("torch", "triton"):
        for reduction in ("mean", "none"):
            dtype = torch.float64 if backend == "torch" else torch.float32
            loss = check_ce(rank, sizes, group, dtype=dtype, backend=backend, x=x.to(dtype), t=t,
                            reduction=reduction, z_loss=1e-3)
            with soft(f"rank {rank} -inf shard {backend} {reduction}"):
                assert torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(part.parts))
def test_gloo(name, gloo_results):
    """One part of the gloo run (see the part's docstring); every rank that ran it passed."""
    gloo.check_part(gloo_results, part, name)


SHARDINGS = ([0, 20, 17], [20, 0, 17], [20, 17, 0])
def _sharding_entry(rank, world, out_dir):
    gloo.init(rank, world, f"file://{out_dir}/rendezvous", timeout_s=15)
    results = []
    try:
        for sizes in SHARDINGS:  # the same rows and options; only the shard sizes change
            x, t, _ = _problem(6, sum(sizes), seed=7, dtype=torch.float64)
            lo, hi = _bounds(sizes, rank)
            # The agreement is cached per rank on its own shapes; when the shards move between
            # calls, validate=True makes every rank agree again (without it, a rank whose shard
            # size repeats would skip the exchange the others make: a collective timeout).
            loss = triton_xent.cross_entropy(x[:, lo:hi], t, label_smoothing=0.1,
                                             process_group=dist.group.WORLD, validate=True)
            ref = cross_entropy_reference(x, t, label_smoothing=0.1)
            results.append("ok" if abs(float(loss) - float(ref)) < 1e-10 else f"{float(loss)} != {float(ref)}")
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    os._exit(0)  # a desynchronised group may hang in its teardown


def test_sharding_changes_between_calls():
    """Three calls on the same group, each with the shards in a different place (the empty one
    first, middle, last), with validate=True: every rank gets the float64 loss of every call.
    Its own spawn, with a
    15 s collective timeout, so a hang fails this test alone."""
    import time

    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_sharding_entry, args=(WORLD_SIZE, d), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    break
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        results = {}
        for r in range(WORLD_SIZE):
            path = os.path.join(d, f"rank{r}.json")
            results[r] = json.load(open(path)) if os.path.exists(path) else ["no result (killed)"]
    assert all(v == ["ok"] * len(SHARDINGS) for v in results.values()), results


def _one_gpu_entry(rank, world, init_method):
    # Every rank on the one device: gloo moves CUDA tensors through host memory (NCCL refuses two
    # ranks on one GPU). The Triton kernels are the compiled ones.
    torch.cuda.set_device(0)
    gloo.init(rank, world, init_method, timeout_s=600)  # (each rank compiles its kernels)
    try:
        dev = torch.device("cuda", 0)
        V, sizes = 50257, [16753, 16752, 16752][:world]
        sizes[-1] += V - sum(sizes)
        lo, hi = _bounds(sizes, rank)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(64, V, generator=g) * 3).to(torch.bfloat16)
        t = torch.randint(0, V, (64,), generator=g)
        t[::5] = IGNORE
        w = torch.rand(V, generator=g) + 0.5
        xs = x[:, lo:hi].to(dev).requires_grad_()
        kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction="none")
        loss = triton_xent.cross_entropy(xs, t.to(dev), w[lo:hi].to(dev), backend="triton",
                                         process_group=dist.group.WORLD, **kw)
        xr = x.double().requires_grad_()
        ref = cross_entropy_reference(xr, t, w.double(), **kw)
        up = upstream_like(ref, torch.bfloat16)
        loss.backward(up.to(dev, torch.bfloat16))
        ref.backward(up)
        assert_close(loss.cpu(), ref, LOSS_TOL[torch.bfloat16], what=f"rank {rank} loss")
        assert_close(xs.grad.cpu(), xr.grad[:, lo:hi], GRAD_TOL[torch.bfloat16], dim=1,
                     what=f"rank {rank} gradient")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_one_gpu(world):
    """2 or 3 ranks sharing one GPU (gloo), the compiled Triton kernels, bf16 logits of a
    GPT-2-sized vocabulary, "none" with a random upstream: a one-GPU machine runs the
    vocabulary-parallel path on CUDA."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_one_gpu_entry, args=(world, f"file://{d}/rendezvous"), nprocs=world, join=True)
