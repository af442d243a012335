"""Vocabulary-parallel cross-entropy: each rank of a process group holds a shard of the classes.

Sharding convention. With a group of ``R > 1`` ranks, rank ``r`` (its rank in the group) holds the
contiguous classes ``[offset_r, offset_r + V_r)`` with ``offset_r = V_0 + ... + V_{r-1}``: shards in
rank order, sizes free (``V = 37`` over 3 ranks may be 13, 12, 12, or anything that adds up; a rank
may hold none). What is sharded: the class dimension of the logits (``(N, V_r)``, ``(V_r,)`` or
``(N, V_r, d1, ...)``), the class weights ``(V_r,)``, and for the linear variant the rows of
``linear_weight`` ``(V_r, D)`` and of ``linear_bias`` ``(V_r,)``. What is the same on every rank:
``target`` (global class ids), the hidden states ``input`` of the linear variant, and every option.
Every rank gets the loss of the unsharded problem (and ``lse``), the gradient of its own shard,
and, for the linear variant, the full gradient of ``input``. ``process_group=None`` or a group of
one rank is the single-process call.

Algorithm, per row (no rank ever holds the full V):

1. local phase: this rank's log-sum-exp ``lse_r`` (after ``softcap``), the target logit ``x_t`` and
   its weight ``w_t`` on the rank that owns the target (zero elsewhere), and the smoothing sum
   ``sum_c w_c x_c`` of its columns;
2. ``all_reduce(MAX)`` of ``lse_r`` gives ``M``; one ``all_reduce(SUM)`` of the packed
   ``[exp(lse_r - M), x_t, w_t, sum_c w_c x_c]`` rows (plus ``sum_c w_c``) gives
   ``lse = M + log(sum_r exp(lse_r - M))`` and the global ``x_t``, ``w_t``, smoothing sums; the
   losses follow, identical on every rank, and so do the mean's denominators;
3. local phase: the gradient of this rank's columns (only the one-hot term is owner-local).

Before that, one ``all_gather`` of a few integers per rank gives the shard sizes (hence the
offsets) and checks that the ranks agree (rows, options, targets, group, shard lengths), so that a
mismatch raises the same clear error on every rank instead of hanging in a collective.

The gradients are computed in the forward, as in the single-process path; the backward only scales
them (the linear variant with ``reduction="none"`` recomputes its weight gradient in the backward,
locally). The collectives are eager ``torch.distributed`` calls (NCCL on GPUs, gloo on CPUs): the
entry points are excluded from torch.compile graphs (a graph break).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _config
from . import _validation as V
from .autograd import _compute_dtype, _reduce
from .backends.torch_ce import chunk_rows_for
from .dispatch import BackendUnavailableError, choose_backend

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

_MAGIC = 0x7670_6365  # "vpce": both sides of the metadata exchange are this module
_KIND_CE, _KIND_LINEAR = 1, 2
_KIND_NAMES = {_KIND_CE: "vocab_parallel_cross_entropy", _KIND_LINEAR: "vocab_parallel_linear_cross_entropy"}
_LOCAL_ERRORS = (V.CrossEntropyInputError, BackendUnavailableError, ValueError, TypeError)


# ------------------------------------------------------------------------------------------------
# Group, shard, metadata
# ------------------------------------------------------------------------------------------------


def _eager(fn):
    """``torch.compiler.disable(fn)``, created on the first call (importing dynamo takes seconds):
    the collectives and the host read of the metadata run outside any compiled graph."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def _world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass(frozen=True)
class _Shard:
    """This rank's place in the vocabulary, agreed by every rank of ``group``."""

    group: object  # a ProcessGroup, or None for one process (no communication)
    offset: int  # global id of this rank's first class
    V_local: int
    V: int  # global vocabulary size
    chunk_rows: int = 0  # linear variant: rows per chunk, the same on every rank
    need_dx: bool = False  # linear variant: some rank needs d(input)


def _all_reduce(t: torch.Tensor, op, shard: _Shard) -> None:
    if shard.group is not None:
        dist.all_reduce(t, op=op, group=shard.group)


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def _checksums(target: torch.Tensor | None, input: torch.Tensor | None, device) -> torch.Tensor:
    """Device-side fingerprints of the tensors that must be equal on every rank (no host sync)."""
    out = torch.zeros(3, dtype=torch.int64, device=device)
    if target is not None and target.numel():
        t = target.reshape(-1)
        pos = torch.arange(t.numel(), device=t.device) % 1021 + 1
        out[0] = t.sum()
        out[1] = (t * pos).sum()
    if input is not None and input.numel():
        # Same values, same kernel, same device: the same sum, bit for bit.
        out[2] = input.detach().sum(dtype=torch.float64).reshape(1).view(torch.int64)[0]
    return out


