"""``@triton.jit`` helpers of the cross-entropy kernels (``kernels/cross_entropy.py``): one helper
per feature, switched by constexpr flags, shared by every kernel. The math and its notation are in
that module's docstring.
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
F_E = tl.constexpr(6)  # sum_c exp(x_c - max) (x_c - max)  (entropy)
NUM_FIELDS = 7

# The arg-max of a row holding a NaN is its first NaN column (torch.argmax's rule): partial
# arg-maxes carry such a column c as c - NAN_TAG (negative), which wins every merge (a MIN over
# the candidates) and is untagged when the row's arg-max is written.
NAN_TAG = tl.constexpr(2**62)


# ----------------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x_raw, softcap):
    """Returns ``(softcap * tanh(x_raw / softcap), 1 - tanh(x_raw / softcap)**2)`` in fp32."""
    # No tanh in triton.language (and libdevice does not run under the interpreter), so build it
    # from exp. With e = exp(-2|y|) in (0, 1]: sech^2 y = 4e / (1 + e)^2 (no cancellation,
    # no overflow; sech^2(+-inf) = 0), and for |y| >= 1, tanh|y| = 1 - 2e / (1 + e) with
    # 2e / (1 + e) <= 0.24: no cancellation either (tanh(+-inf) = +-1). Below 1, 1 - e cancels
    # (by 10x at |y| = 0.05), so tanh a = a + a s Q(s), s = a^2, with Q the degree-7 polynomial
    # fitted to (tanh(a) / a - 1) / s on [0, 1] (relative error under 1e-9; the sum's last
    # rounding dominates). Both branches are within 1.1 ulp of the float64 tanh in fp32 with a
    # correctly rounded exp (tests/test_numerics_kernels.py, under the interpreter).
    y = x_raw / softcap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    th_big = 1.0 - 2.0 * e / (1.0 + e)
    s = a * a
    q = 0.00012203559958737603 * s - 0.000843409273477047
    q = q * s + 0.0030823075176535024
    q = q * s - 0.008598273750590885
    q = q * s + 0.021786217275361033
    q = q * s - 0.053953476147017156
    q = q * s + 0.13333205007637539
    q = q * s - 0.33333329503078063
    th_small = a + a * (s * q)
    th = tl.where(a < 1.0, th_small, th_big)
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
def _stats_update(x, cols, mask, w, m, s, T, W, E, mref,
                  HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                  HAS_ENTROPY: tl.constexpr):
    """Online softmax: folds one block ``x`` (fp32, -inf on masked lanes) into the running
    ``(m, s, T, W, E)``; ``mref`` is the running shift (``m``, or 0 while every logit is -inf)."""
    # m' = max(m, max_b x); s' = s exp(mref - mref') + sum_b exp(x - mref'). While every logit so
    # far is -inf, m' = -inf and x - m' would be NaN: shift by 0 instead (exp(-inf) = 0, s = 0).
    m_new = tl.maximum(m, tl.max(x, axis=0))
    mref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    # exp(m - mref'), not exp(mref - mref'): while m = -inf (s = 0) the factor must be 0, not
    # exp(0 - (-1e9)) = inf.
    r = tl.exp(m - mref_new)
    e = tl.exp(x - mref_new)
    if HAS_ENTROPY:
        # E = sum_c exp(x_c - mref) (x_c - mref) follows the shift like s, plus s times it:
        # E' = r (E + (mref - mref') s) + sum_b ...; a -inf logit adds 0 (not 0 x -inf), and so
        # does the old part while m = -inf (r = 0, s = 0, mref = 0: no inf anywhere).
        E = r * (E + (mref - mref_new) * s) + tl.sum(_e_times_x(e, x - mref_new), axis=0)
    s = s * r + tl.sum(e, axis=0)
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
    return m_new, s, T, W, E, mref_new


@triton.jit
def _e_times_x(e, d):
    """``e * d`` for ``e = exp(d)``-like weights, 0 where ``e`` is 0 (``d = -inf``: the limit
    ``p log p -> 0``, not NaN); a NaN stays NaN through the row's ``s``."""
    return tl.where(e > 0.0, e * d, 0.0)


