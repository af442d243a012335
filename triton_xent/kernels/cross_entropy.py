"""Triton kernels for cross-entropy over a large vocabulary: partials -> merge -> gradient.

Notation, per row ``i`` with target ``t`` (all math in fp32 whatever the logits' dtype):

* ``x = logits[i, :]``, transformed to ``softcap * tanh(logit_scale * x / softcap)`` when asked;
* the row's statistics, as partials over any set of columns (a block, a chunk of a row, a rank's
  shard of the vocabulary): ``m = max_c x_c``, ``s = sum_c exp(x_c - m)``,
  ``T = sum_c w_c (m - x_c)`` and ``W = sum_c w_c`` (smoothing; ``w_c = 1`` without class
  weights), ``x_t`` and ``w_t`` (from the part that holds the target column, zero elsewhere);
* merged over parts with the log-sum-exp merge: ``M = max_k m_k``, ``s = sum_k s_k exp(m_k - M)``,
  ``T = sum_k T_k + W_k (M - m_k)``, ``W``, ``x_t`` and ``w_t`` summed (online softmax,
  arXiv 1805.02867, is the same merge one block at a time);
* ``ce = (1 - eps) w_t ((M - x_t) + log s) + (eps / V) (T + W log s)`` and ``z = z_loss lse**2``
  with ``lse = M + log s``: the maximum is subtracted before anything is added, so a row of equal
  large logits (all -1e9) gives ``log V`` exactly, where ``lse - x_t`` would round to 0 (label
  smoothing as in arXiv 1512.00567 and PyTorch; z-loss as in PaLM);
* ``dL/dx_c = g [p_c A - ce_scale (1 - eps) w_t [c == t] - ce_scale (eps / V) w_c] + g_lse p_c``
  with ``p_c = exp(x_c - M) / s``, ``A = ce_scale ((1 - eps) w_t + (eps / V) W)
  + z_scale 2 z_loss lse``, the upstream gradients ``g`` (of the loss) and ``g_lse`` (of the
  aux lse), times ``dx/dx_raw`` (logit scale, softcap) back to the raw logits. ``ce_scale`` and
  ``z_scale`` are ``1 / D`` for the reduction's denominators ``D`` (the kept targets' summed
  weights and the kept rows for a mean; a divisor, or 1, for a sum).

Rows whose target is ``ignore_index`` get ``ce = z = 0`` and a zero gradient row (their logits are
not read unless their lse is asked for); rows whose target is out of ``[0, V)`` get NaN, never an
out-of-bounds access.

Kernels, chosen by the launcher (``triton_xent/ops/cross_entropy.py``, one plan function):

* ``_ce_fused_kernel``, persistent grid: one program per SM or so walks rows. A row that fits one
  block is read once into registers and its statistics, loss and gradient come from that copy
  (4 B per bf16 logit with the gradient write); longer rows are swept twice, the second sweep
  right after the first so it hits L2 (``evict_last`` then ``evict_first``);
* ``_ce_partials_kernel``, grid ``N * S (+ 1)``: partial statistics of each vocabulary chunk (the
  split path for few long rows, and each rank's shard for vocabulary parallelism); the extra
  program computes the reduction's denominators;
* ``_ce_finish_kernel``, grid ``N * S``: merges a row's partials (``P`` of them: ``S`` chunks, or
  one set already merged across ranks), writes the row's loss (chunk 0) and its chunk of the
  gradient. With an upstream gradient it is also the backward's recompute: rows whose upstream is
  exactly 1 (and whose lse carries no gradient) are skipped, so ``loss.backward()`` costs nothing;
* ``_ce_finalize_kernel``, one program: the reduced loss from the per-row values, in a fixed order
  (deterministic), cast to the output dtype;
* ``_scale_kernel``: ``t *= g`` in place unless ``g == 1`` (the backward of an in-place gradient,
  and of the fused linear head's dX/dW/db).

Every feature is one ``@triton.jit`` helper switched by a constexpr flag (``HAS_WEIGHT``,
``HAS_SMOOTHING``, ``HAS_Z_LOSS``, ``HAS_SCALE``, ``HAS_SOFTCAP``, ...), shared by all kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Reductions (constexpr REDUCTION).
RED_NONE = tl.constexpr(0)
RED_SUM = tl.constexpr(1)
RED_MEAN = tl.constexpr(2)

# Fields of a statistics buffer, field-major: ``stats[f * stride_f + row * P + part]``.
F_M = tl.constexpr(0)  # max
F_S = tl.constexpr(1)  # sum of exp(x - max)
F_T = tl.constexpr(2)  # sum_c w_c (max - x_c)        (smoothing)
F_W = tl.constexpr(3)  # sum_c w_c                    (smoothing)
F_XT = tl.constexpr(4)  # target logit, from its owner
F_WT = tl.constexpr(5)  # target weight, from its owner (class weights)
NUM_FIELDS = 6


# ----------------------------------------------------------------------------------------------
# Elementwise helpers
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
def _load_x(ptrs, mask, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            EVICT: tl.constexpr):
    """Loads logits in fp32 (masked lanes = -inf) and transforms them; returns ``(x, dx/dx_raw)``."""
    x = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    x, dcap = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if HAS_SOFTCAP:
        # tanh(-inf) is finite: mask the padded lanes back to -inf, or they would join the softmax.
        x = tl.where(mask, x, float("-inf"))
    return x, dcap


@triton.jit
def _round_store(ptrs, value, mask, EMULATE_RTNE: tl.constexpr, EVICT: tl.constexpr):
    """Stores fp32 ``value`` in the pointer's dtype, rounded to nearest even.

    A GPU rounds fp32 -> bf16 to nearest even; the interpreter truncates. Under the interpreter
    (``EMULATE_RTNE``) the rounding is done on the bits, so CPU tests see the GPU's values.
    """
    dt: tl.constexpr = ptrs.dtype.element_ty
    if EMULATE_RTNE and dt == tl.bfloat16:
        b = value.to(tl.uint32, bitcast=True)
        r = b + 0x7FFF + ((b >> 16) & 1)
        r = tl.where(value != value, b | 0x400000, r)  # a NaN stays a (quiet) NaN
        out = (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = value.to(dt)
    tl.store(ptrs, out, mask=mask, eviction_policy=EVICT)


# ----------------------------------------------------------------------------------------------
# Row helpers: target, denominators, statistics, merge, loss, gradient
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_target(target_ptr, row, ignore_index, V, OFFSET, V_LOCAL):
    """Loads the target of ``row``; returns ``(t_local, is_ignored, is_invalid)``.

    ``t_local`` is the target's column among this part's ``V_LOCAL`` columns (which start at the
    global class ``OFFSET``), or -1 where this part does not hold it: a bad target is never used
    as an address. Ignored and invalid are decided on the global ``V``.
    """
    t = tl.load(target_ptr + row)
    is_ignored = t == ignore_index
    is_invalid = (t != ignore_index) & ((t < 0) | (t >= V))
    t_loc = t - OFFSET
    owned = (~is_ignored) & (~is_invalid) & (t_loc >= 0) & (t_loc < V_LOCAL)
    return tl.where(owned, t_loc, -1).to(tl.int32), is_ignored, is_invalid


@triton.jit
def _denominators(target_ptr, weight_ptr, divisor_ptr, N, V, ignore_index, inv_divisor,
                  REDUCTION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """``(D_ce, D_z)``: the loss is ``sum ce / D_ce + sum z / D_z``.

    A mean divides by the kept targets' summed class weights (PyTorch's weighted mean) and by the
    kept rows (the z-loss); a sum by its divisor (a device scalar, or ``1 / inv_divisor``), or 1.
    """
    if REDUCTION == RED_MEAN:
        n_kept = tl.zeros((), tl.float32)
        w_kept = tl.zeros((), tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            t = tl.load(target_ptr + offs, mask=offs < N, other=ignore_index)
            keep = (offs < N) & (t != ignore_index)
            n_kept += tl.sum(keep.to(tl.float32), axis=0)
            if HAS_WEIGHT:
                ok = keep & (t >= 0) & (t < V)
                w_kept += tl.sum(tl.load(weight_ptr + tl.where(ok, t, 0), mask=ok, other=0.0), axis=0)
        if not HAS_WEIGHT:
            w_kept = n_kept
        return w_kept, n_kept
    elif HAS_DIVISOR:
        d = tl.load(divisor_ptr).to(tl.float32)
        return d, d
    else:
        d = 1.0 / inv_divisor
        return tl.zeros((), tl.float32) + d, tl.zeros((), tl.float32) + d


@triton.jit
def _stats_update(x, cols, mask, w, m, s, T, W, mref,
                  HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Online softmax: folds one block ``x`` (fp32, -inf on masked lanes) into the running
    ``(m, s, T, W)``; ``mref`` is the running shift (``m``, or 0 while every logit is -inf)."""
    # m' = max(m, max_b x); s' = s exp(mref - mref') + sum_b exp(x - mref'). While every logit so
    # far is -inf, m' = -inf and x - m' would be NaN: shift by 0 instead (exp(-inf) = 0, s = 0).
    m_new = tl.maximum(m, tl.max(x, axis=0))
    mref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    # exp(m - mref'), not exp(mref - mref'): while m = -inf (s = 0) the factor must be 0, not
    # exp(0 - (-1e9)) = inf.
    s = s * tl.exp(m - mref_new) + tl.sum(tl.exp(x - mref_new), axis=0)
    if HAS_SMOOTHING:
        # T = sum_c w_c (mref - x_c) follows the shift: T' = T + W (mref' - mref) + sum_b ...
        # Masked lanes add nothing (w * (mref - (-inf)) would be NaN there); an infinite T (a -inf
        # logit with weight) stays infinite.
        if HAS_WEIGHT:
            wb = w
        else:
            wb = mask.to(tl.float32)
        shift = tl.where((W == 0.0) | (T == float("inf")), 0.0, W * (mref_new - mref))
        T = T + shift + tl.sum(tl.where(mask, wb * (mref_new - x), 0.0), axis=0)
        W = W + tl.sum(wb, axis=0)
    return m_new, s, T, W, mref_new