def _exchange(
    group, device, *, kind: int, error: Exception | None, N: int, V_local: int, weight_len: int,
    bias_len: int, D: int, options: tuple, target, input=None, need_dx: bool = False,
    chunk_rows: int = 0,
) -> _Shard:
    """One ``all_gather`` of per-rank metadata: shard sizes, and checks that the ranks agree.

    Every rank raises the same error on a mismatch (a rank whose arguments were rejected locally
    raises its own error; the others say which rank it was), so that none is left waiting in a
    later collective.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    head = [
        _MAGIC, kind, int(error is not None), N, V_local, weight_len, bias_len, D,
        _crc(options), _crc(dist.get_process_group_ranks(group)), int(need_dx), chunk_rows,
    ]
    meta = torch.cat([torch.tensor(head, dtype=torch.int64).to(device),
                      _checksums(target if error is None else None,
                                 input if error is None else None, device)])
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync of a call
    (magic, kinds, errs, Ns, Vs, wlens, blens, Ds, opts, grps, needs, chunks, cs0, cs1, cs2) = (
        list(col) for col in zip(*table)
    )

    def fail(msg: str):
        raise V.CrossEntropyInputError(msg + " (every rank of the group raises this error)")

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
    if len(set(Ns)) > 1:
        fail(f"the ranks have different numbers of rows (per rank: {Ns}): every rank passes the same "
             "target, of global class ids, and logits rows for the same tokens.")
    if len(set(opts)) > 1:
        fail("the ranks passed different options (ignore_index, reduction, label_smoothing, "
             "z_loss, softcap, presence of class weights or bias): pass the same ones everywhere.")
    if len(set(cs0)) > 1 or len(set(cs1)) > 1:
        fail("target differs across the ranks: with a vocabulary-parallel loss every rank passes "
             "the same target, of global class ids.")
    if kind == _KIND_LINEAR:
        if len(set(Ds)) > 1:
            fail(f"the ranks have different hidden sizes D (per rank: {Ds}).")
        if len(set(cs2)) > 1:
            fail("input differs across the ranks: the vocabulary-parallel linear cross-entropy "
                 "needs the same hidden states on every rank (only linear_weight is sharded).")
    V_total = sum(Vs)
    if V_total < 1:
        fail("the vocabulary shards are all empty.")
    for r, (vl, wl, bl) in enumerate(zip(Vs, wlens, blens)):
        for name, n in (("weight", wl), ("linear_bias", bl)):
            if n >= 0 and n != vl:
                hint = " (it looks like the full vector: pass this rank's slice)" if n == V_total else ""
                fail(f"on rank {r}, {name} has {n} entries but its vocabulary shard has {vl} "
                     f"classes{hint}.")
    # The linear variant: every rank runs the same chunks of rows (two collectives each), the
    # smallest that a rank proposed.
    return _Shard(group, sum(Vs[:rank]), V_local, V_total, chunk_rows=min(chunks),
                  need_dx=any(needs))


# ------------------------------------------------------------------------------------------------
# The three phases: local statistics, combination across ranks, local gradient
# ------------------------------------------------------------------------------------------------


class _RowStats(NamedTuple):
    """Global per-row statistics, the same on every rank (``cdt``: fp32, or fp64 for fp64)."""

    lse: torch.Tensor  # (N,) log-sum-exp over the whole vocabulary (after softcap)
    x_t: torch.Tensor | None  # (N,) target logit (after softcap); 0 for ignored rows
    w_t: torch.Tensor | None  # (N,) target weight (class weights only)
    swx: torch.Tensor | None  # (N,) sum_c w_c x_c (smoothing only)
    sum_w: torch.Tensor | float  # sum_c w_c: (1,) tensor with weights and smoothing, else V
    f: torch.Tensor  # (N,) 1 for a kept row, 0 ignored, NaN for a target outside [0, V)


def _row_factor(target, ignore_index, V, dtype):
    ignored = target == ignore_index
    bad = ~ignored & ((target < 0) | (target >= V))
    return (~ignored).to(dtype).masked_fill_(bad, float("nan"))


def _owned(target, ignore_index, shard: _Shard):
    """Rows whose target column is on this rank, and that column (clamped into the shard)."""
    t_loc = target - shard.offset
    owned = (target != ignore_index) & (t_loc >= 0) & (t_loc < shard.V_local)
    return owned, t_loc.clamp(0, max(shard.V_local - 1, 0))


def _softcapped(x, softcap):
    return x if softcap is None else torch.tanh(x / softcap) * softcap


def _local_stats_torch(logits, weight, eps, softcap, cdt):
    """Per row: log-sum-exp of this rank's columns and sum_c w_c x_c, in chunks of rows."""
    N, V_local = logits.shape
    lse = torch.empty(N, dtype=cdt, device=logits.device)
    swx = torch.empty(N, dtype=cdt, device=logits.device) if eps > 0.0 else None
    w = weight.to(cdt) if weight is not None else None
    step = _config.TORCH_CHUNK_ROWS or chunk_rows_for(V_local, cdt)
    for s in range(0, N, step):
        x = _softcapped(logits[s:s + step].to(cdt), softcap)
        lse[s:s + step] = torch.logsumexp(x, 1)  # -inf for an empty shard
        if swx is not None:
            swx[s:s + step] = (x @ w) if w is not None else x.sum(1)
    return lse, swx


