"""The 4-rank gloo world of test_parallel_more.py (process groups) and test_dtensor.py (DTensor
arguments): one spawn runs the parts of both files (spawning and importing torch is what costs
time; conftest.py's session fixture ``gloo_world_results`` spawns it once); a part names how many
ranks it uses (the first 2, 3 or all 4), and gets the group and a 1-D mesh of those ranks.

Every rank builds the same full problem from a seed (``problem``), keeps its shard, and checks
against ``cross_entropy_reference`` in float64 on the full problem, with a random upstream
gradient (``upstream``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)


import gloo
import pytest
import torch
import torch.distributed as dist
from helpers import rel_err

import triton_xent

IGNORE = -100
WORLD_SIZE = 4
CTX: dict[str, object] = {}  # meshes every rank made (creating one is collective)


def entry(rank, world, init_method, out_dir):
    """Runs the parts of test_parallel_more.py and test_dtensor.py on this rank."""
    import test_dtensor
    import test_parallel_more

    parts = gloo.Parts()
    parts.parts = {**test_parallel_more.part.parts, **test_dtensor.part.parts}
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

        parts.run(rank, out_dir, call)
    finally:
        dist.destroy_process_group()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def problem(shape, *, seed, probs=False, weight=False, ignore_frac=0.25, cdim=1):
    """Full float64 logits, targets (global class ids, or probabilities of the logits' shape)
    and class weights: the same on every rank."""
    g = gen(seed)
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
    return torch.randn(ref.shape, generator=gen(seed + 7), dtype=torch.float64) + (0 if ref.dim() else 2)


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


def raises_input_error(match, fn):
    with pytest.raises(triton_xent.CrossEntropyInputError, match=match):
        fn()
