"""The pipeline's merge across ranks: vocabulary parallelism over a ``torch.distributed`` group.

Sharding convention. With a group of ``R > 1`` ranks, rank ``r`` (its rank in the group) holds
the contiguous classes ``[offset_r, offset_r + V_r)`` with ``offset_r = V_0 + ... + V_{r-1}``:
shards in rank order, any sizes (a rank may hold none). Sharded: the class dimension of the
logits, the class weights, class-probability targets, and for the linear head the rows of its
weight and bias. The same on every rank: class-index targets (global ids), the hidden states of
the linear head, every option.

Per call, each rank computes its shard's partial statistics (the backend's ``partials``),
:func:`merge_ranks` merges them with two all-reduces of a few values per row (MAX of the row
maxima, then one SUM of the rescaled partials; a third, MIN, only for the argmax), and each rank
writes the loss rows and its shard's gradient from the merged statistics (the backend's
``finish``). The collectives are functional collectives
(``torch.distributed._functional_collectives``), which torch.compile traces.

The ranks' agreement (shard sizes, hence offsets; row counts, dtypes, options, the group) is
checked by one ``all_gather`` of a few integers the first time a configuration (this rank's
shapes, dtype and options) is seen: a host sync, then cached, so a mismatch raises the same clear
error on every rank instead of hanging. A rank whose arguments change between calls while the
others' do not (a bug) is not caught after the first call: the collectives then wait until the
group's timeout.
``validate=True`` repeats it on every call and also compares the targets (and the linear head's
hidden states) byte for byte.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from ._validation import CrossEntropyInputError, check_target_range, compile_check
from .backends.protocol import F_E, F_M, F_S, F_T, F_W, F_WT, F_XT, Options, RowOutputs
from .backends.torch_ce import argmax_candidates, denominators, merge_parts

_MAGIC = 0x7670_6365  # "vpce": both sides of the metadata exchange are this module
KIND_CE, KIND_LINEAR = 1, 2
_KIND_NAMES = {KIND_CE: "cross_entropy", KIND_LINEAR: "linear_cross_entropy"}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


class Shard(NamedTuple):
    """This rank's place in the vocabulary, agreed by every rank of ``group``."""

    group: object
    offset: int  # global id of this rank's first class
    V_local: int
    vocab_size: int  # global V
    chunk_rows: int = 0  # linear head: rows per chunk, the same on every rank
    need_dx: bool = False  # linear head: some rank needs d(input)


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def byte_hash(t: torch.Tensor | None) -> torch.Tensor:
    """Two int64 fingerprints of a tensor's raw bytes on its device (no host sync): integer sums
    wrap modulo 2**64, so they do not depend on the summation order (thread counts, kernels)."""
    out = torch.zeros(2, dtype=torch.int64, device=t.device if t is not None else "cpu")
    if t is None or t.numel() == 0:
        return out
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-b.numel()) % 4
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    words = b.view(torch.int32).to(torch.int64)
    pos = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 1000003 + 1
    out[0] = words.sum()
    out[1] = (words * pos).sum()
    return out


_AGREED: dict[tuple, Shard] = {}
_MAX_AGREED = 256


