"""Vocabulary parallelism on CUDA: the compiled Triton kernels with the merge across ranks.

GPU-marked (skipped with the reason where there is no GPU). Run them with the kernels compiled,
not interpreted::

    TRITON_INTERPRET=0 python -m pytest tests/test_parallel_gpu.py -m gpu -q -rs

* ``test_two_ranks_one_gpu``: 2 ranks share one GPU over gloo (which takes CUDA tensors; NCCL
  refuses two ranks on one device, "Duplicate GPU detected"), so one GPU checks the kernels'
  shard phases and the merge across ranks.
* ``test_nccl``: NCCL, one GPU per rank (needs 2), the same checks plus the step under
  ``torch.compile(fullgraph=True)``.

Each rank checks, against float64 on the full problem: a process group with plain shards of bf16
logits of GPT-2's vocabulary (uneven halves), DTensor logits on a CUDA mesh, and the fused head
with a DTensor ``linear_weight`` (``Shard(0)``).
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
import torch.nn.functional as F

import triton_xent
from triton_xent.reference import cross_entropy_reference

V, N, D = 50257, 256, 512


def _err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _checks(rank, world, device, *, compiled, backend="triton", V=V, N=N, D=D):
    """The checks of one rank (``backend``, sizes: a CPU dry run can pass "torch" and less)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from triton_xent.backends import triton_ce as ops

    assert backend != "triton" or not ops.INTERPRETED, (
        "TRITON_INTERPRET=1 is set: run with TRITON_INTERPRET=0")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 3).to(device, torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[::5] = -100
    w = (torch.rand(V, generator=g) + 0.5).to(device)
    h = torch.randn(N, D, generator=g).to(device, torch.bfloat16)
    W = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(device, torch.bfloat16)
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    xr = x.double().requires_grad_()
    ref = cross_entropy_reference(xr, t, w.double(), **opts)
    ref.backward()
    mesh = init_device_mesh(device.type, (world,))
    full = -(-V // world)
    lo, hi = min(rank * full, V), min((rank + 1) * full, V)
    # fp32 losses (loss_dtype): the merge is exact to fp32 whatever the logits' dtype; the
    # gradient is bf16, rounded once (2**-8 of the row maximum).
    xs = x[:, lo:hi].clone().requires_grad_()
    loss = triton_xent.cross_entropy(xs, t, w[lo:hi], backend=backend, process_group=dist.group.WORLD,
                                     loss_dtype=torch.float32, **opts)
    loss.backward()
    assert _err(loss, ref) < 1e-5 and _err(xs.grad, xr.grad[:, lo:hi]) < 1e-2, "group"
    xd = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
    loss = triton_xent.cross_entropy(xd, t, w, backend=backend, loss_dtype=torch.float32, **opts)
    loss.backward()
    assert _err(loss.to_local(), ref) < 1e-5, "DTensor loss"
    assert xd.grad.placements == (Shard(1),) and _err(xd.grad.to_local(), xr.grad[:, lo:hi]) < 1e-2

    hr, Wr = h.double().requires_grad_(), W.double().requires_grad_()
    lref = cross_entropy_reference(F.linear(hr, Wr), t, **opts)
    lref.backward()
    same = cross_entropy_reference(F.linear(h, W).double(), t, **opts)  # the same bf16 logits

    def head(hd, Wd):
        return triton_xent.linear_cross_entropy(hd, Wd, t, backend=backend, loss_dtype=torch.float32,
                                                **opts)

    for fn in [head] + ([torch.compile(head, fullgraph=True)] if compiled else []):
        hd = h.clone().requires_grad_()
        Wd = distribute_tensor(W, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        loss = fn(hd, Wd)
        loss.backward()
        assert loss.placements == (Replicate(),)
        # The head's logits are bf16 GEMM outputs: against the same logits the fp32 loss is
        # close (chunked GEMMs may round a few logits the other way); against float64 bf16's.
        assert _err(loss.to_local(), same) < 1e-3 and _err(loss.to_local(), lref) < 1.6e-2, "head"
        assert _err(hd.grad, hr.grad) < 1.6e-2 and _err(Wd.grad.to_local(), Wr.grad[lo:hi]) < 1.6e-2


def _entry(rank, world, init_method, backend, out_dir):
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        _checks(rank, world, device, compiled=backend == "nccl")
        result = "ok"
    except Exception:
        result = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _run(backend):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(2, f"file://{d}/rendezvous", backend, d), nprocs=2, join=True)
        for r in range(2):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                got = json.load(f)
            assert got == "ok", f"rank {r}:\n{got}"


@pytest.mark.gpu
def test_two_ranks_one_gpu():
    """2 ranks on one GPU (gloo moves the CUDA tensors): group, DTensor, fused head."""
    _run("gloo")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL needs one GPU per rank (it refuses two ranks on one device); "
                           "test_two_ranks_one_gpu covers one GPU over gloo")
def test_nccl():
    """NCCL, one GPU per rank: group, DTensor, fused head, and the head under torch.compile."""
    _run("nccl")
