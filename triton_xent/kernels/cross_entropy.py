"""Triton kernels for cross-entropy over a large vocabulary: partials -> merge -> gradient.

Notation, per row ``i`` with target ``t`` (all math in fp32 whatever the logits' dtype):

* ``x = logits[i, :]``, transformed to ``softcap * tanh(logit_scale * x / softcap)`` when asked;
* the row's statistics, as partials over any set of columns (a block, a chunk of a row, a rank's
  shard of the vocabulary): ``m = max_c x_c``, ``s = sum_c exp(x_c - m)``,
  ``T = sum_c w_c (m - x_c)`` and ``W = sum_c w_c`` (smoothing; ``w_c = 1`` without class
  weights), ``E = sum_c exp(x_c - m) (x_c - m)`` (entropy, with a -inf logit adding 0), ``x_t``
  and ``w_t`` (from the part that holds the target column, zero elsewhere);
* merged over parts with the log-sum-exp merge: ``M = max_k m_k``, ``s = sum_k s_k exp(m_k - M)``,
  ``T = sum_k T_k + W_k (M - m_k)``, ``E = sum_k exp(m_k - M) (E_k + (m_k - M) s_k)``, ``W``,
  ``x_t`` and ``w_t`` summed (online softmax,
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
  weights and the kept rows for a mean; a divisor, or 1, for a sum);
* the entropy ``H = log s - E / s`` (the op layer reads it from the merged statistics) and, with
  its upstream ``g_ent``, ``dH/dx_c = -p_c (log p_c + H) = -p_c ((x_c - M) - E / s)``, added to
  ``dL/dx_c`` in the same gradient pass.

Rows whose target is ``ignore_index`` get ``ce = z = 0`` and PyTorch's gradient row ``0 x p``:
zeros, or NaN on the whole row where its statistics are NaN (a NaN or +inf logit, or every logit
-inf). Their logits are read once when a gradient or their lse is asked for (``ALL_ROWS``: the
statistics pass; the gradient pass writes the row's one value without reading), not at all
otherwise; rows whose target is out of ``[0, V)`` get NaN, never an out-of-bounds access.

Kernels, chosen by the launcher (``backends/triton_ce.py``, by ``plan()`` in ``triton_plan.py``):

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
* ``_ce_finalize_kernel``, one program: the reduced loss, summed in a fixed order (deterministic);
* ``_ce_dens_kernel``, one program: the denominators alone (the fused head's chunks share
  them); ``t *= g`` for a backward's upstream is ``kernels/scale.py``.

Every feature is one ``@triton.jit`` helper (``kernels/ce_helpers.py``) switched by a constexpr
flag (``HAS_WEIGHT``, ``HAS_SMOOTHING``, ``HAS_Z_LOSS``, ``HAS_SCALE``, ...), shared by all kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_xent.kernels.ce_helpers import (
    F_E,
    F_M,
    F_S,
    F_T,
    F_W,
    F_WT,
    F_XT,
    _argmax_merge,
    _argmax_update,
    _denominators,
    _e_times_x,
    _grad_block,
    _grad_coefs,
    _load_x,
    _merge_parts,
    _part_stats,
    _round_store,
    _row_loss,
    _row_target,
    _store_row,
    _sum_field,
    _unread_stats,
    _write_grad,
)

# ---- Fused path: one program walks whole rows (merge: none) ----------------------------------


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
    HAS_ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ALL_ROWS: tl.constexpr,  # read ignored rows too (their lse or gradient is asked for)
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
        # Ignored rows (zero loss) are not read unless their lse or gradient is asked for.
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
            E = tl.zeros((), tl.float32)
            if HAS_ENTROPY:  # from e while it is live (p is recomputed from x for the gradient)
                E = tl.sum(_e_times_x(e, x - mref), axis=0)
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
            idx = tl.zeros((), tl.int64)
            if HAS_ARGMAX:
                idx = _argmax_update(x, cols, float("-inf"), idx)
        else:
            M, s, T, W, E, x_t, _, idx = _part_stats(
                row_ptr, weight_ptr, 0, tl.where(read, V, 0), t_loc, logit_scale, softcap,
                BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, HAS_ARGMAX,
                HAS_ENTROPY, "evict_last")
            if not HAS_SMOOTHING or not HAS_WEIGHT:
                W = tl.zeros((), tl.float32) + V
            else:
                W = W_all
            mref = tl.where(M == float("-inf"), 0.0, M)
        if not ALL_ROWS:
            M, s = _unread_stats(M, s, is_ignored)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + tl.maximum(t_loc, 0), mask=t_loc >= 0, other=0.0)
        else:
            w_t = (t_loc >= 0).to(tl.float32)
        ce, z, lse = _row_loss(M, s, T, W, x_t, w_t, is_ignored, is_invalid, V, label_smoothing,
                               z_loss, HAS_SMOOTHING, HAS_Z_LOSS)
        _store_row(row64, ce, z, lse, M, s, T, W, E, x_t, w_t, idx, ce_ptr, z_ptr, lse_ptr,
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
                                coef_w, is_ignored, is_invalid, 0.0, 0.0, HAS_WEIGHT,
                                HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, False)
                _round_store(grad_row_ptr + cols, g, mask, EMULATE_RTNE, "")
            else:
                # The gradient sweep runs backwards: the blocks read last are the likeliest in
                # L2, so when the rows in flight outgrow it (V=262144: 132 x 512 KB) the misses
                # fall on the blocks read first (a forward sweep would evict its next blocks).
                nblk = tl.cdiv(V, BLOCK_V)
                read_end = tl.where(is_ignored, 0, V)
                for i in range(0, nblk):
                    cols = (nblk - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
                    mask = cols < V
                    xb, dcb = _load_x(row_ptr + cols, cols < read_end, logit_scale, softcap,
                                      HAS_SCALE, HAS_SOFTCAP, "evict_first")
                    wb2 = xb
                    if HAS_WEIGHT and HAS_SMOOTHING:
                        wb2 = tl.load(weight_ptr + cols, mask=tl.where(is_ignored, False, mask),
                                      other=0.0)
                    g = _grad_block(xb, dcb, cols, mask, wb2, t_loc, mref, inv_s, coef_p, coef_t,
                                    coef_w, is_ignored, is_invalid, 0.0, 0.0, HAS_WEIGHT,
                                    HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, False)
                    _round_store(grad_row_ptr + cols, g, mask, EMULATE_RTNE, "evict_first")


# ---- Split path and vocabulary parallelism: partials, then merge + loss + gradient -----------


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
    HAS_ENTROPY: tl.constexpr,
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
        m, s, T, W, E, x_t, w_t, idx = _part_stats(
            logits_ptr + row * stride_logits_n, weight_ptr, start, end, t_loc, logit_scale,
            softcap, BLOCK_V, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, HAS_ARGMAX,
            HAS_ENTROPY, "")
        if not ALL_ROWS:
            m, s = _unread_stats(m, s, is_ignored)
        out = part_ptr + row * S + split
        tl.store(out + F_M * stride_part_f, m)
        tl.store(out + F_S * stride_part_f, s)
        if HAS_SMOOTHING:
            tl.store(out + F_T * stride_part_f, T)
            tl.store(out + F_W * stride_part_f, W)
        tl.store(out + F_XT * stride_part_f, x_t)
        tl.store(out + F_WT * stride_part_f, w_t)
        if HAS_ENTROPY:
            tl.store(out + F_E * stride_part_f, E)
        if HAS_ARGMAX:
            tl.store(part_idx_ptr + row * S + split, idx.to(tl.int64) + OFFSET)


@triton.jit
def _ce_finish_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, dens_ptr, part_ptr, part_idx_ptr, upstream_ptr,
    upstream_lse_ptr, upstream_ent_ptr, ce_ptr, z_ptr, lse_ptr, stats_ptr, argmax_ptr,
    loss_rows_ptr, grad_ptr,
    # shapes
    N, V, V_LOCAL, OFFSET, CHUNK, S, P,
    # strides
    # (the aux upstreams, of the lse and of the entropy, share one stride)
    stride_logits_n, stride_grad_n, stride_part_f, stride_stats_f, stride_up, stride_up_aux,
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
    HAS_ENTROPY: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,  # chunk 0 writes the row's loss, lse, argmax and merged stats
    COMPUTE_GRAD: tl.constexpr,
    HAS_UPSTREAM: tl.constexpr,  # the gradient times the upstream g (and plus g_lse p)
    HAS_UPSTREAM_LSE: tl.constexpr,
    HAS_UPSTREAM_ENT: tl.constexpr,  # and the aux entropy's gradient, its upstream g_ent
    SKIP_UNIT: tl.constexpr,  # backward recompute: skip rows with g == 1, g_lse == g_ent == 0
    WRITE_STATS: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Persistent grid (a few programs per SM) over the ``N * S`` items (row ``row``, chunk
    ``split``): merges the ``P`` partials of the row, then writes its loss (chunk 0) and chunk
    ``split`` of its gradient (this part's local columns). With ``SKIP_UNIT`` a program first
    reads the upstream gradients of all its items in one vector load and stops at once when every
    one is 1 (and every lse upstream 0): ``loss.backward()`` costs one small launch."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    work = N * S
    end = work
    if HAS_UPSTREAM and SKIP_UNIT:
        todo = tl.zeros((), tl.int32)
        for c in range(0, tl.cdiv(work - pid, nprog), 1024):
            items = pid + (c + tl.arange(0, 1024)) * nprog
            in_work = items < work
            rows = (items // S).to(tl.int64)
            g_all = tl.load(upstream_ptr + rows * stride_up, mask=in_work, other=1.0)
            busy = g_all.to(tl.float32) != 1.0
            if HAS_UPSTREAM_LSE:
                g_lse_all = tl.load(upstream_lse_ptr + rows * stride_up_aux, mask=in_work,
                                    other=0.0)
                busy = busy | (g_lse_all.to(tl.float32) != 0.0)
            if HAS_UPSTREAM_ENT:
                g_ent_all = tl.load(upstream_ent_ptr + rows * stride_up_aux, mask=in_work,
                                    other=0.0)
                busy = busy | (g_ent_all.to(tl.float32) != 0.0)
            todo += tl.sum(busy.to(tl.int32), axis=0)
        end = tl.where(todo > 0, work, 0)
    for item in range(pid, end, nprog):
        _finish_item(
            item, logits_ptr, target_ptr, weight_ptr, dens_ptr, part_ptr, part_idx_ptr,
            upstream_ptr, upstream_lse_ptr, upstream_ent_ptr, ce_ptr, z_ptr, lse_ptr, stats_ptr,
            argmax_ptr, loss_rows_ptr, grad_ptr, V, V_LOCAL, OFFSET, CHUNK, S, P,
            stride_logits_n, stride_grad_n, stride_part_f, stride_stats_f, stride_up,
            stride_up_aux, ignore_index, label_smoothing, z_loss, logit_scale,
            softcap, BLOCK_V, P_BLOCK,
            REDUCTION, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS,
            HAS_SCALE, HAS_SOFTCAP, HAS_ARGMAX, HAS_ENTROPY, COMPUTE_LOSS, COMPUTE_GRAD,
            HAS_UPSTREAM, HAS_UPSTREAM_LSE, HAS_UPSTREAM_ENT, SKIP_UNIT, WRITE_STATS,
            EMULATE_RTNE)


@triton.jit
def _finish_item(
    item, logits_ptr, target_ptr, weight_ptr, dens_ptr, part_ptr, part_idx_ptr, upstream_ptr,
    upstream_lse_ptr, upstream_ent_ptr, ce_ptr, z_ptr, lse_ptr, stats_ptr, argmax_ptr,
    loss_rows_ptr, grad_ptr, V, V_LOCAL, OFFSET, CHUNK, S, P,
    stride_logits_n, stride_grad_n, stride_part_f, stride_stats_f, stride_up, stride_up_aux,
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    BLOCK_V: tl.constexpr, P_BLOCK: tl.constexpr, REDUCTION: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ARGMAX: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, COMPUTE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_UPSTREAM: tl.constexpr, HAS_UPSTREAM_LSE: tl.constexpr, HAS_UPSTREAM_ENT: tl.constexpr,
    SKIP_UNIT: tl.constexpr, WRITE_STATS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """One item of :func:`_ce_finish_kernel`: row ``item // S``, chunk ``item % S``."""
    row = (item // S).to(tl.int64)
    split = item % S
    t_loc, is_ignored, is_invalid = _row_target(target_ptr, row, ignore_index, V, OFFSET, V_LOCAL)
    g = 1.0
    g_lse = 0.0
    g_ent = 0.0
    active = True
    if HAS_UPSTREAM:
        g = tl.load(upstream_ptr + row * stride_up).to(tl.float32)
        if HAS_UPSTREAM_LSE:
            g_lse = tl.load(upstream_lse_ptr + row * stride_up_aux).to(tl.float32)
        if HAS_UPSTREAM_ENT:
            g_ent = tl.load(upstream_ent_ptr + row * stride_up_aux).to(tl.float32)
        if SKIP_UNIT:
            # The forward wrote the gradient for g == 1: keep it (and an ignored row's zeros).
            active = (g != 1.0) & ~is_ignored
            if HAS_UPSTREAM_LSE:
                active = active | (g_lse != 0.0)
            if HAS_UPSTREAM_ENT:
                active = active | (g_ent != 0.0)
    if active:
        parts = tl.arange(0, P_BLOCK)
        part_mask = parts < P
        base = row * P
        if HAS_ENTROPY and (COMPUTE_LOSS or HAS_UPSTREAM_ENT):  # E only where it is used
            M, s, T, W, E = _merge_parts(part_ptr, stride_part_f, base, part_mask, parts,
                                         HAS_SMOOTHING, COMPUTE_LOSS, True)
        else:
            M, s, T, W, E = _merge_parts(part_ptr, stride_part_f, base, part_mask, parts,
                                         HAS_SMOOTHING, COMPUTE_LOSS, False)
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
                idx = tl.zeros((), tl.int64)
                if HAS_ARGMAX:
                    idx = _argmax_merge(part_idx_ptr + base, part_ptr + F_M * stride_part_f + base,
                                        M, part_mask, parts)
                _store_row(row, ce, z, lse, M, s, T, W, E, x_t, w_t, idx, ce_ptr, z_ptr,
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
            if HAS_UPSTREAM_ENT:
                zero_row = zero_row & (g_ent == 0.0)  # and its entropy
            _write_grad(logits_ptr + row * stride_logits_n, grad_ptr + row * stride_grad_n,
                        weight_ptr, start, end, t_loc, zero_row, is_invalid, mref, 1.0 / s,
                        coef_p, coef_t, coef_w, g_ent, E, logit_scale, softcap, BLOCK_V,
                        HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, HAS_UPSTREAM_ENT,
                        EMULATE_RTNE)


# ---- Reduction and denominators ----------------------------------------------------------


@triton.jit
def _ce_finalize_kernel(
    ce_ptr, z_ptr, dens_ptr, loss_ptr, z_term_ptr,
    N,
    BLOCK_N: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    IS_MEAN: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One program: ``loss = sum ce / D_ce + sum z / D_z`` over the rows in a fixed order
    (deterministic), stored in the loss's dtype; the z-loss term in fp32. A mean's zero
    denominator gives NaN (an all-ignored mean, or class weights summing to zero), as in
    PyTorch; a sum's divisor divides as it is (``sum / 0`` is inf)."""
    acc_ce = tl.zeros((BLOCK_N,), tl.float32)
    acc_z = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        acc_ce += tl.load(ce_ptr + offs, mask=offs < N, other=0.0)
        if HAS_Z_LOSS:
            acc_z += tl.load(z_ptr + offs, mask=offs < N, other=0.0)
    D_ce = tl.load(dens_ptr)
    D_z = tl.load(dens_ptr + 1)
    loss_ce = tl.sum(acc_ce, axis=0) / D_ce
    z_term = tl.zeros((), tl.float32)
    if HAS_Z_LOSS:
        z_term = tl.sum(acc_z, axis=0) / D_z
    if IS_MEAN:
        loss_ce = tl.where(D_ce == 0.0, float("nan"), loss_ce)
        z_term = tl.where(D_z == 0.0, float("nan"), z_term)
    tl.store(z_term_ptr, z_term)
    _round_store(loss_ptr, loss_ce + z_term, True, EMULATE_RTNE, "")


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