def agree(group, device, *, kind: int, error: Exception | None, N: int, V_local: int,
          weight_len: int, bias_len: int, D: int, dtype: torch.dtype | None, options: tuple,
          validate: bool, target=None, input=None, need_dx: bool = False,
          chunk_rows: int = 0) -> Shard:
    """The shard of this rank, after checking that the ranks agree (see the module docstring).

    A rank whose arguments were rejected locally passes its ``error``: on a first call every
    rank raises (the others say which rank it was)."""
    key = (id(group), kind, N, V_local, weight_len, bias_len, D, dtype, options, need_dx,
           chunk_rows)
    if not validate and error is None and key in _AGREED:
        return _AGREED[key]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    head = [
        _MAGIC, kind, int(error is not None), N, V_local, weight_len, bias_len, D,
        _DTYPES.index(dtype) if dtype in _DTYPES else -1, _crc(options),
        _crc(dist.get_process_group_ranks(group)), int(need_dx), chunk_rows, int(validate),
    ]
    sums = torch.zeros(4, dtype=torch.int64, device=device)
    if validate and error is None:
        sums[:2] = byte_hash(target).to(device)
        sums[2:] = byte_hash(input).to(device)
    meta = torch.cat([torch.tensor(head, dtype=torch.int64).to(device), sums])
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).cpu().tolist()  # the host sync, once per configuration
    cols = [list(c) for c in zip(*table)]
    (magic, kinds, errs, Ns, Vs, wlens, blens, Ds, dts, opts, grps, needs, chunks, vals) = cols[:14]
    sums_t, sums_i = list(zip(cols[14], cols[15])), list(zip(cols[16], cols[17]))

    def fail(msg: str):
        raise CrossEntropyInputError(msg + " (every rank of the group raises this error)")

    if any(m != _MAGIC for m in magic) or len(set(kinds)) > 1:
        names = {r: _KIND_NAMES.get(k, "another collective") for r, k in enumerate(kinds)}
        fail(f"the ranks of the process group are not in the same call: {names}.")
    if len(set(grps)) > 1:
        fail("the ranks passed different process groups (their lists of ranks differ): pass the "
             "same group, holding the vocabulary shards, on every rank.")
    if any(errs):
        if error is not None:
            raise error
        bad = [r for r, e in enumerate(errs) if e]
        fail(f"rank(s) {bad} of the group rejected their arguments (see the error there).")
    if len(set(vals)) > 1:
        fail(f"validate differs across the ranks (per rank: {vals}): pass the same value.")
    if len(set(dts)) > 1:
        names = [str(_DTYPES[d]) if 0 <= d < len(_DTYPES) else "?" for d in dts]
        fail(f"the ranks' logits have different dtypes (per rank: {names}): cast them to one.")
    if len(set(Ns)) > 1:
        fail(f"the ranks have different numbers of rows (per rank: {Ns}): every rank passes the "
             "same target, of global class ids, and logits rows for the same tokens.")
    if len(set(opts)) > 1:
        fail("the ranks passed different options (ignore_index, reduction, label_smoothing, "
             "z_loss, softcap, logit_scale, temperature, divisor, presence of class weights or bias, target "
             "kind): pass the same ones everywhere.")
    if len(set(sums_t)) > 1:
        fail("target differs across the ranks: with a vocabulary-parallel loss every rank passes "
             "the same target, of global class ids.")
    if kind == KIND_LINEAR:
        if len(set(Ds)) > 1:
            fail(f"the ranks have different hidden sizes D (per rank: {Ds}).")
        if len(set(sums_i)) > 1:
            fail("input differs across the ranks (byte for byte): the vocabulary-parallel linear "
                 "cross-entropy needs the same hidden states on every rank (only linear_weight "
                 "is sharded).")
    V_total = sum(Vs)
    if V_total < 1:
        fail("the vocabulary shards are all empty.")
    for r, (vl, wl, bl) in enumerate(zip(Vs, wlens, blens)):
        for name, n in (("weight", wl), ("linear_bias", bl)):
            if n >= 0 and n != vl:
                hint = " (it looks like the full vector: pass this rank's slice)" if n == V_total else ""
                fail(f"on rank {r}, {name} has {n} entries but its vocabulary shard has {vl} "
                     f"classes{hint}.")
    shard = Shard(group, sum(Vs[:rank]), V_local, V_total, chunk_rows=min(chunks),
                  need_dx=any(needs))
    if len(_AGREED) >= _MAX_AGREED:  # bounded: a new row count is a new configuration
        _AGREED.pop(next(iter(_AGREED)))
    _AGREED[key] = shard
    return shard


