"""Triton kernels for cross-entropy over a large vocabulary, with the gradient in the forward.

Notation, per row ``i`` with target ``t`` (all math in fp32 whatever the logits' dtype):

* ``x = logits[i, :]``, or ``softcap * tanh(logits[i, :] / softcap)`` with a softcap;
* ``lse = log(sum_c exp(x_c))``, by online softmax over vocabulary blocks;
* ``W = sum_c w_c`` and ``S = sum_c w_c * x_c`` (``w_c = 1`` without class weights), for smoothing;
* ``ce = (1 - eps) * w_t * (lse - x_t) + (eps / V) * (lse * W - S)``, ``z = z_loss * lse**2``;
* ``dL/dx_c = p_c * A - ce_scale * (1 - eps) * w_t * [c == t] - ce_scale * (eps / V) * w_c`` with
  ``p = softmax(x)`` and ``A = ce_scale * ((1 - eps) * w_t + (eps / V) * W) + z_scale * 2 * z_loss * lse``,
  times ``1 - tanh(logits_c / softcap)**2`` with a softcap (chain rule back to the raw logits).

Rows whose target is ``ignore_index`` get ``ce = z = 0`` and a zero gradient row; rows whose target is
out of ``[0, V)`` get NaN everywhere (never an out-of-bounds access). ``lse`` is always written.

Two paths, chosen by the launcher (``triton_xent/ops/cross_entropy.py``):

* fused, grid ``(N,)``: ``_ce_fwd_kernel`` sweeps its row once for the statistics, then a second
  time (the row usually comes back from L2) to write the gradient;
* split vocabulary, for few long rows: ``_ce_split_stats_kernel`` grid ``(N, S)`` writes partial
  statistics of each chunk, ``_ce_split_merge_kernel`` grid ``(N,)`` merges them into lse/ce/z, and
  ``_ce_split_grad_kernel`` grid ``(N, S)`` writes the gradient chunks.

The building blocks are ``@triton.jit`` helpers shared by both paths, so each feature lives in one
place and is switched by a constexpr flag (``HAS_WEIGHT``, ``HAS_SMOOTHING``, ``HAS_Z_LOSS``,
``HAS_SOFTCAP``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x_raw, softcap):
    """Returns ``(softcap * tanh(x_raw / softcap), 1 - tanh(x_raw / softcap)**2)`` in fp32."""
    # No tanh in triton.language (and libdevice does not run under the interpreter), so build it
    # from exp. With e = exp(-2|y|) in (0, 1]: tanh|y| = (1 - e) / (1 + e) and
    # sech^2 y = 4e / (1 + e)^2; neither overflows, and tanh(+-inf) = +-1, sech^2(+-inf) = 0.
    # (1 - e) loses relative precision for tiny |y|, where the odd Taylor series is exact to fp32.
    y = x_raw / softcap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    th_big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    th_small = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0)))  # error ~ a^7 < 1e-9 for a < 0.05
    th = tl.where(a < 0.05, th_small, th_big)
    th = tl.where(y < 0.0, -th, th)
    one_plus_e = 1.0 + e
    dcap = 4.0 * e / (one_plus_e * one_plus_e)
    return softcap * th, dcap


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``x -> softcap * tanh(logit_scale * x / softcap)`` (each part optional), in fp32; returns
    ``(x', dx'/dx)`` (the derivative is only meaningful when HAS_SCALE or HAS_SOFTCAP)."""
    if HAS_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        x, dcap = _softcap(x, softcap)
        if HAS_SCALE:
            dcap = dcap * logit_scale
    elif HAS_SCALE:
        dcap = tl.zeros_like(x) + logit_scale
    else:
        dcap = x  # unused; keeps every branch returning a tensor
    return x, dcap