def _global_stats(logits, target, weight, shard: _Shard, *, ignore_index, eps, softcap, backend,
                  extra: torch.Tensor | None = None):
    """Local statistics, then the two collectives. Returns ``_RowStats`` and the summed ``extra``
    (scalars that ride along in the SUM, for the linear variant's mean denominator)."""
    N, V_local = logits.shape
    cdt = _compute_dtype(logits.dtype)
    dev = logits.device
    if backend == "triton" and V_local > 0:
        from .ops.vocab_parallel import vp_local_stats

        lse_loc, swx = vp_local_stats(
            logits, weight.float() if weight is not None else None, label_smoothing=eps,
            softcap=softcap, block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS,
        )
    else:
        lse_loc, swx = _local_stats_torch(logits, weight, eps, softcap, cdt)

    # The target logit and weight, on the owning rank only (zero elsewhere): N-element gathers.
    owned, t_col = _owned(target, ignore_index, shard)
    if V_local > 0:
        x_t = _softcapped(logits.gather(1, t_col.unsqueeze(1)).squeeze(1).to(cdt), softcap)
        x_t = torch.where(owned, x_t, 0.0)
    else:
        x_t = torch.zeros(N, dtype=cdt, device=dev)
    w_t = w_sum = None
    if weight is not None:
        w = weight.to(cdt)
        w_t = torch.where(owned, w[t_col], 0.0) if V_local > 0 else torch.zeros(N, dtype=cdt, device=dev)
        if eps > 0.0:
            w_sum = w.sum().reshape(1)

    # MAX of the local lse, then one SUM of everything else, rescaled to that maximum.
    m = lse_loc.clone()
    _all_reduce(m, dist.ReduceOp.MAX, shard)
    m_ref = m.masked_fill(m == float("-inf"), 0.0)  # all -inf: exp(-inf - 0) = 0, lse = -inf
    cols = [torch.exp(lse_loc - m_ref), x_t] + [c for c in (w_t, swx) if c is not None]
    tail = [t.reshape(-1).to(cdt) for t in (w_sum, extra) if t is not None]
    packed = torch.cat([torch.stack(cols, 1).reshape(-1), *tail])
    _all_reduce(packed, dist.ReduceOp.SUM, shard)

    k = len(cols)
    body = packed[: N * k].view(N, k)
    rest = packed[N * k:]
    lse = m + body[:, 0].log()
    j = 2
    if w_t is not None:
        w_t, j = body[:, j], j + 1
    if swx is not None:
        swx = body[:, j]
    sum_w = float(shard.V)
    if w_sum is not None:
        sum_w, rest = rest[:1], rest[1:]
    stats = _RowStats(lse, body[:, 1], w_t, swx, sum_w, _row_factor(target, ignore_index, shard.V, cdt))
    return stats, (rest if extra is not None else None)


def _row_losses(st: _RowStats, eps: float, z_loss: float, V: int):
    """Per-row cross-entropy and z-loss from the global statistics (as in ``torch_ce``)."""
    w_t = st.w_t if st.w_t is not None else 1.0
    ce = (1.0 - eps) * w_t * (st.lse - st.x_t)
    if eps > 0.0:
        ce = ce + (eps / V) * (st.lse * st.sum_w - st.swx)
    zero = torch.zeros_like(st.lse)
    ce_rows = torch.where(st.f == 0, zero, ce * st.f)
    z_rows = torch.where(st.f == 0, zero, z_loss * st.lse.square() * st.f)
    return ce_rows, z_rows


