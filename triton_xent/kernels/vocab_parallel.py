"""Triton kernel of the vocabulary-parallel cross-entropy's gradient phase.

Each rank holds columns ``[OFFSET, OFFSET + V_LOCAL)`` of a vocabulary of ``V`` classes. The
statistics phase reuses ``_ce_split_stats_kernel`` of ``kernels/cross_entropy.py`` (partial max,
sum-exp and smoothing sums of vocabulary chunks); the ranks then combine them into the global
``lse``, ``w_t`` and ``W = sum_c w_c`` (``triton_xent/distributed.py``). This kernel writes the
gradient of this rank's columns from those global values, with the formula of the single-process
kernel (``_write_grad_chunk``): only the one-hot term is local, present on the rank that owns the
target column, and the smoothing term divides by the global ``V``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_xent.kernels.cross_entropy import _write_grad_chunk


@triton.jit
def _vp_grad_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, scales_ptr,  # local logits, global targets, local weights
    lse_ptr, w_t_ptr, sum_w_ptr,  # global per-row lse and target weight, global W (one value)
    grad_ptr,
    # shapes
    V_LOCAL, V, OFFSET, CHUNK,  # chunk `split` holds local columns [split * CHUNK, ... + CHUNK)
    # strides (the class dimension is contiguous)
    stride_logits_n, stride_grad_n,
    # scalar options
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Grid (N, S): writes dL/dlogits of one chunk of this rank's columns of one row."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at real sizes
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, V_LOCAL)
    # Ignored and out-of-range rows are decided on the global vocabulary, the same on every rank.
    t = tl.load(target_ptr + row)
    is_ignored = t == ignore_index
    is_invalid = (t != ignore_index) & ((t < 0) | (t >= V))
    # The one-hot column only on the rank that owns it; -1 matches no column elsewhere.
    t_loc = t - OFFSET
    owned = (t != ignore_index) & (t_loc >= 0) & (t_loc < V_LOCAL)
    t_safe = tl.where(owned, t_loc, -1)
    lse = tl.load(lse_ptr + row)
    if HAS_WEIGHT:
        w_t = tl.load(w_t_ptr + row)  # the owner's weight, summed over the ranks
    else:
        w_t = tl.full((), 1.0, tl.float32)
    if HAS_WEIGHT and HAS_SMOOTHING:
        sum_w = tl.load(sum_w_ptr)
    else:
        sum_w = tl.zeros((), tl.float32) + V  # W = V without class weights (unused otherwise)
    # With an in-place gradient grad_ptr == logits_ptr: each block is read before it is written,
    # by this program only (the statistics phase finished before this launch).
    _write_grad_chunk(
        logits_ptr + row * stride_logits_n, grad_ptr + row * stride_grad_n, weight_ptr, scales_ptr,
        start, end, t_safe, is_ignored, is_invalid, lse, w_t, sum_w, V,
        label_smoothing, z_loss, logit_scale, softcap,
        BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SCALE, HAS_SOFTCAP,
    )