@triton.jit
def _argmax_update(x, cols, m_old, idx):
    """Tracks the first column of the row maximum alongside the online max."""
    b_max = tl.max(x, axis=0)
    b_idx = tl.min(tl.where(x == b_max, cols, 2147483647), axis=0)  # first maximal column
    return tl.where(b_max > m_old, b_idx, idx)


@triton.jit
def _part_stats(row_ptr, weight_ptr, start, end, t_loc, logit_scale, softcap,
                BLOCK_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ARGMAX: tl.constexpr,
                EVICT: tl.constexpr):
    """Partial statistics of columns ``[start, end)`` of one row, block by block.

    Returns ``(m, s, T, W, x_t, w_t, argmax)``; ``x_t``, ``w_t`` are zero unless ``t_loc`` (the
    target's column, or -1) lies in the range, where they are gathered with one load each.
    """
    m = tl.full((), float("-inf"), tl.float32)
    mref = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    T = tl.zeros((), tl.float32)
    W = tl.zeros((), tl.float32)
    idx = tl.zeros((), tl.int32) + start
    for off in range(start, end, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < end
        x, _ = _load_x(row_ptr + cols, mask, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, EVICT)
        w = x  # unused without class weights
        if HAS_WEIGHT and HAS_SMOOTHING:
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        if HAS_ARGMAX:
            idx = _argmax_update(x, cols, m, idx)
        m, s, T, W, mref = _stats_update(x, cols, mask, w, m, s, T, W, mref, HAS_WEIGHT,
                                         HAS_SMOOTHING)
    here = (t_loc >= start) & (t_loc < end)
    t_safe = tl.where(here, t_loc, start)
    x_t = tl.load(row_ptr + t_safe, mask=here, other=0.0).to(tl.float32)
    x_t, _ = _transform(x_t, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    x_t = tl.where(here, x_t, 0.0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe, mask=here, other=0.0)
    else:
        w_t = here.to(tl.float32)
    return m, s, T, W, x_t, w_t, idx


@triton.jit
def _merge_parts(stats_ptr, stride_f, base, part_mask, parts,
                 HAS_SMOOTHING: tl.constexpr, NEED_T: tl.constexpr):
    """Log-sum-exp merge of the partials stored at ``stats_ptr + f * stride_f + base + k``.

    Returns ``(M, s, T, W)``; ``W`` only with smoothing and ``T`` only when ``NEED_T`` too (zero
    otherwise): each program reads only the fields it uses.
    """
    ptr = stats_ptr + base + parts
    m_k = tl.load(ptr + F_M * stride_f, mask=part_mask, other=float("-inf"))
    s_k = tl.load(ptr + F_S * stride_f, mask=part_mask, other=0.0)
    M = tl.max(m_k, axis=0)
    mref = tl.where(M == float("-inf"), 0.0, M)
    mref_k = tl.where(m_k == float("-inf"), 0.0, m_k)
    s = tl.sum(s_k * tl.exp(m_k - mref), axis=0)  # an all -inf part: exp(-inf) = 0
    T = tl.zeros((), tl.float32)
    W = tl.zeros((), tl.float32)
    if HAS_SMOOTHING:
        W_k = tl.load(ptr + F_W * stride_f, mask=part_mask, other=0.0)
        W = tl.sum(W_k, axis=0)
        if NEED_T:
            T_k = tl.load(ptr + F_T * stride_f, mask=part_mask, other=0.0)
            # A part whose W_k is 0 adds nothing, also when its shift is -inf (no 0 * inf).
            T = tl.sum(T_k + tl.where(W_k == 0.0, 0.0, W_k * (mref - mref_k)), axis=0)
    return M, s, T, W


@triton.jit
def _sum_field(stats_ptr, stride_f, base, part_mask, parts, FIELD: tl.constexpr):
    """Sum of one field over a row's partials (x_t and w_t: only their owner's is non-zero)."""
    return tl.sum(tl.load(stats_ptr + FIELD * stride_f + base + parts, mask=part_mask, other=0.0),
                  axis=0)


@triton.jit
def _row_loss(M, s, T, W, x_t, w_t, is_ignored, is_invalid, V, label_smoothing, z_loss,
              HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """``(ce, z, lse)`` of a row from its merged statistics (max subtracted first)."""
    mref = tl.where(M == float("-inf"), 0.0, M)
    log_s = tl.log(s)
    lse = M + log_s
    ce = w_t * ((mref - x_t) + log_s)
    if HAS_SMOOTHING:
        ce = (1.0 - label_smoothing) * ce + (label_smoothing / V) * (T + W * log_s)
    if HAS_Z_LOSS:
        z = z_loss * lse * lse
    else:
        z = tl.zeros((), tl.float32)
    ce = tl.where(is_ignored, 0.0, tl.where(is_invalid, float("nan"), ce))
    z = tl.where(is_ignored, 0.0, tl.where(is_invalid, float("nan"), z))
    return ce, z, lse


@triton.jit
def _grad_coefs(D_ce, D_z, w_t, W, lse, g, g_lse, is_ignored, V, label_smoothing, z_loss,
                HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """Per-row coefficients of ``dL/dx_c = p_c coef_p - coef_t [c == t] - coef_w w_c``. An
    ignored row has no loss terms (only the aux lse's ``g_lse p_c``)."""
    ce_scale = tl.where(is_ignored, 0.0, g / D_ce)
    one_minus_eps = 1.0 - label_smoothing
    coef_t = ce_scale * one_minus_eps * w_t
    coef_p = coef_t + g_lse
    coef_w = ce_scale * 0.0
    if HAS_SMOOTHING:
        coef_w = ce_scale * (label_smoothing / V)
        coef_p += coef_w * W
    if HAS_Z_LOSS:
        # d(z_loss lse^2)/dx_c = 2 z_loss lse p_c
        coef_p += tl.where(is_ignored, 0.0, g / D_z) * 2.0 * z_loss * lse
    return coef_p, coef_t, coef_w


@triton.jit
def _grad_block(x, dcap, cols, mask, w, t_loc, mref, inv_s, coef_p, coef_t, coef_w,
                zero_row, is_invalid,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr):
    """dL/dx_raw of one block of a row (fp32)."""
    p = tl.exp(x - mref) * inv_s
    g = p * coef_p
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= coef_w * w
        else:
            g -= coef_w
    # The target column in fp32, before rounding: p_t - 1 cancels badly in bf16.
    g = tl.where(cols == t_loc, g - coef_t, g)
    if HAS_SCALE or HAS_SOFTCAP:
        g *= dcap
    return tl.where(zero_row, 0.0, tl.where(is_invalid, float("nan"), g))


@triton.jit
def _write_grad(row_ptr, grad_row_ptr, weight_ptr, start, end, t_loc, zero_row, is_invalid,
                mref, inv_s, coef_p, coef_t, coef_w, logit_scale, softcap,
                BLOCK_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Gradient sweep over columns ``[start, end)``: reads each block once, writes it once.

    A ``zero_row`` (ignored, and no aux lse gradient) gets zeros whatever its logits: they are
    not read (masked-off lanes move no data). With an in-place gradient
    ``grad_row_ptr == row_ptr``: each block is read before it is written, by this program only.
    """
    read_end = tl.where(zero_row, start, end)
    for off in range(start, end, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < end
        x, dcap = _load_x(row_ptr + cols, cols < read_end, logit_scale, softcap, HAS_SCALE,
                          HAS_SOFTCAP, "evict_first")
        w = x
        if HAS_WEIGHT and HAS_SMOOTHING:
            w = tl.load(weight_ptr + cols, mask=tl.where(zero_row, False, mask), other=0.0)
        g = _grad_block(x, dcap, cols, mask, w, t_loc, mref, inv_s, coef_p, coef_t, coef_w,
                        zero_row, is_invalid, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP)
        _round_store(grad_row_ptr + cols, g, mask, EMULATE_RTNE, "evict_first")


@triton.jit
def _store_row(row, ce, z, lse, M, s, T, W, x_t, w_t, idx,
               ce_ptr, z_ptr, lse_ptr, stats_ptr, stride_stats_f, argmax_ptr, loss_rows_ptr,
               REDUCTION: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_ARGMAX: tl.constexpr,
               WRITE_STATS: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Per-row outputs: ce and z (fp32, summed by the finalize kernel), lse, the loss row in the
    output dtype (``"none"``), the argmax, and the merged statistics a backward recompute needs."""
    tl.store(ce_ptr + row, ce)
    tl.store(z_ptr + row, z)
    tl.store(lse_ptr + row, lse)
    if REDUCTION == RED_NONE:
        total = ce
        if HAS_Z_LOSS:
            total = ce + z
        _round_store(loss_rows_ptr + row, total, True, EMULATE_RTNE, "")
    if HAS_ARGMAX:
        tl.store(argmax_ptr + row, idx.to(tl.int64))
    if WRITE_STATS:
        tl.store(stats_ptr + F_M * stride_stats_f + row, M)
        tl.store(stats_ptr + F_S * stride_stats_f + row, s)
        tl.store(stats_ptr + F_T * stride_stats_f + row, T)
        tl.store(stats_ptr + F_W * stride_stats_f + row, W)
        tl.store(stats_ptr + F_XT * stride_stats_f + row, x_t)
        tl.store(stats_ptr + F_WT * stride_stats_f + row, w_t)


# ----------------------------------------------------------------------------------------------
# Fused path: one program walks whole rows (merge: none)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_fused_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, divisor_ptr, dens_ptr,
    ce_ptr, z_ptr, lse_ptr, stats_ptr, argmax_ptr, loss_rows_ptr, grad_ptr,
    # shapes
    N, V,
    # strides (the class dimension is contiguous)
    stride_logits_n, stride_grad_n, stride_stats_f,
    # scalar options
    ignore_index, label_smoothing, z_loss, logit_scale, softcap, inv_divisor,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_V >= V: the row is read once, into registers
    REDUCTION: tl.constexpr,
    DENS_FROM_PTR: tl.constexpr,  # read (D_ce, D_z) from dens_ptr instead of computing them
    HAS_DIVISOR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ALL_ROWS: tl.constexpr,  # read ignored rows too (their lse is asked for)
    WRITE_STATS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Persistent grid: program ``pid`` handles rows ``pid, pid + nprog, ...``: statistics, loss
    and (optionally) gradient of each, with the reduction's denominators computed up front (every
    program reads the targets once: no extra launch, no host sync)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if DENS_FROM_PTR:
        D_ce = tl.load(dens_ptr)
        D_z = tl.load(dens_ptr + 1)
    else:
        D_ce, D_z = _denominators(target_ptr, weight_ptr, divisor_ptr, N, V, ignore_index,
                                  inv_divisor, REDUCTION, HAS_WEIGHT, HAS_DIVISOR, BLOCK_N)
        if pid == 0:  # kept for the finalize kernel and a backward recompute
            tl.store(dens_ptr, D_ce)
            tl.store(dens_ptr + 1, D_z)
    if HAS_WEIGHT and HAS_SMOOTHING:
        W_all = tl.zeros((), tl.float32)  # sum of the class weights, once per program
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            W_all += tl.sum(tl.load(weight_ptr + cols, mask=cols < V, other=0.0), axis=0)
    for row in range(pid, N, nprog):
        row64 = tl.zeros((), tl.int64) + row  # int64: row * stride passes 2**31 at real sizes
        row_ptr = logits_ptr + row64 * stride_logits_n
        t_loc, is_ignored, is_invalid = _row_target(target_ptr, row64, ignore_index, V, 0, V)
        # Ignored rows are not read (zero loss and gradient) unless their lse is asked for.
        read = ~is_ignored
        if ALL_ROWS:
            read = read | is_ignored
        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK_V)
            mask = cols < V
            # (tl.where, not &: a block mask & a row scalar must broadcast to bool everywhere)
            x, dcap = _load_x(row_ptr + cols, tl.where(read, mask, False), logit_scale, softcap,
                              HAS_SCALE, HAS_SOFTCAP, "")
            w = x
            if HAS_WEIGHT and HAS_SMOOTHING:
                w = tl.load(weight_ptr + cols, mask=tl.where(read, mask, False), other=0.0)
            M = tl.max(x, axis=0)
            mref = tl.where(M == float("-inf"), 0.0, M)
            e = tl.exp(x - mref)
            s = tl.sum(e, axis=0)
            T = tl.zeros((), tl.float32)
            W = tl.zeros((), tl.float32) + V
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    wb = w
                    W = W_all
                else:
                    wb = mask.to(tl.float32)
                T = tl.sum(tl.where(mask, wb * (mref - x), 0.0), axis=0)
            x_t = tl.sum(tl.where(cols == t_loc, x, 0.0), axis=0)
            idx = tl.zeros((), tl.int32)
            if HAS_ARGMAX:
                idx = tl.min(tl.where(x == M, cols, 2147483647), axis=0)
        else:
            M, s, T, W, x_t, _, idx = _part_stats(
                row_ptr, weight_ptr, 0, tl.where(read, V, 0), t_loc, logit_scale, softcap,
                BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, HAS_ARGMAX,
                "evict_last")
            if not HAS_SMOOTHING or not HAS_WEIGHT:
                W = tl.zeros((), tl.float32) + V
            else:
                W = W_all
            mref = tl.where(M == float("-inf"), 0.0, M)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + tl.maximum(t_loc, 0), mask=t_loc >= 0, other=0.0)
        else:
            w_t = (t_loc >= 0).to(tl.float32)
        ce, z, lse = _row_loss(M, s, T, W, x_t, w_t, is_ignored, is_invalid, V, label_smoothing,
                               z_loss, HAS_SMOOTHING, HAS_Z_LOSS)
        _store_row(row64, ce, z, lse, M, s, T, W, x_t, w_t, idx, ce_ptr, z_ptr, lse_ptr,
                   stats_ptr, stride_stats_f, argmax_ptr, loss_rows_ptr, REDUCTION, HAS_Z_LOSS,
                   HAS_ARGMAX, WRITE_STATS, EMULATE_RTNE)
        if COMPUTE_GRAD:
            coef_p, coef_t, coef_w = _grad_coefs(D_ce, D_z, w_t, W, lse, 1.0, 0.0, is_ignored, V,
                                                 label_smoothing, z_loss, HAS_SMOOTHING,
                                                 HAS_Z_LOSS)
            inv_s = 1.0 / s
            grad_row_ptr = grad_ptr + row64 * stride_grad_n
            if SINGLE_BLOCK:
                g = _grad_block(x, dcap, cols, mask, w, t_loc, mref, inv_s, coef_p, coef_t,
                                coef_w, is_ignored, is_invalid, HAS_WEIGHT, HAS_SMOOTHING,
                                HAS_SCALE, HAS_SOFTCAP)
                _round_store(grad_row_ptr + cols, g, mask, EMULATE_RTNE, "")
            else:
                _write_grad(row_ptr, grad_row_ptr, weight_ptr, 0, V, t_loc, is_ignored,
                            is_invalid, mref, inv_s, coef_p, coef_t, coef_w, logit_scale, softcap,
                            BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP,
                            EMULATE_RTNE)


# ----------------------------------------------------------------------------------------------
# Split path and vocabulary parallelism: partials, then merge + loss + gradient
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_partials_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, divisor_ptr, dens_ptr, part_ptr, part_idx_ptr,
    # shapes: this part holds V_LOCAL columns starting at global class OFFSET, of V in all
    N, V, V_LOCAL, OFFSET, CHUNK, S,
    # strides
    stride_logits_n, stride_part_f,
    # scalar options
    ignore_index, logit_scale, softcap, inv_divisor,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REDUCTION: tl.constexpr,
    COMPUTE_DENS: tl.constexpr,  # one more program computes (D_ce, D_z) into dens_ptr
    HAS_DIVISOR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    ALL_ROWS: tl.constexpr,
):
    """Grid ``N * S`` (+1): partial statistics of chunk ``split`` (columns
    ``[split * CHUNK, min((split + 1) * CHUNK, V_LOCAL))``) of row ``row``, stored field-major at
    ``part[f, row, split]``. The extra program ``N * S`` computes the denominators."""
    pid = tl.program_id(0)
    if COMPUTE_DENS and pid == N * S:
        D_ce, D_z = _denominators(target_ptr, weight_ptr, divisor_ptr, N, V, ignore_index,
                                  inv_divisor, REDUCTION, HAS_WEIGHT, HAS_DIVISOR, BLOCK_N)
        tl.store(dens_ptr, D_ce)
        tl.store(dens_ptr + 1, D_z)
    elif pid < N * S:
        row = (pid // S).to(tl.int64)
        split = pid % S
        t_loc, is_ignored, _ = _row_target(target_ptr, row, ignore_index, V, OFFSET, V_LOCAL)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, V_LOCAL)
        if not ALL_ROWS:
            end = tl.where(is_ignored, start, end)  # ignored rows: nothing to read
        m, s, T, W, x_t, w_t, idx = _part_stats(
            logits_ptr + row * stride_logits_n, weight_ptr, start, end, t_loc, logit_scale,
            softcap, BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, HAS_ARGMAX, "")
        out = part_ptr + row * S + split
        tl.store(out + F_M * stride_part_f, m)
        tl.store(out + F_S * stride_part_f, s)
        if HAS_SMOOTHING:
            tl.store(out + F_T * stride_part_f, T)
            tl.store(out + F_W * stride_part_f, W)
        tl.store(out + F_XT * stride_part_f, x_t)
        tl.store(out + F_WT * stride_part_f, w_t)
        if HAS_ARGMAX:
            tl.store(part_idx_ptr + row * S + split, idx.to(tl.int64) + OFFSET)


@triton.jit
def _ce_finish_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, dens_ptr, part_ptr, part_idx_ptr, upstream_ptr,
    upstream_lse_ptr, ce_ptr, z_ptr, lse_ptr, stats_ptr, argmax_ptr, loss_rows_ptr, grad_ptr,
    # shapes
    N, V, V_LOCAL, OFFSET, CHUNK, S, P,
    # strides
    stride_logits_n, stride_grad_n, stride_part_f, stride_stats_f, stride_up, stride_up_lse,
    # scalar options
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    P_BLOCK: tl.constexpr,  # next power of two >= P
    REDUCTION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,  # chunk 0 writes the row's loss, lse, argmax and merged stats
    COMPUTE_GRAD: tl.constexpr,
    HAS_UPSTREAM: tl.constexpr,  # the gradient times the upstream g (and plus g_lse p)
    HAS_UPSTREAM_LSE: tl.constexpr,
    SKIP_UNIT: tl.constexpr,  # backward recompute: skip rows with g == 1 and g_lse == 0
    WRITE_STATS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Grid ``N * S``: merges the ``P`` partials of row ``row``, then writes the row's loss
    (chunk 0) and chunk ``split`` of its gradient (this part's local columns)."""
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    split = pid % S
    t_loc, is_ignored, is_invalid = _row_target(target_ptr, row, ignore_index, V, OFFSET, V_LOCAL)
    g = 1.0
    g_lse = 0.0
    active = True
    if HAS_UPSTREAM:
        g = tl.load(upstream_ptr + row * stride_up).to(tl.float32)
        if HAS_UPSTREAM_LSE:
            g_lse = tl.load(upstream_lse_ptr + row * stride_up_lse).to(tl.float32)
        if SKIP_UNIT:
            # The forward wrote the gradient for g == 1: keep it (and an ignored row's zeros).
            active = (g != 1.0) & ~is_ignored
            if HAS_UPSTREAM_LSE:
                active = active | (g_lse != 0.0)
    if active:
        parts = tl.arange(0, P_BLOCK)
        part_mask = parts < P
        base = row * P
        M, s, T, W = _merge_parts(part_ptr, stride_part_f, base, part_mask, parts, HAS_SMOOTHING,
                                  COMPUTE_LOSS)
        if HAS_WEIGHT:
            w_t = _sum_field(part_ptr, stride_part_f, base, part_mask, parts, F_WT)
        else:
            w_t = ((~is_ignored) & (~is_invalid)).to(tl.float32)
        mref = tl.where(M == float("-inf"), 0.0, M)
        lse = M + tl.log(s)
        if COMPUTE_LOSS:
            if split == 0:
                x_t = _sum_field(part_ptr, stride_part_f, base, part_mask, parts, F_XT)
                ce, z, lse = _row_loss(M, s, T, W, x_t, w_t, is_ignored, is_invalid, V,
                                       label_smoothing, z_loss, HAS_SMOOTHING, HAS_Z_LOSS)
                idx = tl.zeros((), tl.int32)
                if HAS_ARGMAX:
                    parts_m = tl.load(part_ptr + F_M * stride_part_f + base + parts,
                                      mask=part_mask, other=float("-inf"))
                    best = tl.min(tl.where(parts_m == M, parts, P_BLOCK), axis=0)
                    idx = tl.load(part_idx_ptr + base + best)
                _store_row(row, ce, z, lse, M, s, T, W, x_t, w_t, idx, ce_ptr, z_ptr,
                           lse_ptr, stats_ptr, stride_stats_f, argmax_ptr, loss_rows_ptr,
                           REDUCTION, HAS_Z_LOSS, HAS_ARGMAX, WRITE_STATS, EMULATE_RTNE)
        if COMPUTE_GRAD:
            D_ce = tl.load(dens_ptr)
            D_z = tl.load(dens_ptr + 1)
            coef_p, coef_t, coef_w = _grad_coefs(D_ce, D_z, w_t, W, lse, g, g_lse, is_ignored, V,
                                                 label_smoothing, z_loss, HAS_SMOOTHING,
                                                 HAS_Z_LOSS)
            start = split * CHUNK
            end = tl.minimum(start + CHUNK, V_LOCAL)
            zero_row = is_ignored
            if HAS_UPSTREAM_LSE:
                zero_row = zero_row & (g_lse == 0.0)  # an ignored row's lse may carry a gradient
            _write_grad(logits_ptr + row * stride_logits_n, grad_ptr + row * stride_grad_n,
                        weight_ptr, start, end, t_loc, zero_row, is_invalid, mref, 1.0 / s,
                        coef_p, coef_t, coef_w, logit_scale, softcap, BLOCK_V, HAS_WEIGHT,
                        HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, EMULATE_RTNE)


# ----------------------------------------------------------------------------------------------
# Reduction and backward scaling
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_finalize_kernel(
    ce_ptr, z_ptr, dens_ptr, loss_ptr, z_term_ptr,
    N,
    BLOCK_N: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One program: ``loss = sum ce / D_ce + sum z / D_z`` over the rows in a fixed order
    (deterministic), stored in the loss's dtype; the z-loss term in fp32. A zero denominator
    gives NaN (an all-ignored mean, or class weights summing to zero), as in PyTorch."""
    acc_ce = tl.zeros((BLOCK_N,), tl.float32)
    acc_z = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        acc_ce += tl.load(ce_ptr + offs, mask=offs < N, other=0.0)
        if HAS_Z_LOSS:
            acc_z += tl.load(z_ptr + offs, mask=offs < N, other=0.0)
    D_ce = tl.load(dens_ptr)
    D_z = tl.load(dens_ptr + 1)
    loss_ce = tl.where(D_ce == 0.0, float("nan"), tl.sum(acc_ce, axis=0) / D_ce)
    z_term = tl.zeros((), tl.float32)
    if HAS_Z_LOSS:
        z_term = tl.where(D_z == 0.0, float("nan"), tl.sum(acc_z, axis=0) / D_z)
    tl.store(z_term_ptr, z_term)
    _round_store(loss_ptr, loss_ce + z_term, True, EMULATE_RTNE, "")


@triton.jit
def _scale_kernel(
    t_ptr, g_ptr,
    row_len, blocks_per_row, stride_t, stride_g,
    BLOCK: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """``t[row] *= g[row]`` in place (``g`` one device scalar when ``stride_g == 0``); a program
    whose ``g`` is exactly 1 returns without touching memory. Grid: ``rows * blocks_per_row``."""
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + row * stride_g).to(tl.float32)
    if g != 1.0:
        mask = cols < row_len
        ptrs = t_ptr + row * stride_t + cols
        t = tl.load(ptrs, mask=mask).to(tl.float32)
        _round_store(ptrs, t * g, mask, EMULATE_RTNE, "")


@triton.jit
def _ce_dens_kernel(
    target_ptr, weight_ptr, divisor_ptr, dens_ptr,
    N, V, ignore_index, inv_divisor,
    BLOCK_N: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DIVISOR: tl.constexpr,
):
    """One program: the reduction's denominators (for callers that run the rows in chunks and
    scale every chunk by the whole batch's, as the fused linear head)."""
    D_ce, D_z = _denominators(target_ptr, weight_ptr, divisor_ptr, N, V, ignore_index,
                              inv_divisor, REDUCTION, HAS_WEIGHT, HAS_DIVISOR, BLOCK_N)
    tl.store(dens_ptr, D_ce)
    tl.store(dens_ptr + 1, D_z)
