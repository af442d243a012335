"""An FSDP2-sharded LM head that is never gathered: the rows travel instead of the head.

Under FSDP2 each of the ``R`` ranks holds ``V/R`` rows of the head (``torch.chunk``) and its own
``N_r`` tokens. The gathered schedule (:func:`triton_xent.dtensor.fsdp_param_of`, the default)
all-gathers the head and reduce-scatters its gradient: ``2 (R-1)/R V D`` elements sent per rank
per step, whatever the batch. This schedule all-gathers the hidden states and targets of the
group instead (``R x N`` rows, padded to the largest ``N_r``), runs the vocabulary-parallel
pipeline (:mod:`triton_xent.parallel`) on the local rows of the head, and keeps each rank's own
rows of the result: the head's gradient comes out already sharded and no rank ever holds the
whole head. Elements sent per rank (ring collectives; ``M`` = the largest ``N_r``):

* hidden states all-gathered: ``(R-1) M D``; targets: ``(R-1) M`` (int64);
* the pipeline: per chunk a MAX and a packed SUM all-reduce of a few values per row (``R M``
  rows), and the all-reduce of d(hidden) over the vocabulary shards: ``2 (R-1) M D``;
* the upstream gradient of each rank's own tokens, all-gathered: ``(R-1) M``;
* one all-gather of the row counts (a host sync: the padding must be known).

So it moves fewer bytes when ``3 (R-1) M D < 2 (R-1)/R V D``, i.e. ``R M < 2 V / 3`` (e.g. 8
ranks x 8192 tokens = 65536 < 85504 at V = 128256): :func:`bytes_per_rank` counts both, and
``"auto"`` picks the smaller per call. Each rank's loss is its own tokens' loss (a plain tensor);
the head's gradient is FSDP2's (the sum over the ranks' losses divided by the number of ranks or
the unit's ``gradient_divide_factor``); d(hidden) is each rank's own. The backward recomputes
the logits (the per-token losses are reduced per rank after the pipeline: one more GEMM).
Refused: HSDP or a head sharded on more than one mesh dimension, ``return_aux``/``argmax``,
class weights, a bias, an ``ignore_index`` of None with uneven row counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _validation as V


def bytes_per_rank(world: int, rows: int, D: int, vocab: int, x_bytes: int, w_bytes: int,
                   grad_bytes: int) -> dict:
    """Bytes each rank sends per step in each schedule (ring collectives, large terms only):
    ``rows`` is the largest row count of the ranks; ``x_bytes`` the hidden states' element
    size, ``w_bytes`` the gathered head's, ``grad_bytes`` its gradient's reduction dtype's."""
    frac = (world - 1) / world
    gathered = frac * vocab * D * (w_bytes + grad_bytes)
    sharded = (world - 1) * rows * (D * x_bytes + 8 + 4) + 2 * frac * world * rows * D * x_bytes
    return {"gathered": int(gathered), "sharded": int(sharded)}


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (padded to ``pad``), rank order. Backward: this rank's rows of the
    gradient, which the pipeline has already summed over the vocabulary shards."""

    @staticmethod
    def forward(ctx, x, pad, group, rank, world):
        ctx.rows = (rank * pad, x.shape[0])
        out = x.new_empty((world * pad, *x.shape[1:]))
        dist.all_gather_into_tensor(out, _padded(x, pad, 0), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        start, n = ctx.rows
        return grad[start:start + n], None, None, None, None


class _OwnRows(torch.autograd.Function):
    """This rank's entries of a per-row vector of every rank's rows. Backward: every rank's
    upstream gradient of its own entries, gathered (the head's gradient sums them all)."""

    @staticmethod
    def forward(ctx, per_row, n, pad, group, rank, world):
        ctx.spec = (n, pad, group, world)
        return per_row[rank * pad:rank * pad + n].clone()

    @staticmethod
    def backward(ctx, grad):
        n, pad, group, world = ctx.spec
        out = grad.new_empty(world * pad)
        dist.all_gather_into_tensor(out, _padded(grad.contiguous(), pad, 0), group=group)
        return out, None, None, None, None, None


class _Divide(torch.autograd.Function):
    """Identity; the gradient divided by ``divide`` (FSDP2's average over the ranks)."""

    @staticmethod
    def forward(ctx, t, divide):
        ctx.divide = divide
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.divide, None


def _padded(t, pad, fill):
    if t.shape[0] == pad:
        return t.contiguous()
    out = t.new_full((pad, *t.shape[1:]), fill)
    out[:t.shape[0]] = t
    return out


def _error(msg):
    return V.CrossEntropyInputError(msg)


def row_counts(x_rows: int, group) -> list[int]:
    """Every rank's row count (one tiny all-gather and a host sync)."""
    world = dist.get_world_size(group)
    out = torch.empty(world, dtype=torch.int64)
    dist.all_gather_into_tensor(out, torch.tensor([x_rows], dtype=torch.int64), group=group)
    return out.tolist()


def call(fn, args: dict, fsdp_param, group, counts=None):
    """``linear_cross_entropy`` (``fn``) with the FSDP2-sharded head never gathered; see the
    module docstring."""
    from torch.distributed.tensor import Shard

    W = args["linear_weight"]
    mesh = W.device_mesh
    if mesh.ndim != 1 or tuple(W.placements) != (Shard(0),):
        raise _error(f"fsdp_schedule='sharded' takes a head sharded Shard(0) on a 1-D mesh; this "
                     f"one has placements {tuple(W.placements)} on a {mesh.ndim}-D mesh (HSDP?). "
                     "Use the gathered schedule.")
    for name in ("return_aux", "return_argmax"):
        if args.get(name):
            raise _error(f"fsdp_schedule='sharded' does not return aux outputs ({name}=True).")
    for name in ("weight", "linear_bias"):
        if args.get(name) is not None:
            raise _error(f"fsdp_schedule='sharded' takes no {name}; use the gathered schedule.")
    pg = mesh.get_group(0)
    world, rank = mesh.size(0), mesh.get_local_rank(0)
    x, target = args["input"], args["target"]
    D = x.shape[-1]
    x2, t1 = x.reshape(-1, D), target.reshape(-1)
    n = x2.shape[0]
    counts = counts if counts is not None else row_counts(n, pg)
    pad = max(counts)
    ignore = args["ignore_index"]
    if ignore is None and min(counts) != pad:
        raise _error("fsdp_schedule='sharded' pads the ranks' rows to the same count with "
                     "ignore_index targets: pass an ignore_index, or the same rows on each rank.")
    policy = group.mp_policy
    compute = policy.param_dtype or W.dtype
    divide = group.gradient_divide_factor or float(world)
    w_local = _Divide.apply(W.to_local(), divide).to(compute)
    xs = _GatherRows.apply(x2, pad, pg, rank, world)
    ts = torch.empty(world * pad, dtype=t1.dtype, device=t1.device)
    dist.all_gather_into_tensor(ts, _padded(t1, pad, -100 if ignore is None else ignore),
                                group=pg)
    reduction, divisor = args["reduction"], args.get("divisor")
    if divisor is not None and reduction != "sum":
        raise _error(f"divisor= divides the sum: pass reduction='sum', not {reduction!r}.")
    per_row = fn(**dict(args, input=xs, linear_weight=w_local, target=ts, reduction="none",
                        divisor=None, process_group=pg))
    own = _OwnRows.apply(per_row, n, pad, pg, rank, world)
    if reduction == "none":
        return own.view(target.shape)
    total = own.float().sum()  # accumulated in fp32, as the op's own reductions are
    if reduction == "sum":
        return (total if divisor is None else total / divisor).to(own.dtype)
    kept = t1.numel() if ignore is None else (t1 != ignore).sum()
    return (total / kept).to(own.dtype)
