"""An LM head that FSDP2 shards, in :func:`triton_xent.linear_cross_entropy`.

FSDP2 (``fully_shard``) keeps each parameter as a DTensor sharded ``Shard(0)`` over the
data-parallel ranks outside its unit's forward. A head whose unit has not run when the loss
reads it (``fully_shard(model.lm_head)``: the fused loss never runs the head module) is such a
shard: each of the ``R`` ranks holds ``V/R`` rows of it (``torch.chunk``) and its own ``N_r``
tokens. Tensor parallelism gives the same placement with the opposite meaning (every rank holds
the same tokens), so the two are told apart by FSDP2's own state (:func:`param_of`), never by
the placements. Each rank's loss is its own tokens' (a plain tensor), d(hidden) its own, and the
head's gradient FSDP2's: the ranks' gradients averaged (or divided by the unit's
``gradient_divide_factor``), in the shard. Two schedules (:func:`schedule`; in the transformers
integration ``patch(model, fsdp_schedule=...)``):

* ``"gathered"`` (default): the head is all-gathered for the call in FSDP2's ``param_dtype``;
  its gradient is reduced in ``reduce_dtype`` and reduce-scattered into the shard, as FSDP2's
  own reduce-scatter does. The whole head lives from the loss's forward to its backward (the
  loss's backward is the first of the backward pass). Sent per rank (ring collectives):
  ``(R-1)/R V D`` elements, twice.
* ``"sharded"``: the head is never gathered. The hidden states and targets of the group are
  all-gathered instead (``R x M`` rows, ``M`` the largest ``N_r``: shorter ranks are padded
  with ``ignore_index`` targets), the vocabulary-parallel pipeline (:mod:`triton_xent.parallel`)
  runs on the local rows of the head, and each rank keeps its own rows of the result: the
  head's gradient comes out sharded. Sent per rank: the hidden states ``(R-1) M D``, the targets
  ``(R-1) M`` (int64), the pipeline's per-row statistics (a few values per row and chunk), the
  all-reduce of d(hidden) over the vocabulary shards ``2 (R-1) M D``, each rank's upstream
  gradient ``(R-1) M``, and the row counts (one tiny all-gather: a host sync). The backward
  recomputes the logits (the per-token losses are reduced per rank after the pipeline: one more
  GEMM). With mixed precision the head's gradient is summed over the ranks' tokens inside the
  op and rounded to ``param_dtype`` before the division (not reduced in ``reduce_dtype``).
  Refused: HSDP (a 2-D mesh), ``return_aux``/``return_argmax``, class weights, a bias, an
  ``ignore_index`` of None with uneven row counts.
* ``"auto"``: per call, whichever sends fewer bytes (:func:`bytes_per_rank`; the row counts are
  exchanged first, a host sync). The never-gathered schedule wins when ``3 (R-1) M D <
  2 (R-1)/R V D``, i.e. ``R M < 2 V / 3`` (same element sizes): 8 ranks x 8192 tokens = 65536
  rows against 85504 at V = 128256 (Llama 3).

Refused in both: FSDP2 over a tensor-parallel head (a DTensor parameter sharded again), FSDP2
offloading the head to the CPU, other DTensor arguments, ``process_group=``.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from . import _validation as V


def _error(msg: str) -> V.CrossEntropyInputError:
    return V.CrossEntropyInputError(msg)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def param_of(w):
    """The FSDP2 ``FSDPParam`` whose sharded parameter is ``w`` (a DTensor), or None.

    FSDP2 (``fully_shard``) registers its state per module; each state's parameter groups list
    the parameters it manages. A DTensor weight found there is data-parallel (every rank holds
    other rows of the batch), one found nowhere is read as tensor parallelism (every rank holds
    the same rows). Nothing is guessed from the placements, which are ``Shard(0)`` either way."""
    registry = sys.modules.get("torch.distributed._composable_state")
    if registry is None or "torch.distributed.fsdp._fully_shard._fsdp_state" not in sys.modules:
        return None  # fully_shard was never imported: nothing is FSDP-managed
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    seen = set()
    for ref in list(registry._module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState) or id(state) in seen:
            continue
        seen.add(id(state))
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                if fsdp_param.sharded_param is w:
                    return fsdp_param, group
    return None


class _FSDPGather(torch.autograd.Function):
    """The whole parameter from its FSDP2 shards, in FSDP2's compute dtype; backward: the
    gradient in FSDP2's reduce dtype, averaged over the data-parallel ranks (or divided by the
    group's ``gradient_divide_factor``) and reduce-scattered back to the parameter's
    placements, as FSDP2's own reduce-scatter would give it."""

    @staticmethod
    def forward(ctx, w, compute_dtype, reduce_dtype, divide):
        from torch.distributed.tensor import Replicate

        mesh = w.device_mesh
        ctx.spec = (mesh, tuple(w.placements), w.dtype, reduce_dtype, divide)
        return w.to(compute_dtype).redistribute(mesh, [Replicate()] * mesh.ndim).to_local()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        mesh, placements, dtype, reduce_dtype, divide = ctx.spec
        op = Partial("avg") if divide is None else Partial("sum")
        g = DTensor.from_local(grad.to(reduce_dtype), mesh, [op] * mesh.ndim, run_check=False)
        g = g.redistribute(mesh, placements)
        if divide is not None:
            g = g / divide
        return g.to(dtype), None, None, None


