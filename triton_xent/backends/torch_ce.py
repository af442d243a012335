"""The lean pure-torch backend: rows in chunks, gradient computed during the forward.

It has the launcher signature of the Triton kernel (``triton_xent.ops.cross_entropy.ce_forward``)
so the autograd layer drives either. Per chunk of rows it upcasts the logits to fp32 (fp64 for
fp64 inputs), computes the row statistics and writes the gradient of the chunk straight into the
gradient buffer (or into the logits with ``inplace``). Nothing of size N x V beyond that one
gradient buffer is ever held, so fwd+bwd peaks at about the logits' size plus one chunk, where
``F.cross_entropy`` on upcast logits holds the fp32 copy, log-softmax and its gradient.
"""

from __future__ import annotations

import torch

# Bytes of fp32 scratch per chunk: large enough that per-op overhead vanishes, small enough to
# stay in the last-level cache of a CPU and far below the logits' size.
_CHUNK_BYTES = 32 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows_for(V: int, dtype: torch.dtype, budget: int = _CHUNK_BYTES) -> int:
    item = 8 if dtype == torch.float64 else 4
    return max(1, budget // max(1, V * item))


def _row_factor(target, ignore_index, V, dtype):
    """1 for a row that counts, 0 for an ignored row, NaN for an out-of-range class index."""
    ignored = target == ignore_index
    bad = ~ignored & ((target < 0) | (target >= V))
    f = (~ignored).to(dtype)
    return f.masked_fill_(bad, float("nan")), target.clamp(0, max(V - 1, 0))


def _transform(raw: torch.Tensor, cdt, logit_scale: float | None, softcap: float | None):
    """``x = softcap * tanh(logit_scale * raw / softcap)`` (each part optional) and the tanh (or
    None). Without either, ``raw`` is returned in its own dtype (the reductions accumulate in
    ``cdt``); otherwise ``x`` is in ``cdt``."""
    if logit_scale is None and softcap is None:
        return raw, None
    x = raw.to(cdt)
    if logit_scale is not None:
        x = x * logit_scale
    th = None
    if softcap is not None:
        th = torch.tanh(x / softcap)
        x = th * softcap
    return x, th


def _chain(p: torch.Tensor, th: torch.Tensor | None, logit_scale: float | None) -> None:
    """Chain rule back to the raw logits, in place: times ``1 - tanh**2`` (softcap) and times
    ``logit_scale``."""
    if th is not None:
        p.mul_(1.0 - th.square())
    if logit_scale is not None:
        p.mul_(logit_scale)


def _outputs(logits: torch.Tensor, compute_grad: bool, inplace: bool):
    """The compute dtype, the three per-row outputs and the gradient buffer (or None)."""
    N = logits.shape[0]
    cdt = _compute_dtype(logits.dtype)
    rows = [torch.empty(N, dtype=cdt, device=logits.device) for _ in range(3)]
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    return cdt, *rows, grad


def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    inplace: bool,
    logit_scale: float | None = None,
    chunk_rows: int | None = None,
):
    """Class-index targets. Returns ``ce_rows, z_rows, lse, grad`` (see the Triton launcher)."""
    N, V = logits.shape
    cdt, ce_rows, z_rows, lse_all, grad = _outputs(logits, compute_grad, inplace)
    eps = float(label_smoothing)
    w = weight.to(cdt) if weight is not None else None
    w_sum = w.sum() if w is not None else float(V)
    sc = scales.to(cdt)
    ce_scale, z_scale = sc[0], sc[1]
    step = chunk_rows or chunk_rows_for(V, cdt)

    for s in range(0, N, step):
        e = min(N, s + step)
        x, th = _transform(logits[s:e], cdt, logit_scale, softcap)
        f, t = _row_factor(target[s:e], ignore_index, V, cdt)
        t = t.unsqueeze(1)
        x_t = x.gather(1, t).squeeze(1).to(cdt)
        w_t = w[t.squeeze(1)] if w is not None else torch.ones_like(x_t)
        s_wx = None
        if eps > 0.0:
            s_wx = (x.to(cdt) @ w) if w is not None else x.sum(1, dtype=cdt)

        # One fused softmax (ATen's vectorised kernel) gives p; the row max gives lse exactly:
        # p's own max sits at x's arg-max and is exp(0) / sum, so lse = max(x) - log(max(p)),
        # with max(p) >= 1/V (no underflow). amax is cheaper than max-with-indices + gather.
        # The softmax goes straight into the gradient slice when that holds cdt, in place over
        # the logits too (everything read from x was read above).
        m = x.amax(1, keepdim=True)
        direct = grad is not None and grad.dtype == cdt
        if direct:
            p = grad[s:e]
            torch.softmax(x, 1, out=p) if x.dtype == cdt else p.copy_(torch.softmax(x, 1, dtype=cdt))
        else:
            p = torch.softmax(x, 1, dtype=cdt)
        lse = (m.to(cdt) - p.amax(1, keepdim=True).log()).squeeze(1)

        ce = (1.0 - eps) * w_t * (lse - x_t)
        if eps > 0.0:
            ce = ce + (eps / V) * (lse * w_sum - s_wx)
        ce_rows[s:e] = torch.where(f == 0, torch.zeros_like(ce), ce * f)
        z_rows[s:e] = torch.where(f == 0, torch.zeros_like(lse), z_loss * lse.square() * f)
        lse_all[s:e] = lse

        if grad is None:
            continue
        # d/dx_c = ce_scale * [(1-eps) w_t (p_c - [c==t]) + eps/V (W p_c - w_c)] + z_scale 2 z lse p_c
        # p_c enters with one per-row coefficient; the one-hot and the smoothing terms follow.
        # Per-row factors are zeroed with where(), not multiplied by f: an all-ignored mean has
        # an infinite scale (1/0), and its rows must still get a zero gradient, as in PyTorch.
        kept = f != 0
        coef = ce_scale * ((1.0 - eps) * w_t + (eps / V) * w_sum) + z_scale * (2.0 * z_loss) * lse
        p.mul_(torch.where(kept, coef * f, 0.0).unsqueeze(1))
        p.scatter_add_(1, t, torch.where(kept, -ce_scale * (1.0 - eps) * w_t * f, 0.0).unsqueeze(1))
        if eps > 0.0:
            keep = torch.where(kept, ce_scale * (eps / V) * f, 0.0).unsqueeze(1)
            if w is not None:
                p.addcmul_(keep, w.unsqueeze(0), value=-1.0)
            else:
                p.sub_(keep)
        _chain(p, th, logit_scale)
        if not direct:
            grad[s:e].copy_(p)
    return ce_rows, z_rows, lse_all, grad