@triton.jit
def _argmax_update(x, cols, m_old, idx):
    """Tracks the row's arg-max (int64) alongside the online max ``m_old``, as torch.argmax: the
    first maximal column, or the first NaN column (tagged ``c - NAN_TAG``, then kept)."""
    b_max = tl.max(x, axis=0)
    b_idx = tl.min(tl.where(x == b_max, cols, 2147483647), axis=0)  # first maximal column
    b_nan = tl.min(tl.where(x != x, cols, 2147483647), axis=0)  # first NaN column
    # (whether max() skips or propagates a NaN, the NaN branch decides such a block)
    new = tl.where(b_nan < 2147483647, b_nan.to(tl.int64) - NAN_TAG,
                   tl.where(b_max > m_old, b_idx.to(tl.int64), idx))
    return tl.where(idx < 0, idx, new)


@triton.jit
def _argmax_untag(idx):
    """The column of a (possibly NaN-tagged) arg-max."""
    return tl.where(idx < 0, idx + NAN_TAG, idx)


@triton.jit
def _argmax_merge(part_idx_ptr, part_m_ptr, M, part_mask, parts):
    """The arg-max of a row from its partials' (``part_idx_ptr[k]``, global columns, tagged) and
    their maxima ``part_m_ptr[k]``: a NaN part's tag wins, else the first part holding the maximum
    ``M`` (its columns are the lowest: parts are in column order)."""
    idx_k = tl.load(part_idx_ptr + parts, mask=part_mask, other=0)
    m_k = tl.load(part_m_ptr + parts, mask=part_mask, other=float("-inf"))
    big = 9223372036854775807
    return tl.min(tl.where(part_mask & ((idx_k < 0) | (m_k == M)), idx_k, big), axis=0)


@triton.jit
def _unread_stats(M, s, is_ignored):
    """Marks the statistics of an ignored row left unread (neither its lse nor its gradient
    asked for): ``M = 0, s = inf``, which no read row has (``s`` is in ``[1, V]``, NaN, or 0 when
    all -inf) and which survive any merge, so that a gradient written later from them (a direct
    caller's backward) is ``0 / s = 0``, not ``0 / 0``."""
    return tl.where(is_ignored, 0.0, M), tl.where(is_ignored, float("inf"), s)


