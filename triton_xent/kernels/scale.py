"""``t *= g`` in place on the device, for the backward of a gradient made in the forward (an
in-place gradient, the fused linear head's ``dX``/``dW``/``db``): skipped wherever ``g == 1``."""

from __future__ import annotations

import triton
import triton.language as tl

from triton_xent.kernels.ce_helpers import _round_store


@triton.jit
def _scale_kernel(
    t_ptr, g_ptr,
    rows, row_len, blocks_per_row, parts, stride_t, stride_g,
    BLOCK: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """``t[row] *= g[row]`` in place (``g`` one device scalar when ``stride_g == 0``, ``rows``
    1). Persistent grid (a few programs per SM) over ``rows * parts`` units: unit ``u`` is row
    ``u // parts`` and its blocks ``u % parts``, ``+ parts``, ... A program first reads the ``g``
    of all its units in one vector load and stops at once when every one is exactly 1; a unit
    whose ``g`` is 1 touches nothing."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    units = rows * parts
    todo = tl.zeros((), tl.int32)
    for c in range(0, tl.cdiv(units - pid, nprog), 1024):
        us = pid + (c + tl.arange(0, 1024)) * nprog
        g_all = tl.load(g_ptr + (us // parts).to(tl.int64) * stride_g, mask=us < units,
                        other=1.0)
        todo += tl.sum((g_all.to(tl.float32) != 1.0).to(tl.int32), axis=0)
    end = tl.where(todo > 0, units, 0)
    for u in range(pid, end, nprog):
        row = (u // parts).to(tl.int64)
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        if g != 1.0:
            for b in range(u % parts, blocks_per_row, parts):
                cols = (tl.zeros((), tl.int64) + b) * BLOCK + tl.arange(0, BLOCK)
                mask = cols < row_len
                ptrs = t_ptr + row * stride_t + cols
                t = tl.load(ptrs, mask=mask, eviction_policy="evict_first").to(tl.float32)
                _round_store(ptrs, t * g, mask, EMULATE_RTNE, "evict_first")