@triton.jit
def _load_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr):
    """Loads one vocabulary block in fp32 (padded lanes = -inf); returns ``(x, dx/dx_raw)``."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    x, dcap = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if HAS_SOFTCAP:
        # tanh(-inf) is finite: mask the padded lanes back to -inf, or they would join the softmax.
        x = tl.where(mask, x, float("-inf"))
    return x, dcap


@triton.jit
def _chunk_stats(
    row_ptr, weight_ptr,  # pointers: this row's logits, class weights
    start, end,  # the columns [start, end) of this row
    logit_scale, softcap,
    BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Online-softmax statistics of columns [start, end): ``(max, sum exp(x - max), S, W)``."""
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.zeros((), tl.float32)  # running sum of exp(x - m)
    sum_wx = tl.zeros((), tl.float32)  # S = sum_c w_c * x_c   (smoothing only)
    sum_w = tl.zeros((), tl.float32)  # W = sum_c w_c         (smoothing with weights only)
    for off in range(start, end, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < end
        x, _ = _load_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        # Online softmax: m' = max(m, max_b x); s' = s * exp(m - m') + sum_b exp(x - m').
        # While every logit so far is -inf, m' = -inf and x - m' would be NaN (-inf - -inf):
        # shift by 0 instead, which gives exp(-inf) = 0 terms and keeps s = 0.
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                # Padded lanes hold x = -inf and w = 0: zero x there, not w * x (0 * -inf = NaN).
                sum_wx += tl.sum(w * tl.where(mask, x, 0.0), axis=0)
                sum_w += tl.sum(w, axis=0)
            else:
                sum_wx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return m, s, sum_wx, sum_w


@triton.jit
def _row_target(target_ptr, row, ignore_index, V):
    """Loads the target of ``row``; returns ``(t_safe, is_ignored, is_invalid)``.

    ``t_safe`` is a column inside [0, V) to gather from whatever the target is: out-of-range targets
    are flagged (their row becomes NaN), never used as an address.
    """
    t = tl.load(target_ptr + row)
    is_ignored = t == ignore_index
    is_invalid = (t != ignore_index) & ((t < 0) | (t >= V))
    t_safe = tl.where(is_ignored | is_invalid, 0, t)
    return t_safe, is_ignored, is_invalid


@triton.jit
def _row_loss(
    row_ptr, weight_ptr, t_safe, is_ignored, is_invalid,
    lse, sum_wx, sum_w, V,
    label_smoothing, z_loss, logit_scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Returns ``(ce, z, w_t)`` of one row from its merged statistics."""
    x_t = tl.load(row_ptr + t_safe).to(tl.float32)  # one gather; t_safe is always in bounds
    x_t, _ = _transform(x_t, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe)
    else:
        w_t = tl.full((), 1.0, tl.float32)
    # -log p_t = lse - x_t; smoothing: -sum_c w_c log p_c / V = (lse * W - S) / V.
    ce = w_t * (lse - x_t)
    if HAS_SMOOTHING:
        ce = (1.0 - label_smoothing) * ce + (label_smoothing / V) * (lse * sum_w - sum_wx)
    if HAS_Z_LOSS:
        z = z_loss * lse * lse
    else:
        z = tl.zeros((), tl.float32)
    ce = tl.where(is_ignored, 0.0, tl.where(is_invalid, float("nan"), ce))
    z = tl.where(is_ignored, 0.0, tl.where(is_invalid, float("nan"), z))
    return ce, z, w_t


@triton.jit
def _write_grad_chunk(
    row_ptr, grad_row_ptr, weight_ptr, scales_ptr,  # pointers
    start, end, t_safe, is_ignored, is_invalid,  # columns [start, end) and the row's target
    lse, w_t, sum_w, V,  # merged row statistics
    label_smoothing, z_loss, logit_scale, softcap,
    BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Writes dL/dlogits for columns [start, end) of one row, given its lse."""
    # Upstream scales live on the device (they hold the mean's denominator): no host sync.
    ce_scale = tl.load(scales_ptr)
    z_scale = tl.load(scales_ptr + 1)
    # Per-row coefficients of g_c = p_c * coef_p - coef_t * [c == t] - coef_w * w_c.
    one_minus_eps = 1.0 - label_smoothing
    coef_p = ce_scale * one_minus_eps * w_t
    if HAS_SMOOTHING:
        coef_p += ce_scale * (label_smoothing / V) * sum_w
    if HAS_Z_LOSS:
        coef_p += z_scale * 2.0 * z_loss * lse  # d(z_loss * lse^2)/dx_c = 2 z_loss lse p_c
    coef_t = ce_scale * one_minus_eps * w_t
    coef_w = ce_scale * (label_smoothing / V)
    # An ignored row's gradient is zero whatever its logits: skip reading them again (masked-off
    # lanes move no data). Where many targets are ignored (prompt tokens) this saves bandwidth.
    read_end = tl.where(is_ignored, start, end)
    for off in range(start, end, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < end
        x, dcap = _load_block(row_ptr, cols, cols < read_end, logit_scale, softcap, HAS_SCALE,
                              HAS_SOFTCAP)
        p = tl.exp(x - lse)
        g = p * coef_p
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= coef_w * tl.load(weight_ptr + cols, mask=mask, other=0.0)
            else:
                g -= coef_w
        # The target column in fp32, before rounding: p_t - 1 cancels badly in bf16.
        g = tl.where(cols == t_safe, g - coef_t, g)
        if HAS_SCALE or HAS_SOFTCAP:
            g *= dcap
        g = tl.where(is_ignored, 0.0, tl.where(is_invalid, float("nan"), g))
        tl.store(grad_row_ptr + cols, g.to(grad_row_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Fused path: one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, scales_ptr,
    ce_ptr, z_ptr, lse_ptr, grad_ptr,
    # shapes
    V,
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
    COMPUTE_GRAD: tl.constexpr,
):
    """One row per program: statistics sweep, losses, then (optionally) a gradient sweep."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at real sizes
    row_ptr = logits_ptr + row * stride_logits_n
    t_safe, is_ignored, is_invalid = _row_target(target_ptr, row, ignore_index, V)

    m, s, sum_wx, sum_w = _chunk_stats(
        row_ptr, weight_ptr, 0, V, logit_scale, softcap, BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE,
        HAS_SOFTCAP,
    )
    lse = m + tl.log(s)
    if not HAS_WEIGHT:
        sum_w = tl.zeros((), tl.float32) + V  # W = V without class weights
    ce, z, w_t = _row_loss(
        row_ptr, weight_ptr, t_safe, is_ignored, is_invalid, lse, sum_wx, sum_w, V,
        label_smoothing, z_loss, logit_scale, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SCALE,
        HAS_SOFTCAP,
    )
    tl.store(ce_ptr + row, ce)
    tl.store(z_ptr + row, z)
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        # Second sweep; with an in-place gradient grad_ptr == logits_ptr, and each block is read
        # before it is overwritten, by this program only.
        _write_grad_chunk(
            row_ptr, grad_ptr + row * stride_grad_n, weight_ptr, scales_ptr,
            0, V, t_safe, is_ignored, is_invalid, lse, w_t, sum_w, V,
            label_smoothing, z_loss, logit_scale, softcap,
            BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SCALE, HAS_SOFTCAP,
        )


# ----------------------------------------------------------------------------------------------
# Split-vocabulary path: S programs per row, for few long rows
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_split_stats_kernel(
    # pointers
    logits_ptr, weight_ptr,
    part_max_ptr, part_sum_ptr, part_swx_ptr, part_w_ptr,  # (N, S) fp32 partials
    # shapes
    V, CHUNK,  # chunk `split` holds columns [split * CHUNK, min((split + 1) * CHUNK, V))
    # strides
    stride_logits_n, stride_part_n,
    # scalar options
    logit_scale, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Grid (N, S): online-softmax partials of one vocabulary chunk of one row."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, V)
    m, s, sum_wx, sum_w = _chunk_stats(
        logits_ptr + row * stride_logits_n, weight_ptr, start, end, logit_scale, softcap,
        BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP,
    )
    part = row * stride_part_n + split
    tl.store(part_max_ptr + part, m)
    tl.store(part_sum_ptr + part, s)
    if HAS_SMOOTHING:
        tl.store(part_swx_ptr + part, sum_wx)
        if HAS_WEIGHT:
            tl.store(part_w_ptr + part, sum_w)


@triton.jit
def _merged_sum_w(part_w_ptr, part, split_mask, V, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """W = sum_c w_c of a row from its chunk partials (V without weights; unused without smoothing)."""
    if HAS_WEIGHT and HAS_SMOOTHING:
        sum_w = tl.sum(tl.load(part_w_ptr + part, mask=split_mask, other=0.0), axis=0)
    else:
        sum_w = tl.zeros((), tl.float32) + V
    return sum_w


@triton.jit
def _ce_split_merge_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr,
    part_max_ptr, part_sum_ptr, part_swx_ptr, part_w_ptr,
    ce_ptr, z_ptr, lse_ptr,
    # shapes
    V, NUM_SPLITS,
    # strides
    stride_logits_n, stride_part_n,
    # scalar options
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    # meta-parameters
    SPLIT_BLOCK: tl.constexpr,  # next power of two >= NUM_SPLITS
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Grid (N,): merges a row's chunk partials into lse, then its ce and z."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLIT_BLOCK)
    split_mask = splits < NUM_SPLITS
    part = row * stride_part_n + splits
    # Log-sum-exp merge: lse = M + log(sum_k s_k * exp(m_k - M)), M = max_k m_k; the same -inf
    # guard as the online softmax (a chunk, or the whole row, may be all -inf).
    part_max = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0)
    m = tl.max(part_max, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.sum(part_sum * tl.exp(part_max - m_ref), axis=0))
    if HAS_SMOOTHING:
        sum_wx = tl.sum(tl.load(part_swx_ptr + part, mask=split_mask, other=0.0), axis=0)
    else:
        sum_wx = tl.zeros((), tl.float32)
    sum_w = _merged_sum_w(part_w_ptr, part, split_mask, V, HAS_WEIGHT, HAS_SMOOTHING)

    t_safe, is_ignored, is_invalid = _row_target(target_ptr, row, ignore_index, V)
    ce, z, _ = _row_loss(
        logits_ptr + row * stride_logits_n, weight_ptr, t_safe, is_ignored, is_invalid,
        lse, sum_wx, sum_w, V, label_smoothing, z_loss, logit_scale, softcap,
        HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SCALE, HAS_SOFTCAP,
    )
    tl.store(ce_ptr + row, ce)
    tl.store(z_ptr + row, z)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_split_grad_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, scales_ptr, lse_ptr, part_w_ptr, grad_ptr,
    # shapes
    V, CHUNK, NUM_SPLITS,
    # strides
    stride_logits_n, stride_grad_n, stride_part_n,
    # scalar options
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Grid (N, S): writes the gradient of one vocabulary chunk of one row, from the merged lse."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, V)
    t_safe, is_ignored, is_invalid = _row_target(target_ptr, row, ignore_index, V)
    lse = tl.load(lse_ptr + row)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe)
    else:
        w_t = tl.full((), 1.0, tl.float32)
    splits = tl.arange(0, SPLIT_BLOCK)
    sum_w = _merged_sum_w(
        part_w_ptr, row * stride_part_n + splits, splits < NUM_SPLITS, V, HAS_WEIGHT, HAS_SMOOTHING
    )
    # In place, grad_ptr == logits_ptr: this program reads and writes only its own chunk, and the
    # merge kernel (which gathers x_t) has finished before this launch.
    _write_grad_chunk(
        logits_ptr + row * stride_logits_n, grad_ptr + row * stride_grad_n, weight_ptr, scales_ptr,
        start, end, t_safe, is_ignored, is_invalid, lse, w_t, sum_w, V,
        label_smoothing, z_loss, logit_scale, softcap,
        BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SCALE, HAS_SOFTCAP,
    )
