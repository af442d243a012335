"""DTensor in: :func:`~triton_xent.cross_entropy` and :func:`~triton_xent.linear_cross_entropy`
on ``torch.distributed.tensor.DTensor`` arguments, as tensor-parallel models produce them.

A DTensor argument is turned into this rank's local tensor, the mesh dimension that shards the
classes into its process group, and the call runs the vocabulary-parallel pipeline on them (the
``process_group=`` path, :mod:`triton_xent.parallel`). Nothing is gathered: the logits stay
sharded, the ranks exchange a few values per row.

Accepted (any mesh; exactly one mesh dimension shards the classes, every other one is
``Replicate()``; a mesh dimension of size 1 is no sharding):

* ``cross_entropy``: logits sharded on the class dimension, ``Shard(1)`` for ``(N, C, ...)``
  (``Shard(-1)`` for ``(N, V)``), ``Shard(0)`` for ``(C,)``; or ``(B, T, V)`` logits sharded on
  their last dimension with class-index targets ``(B, T)`` (the language-model layout, where
  PyTorch would read ``T`` as the classes: accepted where the shapes leave no doubt). Class-index
  targets (global ids) replicated: a ``Replicate()`` DTensor or a plain tensor. Class-probability
  targets sharded like the logits (a DTensor with the logits' placements), or a plain tensor of
  the full shape (this rank's slice is taken; it may not require grad).
* ``linear_cross_entropy``: ``linear_weight`` ``(V, D)`` sharded ``Shard(0)`` (a
  ``ColwiseParallel`` LM head), ``linear_bias`` sharded like it; hidden states and targets
  replicated (``Replicate()`` DTensors or plain tensors).
* ``linear_cross_entropy`` with a ``linear_weight`` that FSDP2 manages (``fully_shard``; found
  in FSDP2's state, not guessed from its ``Shard(0)`` placement): data parallelism, not a
  vocabulary split. The weight (and bias) is gathered for the call in FSDP2's ``param_dtype``;
  its gradient is reduced as FSDP2 reduces it (in ``reduce_dtype``, averaged over the ranks or
  divided by the unit's ``gradient_divide_factor``, reduce-scattered to the shard). Each rank
  passes its own hidden states and targets as plain tensors; the loss is this rank's, plain.
* Class ``weight``: a plain ``(V,)`` tensor or a ``Replicate()`` DTensor (this rank's slice is
  taken), or a DTensor sharded like the classes. A tensor ``divisor``: plain or ``Replicate()``.
* Uneven shards: a DTensor shards by ``torch.chunk`` (``ceil(V / R)`` classes per rank, the last
  ones fewer, possibly none). The pipeline agrees on the actual local sizes, so the loss of a
  DTensor built by ``DTensor.from_local(..., shape=...)`` from other sizes is right too, as long
  as no plain full-size tensor (class weights, probabilities, bias) has to be sliced for it; its
  gradient is not (DTensor's own ``to_local()`` backward assumes ``torch.chunk``'s sizes).

Returned: the loss (and the aux outputs of ``return_aux``) as ``Replicate()`` DTensors on the
logits' (the head's) mesh, as PyTorch's ``loss_parallel()`` returns them: ``loss.backward()``
works as usual, ``loss.full_tensor()`` or ``loss.to_local()`` give a plain tensor (every rank
holds the whole loss). Gradients come back in the arguments' form: the logits' gradient with the
logits' placements, the head's with the head's, a replicated input's replicated (every rank gets
the full gradient of the hidden states, summed over the vocabulary shards inside the op).

Refused with an error that says what to do: ``Partial`` placements, logits sharded on a batch or
position dimension (or on several mesh dimensions), a head sharded on ``D`` (``RowwiseParallel``),
hidden states or class-index targets that are not replicated, a ``process_group=`` other than the
mesh dimension's group, a mesh whose ranks along the class dimension are not in the group's rank
order (``DeviceMesh`` from a permuted rank tensor: the shards' order would not be the group's).
"""

from __future__ import annotations

import sys

import torch

from . import _validation as V

__all__ = ["given", "call_cross_entropy", "call_linear_cross_entropy"]