@triton.jit
def _part_stats(row_ptr, weight_ptr, start, end, t_loc, logit_scale, softcap,
                BLOCK_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ARGMAX: tl.constexpr,
                HAS_ENTROPY: tl.constexpr, EVICT: tl.constexpr):
    """Partial statistics of columns ``[start, end)`` of one row, block by block.

    Returns ``(m, s, T, W, E, x_t, w_t, argmax)``; ``x_t``, ``w_t`` are zero unless ``t_loc`` (the
    target's column, or -1) lies in the range, where they are gathered with one load each.
    """
    m = tl.full((), float("-inf"), tl.float32)
    mref = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    T = tl.zeros((), tl.float32)
    W = tl.zeros((), tl.float32)
    E = tl.zeros((), tl.float32)
    idx = tl.zeros((), tl.int64) + start
    for off in range(start, end, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < end
        x, _ = _load_x(row_ptr + cols, mask, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, EVICT)
        w = x  # unused without class weights
        if HAS_WEIGHT and HAS_SMOOTHING:
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        if HAS_ARGMAX:
            idx = _argmax_update(x, cols, m, idx)
        m, s, T, W, E, mref = _stats_update(x, cols, mask, w, m, s, T, W, E, mref, HAS_WEIGHT,
                                            HAS_SMOOTHING, HAS_ENTROPY)
    here = (t_loc >= start) & (t_loc < end)
    t_safe = tl.where(here, t_loc, start)
    x_t = tl.load(row_ptr + t_safe, mask=here, other=0.0).to(tl.float32)
    x_t, _ = _transform(x_t, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    x_t = tl.where(here, x_t, 0.0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe, mask=here, other=0.0)
    else:
        w_t = here.to(tl.float32)
    return m, s, T, W, E, x_t, w_t, idx


@triton.jit
def _merge_parts(stats_ptr, stride_f, base, part_mask, parts,
                 HAS_SMOOTHING: tl.constexpr, NEED_T: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """Log-sum-exp merge of the partials stored at ``stats_ptr + f * stride_f + base + k``.

    Returns ``(M, s, T, W, E)``; ``W`` only with smoothing and ``T`` only when ``NEED_T`` too,
    ``E`` with the entropy (zero otherwise): each program reads only the fields it uses.
    """
    ptr = stats_ptr + base + parts
    m_k = tl.load(ptr + F_M * stride_f, mask=part_mask, other=float("-inf"))
    s_k = tl.load(ptr + F_S * stride_f, mask=part_mask, other=0.0)
    M = tl.max(m_k, axis=0)
    mref = tl.where(M == float("-inf"), 0.0, M)
    mref_k = tl.where(m_k == float("-inf"), 0.0, m_k)
    s = tl.sum(s_k * tl.exp(m_k - mref), axis=0)  # an all -inf part: exp(-inf) = 0
    E = tl.zeros((), tl.float32)
    if HAS_ENTROPY:
        # E = sum_k r_k (E_k + (mref_k - mref) s_k); an all -inf part has s_k = E_k = 0, r_k = 0
        E_k = tl.load(ptr + F_E * stride_f, mask=part_mask, other=0.0)
        E = tl.sum(tl.exp(m_k - mref) * (E_k + (mref_k - mref) * s_k), axis=0)
    T = tl.zeros((), tl.float32)
    W = tl.zeros((), tl.float32)
    if HAS_SMOOTHING:
        W_k = tl.load(ptr + F_W * stride_f, mask=part_mask, other=0.0)
        W = tl.sum(W_k, axis=0)
        if NEED_T:
            T_k = tl.load(ptr + F_T * stride_f, mask=part_mask, other=0.0)
            # A part whose W_k is 0 adds nothing, also when its shift is -inf (no 0 * inf).
            T = tl.sum(T_k + tl.where(W_k == 0.0, 0.0, W_k * (mref - mref_k)), axis=0)
    return M, s, T, W, E


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
                zero_row, is_invalid, g_ent, E,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_UPSTREAM_ENT: tl.constexpr):
    """dL/dx_raw of one block of a row (fp32). With ``HAS_UPSTREAM_ENT`` the aux entropy's
    gradient too: ``dH/dx_c = -p_c (log p_c + H) = -p_c ((x_c - M) - E / s)`` (``E``: the
    row's merged statistic, ``H - log s = -E / s``), times its upstream ``g_ent``."""
    p = tl.exp(x - mref) * inv_s
    g = p * coef_p
    if HAS_UPSTREAM_ENT:
        g -= g_ent * _e_times_x(p, (x - mref) - E * inv_s)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= coef_w * w
        else:
            g -= coef_w
    # The target column in fp32, before rounding: p_t - 1 cancels badly in bf16.
    g = tl.where(cols == t_loc, g - coef_t, g)
    if HAS_SCALE or HAS_SOFTCAP:
        g *= dcap
    # A zero row (ignored) gets PyTorch's 0 x softmax: 0, or NaN on the whole row where its
    # statistics are NaN (a NaN or +inf logit: s = NaN) or the row is all -inf (1 / s = inf). One
    # value per row, so its logits need not be read again: the statistics pass read them.
    return tl.where(zero_row, inv_s * 0.0, tl.where(is_invalid, float("nan"), g))


@triton.jit
def _write_grad(row_ptr, grad_row_ptr, weight_ptr, start, end, t_loc, zero_row, is_invalid,
                mref, inv_s, coef_p, coef_t, coef_w, g_ent, E, logit_scale, softcap,
                BLOCK_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_UPSTREAM_ENT: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Gradient sweep over columns ``[start, end)``: reads each block once, writes it once.

    A ``zero_row`` (ignored, and no aux lse gradient) gets ``0 / s``: zeros, or NaN where its
    statistics are NaN, as PyTorch's ``0 x softmax``; its logits are not read here (masked-off
    lanes move no data), the statistics pass read them. With an in-place gradient
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
                        zero_row, is_invalid, g_ent, E, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE,
                        HAS_SOFTCAP, HAS_UPSTREAM_ENT)
        _round_store(grad_row_ptr + cols, g, mask, EMULATE_RTNE, "evict_first")


@triton.jit
def _store_row(row, ce, z, lse, M, s, T, W, E, x_t, w_t, idx,
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
        tl.store(argmax_ptr + row, _argmax_untag(idx.to(tl.int64)))
    if WRITE_STATS:
        tl.store(stats_ptr + F_M * stride_stats_f + row, M)
        tl.store(stats_ptr + F_S * stride_stats_f + row, s)
        tl.store(stats_ptr + F_T * stride_stats_f + row, T)
        tl.store(stats_ptr + F_W * stride_stats_f + row, W)
        tl.store(stats_ptr + F_XT * stride_stats_f + row, x_t)
        tl.store(stats_ptr + F_WT * stride_stats_f + row, w_t)
        tl.store(stats_ptr + F_E * stride_stats_f + row, E)
