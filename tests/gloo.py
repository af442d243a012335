"""Shared plumbing of the gloo tests: one spawn of CPU ranks runs every registered part (spawning
and importing torch in each process is what costs time), each rank records "ok" or the traceback
of each part, and the test collection reads the records back.

A test module keeps a :class:`Parts` registry, writes an entry function (module level, so the
spawned processes can import it) that calls :func:`init`, makes its groups, then
:meth:`Parts.run`, and exposes ``spawn(entry, world)`` through a module-scoped fixture.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Parts:
    """Named test parts, each run on the first ``nranks`` ranks of the spawn."""

    def __init__(self):
        self.parts: dict[str, tuple[int, object]] = {}

    def __call__(self, nranks: int):
        def register(fn):
            self.parts[fn.__name__] = (nranks, fn)
            return fn

        return register

    def run(self, rank: int, out_dir: str, call) -> None:
        """Runs every part this rank takes part in: ``call(fn, nranks)`` returns the part's
        record (its failures, or "ok"); an exception is recorded with its traceback (a failed
        ``pytest.raises`` raises ``pytest.fail.Exception``, which is not an ``Exception``, and
        must not kill the rank: the others would wait in the next barrier)."""
        results = {}
        for name, (nranks, fn) in self.parts.items():
            if rank < nranks:
                try:
                    results[name] = call(fn, nranks)
                except (Exception, pytest.fail.Exception):
                    results[name] = traceback.format_exc()
            dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


def init(rank: int, world: int, init_method: str, timeout_s: int = 60) -> None:
    """Joins the gloo group. A rank that fails mid-collective leaves the others waiting: the
    timeout bounds that."""
    torch.set_num_threads(1)  # the machine's cores are shared by every rank
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def rank_env(rank: int, world: int, backend: str) -> None:
    """What a launcher (torchrun, accelerate) sets for a rank, and the library's backend."""
    os.environ["TRITON_XENT_BACKEND"] = backend
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank)):
        os.environ[key] = str(value)


def run(rank: int, world: int, init_method: str, out_dir: str, parts: Parts, call, *,
        timeout_s: int = 60) -> None:
    """A spawned rank's whole run (an ``entry`` of :func:`spawn` calls it): joins the group,
    runs ``parts`` (``call(fn, nranks)`` returns each part's record), leaves the group."""
    init(rank, world, init_method, timeout_s)
    try:
        parts.run(rank, out_dir, call)
    finally:
        dist.destroy_process_group()


def spawn(entry, world: int) -> dict[int, dict[str, str]]:
    """Runs ``entry(rank, world, init_method, out_dir)`` on ``world`` processes, once:
    ``{rank: {part: "ok" | failure}}``."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(entry, args=(world, f"file://{d}/rendezvous", d), nprocs=world, join=True)
        out = {}
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                out[r] = json.load(f)
        return out


def check_part(results: dict, parts: Parts, name: str) -> None:
    """Every rank that ran part ``name`` passed it."""
    nranks = parts.parts[name][0]
    for r in range(nranks):
        got = results[r].get(name)
        assert got == "ok", f"rank {r} of {nranks}:\n{got}"


def bounds(sizes, rank):
    """The global columns ``[lo, hi)`` of shard ``rank`` with shards of ``sizes`` in rank order."""
    off = sum(sizes[:rank])
    return off, off + sizes[rank]