def _mean_scales(w_kept, n_kept, reduction, dtype, device):
    """``[ce_scale, z_scale]``: 1/(summed weights of kept targets), 1/(kept rows) for a mean."""
    if reduction != "mean":
        return torch.ones(2, dtype=dtype, device=device)
    return torch.stack([w_kept.to(dtype), n_kept.to(dtype)]).reciprocal()


def _shard_grad_torch(logits, target, weight, shard, st: _RowStats, scales, *, ignore_index, eps,
                      z_loss, softcap, inplace):
    """dL/dlogits of this shard, in chunks of rows, written into one buffer (as ``torch_ce``)."""
    N, V_local = logits.shape
    cdt = _compute_dtype(logits.dtype)
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if N == 0 or V_local == 0:
        return grad
    sc = scales.to(cdt)
    ce_scale, z_scale = sc[0], sc[1]
    w_t = st.w_t if st.w_t is not None else 1.0
    kept = st.f != 0
    # d/dx_c = p_c * coef_p + [c == t] * coef_t (owner only) - coef_w * w_c, with p = exp(x - lse);
    # zeroed with where() (an all-ignored mean has an infinite scale), NaN through f.
    coef_p = ce_scale * ((1.0 - eps) * w_t + (eps / shard.V) * st.sum_w) + z_scale * (2.0 * z_loss) * st.lse
    coef_p = torch.where(kept, coef_p * st.f, 0.0)
    owned, t_col = _owned(target, ignore_index, shard)
    coef_t = torch.where(kept & owned, -ce_scale * (1.0 - eps) * w_t * st.f, 0.0)
    coef_w = torch.where(kept, ce_scale * (eps / shard.V) * st.f, 0.0)
    w = weight.to(cdt) if weight is not None else None
    step = _config.TORCH_CHUNK_ROWS or chunk_rows_for(V_local, cdt)
    direct = grad.dtype == cdt
    for s in range(0, N, step):
        e = min(N, s + step)
        raw = logits[s:e]
        th = torch.tanh(raw.to(cdt) / softcap) if softcap is not None else None
        x = th * softcap if th is not None else raw
        lse = st.lse[s:e].unsqueeze(1)
        # Straight into the gradient slice when it holds cdt (over the logits too: elementwise).
        p = torch.sub(x, lse, out=grad[s:e]) if direct else x.to(cdt) - lse
        p.exp_().mul_(coef_p[s:e].unsqueeze(1))
        p.scatter_add_(1, t_col[s:e].unsqueeze(1), coef_t[s:e].unsqueeze(1))
        if eps > 0.0:
            if w is not None:
                p.addcmul_(coef_w[s:e].unsqueeze(1), w.unsqueeze(0), value=-1.0)
            else:
                p.sub_(coef_w[s:e].unsqueeze(1))
        if th is not None:
            p.mul_(1.0 - th.square())  # softcap chain rule
        if not direct:
            grad[s:e].copy_(p)
    return grad


def _shard_grad(logits, target, weight, shard, st: _RowStats, scales, *, ignore_index, eps, z_loss,
                softcap, backend, inplace):
    if backend == "triton" and logits.shape[1] > 0:
        from .ops.vocab_parallel import vp_shard_grad

        return vp_shard_grad(
            logits, target, weight.float() if weight is not None else None, scales.float(),
            st.lse, st.w_t, st.sum_w if isinstance(st.sum_w, torch.Tensor) else None,
            offset=shard.offset, vocab_size=shard.V, ignore_index=ignore_index,
            label_smoothing=eps, z_loss=z_loss, softcap=softcap, inplace=inplace,
            block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS,
        )
    return _shard_grad_torch(logits, target, weight, shard, st, scales, ignore_index=ignore_index,
                             eps=eps, z_loss=z_loss, softcap=softcap, inplace=inplace)


class _GradInForward(torch.autograd.Function):
    """Runs ``run()`` -> ``(loss, lse, z_term, finish)``; ``finish(g_loss)`` returns the gradients
    of ``tensors`` (computed in the forward, scaled in place; released after one backward)."""

    @staticmethod
    def forward(ctx, run, *tensors):
        loss, lse, z_term, finish = run()
        ctx.finish = finish
        ctx.mark_non_differentiable(lse, z_term)
        return loss, lse, z_term

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_z):
        finish, ctx.finish = ctx.finish, None
        if finish is None:
            raise RuntimeError(
                "triton_xent: backward through the same vocabulary-parallel call a second time is "
                "not supported (the gradient is computed in the forward and scaled in place)."
            )
        return (None, *finish(g_loss))


def _scale_rows(t: torch.Tensor | None, g: torch.Tensor, reduction: str):
    if t is None:
        return None
    return t.mul_(g.unsqueeze(1) if reduction == "none" else g)