# ------------------------------------------------------------------------------------------------
# The merge and the phases of one rank
# ------------------------------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, op: str, group) -> torch.Tensor:
    """A functional all-reduce (``"sum"``, ``"max"``, ``"min"``): a new tensor, traceable by
    torch.compile, waited for in eager mode."""
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(t, op, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def merge_ranks(part: torch.Tensor, part_idx: torch.Tensor | None, group, *,
                extra: torch.Tensor | None = None):
    """Merges this rank's partials ``(7, N, S)`` with every rank's: ``(merged (7, N), argmax
    (N,) or None, extra summed over the ranks)``. ``extra``: a few values that ride along in the
    SUM (the linear head's weighted-mean denominator)."""
    st, idx = merge_parts(part, part_idx)  # this rank's chunks first (a local LSE merge)
    M = all_reduce(st[F_M], "max", group)
    mref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    m_r = st[F_M]
    mref_r = torch.where(m_r == float("-inf"), torch.zeros_like(m_r), m_r)
    W = st[F_W]
    r = torch.exp(m_r - mref)  # an all -inf shard adds exp(-inf) = 0
    rescaled = torch.stack([
        st[F_S] * r,
        st[F_T] + torch.where(W == 0, torch.zeros_like(W), W * (mref - mref_r)),
        W, st[F_XT], st[F_WT],
        r * (st[F_E] + (mref_r - mref) * st[F_S]),  # the entropy's E (0 when not asked)
    ])
    flat = rescaled.reshape(-1)
    if extra is not None:
        flat = torch.cat([flat, extra.reshape(-1).to(flat.dtype)])
    summed = all_reduce(flat, "sum", group)
    body = summed[: rescaled.numel()].view_as(rescaled)
    merged = torch.stack([M, body[0], body[1], body[2], body[3], body[4], body[5]])
    if idx is not None:
        # a NaN-tagged column (torch.argmax's first NaN) wins, else the first rank's maximum
        idx = all_reduce(argmax_candidates(m_r, M, idx), "min", group)
    return merged, idx, (summed[rescaled.numel():] if extra is not None else None)


def shard_dens(merged: torch.Tensor, target, weight, opts: Options, divisor) -> torch.Tensor:
    """The reduction's denominators from the merged statistics (no communication: the target
    weights ``w_t`` were merged from their owners)."""
    if opts.reduction == "mean" and weight is not None and not opts.probs:
        keep = target != opts.ignore_index
        w_kept = torch.where(keep, merged[F_WT], 0).sum()
        return torch.stack([w_kept, keep.sum().to(merged.dtype)])
    return denominators(target, None, opts, divisor=divisor, V=0, dtype=merged.dtype)


def shard_forward(B, call, *, compute_grad: bool, inplace: bool, grad_target=None,
                  dens: torch.Tensor | None = None) -> RowOutputs:
    """One rank of the pipeline: partials of this shard, merge across ranks, row losses and
    this shard's gradient (for an upstream gradient of 1). ``call`` is an op layer ``Call``."""
    logits, target, weight, opts, shard = call.logits, call.target, call.weight, call.opts, call.shard
    span = dict(offset=shard.offset, vocab_size=shard.vocab_size)
    part, part_idx = B.partials(logits, target, weight, opts, **span)
    merged, idx, _ = merge_ranks(part, part_idx, shard.group)
    if dens is None:
        dens = shard_dens(merged, target, weight, opts, call.divisor)
    rows = B.row_buffers(logits.shape[0], logits.device, opts, logits.dtype)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    B.finish(logits, target, weight, opts, merged, idx, dens=dens, rows=rows, grad=grad,
             grad_target=grad_target, **span)
    return RowOutputs(*rows[:6], dens, grad)


# ------------------------------------------------------------------------------------------------
# Shards from a group's name: the custom ops (torch.compile) take the group as a string and agree
# on the shard at run time, inside the op (the first call's exchange is a host sync, which a
# compiled graph may not trace).
# ------------------------------------------------------------------------------------------------


def group_name(group) -> str:
    """The name of a process group, "" for none."""
    return "" if group is None else group.group_name


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def agree_call(group, kind: int, call, error: Exception | None, *, validate: bool,
               device: torch.device) -> Shard:
    """The shard of one call, agreed with the other ranks: ``call`` is the op layer's ``Call``
    (``cross_entropy``) or ``LinearCall`` (``linear_cross_entropy``), None where this rank's
    arguments raised ``error`` (then every rank raises). Under torch.compile the exchange (a
    host sync) runs inside the op instead (:func:`shard_by_name`). Class ids are checked
    against the global vocabulary on the CPU, and with ``validate``."""
    if torch.compiler.is_compiling():
        if error is not None:
            raise error  # on this rank; the others wait
        compile_check(validate)
        return Shard(group, -1, -1, -1)
    if call is None:
        shard = agree(group, device, kind=kind, error=error, N=-1, V_local=-1, weight_len=-1,
                      bias_len=-1, D=-1, dtype=None, options=(), validate=validate)
    else:
        shard = agree(group, device, error=error, validate=validate, target=call.target,
                      **_described(kind, call))
    opts = call.opts
    if (validate or device.type == "cpu") and not opts.probs and call.target.numel():
        check_target_range(call.target, shard.vocab_size, opts.ignore_index)
    return shard


def _described(kind: int, call) -> dict:
    """What the ranks compare of a call (its shapes, dtype and options)."""
    opts, weight = call.opts, call.weight
    linear = kind == KIND_LINEAR
    rows = call.x if linear else call.logits
    bias = call.b if linear else None
    return dict(
        kind=kind, N=rows.shape[0], V_local=call.W.shape[0] if linear else rows.shape[1],
        weight_len=-1 if weight is None else weight.shape[0],
        bias_len=-1 if bias is None else bias.shape[0], D=rows.shape[1] if linear else -1,
        dtype=rows.dtype, input=call.x if linear else None, need_dx=bool(opts.need[0]),
        chunk_rows=opts.chunk_rows,
        options=(opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss,
                 opts.softcap, opts.logit_scale, opts.inv_divisor, call.divisor is not None,
                 weight is not None, opts.probs, opts.argmax, bias is not None,
                 opts.skip_ignored, opts.temperature))


def shard_by_name(kind: int, call) -> Shard | None:
    """Inside a custom op: the shard of ``call.opts.group`` (None for ""), agreed at run time
    (cached after the first call, so a compiled step has no host sync)."""
    opts = call.opts
    if not opts.group:
        return None
    rows = call.x if kind == KIND_LINEAR else call.logits
    desc = _described(kind, call)
    desc.pop("input")
    shard = agree(_group(opts.group), rows.device, error=None, validate=False, **desc)
    if not opts.probs and call.target.device.type == "cpu" and call.target.numel():
        # Global class ids, checked against the global vocabulary as an eager call does on the
        # CPU (free there; on an accelerator only validate=True checks, eagerly).
        check_target_range(call.target, shard.vocab_size, opts.ignore_index)
    return shard
