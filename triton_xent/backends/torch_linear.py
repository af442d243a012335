"""Chunked linear + cross-entropy: ``loss(x @ W.T + b)`` without the ``(N, V)`` logits.

A plain torch function (no autograd), testable alone; ``triton_xent.linear`` wraps it in the op
and autograd layers. The GEMMs are torch's (cuBLAS on CUDA, MKL/oneDNN on the CPU) on every
backend; the cross-entropy step on a chunk of logits is a ``ce_forward`` launcher -- the Triton
kernel or the torch backend -- that turns the logits, in place, into d(loss)/d(logits).

Per chunk of ``n`` rows (``W`` is ``(V, D)``)::

    logits = x_c @ W.T + b                 # (n, V), the only large buffer, reused by every chunk
    ce, z, lse, dlogits = ce_forward(logits, ..., inplace=True)
    dX[rows] = dlogits @ W                 # (n, D)
    dW += dlogits.T @ x_c                  # (V, D), fp32 accumulation for 16-bit weights
    db += dlogits.sum(0)

Working memory beyond the outputs: one ``(chunk, V)`` logits buffer (``chunk_bytes``, 128 MiB by
default), the fp32 dW accumulator for 16-bit weights (``V * D * 4`` bytes; the final dW in the
weight's dtype is made from it at the end), and ``(chunk, D)`` slices.

Rows whose target is ``ignore_index`` cost no GEMM: their indices are gathered once
(``nonzero``: one host sync on an accelerator) and the chunks take kept rows only
(``index_select``). ``skip_ignored=False`` avoids that sync (CUDA graphs): fixed chunks over all
rows, the ignored ones computed and given a zero gradient by the CE step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Bytes of the per-chunk logits buffer. 128 MiB gives 512 rows at V = 128k in bf16 (or
# V = 64k in fp32): GEMMs of 512 x D x V run near peak on GPUs and CPUs alike, and the buffer
# is small next to the dW accumulator and the model.
CHUNK_BYTES = 128 << 20
# Chunks are a multiple of this many rows (GEMM tiles), except a chunk holding all the rows.
_ROW_ALIGN = 64
# Scratch bytes for the blocked fp32 dW accumulation when no fused mixed-dtype GEMM exists.
_DW_BLOCK_BYTES = 32 << 20

CeStep = Callable[[torch.Tensor, torch.Tensor, bool], tuple]


def default_chunk_rows(V: int, dtype: torch.dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that the ``(rows, V)`` logits buffer fits ``chunk_bytes``."""
    budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    rows = budget // max(1, V * torch.empty((), dtype=dtype).element_size())
    if rows >= _ROW_ALIGN:
        return rows // _ROW_ALIGN * _ROW_ALIGN
    return max(1, rows)