# ------------------------------------------------------------------------------------------------
# Logits sharded along the vocabulary
# ------------------------------------------------------------------------------------------------


def _prepare_ce(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, backend):
    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    if isinstance(input, torch.Tensor) and input.dim() >= 1 and isinstance(weight, torch.Tensor):
        c_local = input.shape[0] if input.dim() == 1 else input.shape[1]
        if weight.dim() == 1 and weight.shape[0] != c_local:
            raise V.CrossEntropyInputError(
                f"weight has {weight.shape[0]} entries but this rank's logits have V_local={c_local} "
                "classes: with a process group, weight is this rank's shard of the class weights "
                "(the same slice of the vocabulary as the logits)."
            )
    p = V.prepare(input, target, weight, ignore_index, check_values=False)
    if p.probs:
        raise V.CrossEntropyInputError(
            "class-probability targets are not supported with a process group: pass class ids "
            "(global, the same on every rank)."
        )
    logits = p.logits
    choice = choose_backend(logits, probs=False, backend=backend)
    if choice.backend == "triton" and logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    if inplace_backward and logits.requires_grad and logits.data_ptr() != input.data_ptr():
        raise V.CrossEntropyInputError(
            "inplace_backward=True needs the logits as rows (N, V_local) with a unit-stride class "
            "dimension; this input needed a copy. Pass input.view(-1, V_local), or drop "
            "inplace_backward."
        )
    return p, logits, choice.backend


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
    inplace_backward: bool = False,
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    validate: bool | None = None,
    loss_dtype: torch.dtype | None = None,
):
    """Cross-entropy of logits sharded along the vocabulary over ``process_group``.

    The arguments of :func:`triton_xent.cross_entropy`, with ``input`` and ``weight`` this rank's
    contiguous shard of the classes (shards in rank order, any sizes) and ``target`` the global
    class ids, the same on every rank. Returns, on every rank, the loss of the unsharded problem;
    the gradient of ``input`` is that of this rank's shard. Every option works as in the
    single-process call (label smoothing over the global vocabulary). ``None`` or a group of one
    rank is exactly :func:`triton_xent.cross_entropy`. Class-probability targets are not supported
    with a group. Collective: every rank of the group must make the same call.

    Args:
        input: logits shard ``(V_r,)``, ``(N, V_r)`` or ``(N, V_r, d1, ..., dk)``.
        target: global class ids ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, equal on every rank.
        weight: ``(V_r,)`` this rank's shard of the class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap, return_aux, inplace_backward,
        backend, validate: as in :func:`triton_xent.cross_entropy`.
        process_group: the group over which the vocabulary is sharded.

    Returns:
        The loss (0-d, or shaped like the target for ``"none"``), and with ``return_aux`` a
        :class:`triton_xent.CrossEntropyAux` holding the global per-row lse and the z-loss term.

    Examples::

        >>> # rank r of R holds logits[:, off_r : off_r + V_r] (same rows and targets everywhere)
        >>> loss = vocab_parallel_cross_entropy(logits_shard, target, process_group=group)
        >>> loss.backward()  # logits_shard.grad is this rank's shard of the full gradient
    """
    if _world_size(process_group) == 1:
        from .functional import cross_entropy

        return cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, return_aux=return_aux, inplace_backward=inplace_backward,
            backend=backend, validate=validate, loss_dtype=loss_dtype,
        )
    return _vp_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss, softcap, return_aux, inplace_backward, process_group, backend,
                             validate, loss_dtype)