def _gathered(t, name: str):
    """``t`` whole: an FSDP2-sharded DTensor parameter gathered (its gradient reduced back),
    anything else as it is."""
    if not _is_dtensor(t):
        return t
    group = _managed(t, name)
    policy = group.mp_policy  # FSDP2 computes in param_dtype, reduces in reduce_dtype
    compute = policy.param_dtype if t.is_floating_point() and policy.param_dtype else t.dtype
    reduce = policy.reduce_dtype or compute
    return _FSDPGather.apply(t, compute, reduce, group.gradient_divide_factor)


def _managed(t, name: str):
    """The FSDP2 parameter group of ``t``, or an error for what neither schedule computes."""
    found = param_of(t)
    if found is None:
        raise _error(f"linear_weight is a parameter that FSDP2 shards, but {name} is a DTensor "
                     "that FSDP2 does not manage: pass plain tensors with an FSDP2-sharded head.")
    fsdp_param, group = found
    if fsdp_param.is_dtensor:
        raise _error(
            f"{name} is sharded by FSDP2 over a tensor-parallel DTensor (FSDP2 x TP on one "
            "parameter): gathering it across the data-parallel ranks only is not supported. "
            "Keep the LM head out of the FSDP2 unit, or shard it with one of the two.")
    if fsdp_param.offload_to_cpu:
        raise _error(f"{name} is offloaded to the CPU by FSDP2 (CPUOffloadPolicy): the fused "
                     "head would gather it on the CPU. Keep the LM head's unit on the device.")
    return group


_SCHEDULE = ["gathered"]
SCHEDULES = ("gathered", "sharded", "auto")


@contextlib.contextmanager
def schedule(name: str):
    """How ``linear_cross_entropy`` calls in this block treat an FSDP2-sharded head:
    ``"gathered"`` (default: the head all-gathered, its gradient reduce-scattered),
    ``"sharded"`` (never gathered: the hidden states and targets of the group are gathered
    instead) or ``"auto"`` (per call, whichever sends fewer bytes; one tiny all-gather of the
    row counts first, a host sync). See the module docstring."""
    if name not in SCHEDULES:
        raise ValueError(f"the FSDP2 head schedule must be one of {SCHEDULES}, not {name!r}")
    _SCHEDULE.append(name)
    try:
        yield
    finally:
        _SCHEDULE.pop()


def call(fn, args: dict):
    """``linear_cross_entropy`` with a head that FSDP2 shards (the head's unit has not run, so
    its weight is still this rank's shard): the weight (and bias) gathered for the call, the
    gradient averaged over the data-parallel ranks and reduce-scattered into the sharded
    parameter, as FSDP2 does for the parameters it gathers itself. Each rank passes its own rows
    (data parallelism); the loss is this rank's, a plain tensor. The gathered weight lives
    until the backward of the call (the loss's backward is the first of the backward pass)."""
    others = ("input", "target", "weight", "divisor")
    bad = [k for k in others if _is_dtensor(args.get(k))]
    if bad:
        raise _error(
            f"linear_weight is a parameter that FSDP2 shards (data parallelism: each rank has "
            f"its own rows), but {', '.join(bad)} {'is a DTensor' if len(bad) == 1 else 'are DTensors'}"
            ": pass this rank's hidden states and targets as plain tensors.")
    if args["process_group"] is not None:
        raise _error(
            "process_group= with a linear_weight that FSDP2 shards: FSDP2's shards are "
            "data-parallel (gathered for the call), not a vocabulary split. Drop process_group.")
    if _SCHEDULE[-1] != "gathered":
        out = _never_gathered(fn, args, _SCHEDULE[-1])
        if out is not None:
            return out
    return fn(**dict(args, linear_weight=_gathered(args["linear_weight"], "linear_weight"),
                     linear_bias=_gathered(args["linear_bias"], "linear_bias")))


def _never_gathered(fn, args: dict, name: str):
    """The never-gathered schedule, or None where ``"auto"`` finds the gathered one cheaper
    (or the mesh is not 1-D: HSDP)."""
    W, x = args["linear_weight"], args["input"]
    group = _managed(W, "linear_weight")
    counts = None
    if name == "auto":
        if W.device_mesh.ndim != 1:
            return None
        counts = _row_counts(x.numel() // x.shape[-1], W.device_mesh.get_group(0))
        policy = group.mp_policy
        w_bytes = (policy.param_dtype or W.dtype).itemsize
        cost = bytes_per_rank(W.device_mesh.size(), max(counts), x.shape[-1], W.shape[0],
                              x.element_size(), w_bytes, (policy.reduce_dtype or W.dtype).itemsize)
        if cost["gathered"] <= cost["sharded"]:
            return None
    return _call_sharded(fn, args, group, counts)


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


def _row_counts(x_rows: int, group) -> list[int]:
    """Every rank's row count (one tiny all-gather and a host sync)."""
    world = dist.get_world_size(group)
    out = torch.empty(world, dtype=torch.int64)
    dist.all_gather_into_tensor(out, torch.tensor([x_rows], dtype=torch.int64), group=group)
    return out.tolist()


def _call_sharded(fn, args: dict, group, counts=None):
    """``linear_cross_entropy`` (``fn``) with the FSDP2-sharded head never gathered (the module
    docstring)."""
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
    counts = counts if counts is not None else _row_counts(n, pg)
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
