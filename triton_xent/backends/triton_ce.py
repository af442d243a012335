"""The Triton backend: the launchers of the kernels, checks, allocation, grids.

Plain torch functions (no autograd), testable alone; :func:`plan` (``backends/triton_plan.py``, with
its knob table) decides every launch parameter. The entry points of
:class:`triton_xent.backends.protocol.Backend` (``forward``, ``partials``, ``finish``, ``finalize``,
``denominators``, ``scale_``, ``row_buffers``) are at the end; they take the plan's overrides from
``triton_xent._config`` and call the launchers. The phases of the pipeline are separate launchers so
the op layer can put a merge between them:

* :func:`ce_forward`: one process, the whole vocabulary: the fused kernel, or the split path
  (partials + finish) for few long rows; then :func:`ce_finalize` for ``"mean"``/``"sum"``;
* :func:`ce_partials` / :func:`ce_finish`: the two halves, for vocabulary parallelism (each rank's
  shard; the op layer merges the partials across ranks in between) and for the backward
  recompute (``ce_finish`` with an upstream gradient);
* :func:`scale_`: ``t *= g`` unless ``g == 1``, on the device.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from triton_xent import _config
from triton_xent.dispatch import LOCK
from triton_xent.kernels.ce_helpers import NUM_FIELDS
from triton_xent.kernels.cross_entropy import (
    _ce_dens_kernel,
    _ce_finalize_kernel,
    _ce_finish_kernel,
    _ce_fused_kernel,
    _ce_partials_kernel,
)
from triton_xent.kernels.scale import _scale_kernel

from . import triton_plan
from .protocol import Options, RowOutputs
from .triton_plan import (  # noqa: F401 (the plan's names, also read through this module)
    BLOCK_N,
    BLOCK_V_TWO_SWEEPS,
    BLOCK_V_TWO_SWEEPS_HEAVY,
    CHUNK_ALIGN,
    FINISH_BLOCK_V,
    H100,
    PLAN_REGS,
    PLAN_REGS_HEAVY,
    REGS_PER_SM,
    SCALE_BLOCK,
    SCALE_PER_SM,
    SCALE_WARPS,
    SINGLE_BLOCK_MAX,
    SINGLE_BLOCK_MAX_HEAVY,
    SPLIT_BLOCK_V,
    SPLIT_MAX,
    SPLIT_MIN_CHUNK,
    THREADS_PER_SM,
    DeviceSpec,
    Plan,
    _warps_for_block,
    cuda_spec,
    heavy_features,
    kernel_flags,
    persistent_programs,
    plan,
    programs_per_sm,
    scale_grid,
)

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_RED = {"none": 0, "sum": 1, "mean": 2}

# Under TRITON_INTERPRET=1, @triton.jit returns interpreted functions that run on CPU tensors.
INTERPRETED = isinstance(_ce_fused_kernel, InterpretedFunction)


def device_spec(device: torch.device) -> DeviceSpec:
    """The device the plan is made for: a CUDA device's own properties; off CUDA (the
    interpreter, the traffic meter) the H100 planning model, so that the CPU runs and counts
    exactly what an H100 would launch."""
    return triton_plan.H100 if device.type != "cuda" else cuda_spec(device)


# ----------------------------------------------------------------------------------------------
# Checks and small helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _guard(device: torch.device):
    # Triton launches on the current CUDA device: make it the logits' one. The interpreter is not
    # thread-safe: its launches hold the package's interpreter lock (re-entrant); it computes
    # with numpy, whose warnings on inf/NaN arithmetic (silent on a GPU: an ignored row's
    # unread statistics, a -inf logit) are not the caller's concern.
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    elif INTERPRETED:
        import numpy as np

        with LOCK, np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            yield
    else:
        yield


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D (N, V) tensor, got shape "
                         f"{tuple(getattr(logits, 'shape', ()))}.")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported: use float32, float16 or "
                         "bfloat16.")
    if logits.shape[1] >= 2**30:
        raise ValueError(f"V = {logits.shape[1]} classes is too large for the kernel's int32 "
                         "column offsets (< 2**30).")
    # The kernels step along a row with unit stride; the row stride is free.
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the class dimension (stride(1) == 1), "
                         f"got strides {logits.stride()}: pass logits.contiguous().")
    if logits.device.type == "cpu" and not INTERPRETED:
        raise ValueError("logits is on the CPU: the Triton kernels need a GPU tensor, or "
                         "TRITON_INTERPRET=1 set before triton is imported (interpreter, for tests).")


@functools.lru_cache(maxsize=256)
def _scalars(opts: Options):
    scale, softcap = opts.transform()
    return (1.0 if scale is None else float(scale), 1.0 if softcap is None else float(softcap))


def _row_buffers(N, device, opts: Options, out_dtype):
    f32 = dict(dtype=torch.float32, device=device)
    ce, z, lse = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
    loss_rows = torch.empty(N, dtype=out_dtype, device=device) if opts.reduction == "none" else None
    argmax = torch.empty(N, dtype=torch.int64, device=device) if opts.argmax else None
    stats = torch.empty((NUM_FIELDS, N), **f32)
    return ce, z, lse, loss_rows, argmax, stats


def dens_for_empty(opts: Options, divisor: torch.Tensor | None, device) -> torch.Tensor:
    """The denominators when there are no rows (no kernel program runs to compute them)."""
    if opts.reduction == "mean":
        return torch.zeros(2, dtype=torch.float32, device=device)
    if divisor is not None:
        return divisor.float().reshape(1).expand(2).contiguous()
    return torch.full((2,), 1.0 / opts.inv_divisor, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: Options,
    *,
    divisor: torch.Tensor | None = None,
    dens: torch.Tensor | None = None,
    compute_grad: bool,
    inplace: bool = False,
    out_dtype: torch.dtype = torch.float32,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> RowOutputs:
    """Per-row cross-entropy (and dL/dlogits) of one process holding the whole vocabulary.

    Args:
        logits: ``(N, V)`` float32/float16/bfloat16, ``stride(1) == 1`` (any row stride).
        target: ``(N,)`` int64 class indices (``ignore_index`` rows give zeros; a target outside
            ``[0, V)`` gives NaN for its row, never a bad memory access).
        weight: ``(V,)`` float32 class weights, or None.
        opts: the options; ``opts.reduction`` decides the gradient's scale (the denominators).
        divisor: a 0-d device tensor dividing a ``"sum"`` (else ``opts.inv_divisor``).
        dens: ``(2,)`` float32 denominators to use instead of computing them from ``target``
            (the fused linear head passes the whole batch's to each chunk).
        compute_grad: write the gradient (of the reduced loss, upstream 1).
        inplace: write it over ``logits``.
        out_dtype: dtype of ``loss_rows`` (``"none"``).
        block_v, num_splits: force the plan (tests).

    Returns:
        :class:`RowOutputs`.
    """
    check_logits(logits)
    N, V = logits.shape
    device = logits.device
    if compute_grad and not opts.all_rows:
        # An ignored row's gradient is PyTorch's 0 x softmax, NaN where its logits hold a NaN or
        # +inf: its statistics are needed (one read of the row, not two).
        opts = opts._replace(all_rows=True)
    # (N,) / (V,) vectors: the kernels index them with unit stride (a copy only when strided).
    target = target.contiguous()
    weight = None if weight is None else weight.contiguous()
    flags = kernel_flags(opts, weight is not None)
    scale, cap = _scalars(opts)
    ce, z, lse, loss_rows, argmax, stats = _row_buffers(N, device, opts, out_dtype)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty((N, V), dtype=logits.dtype, device=device)
    dens_given = dens is not None
    if not dens_given:
        dens = (torch.empty(2, dtype=torch.float32, device=device) if N
                else dens_for_empty(opts, divisor, device))
    if N == 0 or V == 0:
        if V == 0 and N:  # no class at all: PyTorch's empty softmax (NaN), zero gradient
            raise ValueError("logits has V = 0 classes; cross-entropy needs at least one class.")
        return RowOutputs(ce, z, lse, loss_rows, argmax, stats, dens, grad)
    p = plan(N, V, logits.dtype, device_spec(device), block_v=block_v, num_splits=num_splits,
             heavy=heavy_features(opts, weight is not None), grad=compute_grad)
    weight_arg = weight if weight is not None else ce  # never read without HAS_WEIGHT
    div_arg = divisor if divisor is not None else dens
    grad_arg = grad if grad is not None else logits  # never written without COMPUTE_GRAD
    loss_rows_arg = loss_rows if loss_rows is not None else ce
    argmax_arg = argmax if argmax is not None else target
    red = _RED[opts.reduction]
    with _guard(device):
        if p.path == "fused":
            _ce_fused_kernel[(p.programs,)](
                logits, target, weight_arg, div_arg, dens,
                ce, z, lse, stats, argmax_arg, loss_rows_arg, grad_arg,
                N, V,
                logits.stride(0), grad_arg.stride(0), N,
                opts.ignore_index, opts.label_smoothing, opts.z_loss, scale, cap, opts.inv_divisor,
                BLOCK_V=p.block_v, BLOCK_N=BLOCK_N, SINGLE_BLOCK=p.single_block, REDUCTION=red,
                DENS_FROM_PTR=dens_given, HAS_DIVISOR=divisor is not None,
                HAS_Z_LOSS=opts.z_loss > 0.0, COMPUTE_GRAD=grad is not None,
                ALL_ROWS=bool(opts.all_rows), WRITE_STATS=True, EMULATE_RTNE=INTERPRETED,
                num_warps=p.num_warps, **flags,
            )
            return RowOutputs(ce, z, lse, loss_rows, argmax, stats, dens, grad)
        part, part_idx = ce_partials(logits, target, weight, opts, splits=p.splits, chunk=p.chunk,
                                     block_v=p.block_v, num_warps=p.num_warps, divisor=divisor,
                                     dens_out=None if dens_given else dens)
        ce_finish(logits, target, weight, opts, part, part_idx, P=p.splits, dens=dens,
                  splits=p.splits, chunk=p.chunk, block_v=p.block_v, num_warps=p.num_warps,
                  rows=(ce, z, lse, loss_rows, argmax, stats), grad=grad)
    return RowOutputs(ce, z, lse, loss_rows, argmax, stats, dens, grad)


def ce_partials(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: Options,
    *,
    splits: int,
    chunk: int,
    block_v: int,
    num_warps: int,
    offset: int = 0,
    vocab_size: int | None = None,
    divisor: torch.Tensor | None = None,
    dens_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Partial statistics of ``splits`` chunks of ``chunk`` columns of each row: ``part``
    ``(NUM_FIELDS, N, splits)`` fp32 and, with ``opts.argmax``, ``part_idx`` ``(N, splits)``
    int64 (global column of each chunk's max).

    The logits are this part's columns ``[offset, offset + V_local)`` of a vocabulary of
    ``vocab_size`` classes (vocabulary parallelism), or all of them. ``dens_out``: also compute the
    reduction's denominators into it (one more program)."""
    N, V_local = logits.shape
    V = V_local if vocab_size is None else vocab_size
    device = logits.device
    part = torch.empty((NUM_FIELDS, N, splits), dtype=torch.float32, device=device)
    part_idx = torch.empty((N, splits), dtype=torch.int64, device=device) if opts.argmax else None
    S = splits if V_local else 0
    if V_local == 0:  # an empty shard: neutral partials (merging them changes nothing)
        part[0].fill_(float("-inf"))
        part[1:].zero_()
        if part_idx is not None:
            part_idx.fill_(offset)
    grid = N * S + (1 if dens_out is not None else 0)
    if grid == 0:
        return part, part_idx
    scale, cap = _scalars(opts)
    with _guard(device):
        _ce_partials_kernel[(grid,)](
            logits, target, weight if weight is not None else part,
            divisor if divisor is not None else part, dens_out if dens_out is not None else part,
            part, part_idx if part_idx is not None else target,
            N, V, V_local, offset, chunk, S,
            logits.stride(0), N * splits,
            opts.ignore_index, scale, cap, opts.inv_divisor,
            BLOCK_V=block_v, BLOCK_N=BLOCK_N, REDUCTION=_RED[opts.reduction],
            COMPUTE_DENS=dens_out is not None, HAS_DIVISOR=divisor is not None,
            ALL_ROWS=bool(opts.all_rows), num_warps=num_warps,
            **kernel_flags(opts, weight is not None),
        )
    return part, part_idx


def ce_finish(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: Options,
    part: torch.Tensor,
    part_idx: torch.Tensor | None,
    *,
    P: int,
    dens: torch.Tensor,
    splits: int,
    chunk: int,
    block_v: int,
    num_warps: int,
    rows=None,
    grad: torch.Tensor | None = None,
    upstream: torch.Tensor | None = None,
    upstream_lse: torch.Tensor | None = None,
    upstream_ent: torch.Tensor | None = None,
    skip_unit: bool = True,
    offset: int = 0,
    vocab_size: int | None = None,
) -> None:
    """Merges each row's ``P`` partials (``part`` ``(NUM_FIELDS, N, P)``), then writes the row
    outputs into ``rows`` (a tuple ``(ce, z, lse, loss_rows, argmax, stats)``; None: no loss) and
    the gradient of this part's columns into ``grad`` (None: no gradient).

    With ``upstream`` (``(N,)`` or a 0-d tensor: the gradient of the loss rows or of the reduced
    loss), ``upstream_lse`` and ``upstream_ent`` (``(N,)`` or None: of the aux lse and entropy)
    this is the backward's recompute, on the statistics a forward stored (``P == 1``): with
    ``skip_unit`` rows whose upstream is exactly 1 (and aux upstreams 0) keep the gradient the
    forward wrote; without, every row is written."""
    N, V_local = logits.shape
    V = V_local if vocab_size is None else vocab_size
    if N == 0 or (V_local == 0 and rows is None):
        return
    device = logits.device
    scale, cap = _scalars(opts)
    compute_loss = rows is not None
    if not compute_loss:
        rows = (None,) * 6
    ce, z, lse, loss_rows, argmax, stats = rows
    dummy = part
    up = upstream if upstream is not None else dummy
    stride_up = 0 if upstream is None or upstream.dim() == 0 else upstream.stride(0)
    # the aux upstreams (per row) share one stride: contiguous when theirs differ
    if (upstream_lse is not None and upstream_ent is not None
            and upstream_lse.stride(0) != upstream_ent.stride(0)):
        upstream_lse, upstream_ent = upstream_lse.contiguous(), upstream_ent.contiguous()
    aux = upstream_lse if upstream_lse is not None else upstream_ent
    stride_aux = 0 if aux is None else aux.stride(0)
    with _guard(device):
        grid = persistent_programs(N * max(splits, 1), num_warps, device_spec(device),
                                   heavy_features(opts, weight is not None))
        _ce_finish_kernel[(grid,)](
            logits, target, weight if weight is not None else dummy, dens, part,
            part_idx if part_idx is not None else target, up,
            upstream_lse if upstream_lse is not None else dummy,
            upstream_ent if upstream_ent is not None else dummy,
            dummy if ce is None else ce, dummy if z is None else z,
            dummy if lse is None else lse, dummy if stats is None else stats,
            argmax if argmax is not None else target, loss_rows if loss_rows is not None else dummy,
            grad if grad is not None else logits,
            N, V, V_local, offset, chunk, max(splits, 1), P,
            logits.stride(0), (grad if grad is not None else logits).stride(0), part.stride(0),
            N, stride_up, stride_aux,
            opts.ignore_index, opts.label_smoothing, opts.z_loss, scale, cap,
            BLOCK_V=block_v, P_BLOCK=triton.next_power_of_2(max(P, 1)),
            REDUCTION=_RED[opts.reduction], HAS_Z_LOSS=opts.z_loss > 0.0,
            COMPUTE_LOSS=compute_loss, COMPUTE_GRAD=grad is not None and V_local > 0,
            HAS_UPSTREAM=upstream is not None, HAS_UPSTREAM_LSE=upstream_lse is not None,
            HAS_UPSTREAM_ENT=upstream_ent is not None,
            SKIP_UNIT=skip_unit,
            WRITE_STATS=compute_loss and stats is not None, EMULATE_RTNE=INTERPRETED,
            num_warps=num_warps, **kernel_flags(opts, weight is not None),
        )


def ce_finalize(ce: torch.Tensor, z: torch.Tensor, dens: torch.Tensor, *, has_z: bool,
                out_dtype: torch.dtype, mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, z_term)``: the reduced loss (0-d, ``out_dtype``) and z-loss term (0-d fp32) from
    per-row values and the denominators, summed in a fixed order (one program)."""
    device = ce.device
    loss = torch.empty((), dtype=out_dtype, device=device)
    z_term = torch.empty((), dtype=torch.float32, device=device)
    with _guard(device):
        _ce_finalize_kernel[(1,)](ce, z, dens, loss, z_term, ce.shape[0], BLOCK_N=BLOCK_N,
                                  HAS_Z_LOSS=has_z, IS_MEAN=mean, EMULATE_RTNE=INTERPRETED,
                                  num_warps=4)
    return loss, z_term


def denominators(target: torch.Tensor, weight: torch.Tensor | None, opts: Options, *,
                 divisor: torch.Tensor | None, V: int, dtype: torch.dtype) -> torch.Tensor:
    """``(D_ce, D_z)`` of a batch of class-index targets, fp32 on the device, in one launch
    (no host sync): see the kernels' ``_denominators``."""
    target = target.contiguous()
    dens = torch.empty(2, dtype=torch.float32, device=target.device)
    weight = None if weight is None else weight.float().contiguous()
    with _guard(target.device):
        _ce_dens_kernel[(1,)](target, weight if weight is not None else dens,
                              divisor if divisor is not None else dens, dens,
                              target.shape[0], V, opts.ignore_index, opts.inv_divisor,
                              BLOCK_N=BLOCK_N, REDUCTION=_RED[opts.reduction],
                              HAS_WEIGHT=weight is not None, HAS_DIVISOR=divisor is not None,
                              num_warps=4)
    return dens


def scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t *= g`` in place on the device and returns ``t``: ``g`` a 0-d tensor, or one value per
    row of ``t`` (2-D, unit stride along rows). One launch of a few programs per SM; programs
    whose ``g`` are all exactly 1 stop after one read of them, so an upstream gradient of 1 costs
    one small launch and no pass over ``t``."""
    if t.numel() == 0:
        return t
    rows = 1 if g.dim() == 0 else t.shape[0]
    row_len = t.numel() // rows
    if g.dim() == 0 and not t.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor for a scalar g")
    if g.dim() and (t.dim() != 2 or t.stride(1) != 1):
        raise ValueError("scale_ with one g per row needs a 2-D tensor with unit column stride")
    stride_t = row_len if g.dim() == 0 else t.stride(0)
    programs, parts, blocks = scale_grid(rows, row_len, device_spec(t.device))
    with _guard(t.device):
        _scale_kernel[(programs,)](t, g, rows, row_len, blocks, parts, stride_t,
                                   0 if g.dim() == 0 else g.stride(0), BLOCK=SCALE_BLOCK,
                                   EMULATE_RTNE=INTERPRETED, num_warps=SCALE_WARPS)
    return t


# ----------------------------------------------------------------------------------------------
# The Backend entry points (triton_xent.backends.protocol): the plan's overrides from _config, the
# class weights and denominators in fp32 (what the kernels read).
# ----------------------------------------------------------------------------------------------


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
            opts: Options, *, divisor: torch.Tensor | None = None,
            dens: torch.Tensor | None = None, compute_grad: bool, inplace: bool = False,
            grad_target: torch.Tensor | None = None) -> RowOutputs:
    """One process, the whole vocabulary: :func:`ce_forward` with the plan's overrides."""
    if opts.probs or grad_target is not None:
        raise ValueError("class-probability targets run on the torch backend")
    return ce_forward(logits, target, None if weight is None else weight.float(), opts,
                      divisor=divisor, dens=None if dens is None else dens.float(),
                      compute_grad=compute_grad, inplace=inplace, out_dtype=opts.out_dtype,
                      block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS)


def _shard_plan(logits: torch.Tensor, opts: Options, weight) -> Plan:
    N, V_local = logits.shape
    return plan(N, max(V_local, 1), logits.dtype, device_spec(logits.device),
                block_v=_config.TRITON_BLOCK_V, num_splits=_config.TRITON_NUM_SPLITS,
                heavy=heavy_features(opts, weight is not None))


def partials(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             opts: Options, *, offset: int, vocab_size: int):
    """Partials of this shard's columns, ``(NUM_FIELDS, N, S)`` (S chunks per row, from the
    plan) and their argmax columns; the op layer merges them across the ranks."""
    check_logits(logits)
    weight = None if weight is None else weight.float()
    p = _shard_plan(logits, opts, weight)
    return ce_partials(logits, target.contiguous(), weight, opts, splits=p.splits, chunk=p.chunk,
                       block_v=p.block_v, num_warps=p.num_warps, offset=offset,
                       vocab_size=vocab_size)


def finish(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
           opts: Options, merged: torch.Tensor, merged_idx: torch.Tensor | None, *,
           dens: torch.Tensor, rows: tuple | None, grad: torch.Tensor | None, offset: int = 0,
           vocab_size: int | None = None, upstream: torch.Tensor | None = None,
           upstream_lse: torch.Tensor | None = None, upstream_ent: torch.Tensor | None = None,
           skip_unit: bool = True, grad_target: torch.Tensor | None = None) -> None:
    """Row outputs and this shard's gradient from statistics merged over the whole vocabulary
    (``merged`` ``(NUM_FIELDS, N)``); with ``upstream``, the backward's recompute."""
    if opts.probs or grad_target is not None:
        raise ValueError("class-probability targets run on the torch backend")
    check_logits(logits)
    weight = None if weight is None else weight.float()
    p = _shard_plan(logits, opts, weight)
    if _config.TRITON_BLOCK_V is None and p.block_v > FINISH_BLOCK_V:  # see the knob table
        p = p._replace(block_v=FINISH_BLOCK_V, num_warps=_warps_for_block(FINISH_BLOCK_V))
    idx = None if merged_idx is None else merged_idx.reshape(-1, 1).contiguous()
    ce_finish(logits, target.contiguous(), weight, opts,
              merged.float().unsqueeze(-1).contiguous(), idx, P=1, dens=dens.float(),
              splits=p.splits, chunk=p.chunk, block_v=p.block_v, num_warps=p.num_warps,
              rows=rows, grad=grad, upstream=upstream, upstream_lse=upstream_lse,
              upstream_ent=upstream_ent, skip_unit=skip_unit, offset=offset, vocab_size=vocab_size)


def finalize(ce: torch.Tensor, z: torch.Tensor, dens: torch.Tensor, opts: Options
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, z_term)`` from per-row values (:func:`ce_finalize`)."""
    return ce_finalize(ce, z, dens.float(), has_z=opts.z_loss > 0.0, out_dtype=opts.out_dtype,
                       mean=opts.reduction == "mean")


def row_buffers(N: int, device: torch.device, opts: Options, dtype: torch.dtype) -> tuple:
    """``(ce, z, lse, loss_rows, argmax, stats)`` to be filled by :func:`finish`."""
    return _row_buffers(N, device, opts, opts.out_dtype)
