"""Chunked linear + cross-entropy: ``loss(x @ W.T + b)`` without the ``(N, V)`` logits.

A plain torch function (no autograd), testable alone; ``triton_xent.ops.linear_cross_entropy`` wraps it
in the op layer. The GEMMs are torch's (cuBLAS on CUDA, MKL/oneDNN on the CPU) on every backend;
the cross-entropy step on a chunk of logits (the Triton kernels or the torch backend, through the
op layer's pipeline) turns the logits, in place, into d(loss)/d(logits).

Per chunk of ``n`` rows (``W`` is ``(V, D)``)::

    logits = x_c @ W.T + b                 # (n, V), the only large buffer, reused by every chunk
    ce, z, lse, stats, dlogits = step(logits, rows)   # in place
    dX[rows] = dlogits @ W                 # (n, D)
    dW += dlogits.T @ x_c                  # (V, D): beta=1 GEMM into dW, in dW's dtype
    db += dlogits.sum(0)

Three GEMMs of ``2 n D V`` FLOPs per chunk, the floor. ``dW`` is accumulated in the weight's
dtype by default: each chunk's GEMM accumulates in fp32 inside and adds its product to ``dW`` in
its epilogue, so a 16-bit ``dW`` is rounded once per chunk (chunks are large, see
:func:`default_chunk_rows`), with no fp32 read-modify-write of a ``V x D`` buffer per chunk;
``fp32_accum`` keeps an fp32 accumulator instead (exact to fp32, ``4 V D`` more bytes).

Rows whose target is ``ignore_index`` cost no GEMM with ``skip_ignored``: their indices are
gathered once (``nonzero``: one host sync on an accelerator) and the chunks take kept rows only.
Without it (CUDA-graph safe) the chunks are fixed and ignored rows get a zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..backends.protocol import NUM_FIELDS

# Chunks are a multiple of this many rows (GEMM tiles), except a chunk holding all the rows.
_ROW_ALIGN = 64
# The default logits chunk: a fifth of the gradients' own bytes, at most CHUNK_MAX_BYTES, and at
# least the rows the chunk's GEMMs need (see default_chunk_rows).
CHUNK_SHARE = 0.2
CHUNK_MAX_BYTES = 1 << 30
# Rows from which a chunk's dW update (dW += dlogits.T @ x_c, reading and writing dW once) is
# compute-bound on an H100 in 16-bit: about rows / 2 FLOP per byte of dW moved, against a balance
# point of about 240.
ROWS_GEMM = 512
# Scratch bytes for the blocked fp32 dW accumulation when no fused mixed-dtype GEMM exists.
_DW_BLOCK_BYTES = 32 << 20

Step = Callable[[torch.Tensor, object, bool], tuple]


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_chunk_rows(N: int, D: int, V: int, dtype: torch.dtype, *,
                       weight_dtype: torch.dtype | None = None, fp32_accum: bool = False,
                       chunk_bytes: int | None = None) -> int:
    """Rows per chunk.

    ``chunk_bytes`` given: as many rows as fit a ``(rows, V)`` logits buffer of that size.
    Otherwise the buffer gets a fifth of the gradients' own bytes (``dX`` and ``dW``, plus the
    fp32 accumulator), at most 1 GiB, and at least what the chunk's GEMMs need, not a fixed size:
    each chunk reads and writes ``dW`` once inside its GEMM, which is hidden by the GEMM's FLOPs
    from 512 rows (:data:`ROWS_GEMM`); where ``D`` is too small for that ever to happen (the update
    is memory-bound at any row count), enough rows that the update moves no more bytes than the
    chunk's own logits passes (``2 V D`` accumulator elements against ``3 rows V`` logits):
    ``min(512, 2 D acc_elt / (3 elt))``. At N=8192, D=4096, V=128256 in bf16: 832 rows (204 MiB),
    10 chunks; the Gemma-2-2B head (D=2304, V=256000): 512 rows; D=256, V=65536 in fp32: 192
    rows (48 MiB). Rows are a multiple of 64 (GEMM tiles)."""
    elt = _elt(dtype)
    if chunk_bytes is not None:
        rows = int(chunk_bytes) // max(1, V * elt)
        return rows // _ROW_ALIGN * _ROW_ALIGN if rows >= _ROW_ALIGN else max(1, rows)
    w_elt = _elt(weight_dtype or dtype)
    acc_elt = 4 if fp32_accum and w_elt < 4 else w_elt
    grads = V * D * w_elt + N * D * elt + (V * D * 4 if fp32_accum else 0)
    share = int(CHUNK_SHARE * grads) // max(1, V * elt) // _ROW_ALIGN * _ROW_ALIGN
    need = min(ROWS_GEMM, math.ceil(2 * D * acc_elt / (3 * elt)))
    rows = max(share, -(-need // _ROW_ALIGN) * _ROW_ALIGN)
    most = CHUNK_MAX_BYTES // max(1, V * elt)
    if rows > most:
        rows = most // _ROW_ALIGN * _ROW_ALIGN if most >= _ROW_ALIGN else most
    return max(1, rows)


def kept_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that count, or None when all do. One host sync on an accelerator."""
    idx = (target != ignore_index).nonzero().squeeze(1)
    return None if idx.numel() == target.numel() else idx