@_eager
def _vp_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                      softcap, return_aux, inplace_backward, group, backend, validate, loss_dtype):
    error = p = logits = None
    try:
        p, logits, backend_name = _prepare_ce(input, target, weight, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, inplace_backward,
                                              backend)
    except _LOCAL_ERRORS as exc:  # raised on every rank, after the exchange below
        error = exc
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    eps, z_loss = float(label_smoothing), float(z_loss)
    softcap = None if softcap is None else float(softcap)
    options = (ignore_index, reduction, eps, z_loss, softcap, weight is not None)
    shard = _exchange(
        group, device, kind=_KIND_CE, error=error,
        N=-1 if p is None else logits.shape[0], V_local=-1 if p is None else logits.shape[1],
        weight_len=-1 if weight is None or p is None else weight.shape[0], bias_len=-1, D=-1,
        options=options, target=None if p is None else p.target,
    )
    tgt = p.target
    on_cpu = device.type == "cpu"
    if (V.validation_requested(validate) or on_cpu) and tgt.numel():
        V.check_target_range(tgt, shard.V, ignore_index)  # the same targets: raises everywhere

    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    kw = dict(ignore_index=ignore_index, eps=eps, softcap=softcap, backend=backend_name)
    w = p.weight.detach() if p.weight is not None else None

    def run():
        x = logits.detach()
        st, _ = _global_stats(x, tgt, w, shard, **kw)
        ce_rows, z_rows = _row_losses(st, eps, z_loss, shard.V)
        keep = tgt != ignore_index
        n_kept = keep.sum()
        w_kept = torch.where(keep, st.w_t, 0.0).sum() if st.w_t is not None else n_kept
        scales = _mean_scales(w_kept, n_kept, reduction, st.lse.dtype, x.device)
        grad = None
        if compute_grad:
            grad = _shard_grad(x, tgt, w, shard, st, scales, z_loss=z_loss,
                               inplace=inplace_backward, **kw)
        loss_ce = _reduce(ce_rows, reduction, scales[0])
        z_term = _reduce(z_rows, reduction, scales[1])
        loss = loss_ce + z_term if z_loss else loss_ce
        return loss, st.lse, z_term, lambda g: (_scale_rows(grad, g, reduction),)

    if compute_grad:
        loss, lse, z_term = _GradInForward.apply(run, logits)
    else:
        loss, lse, z_term, _ = run()
    if reduction == "none":
        loss = loss.view(p.batch_shape)
        z_term = z_term.view(p.batch_shape)
    loss = loss.to(loss_dtype or input.dtype)
    if return_aux:
        from .functional import CrossEntropyAux

        return loss, CrossEntropyAux(lse.view(p.batch_shape), z_term)
    return loss


# ------------------------------------------------------------------------------------------------
# Linear layer sharded along the vocabulary
# ------------------------------------------------------------------------------------------------