def given(*args) -> bool:
    """True when an argument is a DTensor. Free when ``torch.distributed.tensor`` was never
    imported (then nothing can be a DTensor), so plain calls do not pay for importing it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(a, mod.DTensor) for a in args)


def _error(msg: str) -> V.CrossEntropyInputError:
    return V.CrossEntropyInputError(msg)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _shards(t, name: str) -> list[tuple[int, int]]:
    """``[(mesh dim, tensor dim)]`` of ``t``'s ``Shard`` placements; raises for what is neither
    ``Shard`` nor ``Replicate`` (``Partial``, strided shards)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    out = []
    for i, p in enumerate(t.placements):
        if isinstance(p, Replicate) or t.device_mesh.size(i) == 1:
            continue
        if isinstance(p, Partial):
            raise _error(
                f"{name} has a Partial placement ({p}) on mesh dim {i}: its values are pending a "
                "reduction across the ranks. Reduce it first: "
                f"{name}.redistribute(placements=...) with Shard/Replicate placements.")
        if type(p) is not Shard:
            raise _error(f"{name} has the placement {p} on mesh dim {i}; triton_xent takes "
                         "Shard(dim) and Replicate() placements only.")
        out.append((i, _norm(p.dim, t.ndim)))
    return out


def _replicated(t, name: str, fix: str):
    """The local tensor of a DTensor replicated on every mesh dim (a plain tensor as is)."""
    if not _is_dtensor(t):
        return t
    if _shards(t, name):
        raise _error(f"{name} must be replicated (Replicate() on every mesh dim), got placements "
                     f"{tuple(t.placements)}. {fix}")
    return t.to_local()


# ------------------------------------------------------------------------------------------------
# The mesh dimension that shards the classes: its group, this rank's slice of the classes
# ------------------------------------------------------------------------------------------------

_ORDER: dict = {}


@torch.compiler.assume_constant_result  # evaluated once while torch.compile traces
def _order_matches(mesh, mesh_dim: int) -> bool:
    """Whether the mesh's coordinates along ``mesh_dim`` are the ranks of its process group, in
    order (the shards' order is the coordinates'; the pipeline's is the group's). Every rank of a
    group reads the same row of the mesh, so all of them agree on the answer."""
    key = (mesh, mesh_dim)
    if key not in _ORDER:
        import torch.distributed as dist

        coord = mesh.get_coordinate()
        row = mesh.mesh[tuple(coord[:mesh_dim]) + (slice(None),) + tuple(coord[mesh_dim + 1:])]
        group = mesh.get_group(mesh_dim)
        _ORDER[key] = [dist.get_group_rank(group, r) for r in row.tolist()] == list(
            range(row.numel()))
    return _ORDER[key]


