"""Launchers of the two local phases of the vocabulary-parallel cross-entropy (Triton backend).

Plain torch functions, no communication and no autograd, testable alone:

* ``vp_local_stats``: per row, the log-sum-exp of this rank's columns and the smoothing sum
  ``sum_c w_c x_c`` (after ``softcap``), from the split statistics kernel of the single-process
  path (grid ``(N, S)``) and a tiny merge of its ``(N, S)`` partials;
* ``vp_shard_grad``: dL/dlogits of this rank's columns, given the global per-row statistics.

Block sizes and splits follow the single-process launcher's tables (``ops/cross_entropy.py``).
"""

from __future__ import annotations

import contextlib

import torch
import triton

from triton_xent.kernels.cross_entropy import _ce_split_stats_kernel
from triton_xent.kernels.vocab_parallel import _vp_grad_kernel
from triton_xent.ops.cross_entropy import (
    _CHUNK_ALIGN,
    _INTERPRETED,
    _auto_num_splits,
    _block_v_and_warps,
)

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(
            f"logits must be a 2-D float32/float16/bfloat16 tensor, got {logits.dtype} "
            f"{tuple(logits.shape)}."
        )
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have stride(1) == 1, got strides {logits.stride()}.")
    if logits.shape[1] >= 2**30:
        raise ValueError(f"V_local = {logits.shape[1]} is too large for int32 column offsets.")
    if logits.device.type == "cpu" and not _INTERPRETED:
        raise ValueError("logits is on the CPU: the Triton kernels need a GPU tensor or TRITON_INTERPRET=1.")


def _chunks(N: int, V_local: int, device: torch.device, num_splits: int | None) -> tuple[int, int]:
    """``(CHUNK, S)``: S chunks of CHUNK columns (a multiple of 16) cover the row."""
    if num_splits is None:
        num_splits = _auto_num_splits(N, V_local, device)
    chunk = triton.cdiv(triton.cdiv(V_local, num_splits), _CHUNK_ALIGN) * _CHUNK_ALIGN
    return chunk, triton.cdiv(V_local, chunk)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def vp_local_stats(
    logits: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    label_smoothing: float,
    softcap: float | None,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local statistics of this rank's columns.

    Args:
        logits: ``(N, V_local)``, ``V_local >= 1``, float32/float16/bfloat16, ``stride(1) == 1``.
        weight: ``(V_local,)`` float32 class weights of this shard, or None (read for smoothing).
        label_smoothing: the smoothing sum is computed only when it is positive.
        softcap: applied to the logits first, or None.
        block_v, num_splits: force the block and the number of chunks per row (tests).

    Returns:
        ``lse_local`` float32 ``(N,)`` (``-inf`` for a row of ``-inf``), and ``sum_c w_c x_c``
        float32 ``(N,)`` with smoothing, else None.
    """
    _check_logits(logits)
    N, V_local = logits.shape
    device = logits.device
    smoothing = float(label_smoothing) > 0.0
    CHUNK, S = _chunks(N, V_local, device, num_splits)
    BLOCK_V, num_warps = _block_v_and_warps(V_local, logits.dtype, _INTERPRETED)
    if block_v is not None:
        BLOCK_V = block_v
    part_max = torch.empty((N, S), dtype=torch.float32, device=device)
    part_sum = torch.empty((N, S), dtype=torch.float32, device=device)
    part_swx = torch.empty((N, S), dtype=torch.float32, device=device) if smoothing else part_max
    has_weight = weight is not None and smoothing  # the weights enter the statistics only here
    weight_arg = weight.contiguous() if has_weight else part_max
    # The kernel also writes partial sums of the weights with them (W is summed in torch instead).
    part_w = torch.empty((N, S), dtype=torch.float32, device=device) if has_weight else part_max
    if N:
        with _device_guard(device):
            _ce_split_stats_kernel[(N, S)](
                logits, weight_arg,
                part_max, part_sum, part_swx, part_w,
                V_local, CHUNK,
                logits.stride(0), S,
                1.0, 1.0 if softcap is None else float(softcap),
                BLOCK_V=BLOCK_V, HAS_WEIGHT=has_weight, HAS_SMOOTHING=smoothing,
                HAS_SCALE=False, HAS_SOFTCAP=softcap is not None,
                num_warps=num_warps,
            )
    # Log-sum-exp merge of the chunks, with the -inf guard of the kernels.
    m = part_max.amax(1, keepdim=True)
    m_ref = torch.where(m == float("-inf"), 0.0, m)
    lse = (m + (part_sum * torch.exp(part_max - m_ref)).sum(1, keepdim=True).log()).squeeze(1)
    return lse, part_swx.sum(1) if smoothing else None


def vp_shard_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    lse: torch.Tensor,
    w_t: torch.Tensor | None,
    sum_w: torch.Tensor | None,
    *,
    offset: int,
    vocab_size: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    inplace: bool,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """dL/dlogits of this rank's columns ``[offset, offset + V_local)``.

    Args:
        logits: ``(N, V_local)`` as for :func:`vp_local_stats`.
        target: ``(N,)`` int64 global class ids.
        weight: ``(V_local,)`` float32 weights of this shard, or None.
        scales: ``(2,)`` float32 ``[ce_scale, z_scale]`` on the device.
        lse: ``(N,)`` float32 global log-sum-exp.
        w_t: ``(N,)`` float32 weight of each row's target (from its owner), with ``weight``.
        sum_w: ``(1,)`` float32 global ``sum_c w_c``, with ``weight`` and smoothing.
        offset, vocab_size: this shard's first class id and the global V.
        inplace: write the gradient over ``logits`` and return it.

    Returns:
        The gradient, ``(N, V_local)`` in the logits' dtype.
    """
    _check_logits(logits)
    N, V_local = logits.shape
    device = logits.device
    grad = logits if inplace else torch.empty((N, V_local), dtype=logits.dtype, device=device)
    if N == 0 or V_local == 0:
        return grad
    CHUNK, S = _chunks(N, V_local, device, num_splits)
    BLOCK_V, num_warps = _block_v_and_warps(V_local, logits.dtype, _INTERPRETED)
    if block_v is not None:
        BLOCK_V = block_v
    has_weight = weight is not None
    smoothing = float(label_smoothing) > 0.0
    lse = lse.float().contiguous()
    with _device_guard(device):
        _vp_grad_kernel[(N, S)](
            logits, target.contiguous(), weight.contiguous() if has_weight else scales,
            scales.float().contiguous(),
            lse, w_t.float().contiguous() if has_weight else lse,
            sum_w.float().contiguous() if (has_weight and smoothing) else lse,
            grad,
            V_local, vocab_size, offset, CHUNK,
            logits.stride(0), grad.stride(0),
            ignore_index, float(label_smoothing), float(z_loss),
            1.0, 1.0 if softcap is None else float(softcap),
            BLOCK_V=BLOCK_V, HAS_WEIGHT=has_weight, HAS_SMOOTHING=smoothing,
            HAS_Z_LOSS=float(z_loss) > 0.0, HAS_SCALE=False, HAS_SOFTCAP=softcap is not None,
            num_warps=num_warps,
        )
    return grad