_fused_fp32_addmm_ok: dict[str, bool] = {}


def accumulate_dw(acc: torch.Tensor, dlogits: torch.Tensor, x_c: torch.Tensor, first: bool) -> None:
    """``acc += dlogits.T @ x_c`` (``acc = ...`` for the ``first`` chunk when the dtypes agree:
    ``acc`` is then uninitialised); ``acc`` may be fp32 while the operands are 16-bit (zeroed)."""
    if acc.dtype == dlogits.dtype:
        if first:
            torch.mm(dlogits.t(), x_c, out=acc)  # saves zero-filling V x D
        else:
            acc.addmm_(dlogits.t(), x_c)  # beta=1: the GEMM's epilogue adds into acc
        return
    dev = acc.device.type
    if dev == "cuda" and _fused_fp32_addmm_ok.get(dev, True):
        # cuBLAS reads bf16/fp16 operands and accumulates into the fp32 C in place: no scratch.
        try:
            torch.addmm(acc, dlogits.t(), x_c, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _fused_fp32_addmm_ok[dev] = False
    # Blocked over V, bounded scratch: an fp32-output GEMM per block, then an fp32 add. On the
    # CPU the operands are upcast instead (fp32 GEMMs are the fast ones there).
    V, n = dlogits.shape[1], dlogits.shape[0]
    D = x_c.shape[1]
    block = max(1, _DW_BLOCK_BYTES // (4 * max(n, D, 1)))
    x_up = x_c if dev == "cuda" else x_c.to(acc.dtype)
    for v0 in range(0, V, block):
        g = dlogits[:, v0:v0 + block].t()
        if dev == "cuda":
            try:
                acc[v0:v0 + block].add_(torch.mm(g, x_c, out_dtype=acc.dtype))
                continue
            except (RuntimeError, TypeError):
                x_up = x_c.to(acc.dtype)
        acc[v0:v0 + block].addmm_(g.to(acc.dtype), x_up)


def linear_ce_chunks(
    x: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    step: Step,
    ignore_index: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    chunk_rows: int,
    fp32_accum: bool,
    skip_ignored: bool,
    stats_dtype: torch.dtype,
):
    """Runs the chunks; returns ``ce, z, lse, stats, dX, dW, db`` (the grads may be None).

    Args:
        x: ``(N, D)`` rows of the input; ``linear_weight``: ``(V, D)``; ``linear_bias``: ``(V,)``
            or None, all of one dtype. ``target``: ``(N,)`` int64.
        step: ``step(logits, rows, compute_grad) -> (ce, z, lse, stats, grad)``: the
            cross-entropy of one chunk (``rows``: the chunk's rows, a slice or an index tensor),
            writing the gradient over ``logits``; ``stats`` are the rows' merged statistics
            ``(NUM_FIELDS, n)`` (a backward recompute reuses them).
        need_x, need_w, need_b: which gradients to compute (any subset).
        chunk_rows: rows per chunk (>= 1).
        fp32_accum: accumulate dW in fp32 when the weight is 16-bit (db always is).
        skip_ignored: spend no GEMM on ignored rows (one host sync, see the module docstring).
        stats_dtype: dtype of the per-row outputs.

    Returns:
        Per-row ``ce``, ``z``, ``lse`` ``(N,)`` and ``stats`` ``(NUM_FIELDS, N)`` (zeros on skipped ignored
        rows), and ``dX (N, D)``, ``dW (V, D)``, ``db (V,)`` in the dtypes of ``x``,
        ``linear_weight``, ``linear_bias``, or None where not asked for.
    """
    N, D = x.shape
    V = linear_weight.shape[0]
    dev, dt = x.device, x.dtype
    need_grad = need_x or need_w or (need_b and linear_bias is not None)

    idx = kept_rows(target, ignore_index) if skip_ignored and N else None
    M = N if idx is None else idx.numel()
    new_rows = torch.empty if idx is None else torch.zeros  # skipped rows read as 0
    ce_rows, z_rows, lse_rows = (new_rows(N, dtype=stats_dtype, device=dev) for _ in range(3))
    stats = new_rows((NUM_FIELDS, N), dtype=stats_dtype, device=dev)
    dX = dW_acc = db_acc = None
    if need_x:
        dX = new_rows((N, D), dtype=dt, device=dev)
    if need_w:
        half = linear_weight.dtype in (torch.float16, torch.bfloat16)
        acc_dt = torch.float32 if fp32_accum and half else linear_weight.dtype
        # Uninitialised when the first chunk's GEMM overwrites it (see accumulate_dw).
        new_acc = torch.empty if M and acc_dt == dt else torch.zeros
        dW_acc = new_acc((V, D), dtype=acc_dt, device=dev)
    if need_b and linear_bias is not None:
        db_acc = torch.zeros(V, dtype=stats_dtype, device=dev)  # V values: accumulated in fp32

    step_rows = max(1, min(int(chunk_rows), M))
    buf = torch.empty((step_rows, V), dtype=dt, device=dev) if M else None
    w_t = linear_weight.t()
    for s in range(0, M, step_rows):
        e = min(M, s + step_rows)
        if idx is None:
            rows = slice(s, e)
            x_c = x[s:e]
        else:
            rows = idx[s:e]
            x_c = x.index_select(0, rows)
        logits = buf[: e - s]
        if linear_bias is None:
            torch.mm(x_c, w_t, out=logits)
        else:
            torch.addmm(linear_bias, x_c, w_t, out=logits)
        ce, z, lse, st, dlogits = step(logits, rows, need_grad)
        for out, val in ((ce_rows, ce), (z_rows, z), (lse_rows, lse)):
            if idx is None:
                out[s:e] = val
            else:
                out.index_copy_(0, rows, val.to(stats_dtype))
        if idx is None:
            stats[:, s:e] = st
        else:
            stats.index_copy_(1, rows, st.to(stats_dtype))
        if not need_grad:
            continue
        # dlogits is the logits buffer, now d(loss)/d(logits); three reads, no more writes.
        if db_acc is not None:
            db_acc.add_(dlogits.sum(0, dtype=db_acc.dtype))
        if dW_acc is not None:
            accumulate_dw(dW_acc, dlogits, x_c, s == 0)
        if dX is not None:
            if idx is None:
                torch.mm(dlogits, linear_weight, out=dX[s:e])
            else:
                dX.index_copy_(0, rows, torch.mm(dlogits, linear_weight))
    del buf
    dW = None if dW_acc is None else dW_acc.to(linear_weight.dtype)
    db = None if db_acc is None else db_acc.to(linear_bias.dtype)
    return ce_rows, z_rows, lse_rows, stats, dX, dW, db