def _prepare_linear(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                    label_smoothing, z_loss, softcap, backend, chunk_size, chunk_bytes, accum_dtype):
    """The single-process checks of ``linear.py`` (shard-sized), then the backend and the chunking.

    Returns ``x (N, D), W, b, target (N,), weight, batch_shape, backend, chunk_rows, fp32_accum``.
    """
    from .linear import _autocast, _prepare, _resolve_chunk_rows, _resolve_fp32_accum

    V.check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise V.CrossEntropyInputError(
            "class-probability targets are not supported with a process group: pass class ids "
            "(global, the same on every rank)."
        )
    if isinstance(input, torch.Tensor):
        input, linear_weight, linear_bias = _autocast(input, linear_weight, linear_bias)
    if isinstance(weight, torch.Tensor) and isinstance(linear_weight, torch.Tensor) and (
            weight.dim() == 1 and linear_weight.dim() == 2 and weight.shape[0] != linear_weight.shape[0]):
        raise V.CrossEntropyInputError(
            f"weight has {weight.shape[0]} entries but linear_weight holds V_local="
            f"{linear_weight.shape[0]} classes on this rank: with a process group, weight is this "
            "rank's shard of the class weights (the same slice of the vocabulary)."
        )
    # The class ids are global: their range is checked after the exchange, against the global V.
    p = _prepare(input, linear_weight, linear_bias, target, weight, ignore_index, check_values=False)
    choice = choose_backend(p.x, probs=False, backend=backend)
    V_local = linear_weight.shape[0]
    chunk_rows = _resolve_chunk_rows(chunk_size, chunk_bytes, max(1, V_local), p.x.dtype)
    fp32_accum = _resolve_fp32_accum(accum_dtype, linear_weight.dtype)
    return (p.x, linear_weight, linear_bias, p.target, p.weight, p.batch_shape, choice.backend,
            chunk_rows, fp32_accum)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    accum_dtype: torch.dtype | None = None,
    skip_ignored: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    validate: bool | None = None,
    loss_dtype: torch.dtype | None = None,
):
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` with the output projection
    sharded along the vocabulary over ``process_group`` (Megatron's vocab-parallel LM head).

    The arguments of :func:`triton_xent.linear_cross_entropy`. ``input`` ``(..., D)`` and
    ``target`` ``(...)`` (global class ids) are the same on every rank; ``linear_weight``
    ``(V_r, D)``, ``linear_bias`` and ``weight`` ``(V_r,)`` are this rank's contiguous shard of the
    classes (shards in rank order, any sizes). Every rank gets the loss of the unsharded problem,
    the gradients of its own shards, and the full gradient of ``input`` (all-reduced in the
    forward). Logits exist one chunk of rows at a time (the chunk is the smallest any rank asks
    for). ``None`` or a group of one rank is exactly :func:`triton_xent.linear_cross_entropy`.
    Class-probability targets are not supported with a group. Collective: every rank of the group
    must make the same call.

    Args:
        input: hidden states ``(..., D)``, the same on every rank.
        linear_weight: ``(V_r, D)`` this rank's rows of the output projection.
        target: ``(...)`` global class ids, the same on every rank.
        linear_bias, weight: ``(V_r,)`` shards of the bias and of the class weights.
        reduction, ignore_index, label_smoothing, z_loss, softcap, return_aux, chunk_size,
        chunk_bytes, accum_dtype, skip_ignored, backend, validate: as in
            :func:`triton_xent.linear_cross_entropy`.
        process_group: the group over which the vocabulary is sharded.

    Returns:
        The loss, and with ``return_aux`` a :class:`triton_xent.CrossEntropyAux`.

    Examples::

        >>> # rank r holds lm_head.weight[off_r : off_r + V_r]; hidden and labels are replicated
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, w_shard, labels, process_group=tp)
        >>> loss.backward()  # hidden.grad: full gradient; w_shard.grad: this rank's shard
    """
    kwargs = dict(
        linear_bias=linear_bias, weight=weight, reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_aux=return_aux,
        chunk_size=chunk_size, chunk_bytes=chunk_bytes, accum_dtype=accum_dtype,
        skip_ignored=skip_ignored, backend=backend, validate=validate, loss_dtype=loss_dtype,
    )
    if _world_size(process_group) == 1:
        from .linear import linear_cross_entropy

        return linear_cross_entropy(input, linear_weight, target, **kwargs)
    return _vp_linear_cross_entropy(input, linear_weight, target, group=process_group, **kwargs)


class _LinearStep:
    """The vocabulary-parallel cross-entropy step on one chunk of logits, for ``linear_ce_chunks``:
    ``step(logits, target, compute_grad) -> (ce, z, lse, grad over the logits)``.

    ``scales`` are the mean's scales; with class weights their denominator (the owners' weights of
    the kept targets) rides along in the first chunk's SUM, before any gradient. With ``keep`` the
    global statistics of each chunk are kept, and ``replay()`` makes a step that reuses them in
    order, without communication (the ``"none"`` backward: the same chunks again).
    """

    def __init__(self, shard, weight, kw, eps, z_loss, scales, extra=None, keep=False):
        self.shard, self.weight, self.kw, self.eps, self.z_loss = shard, weight, kw, eps, z_loss
        self.scales, self.extra = scales, extra
        self.saved = [] if keep else None
        self.replayed = None

    def replay(self, scales):
        step = _LinearStep(self.shard, self.weight, self.kw, self.eps, self.z_loss, scales)
        step.replayed = iter(self.saved)
        return step

    def __call__(self, logits, target, compute_grad):
        if self.replayed is not None:
            st = next(self.replayed)
        else:
            st, summed = _global_stats(logits, target, self.weight, self.shard, extra=self.extra,
                                       **self.kw)
            if summed is not None:
                self.scales = torch.stack([summed[0].reciprocal(), self.scales[1]])
                self.extra = None
            if self.saved is not None:
                self.saved.append(st._replace(x_t=None, swx=None))
        ce, z = (st.lse, st.lse) if self.replayed is not None else _row_losses(
            st, self.eps, self.z_loss, self.shard.V)
        grad = None
        if compute_grad:
            grad = _shard_grad(logits, target, self.weight, self.shard, st, self.scales,
                               z_loss=self.z_loss, inplace=True, **self.kw)
        return ce, z, st.lse, grad


@_eager
def _vp_linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction,
                             ignore_index, label_smoothing, z_loss, softcap, return_aux,
                             chunk_size, chunk_bytes, accum_dtype, skip_ignored, group, backend,
                             validate, loss_dtype):
    from .backends.torch_linear import linear_ce_chunks
    from .linear import _no_autocast

    error = prep = None
    try:
        prep = _prepare_linear(input, linear_weight, target, linear_bias, weight, ignore_index,
                               reduction, label_smoothing, z_loss, softcap, backend, chunk_size,
                               chunk_bytes, accum_dtype)
    except _LOCAL_ERRORS as exc:  # raised on every rank, after the exchange below
        error = exc
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    out_dtype = loss_dtype or (input.dtype if isinstance(input, torch.Tensor) else None)
    eps, z_loss = float(label_smoothing), float(z_loss)
    softcap = None if softcap is None else float(softcap)
    grad_on = torch.is_grad_enabled()
    x = W = b = tgt = w = None
    need = [False] * 3
    if prep is not None:
        x, W, b, tgt, w, batch_shape, backend_name, chunk_rows, fp32_accum = prep
        need = [grad_on and t is not None and t.requires_grad for t in (x, W, b)]
    # As in linear_cross_entropy: skipping ignored rows is free on the CPU, a sync elsewhere.
    skip_ignored = device.type == "cpu" if skip_ignored is None else bool(skip_ignored)
    options = (ignore_index, reduction, eps, z_loss, softcap, weight is not None,
               linear_bias is not None, skip_ignored)
    shard = _exchange(
        group, device, kind=_KIND_LINEAR, error=error, N=-1 if x is None else x.shape[0],
        V_local=-1 if W is None else W.shape[0], weight_len=-1 if w is None else w.shape[0],
        bias_len=-1 if b is None else b.shape[0], D=-1 if x is None else x.shape[1],
        options=options, target=tgt, input=x, need_dx=need[0],
        chunk_rows=0 if prep is None else chunk_rows,
    )
    if (V.validation_requested(validate) or device.type == "cpu") and tgt.numel():
        V.check_target_range(tgt, shard.V, ignore_index)  # the same targets: raises everywhere

    X, Wd = x.detach(), W.detach()
    bd = b.detach() if b is not None else None
    wd = w.detach() if w is not None else None
    cdt = _compute_dtype(X.dtype)
    kw = dict(ignore_index=ignore_index, eps=eps, softcap=softcap, backend=backend_name)
    n_kept = (tgt != ignore_index).sum()
    ones = torch.ones(2, dtype=cdt, device=X.device)
    chunk_kw = dict(ignore_index=ignore_index, chunk_rows=shard.chunk_rows, fp32_accum=fp32_accum,
                    skip_ignored=bool(skip_ignored))
    need_dx = shard.need_dx  # computed wherever some rank needs it: its all-reduce is collective

    def run():
        if reduction == "none":
            step = _LinearStep(shard, wd, kw, eps, z_loss, ones, keep=need[1] or need[2])
            grads = dict(need_x=need_dx, need_w=False, need_b=False)  # dW, db: in the backward
        else:
            scales = _mean_scales(n_kept, n_kept, reduction, cdt, X.device)
            extra = None
            if wd is not None and reduction == "mean":
                owned, t_col = _owned(tgt, ignore_index, shard)
                extra = torch.where(owned, wd.to(cdt)[t_col], 0.0).sum() if shard.V_local else \
                    torch.zeros((), dtype=cdt, device=X.device)
            step = _LinearStep(shard, wd, kw, eps, z_loss, scales, extra=extra)
            grads = dict(need_x=need_dx, need_w=need[1], need_b=need[2])
        with _no_autocast(X.device):
            ce_rows, z_rows, lse, dX, dW, db = linear_ce_chunks(X, Wd, bd, tgt, ce_step=step,
                                                                **grads, **chunk_kw)
        if dX is not None:
            _all_reduce(dX, dist.ReduceOp.SUM, shard)  # d(input) = sum over the shards
        scales = step.scales
        loss_ce = _reduce(ce_rows, reduction, scales[0])
        z_term = _reduce(z_rows, reduction, scales[1])
        loss = loss_ce + z_term if z_loss else loss_ce

        def finish(g):
            if g is None:
                return None, None, None
            g = g.to(cdt)
            gx = _scale_rows(dX, g, reduction) if need[0] else None
            if reduction != "none":
                return gx, None if dW is None else dW.mul_(g), None if db is None else db.mul_(g)
            if not (need[1] or need[2]):
                return gx, None, None
            # "none": dW and db need the per-row upstream gradient g_i. The same chunks again,
            # with the saved global statistics (no communication): dW += dlogits^T (g_i x_i).
            with _no_autocast(X.device):
                _, _, _, _, gw, gb = linear_ce_chunks(
                    X, Wd, bd, tgt, ce_step=step.replay(ones), need_x=False, need_w=need[1],
                    need_b=need[2], grad_rows=g.reshape(-1), **chunk_kw)
            return gx, gw, gb

        return loss, lse, z_term, finish

    if any(need):
        loss, lse, z_term = _GradInForward.apply(run, x, W, b)
    else:
        loss, lse, z_term, _ = run()
    if reduction == "none":
        loss = loss.view(batch_shape)
        z_term = z_term.view(batch_shape)
    loss = loss.to(out_dtype)
    if return_aux:
        from .functional import CrossEntropyAux

        return loss, CrossEntropyAux(lse.view(batch_shape), z_term)
    return loss