def ce_forward_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    *,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    inplace: bool,
    logit_scale: float | None = None,
    chunk_rows: int | None = None,
):
    """Class-probability targets ``(N, V)``: loss_i = -sum_c w_c q_ic log_softmax(x_i)_c with
    q = (1 - eps) * target + eps / V. Same outputs as :func:`ce_forward`."""
    N, V = logits.shape
    cdt, ce_rows, z_rows, lse_all, grad = _outputs(logits, compute_grad, inplace)
    eps = float(label_smoothing)
    w = weight.to(cdt) if weight is not None else None
    sc = scales.to(cdt)
    ce_scale, z_scale = sc[0], sc[1]
    step = chunk_rows or chunk_rows_for(V, cdt)
    for s in range(0, N, step):
        e = min(N, s + step)
        x, th = _transform(logits[s:e], cdt, logit_scale, softcap)
        x = x.to(cdt)
        q = target[s:e].to(cdt)
        if eps > 0.0:
            q = q * (1.0 - eps) + eps / V
        if w is not None:
            q = q * w
        q_sum = q.sum(1)
        qx = (q * x).sum(1)
        m = x.amax(1, keepdim=True)
        p = (x - m).exp_()
        ssum = p.sum(1, keepdim=True)
        lse = (m + ssum.log()).squeeze(1)
        ce_rows[s:e] = lse * q_sum - qx
        z_rows[s:e] = z_loss * lse.square()
        lse_all[s:e] = lse
        if grad is None:
            continue
        # d/dx_c = ce_scale (Q p_c - q_c) + z_scale 2 z lse p_c, with Q = sum_c q_c
        coef = (ce_scale * q_sum + z_scale * (2.0 * z_loss) * lse) / ssum.squeeze(1)
        p.mul_(coef.unsqueeze(1)).sub_(q * ce_scale)
        _chain(p, th, logit_scale)
        grad[s:e].copy_(p)
    return ce_rows, z_rows, lse_all, grad