def kept_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that count, or None when all do. One host sync on an accelerator."""
    idx = (target != ignore_index).nonzero().squeeze(1)
    return None if idx.numel() == target.numel() else idx


_fused_fp32_addmm_ok: dict[str, bool] = {}


def _accumulate_dw(acc: torch.Tensor, dlogits: torch.Tensor, x_c: torch.Tensor, first: bool) -> None:
    """``acc += dlogits.T @ x_c`` (``acc = ...`` for the ``first`` chunk when the dtypes agree:
    ``acc`` is then uninitialised); ``acc`` may be fp32 while the operands are 16-bit (zeroed)."""
    if acc.dtype == dlogits.dtype:
        if first:
            torch.mm(dlogits.t(), x_c, out=acc)  # saves zero-filling V x D
        else:
            acc.addmm_(dlogits.t(), x_c)
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
    ce_step: CeStep,
    ignore_index: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    chunk_rows: int,
    fp32_accum: bool,
    skip_ignored: bool,
    grad_rows: torch.Tensor | None = None,
):
    """Runs the chunks; returns ``ce_rows, z_rows, lse, dX, dW, db`` (the grads may be None).

    Args:
        x: ``(N, D)`` rows of the input; ``linear_weight``: ``(V, D)``; ``linear_bias``: ``(V,)``
            or None, all of one dtype. ``target``: ``(N,)`` int64.
        ce_step: ``ce_step(logits, target, compute_grad) -> (ce, z, lse, grad)``, a CE launcher
            with the class weights, ``scales`` and options bound, writing the gradient over
            ``logits`` (``inplace=True``). With ``scales`` from ``reduction_scales`` the
            gradients are those of the reduced loss.
        need_x, need_w, need_b: which gradients to compute (any subset).
        chunk_rows: rows per chunk (>= 1).
        fp32_accum: accumulate dW in fp32 when the weight is 16-bit (db always is).
        skip_ignored: spend no GEMM on ignored rows (one host sync, see the module docstring).
        grad_rows: ``(N,)`` per-row upstream gradient (``reduction="none"`` backward, with
            ``scales`` = 1): every row's gradient is multiplied by it. Folded into the small
            operands: ``dW += dlogits.T @ (g * x_c)``, ``dX = g * (dlogits @ W)``,
            ``db += dlogits.T @ g``.

    Returns:
        Per-row ``ce``, ``z``, ``lse`` ``(N,)`` in the compute dtype (zeros on skipped ignored
        rows), and ``dX (N, D)``, ``dW (V, D)``, ``db (V,)`` in the dtypes of ``x``,
        ``linear_weight``, ``linear_bias``, or None where not asked for.
    """
    N, D = x.shape
    V = linear_weight.shape[0]
    dev, dt = x.device, x.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    need_grad = need_x or need_w or (need_b and linear_bias is not None)

    idx = kept_rows(target, ignore_index) if skip_ignored and N else None
    M = N if idx is None else idx.numel()
    new_rows = torch.empty if idx is None else torch.zeros  # skipped rows read as 0
    ce_rows, z_rows, lse_rows = (new_rows(N, dtype=cdt, device=dev) for _ in range(3))
    dX = dW_acc = db_acc = None
    if need_x:
        dX = new_rows((N, D), dtype=dt, device=dev)
    if need_w:
        half = linear_weight.dtype in (torch.float16, torch.bfloat16)
        acc_dt = torch.float32 if fp32_accum and half else linear_weight.dtype
        # Uninitialised when the first chunk's GEMM overwrites it (see _accumulate_dw).
        new_acc = torch.empty if M and acc_dt == dt else torch.zeros
        dW_acc = new_acc((V, D), dtype=acc_dt, device=dev)
    if need_b and linear_bias is not None:
        db_acc = torch.zeros(V, dtype=cdt, device=dev)  # V values: always accumulated in fp32

    step = max(1, min(int(chunk_rows), M))
    buf = torch.empty((step, V), dtype=dt, device=dev) if M else None
    w_t = linear_weight.t()
    for s in range(0, M, step):
        e = min(M, s + step)
        if idx is None:
            x_c, t_c = x[s:e], target[s:e]
            g_c = grad_rows[s:e] if grad_rows is not None else None
        else:
            rows = idx[s:e]
            x_c, t_c = x.index_select(0, rows), target.index_select(0, rows)
            g_c = grad_rows.index_select(0, rows) if grad_rows is not None else None
        logits = buf[: e - s]
        if linear_bias is None:
            torch.mm(x_c, w_t, out=logits)
        else:
            torch.addmm(linear_bias, x_c, w_t, out=logits)
        ce, z, lse, dlogits = ce_step(logits, t_c, need_grad)
        for out, val in ((ce_rows, ce), (z_rows, z), (lse_rows, lse)):
            if idx is None:
                out[s:e] = val
            else:
                out.index_copy_(0, rows, val.to(cdt))
        if not need_grad:
            continue
        # dlogits is the logits buffer, now d(loss)/d(logits); three reads, no more writes.
        if g_c is not None:
            g_c = g_c.to(dt)
        if db_acc is not None:
            if g_c is None:
                db_acc.add_(dlogits.sum(0, dtype=db_acc.dtype))
            else:
                db_acc.add_(torch.mv(dlogits.t(), g_c).to(db_acc.dtype))
        if dW_acc is not None:
            _accumulate_dw(dW_acc, dlogits, x_c if g_c is None else x_c * g_c.unsqueeze(1), s == 0)
        if dX is not None:
            if idx is None:
                dx_c = torch.mm(dlogits, linear_weight, out=dX[s:e])
            else:
                dx_c = torch.mm(dlogits, linear_weight)
            if g_c is not None:
                dx_c.mul_(g_c.unsqueeze(1))
            if idx is not None:
                dX.index_copy_(0, rows, dx_c)
    del buf
    dW = None if dW_acc is None else dW_acc.to(linear_weight.dtype)
    db = None if db_acc is None else db_acc.to(linear_bias.dtype)
    return ce_rows, z_rows, lse_rows, dX, dW, db