class _Classes:
    """The sharding of the classes: ``mesh``, ``mesh_dim`` (None: not sharded), ``group``, the
    number of classes ``size`` and this rank's ``offset`` and ``count`` by DTensor's rule."""

    def __init__(self, mesh, mesh_dim, size: int, process_group):
        self.mesh, self.mesh_dim, self.size = mesh, mesh_dim, size
        self.group, self.offset, self.count = None, 0, size
        if mesh_dim is None:
            if process_group is not None:
                raise _error("process_group= was given, but no argument is sharded on the "
                             "classes: with DTensor arguments the group comes from the mesh "
                             "dimension that shards them. Drop process_group.")
            return
        group = mesh.get_group(mesh_dim)
        if process_group is not None and process_group is not group and (
                process_group.group_name != group.group_name):
            raise _error(f"process_group= is not the group of mesh dim {mesh_dim}, which shards "
                         "the classes: with DTensor arguments the group comes from the mesh. "
                         "Drop process_group.")
        if not _order_matches(mesh, mesh_dim):
            raise _error(
                f"the DeviceMesh's ranks along mesh dim {mesh_dim} are not in the order of its "
                "process group's ranks (a mesh built from a permuted rank tensor), so the order "
                "of the vocabulary shards is not the group's. Build the mesh with the ranks in "
                "increasing order along that dimension (init_device_mesh does).")
        # torch.chunk's rule (DTensor's Shard): ceil(V / R) classes per rank, the last fewer.
        world, coord = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        full = -(-size // world)
        self.group = group
        self.offset = min(full * coord, size)
        self.count = min(full, size - self.offset)

    def slice(self, t: torch.Tensor, dim: int, name: str, local_count: int) -> torch.Tensor:
        """This rank's classes of a full-size tensor."""
        if self.mesh_dim is None:
            return t
        if local_count != self.count:
            raise _error(
                f"this rank holds {local_count} classes, but a DTensor sharded by torch.chunk "
                f"holds {self.count} here, so the slice of the full {name} is unknown. Pass "
                f"{name} as a DTensor sharded like the classes, or build the DTensor with "
                "distribute_tensor (or DTensor.from_local with torch.chunk's sizes).")
        return t.narrow(dim, self.offset, self.count)

    def wrap(self, out, rows_shape=None):
        """Outputs as ``Replicate()`` DTensors on the mesh (per-row ones reshaped first)."""
        from torch.distributed.tensor import DTensor, Replicate

        placements = [Replicate()] * self.mesh.ndim

        def one(t):
            if rows_shape is not None and t.dim() == 1:
                t = t.view(rows_shape)
            return DTensor.from_local(t, self.mesh, placements, run_check=False)

        if isinstance(out, torch.Tensor):
            return one(out)
        if isinstance(out, tuple):
            return type(out)(*(self.wrap(o, rows_shape) for o in out)) if hasattr(
                out, "_fields") else tuple(self.wrap(o, rows_shape) for o in out)
        return out  # explain()'s BackendChoice


def _class_vector(w, classes: _Classes, name: str, local_count: int, *, grad_ok: bool):
    """A per-class vector (class weights, the head's bias) as this rank's slice: a DTensor
    sharded like the classes, or a full-size plain or replicated one, sliced."""
    if w is None or not isinstance(w, torch.Tensor):
        return w
    if _is_dtensor(w):
        sh = _shards(w, name)
        if sh:
            if w.ndim != 1 or sh != [(classes.mesh_dim, 0)]:
                raise _error(f"{name} has placements {tuple(w.placements)}: pass it sharded like "
                             f"the classes (Shard(0) on mesh dim {classes.mesh_dim}) or replicated.")
            return w.to_local()
        w = w.to_local()
    elif classes.mesh_dim is not None and w.dim() == 1 and w.shape[0] != classes.size:
        raise _error(f"{name} has {w.shape[0]} entries: with DTensor arguments a plain {name} is "
                     f"the full vector of the {classes.size} classes (the same on every rank), "
                     "or pass a DTensor sharded like the classes.")
    if classes.mesh_dim is not None and w.requires_grad and not grad_ok:
        raise _error(f"a full-size {name} that requires grad would get only this rank's share "
                     f"of its gradient: pass {name} as a DTensor sharded like the classes.")
    if w.dim() != 1:
        return w  # the shape check of the call says what is wrong
    return classes.slice(w, 0, name, local_count)


def _local_divisor(divisor):
    if not isinstance(divisor, torch.Tensor):
        return divisor
    return _replicated(divisor, "divisor", "Pass the divisor replicated (or a number).")


def _check_inplace(x, args: dict) -> None:
    if not (args.get("inplace_backward") and x.requires_grad):
        return
    base = x._base if x._base is not None else x
    if x.is_leaf or (base.is_leaf and base.requires_grad):
        raise _error("inplace_backward=True on a leaf DTensor, or a view of one (a parameter or "
                     "an input created with requires_grad=True): its values would be overwritten "
                     "by its own gradient. Pass the output of an op, or drop inplace_backward.")


def _overwritten(x, args: dict) -> None:
    # The gradient was written over the local tensor: bump the DTensor's own version counter
    # too, so that an op that saved it for its backward raises instead of reading the gradient.
    if args.get("inplace_backward") and x.requires_grad and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(x)


# ------------------------------------------------------------------------------------------------
# The public functions' DTensor path
# ------------------------------------------------------------------------------------------------


def call_cross_entropy(fn, args: dict):
    """Runs ``fn`` (``cross_entropy`` or ``explain``) on the local shards of ``args`` (its
    arguments by name, some of them DTensors) with the mesh dimension's group; see the module
    docstring for what is accepted and returned."""
    x, target = args["input"], args["target"]
    if not _is_dtensor(x):
        raise _error("target, weight or divisor is a DTensor but input is not: pass the logits as "
                     "a DTensor sharded on the classes, or plain tensors everywhere (with "
                     "process_group= for vocabulary-parallel shards).")
    nd = x.ndim
    if nd == 0:
        raise _error("input is a 0-d DTensor: it needs a class dimension.")
    cdim = 0 if nd == 1 else 1
    probs = isinstance(target, torch.Tensor) and target.is_floating_point()
    shards = _shards(x, "input")
    if len(shards) > 1:
        raise _error(
            f"input is sharded over several mesh dims (placements {tuple(x.placements)}); "
            "cross_entropy takes the classes sharded over one mesh dim, the others Replicate(). "
            "For logits sharded on the batch too (data parallel), compute the loss of this rank's "
            "rows: cross_entropy(input.to_local(), local_target, process_group="
            "mesh.get_group(<the class dim>)).")
    class_last = False
    if shards and shards[0][1] != cdim:
        d = shards[0][1]
        rows = tuple(x.shape[:-1])
        torch_rows = (x.shape[0], *x.shape[2:])
        if not (nd >= 3 and d == nd - 1):
            raise _error(
                f"input is sharded on dim {d} (placements {tuple(x.placements)}), not on the "
                f"classes (dim {cdim}): logits sharded on the batch or a position dim are not "
                "supported. Shard the classes (ColwiseParallel with output_layouts=Shard(-1)), or "
                "pass this rank's rows as plain tensors.")
        if probs or not isinstance(target, torch.Tensor) or tuple(target.shape) != rows or (
                rows == torch_rows):
            raise _error(
                f"input {tuple(x.shape)} is sharded on its last dim, read as the classes of "
                f"language-model logits (B, T, V), which needs class-index targets of shape "
                f"{rows} (PyTorch reads dim 1 as the classes, which this target does not rule "
                "out). Flatten both: cross_entropy(input.flatten(0, -2), target.flatten(0, -2)) "
                "(class probabilities: target.flatten(0, -2) too).")
        class_last, cdim = True, nd - 1
    classes = _Classes(x.device_mesh, shards[0][0] if shards else None, x.shape[cdim],
                       args["process_group"])
    _check_inplace(x, args)
    local = x.to_local()
    count = local.shape[cdim]
    if probs:
        if _is_dtensor(target):
            if tuple(target.placements) != tuple(x.placements) or target.shape != x.shape:
                raise _error(
                    f"class-probability target {tuple(target.shape)} with placements "
                    f"{tuple(target.placements)}: pass it with the logits' shape and placements "
                    f"{tuple(x.placements)} (each rank holds its shard of the distribution), or "
                    "as a plain tensor of the full shape.")
            target = target.to_local()
        elif classes.mesh_dim is not None:
            if tuple(target.shape) != tuple(x.shape):
                raise _error(f"a plain class-probability target must have the full shape "
                             f"{tuple(x.shape)} of the logits (this rank's slice is taken), got "
                             f"{tuple(target.shape)}.")
            if target.requires_grad:
                raise _error("a full-size plain class-probability target that requires grad "
                             "would get only this rank's share of its gradient: pass it as a "
                             "DTensor sharded like the logits.")
            target = classes.slice(target, cdim, "target", count)
    else:
        target = _replicated(target, "target", "Class-index targets are global ids, the same on "
                             "every rank: target.full_tensor() (or redistribute to Replicate()).")
    rows_shape = None
    if class_last:  # (B, T, V_r) -> rows (B*T, V_r); the per-row outputs go back to (B, T)
        rows_shape = tuple(local.shape[:-1])
        local, target = local.reshape(-1, count), target.reshape(-1)
    args = dict(args, input=local, target=target,
                weight=_class_vector(args["weight"], classes, "weight", count, grad_ok=False),
                divisor=_local_divisor(args.get("divisor")), process_group=classes.group)
    out = fn(**args)
    _overwritten(x, args)
    return classes.wrap(out, rows_shape)


def call_linear_cross_entropy(fn, args: dict):
    """Runs ``linear_cross_entropy`` on the local shards of ``args`` (by name, some of them
    DTensors) with the group of the mesh dimension that shards the head's rows; a head that
    FSDP2 shards goes to :mod:`triton_xent.fsdp` instead."""
    from . import fsdp

    W, x = args["linear_weight"], args["input"]
    if _is_dtensor(W) and fsdp.param_of(W) is not None:
        return fsdp.call(fn, args)
    ref = W if _is_dtensor(W) else next(
        a for a in (x, args["target"], args["linear_bias"], args["weight"], args.get("divisor"))
        if _is_dtensor(a))
    mesh_dim = None
    if _is_dtensor(W):
        shards = _shards(W, "linear_weight")
        if shards and (len(shards) > 1 or shards[0][1] != 0):
            raise _error(
                f"linear_weight has placements {tuple(W.placements)}: the head must be sharded on "
                "its rows, the classes (Shard(0) on one mesh dim, as ColwiseParallel does), or "
                "replicated. A head sharded on D (RowwiseParallel) is not supported.")
        mesh_dim = shards[0][0] if shards else None
        V_total, W = W.shape[0], W.to_local()
    else:
        V_total = W.shape[0] if isinstance(W, torch.Tensor) and W.dim() == 2 else -1
    classes = _Classes(ref.device_mesh, mesh_dim, V_total, args["process_group"])
    count = W.shape[0] if isinstance(W, torch.Tensor) and W.dim() == 2 else -1
    fix = "Every rank passes the same hidden states and targets (Replicate())."
    if _is_dtensor(x) and _shards(x, "input"):
        fix = ("Gather them first: input.redistribute(placements=[Replicate()] * mesh.ndim) (what "
               "ColwiseParallel's input hook does for sequence-parallel hidden states).")
    local_x = _replicated(x, "input", fix)
    args = dict(
        args, input=local_x, linear_weight=W,
        target=_replicated(args["target"], "target", "Targets are global class ids, the same on "
                           "every rank: target.full_tensor()."),
        linear_bias=_class_vector(args["linear_bias"], classes, "linear_bias", count, grad_ok=False),
        weight=_class_vector(args["weight"], classes, "weight", count, grad_ok=False),
        divisor=_local_divisor(args.get("divisor")), process_group=classes.group)
    return classes.wrap(fn(**args))
