"""The lean pure-torch backend: the phases of the Triton launchers, on rows in chunks.

It implements :class:`triton_xent.backends.protocol.Backend` (``forward``, ``partials``, ``finish``,
``finalize``, ``denominators``, ``scale_``, ``row_buffers``), as the Triton launcher does, so the op
layer drives either backend through one pipeline. Per chunk of rows the logits are upcast to fp32
(fp64 for fp64 inputs), the statistics and the gradient of the chunk are written straight into the
gradient buffer (or into the logits with ``inplace``); nothing of size N x V beyond that one buffer
is held, where ``F.cross_entropy`` on upcast logits holds the fp32 copy, log-softmax and its
gradient.

The math is the kernels' (see ``triton_xent/kernels/cross_entropy.py`` for the derivation): the row
maximum is subtracted before anything is added, ``ce = (1 - eps) w_t ((M - x_t) + log s) + (eps / V)
(T + W log s)`` with ``T = sum_c w_c (M - x_c)``. It also runs what the kernels do not: float64, and
class-probability targets ``q`` (the loss ``sum_c q_c (lse - x_c)`` is the smoothing term with per-
row weights ``q``: ``T_q + Q log s``, gradient ``Q p - q``), whose gradient with respect to ``q`` it
can compute too.
"""

from __future__ import annotations

import torch

from .. import _config
from .protocol import (
    F_E,
    F_M,
    F_S,
    F_T,
    F_W,
    F_WT,
    F_XT,
    NUM_FIELDS,
    Options,
    RowOutputs,
    compute_dtype,
)

# Bytes of fp32 scratch per chunk: large enough that per-op overhead vanishes (a few ms per
# row block at V=65536 against ~10 us per op), small enough to stay in a CPU's last-level cache
# and far below the logits' size (the fused head's step holds 2-4 such blocks beside its chunk).
_CHUNK_BYTES = 8 << 20
# A partial arg-max in a part holding a NaN is its first NaN column c, carried as c - NAN_TAG so
# that it wins every merge (torch.argmax's rule; the kernels' ``NAN_TAG``).
NAN_TAG = 2**62
_NO_IDX = torch.iinfo(torch.int64).max


def argmax_candidates(m_k: torch.Tensor, M: torch.Tensor, idx_k: torch.Tensor) -> torch.Tensor:
    """Each part's arg-max where it may be the row's (a NaN tag, or the part holds the maximum
    ``M``), else int64 max: the row's arg-max is the MIN over the parts (or the ranks)."""
    return torch.where((idx_k < 0) | (m_k == M), idx_k, torch.full_like(idx_k, _NO_IDX))


def argmax_untag(idx: torch.Tensor) -> torch.Tensor:
    return torch.where(idx < 0, idx + NAN_TAG, idx)


def chunk_rows_for(V: int, dtype: torch.dtype, budget: int = _CHUNK_BYTES) -> int:
    """Rows per chunk (``_config.TORCH_CHUNK_ROWS`` overrides it)."""
    if _config.TORCH_CHUNK_ROWS:
        return _config.TORCH_CHUNK_ROWS
    item = 8 if dtype == torch.float64 else 4
    return max(1, budget // max(1, V * item))


def _transform(raw: torch.Tensor, cdt, opts: Options):
    """``x = softcap * tanh(logit_scale * raw / softcap) / temperature`` (each part optional;
    the temperature folded into the other two, :meth:`Options.transform`) and the tanh (or
    None). Without any, ``raw`` is returned in its own dtype (the reductions accumulate in
    ``cdt``); otherwise ``x`` is in ``cdt``."""
    scale, softcap = opts.transform()
    if scale is None and softcap is None:
        return raw, None
    x = raw.to(cdt)
    if scale is not None:
        x = x * scale
    th = None
    if softcap is not None:
        th = torch.tanh(x / softcap)
        x = th * softcap
    return x, th


def _chain(p: torch.Tensor, th: torch.Tensor | None, opts: Options) -> None:
    """Chain rule back to the raw logits, in place: times ``1 - tanh**2`` (softcap) and times
    ``logit_scale / temperature``."""
    if th is not None:
        p.mul_(1.0 - th.square())
    scale = opts.transform()[0]
    if scale is not None:
        p.mul_(scale)


def _target_info(target, ignore_index, V, offset, V_local):
    """``(t_local clamped, owned, ignored, invalid)`` of class-index targets (see the kernels)."""
    ignored = target == ignore_index
    invalid = ~ignored & ((target < 0) | (target >= V))
    t_loc = target - offset
    owned = ~ignored & ~invalid & (t_loc >= 0) & (t_loc < V_local)
    return t_loc.clamp(0, max(V_local - 1, 0)), owned, ignored, invalid


def _finite_(xm: torch.Tensor) -> torch.Tensor:
    """``x - M`` in place with its -inf (a class of probability 0) read as 0, so that its
    product with ``p = 0`` is the limit ``p log p -> 0``, not NaN; a NaN stays NaN."""
    return torch.nan_to_num_(xm, nan=float("nan"), posinf=float("inf"), neginf=0.0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` of two ``(n, V)`` tensors without an ``(n, V)`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _mask_rows(v: torch.Tensor, ignored, invalid) -> torch.Tensor:
    nan = torch.full_like(v, float("nan"))
    return torch.where(ignored, torch.zeros_like(v), torch.where(invalid, nan, v))


def _probs_q(q_raw, weight, eps, V, cdt):
    """Per-row weights of class-probability targets: ``((1 - eps) q + eps / V) * w``."""
    q = q_raw.to(cdt)
    if eps > 0.0:
        q = q * (1.0 - eps) + eps / V
    if weight is not None:
        q = q * weight.to(cdt)
    return q


def row_buffers(N: int, device: torch.device, opts: Options, dtype: torch.dtype) -> tuple:
    """``(ce, z, lse, loss_rows, argmax, stats)`` in the compute dtype of ``dtype`` logits."""
    cdt = compute_dtype(dtype)
    ce, z, lse = (torch.empty(N, dtype=cdt, device=device) for _ in range(3))
    loss_rows = (torch.empty(N, dtype=opts.out_dtype, device=device)
                 if opts.reduction == "none" else None)
    argmax = torch.empty(N, dtype=torch.int64, device=device) if opts.argmax else None
    return ce, z, lse, loss_rows, argmax, torch.zeros((NUM_FIELDS, N), dtype=cdt, device=device)


def _row_loss(st, w_t, eps, z_loss, V, probs):
    """``(ce, z, lse)`` per row from merged statistics ``st`` (fields x rows)."""
    M, s, T, W, x_t = st[F_M], st[F_S], st[F_T], st[F_W], st[F_XT]
    mref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    log_s = s.log()
    lse = M + log_s
    if probs:
        ce = T + W * log_s
    else:
        ce = w_t * ((mref - x_t) + log_s)
        if eps > 0.0:
            ce = (1.0 - eps) * ce + (eps / V) * (T + W * log_s)
    return ce, z_loss * lse.square(), lse


def _grad_from_p(p, t_loc, owned, kept, w_t, W, lse, dens, g, g_lse, q, weight, th,
                 opts: Options, V: int, ent=None):
    """dL/dx_raw of a chunk of rows, in place over ``p`` (the chunk's softmax, ``cdt``).

    ``dL/dx_c = p_c coef_p - coef_t [c == t] - coef_w w_c`` (class indices) or
    ``p_c coef_p - ce_scale q_c`` (probabilities ``q``), times the transform's derivative;
    ``g`` and ``g_lse`` are the rows' upstream gradients. Rows not ``kept`` get zeros: where(),
    not a product, as an all-ignored mean has an infinite scale (1/0) and its rows must still
    get a zero gradient, as in PyTorch. ``ent``: ``(g_ent, x - M, c_ent)`` adds the aux
    entropy's gradient ``-g_ent p_c ((x_c - M) + c_ent)``, ``c_ent = -E / s``."""
    eps = opts.label_smoothing
    ent_term = None
    if ent is not None:
        g_ent, xm, c_ent = ent
        # in place over x - M (the caller's own copy): -g_ent p ((x - M) + c_ent)
        ent_term = _finite_(xm).add_(c_ent.unsqueeze(1)).mul_(p).mul_(g_ent.unsqueeze(1))
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    ce_scale = torch.where(kept, g / dens[0], zero)
    if q is not None:
        coef_p = ce_scale * W
    else:
        coef_t = ce_scale * (1.0 - eps) * w_t
        coef_p = coef_t + (ce_scale * (eps / V)) * W if eps > 0.0 else coef_t
    if opts.z_loss:
        coef_p = coef_p + torch.where(kept, g / dens[1], zero) * (2.0 * opts.z_loss) * lse
    if g_lse is not None:  # the aux lse's gradient, on every row (ignored ones too)
        coef_p = coef_p + g_lse
    p.mul_(coef_p.unsqueeze(1))
    if q is not None:
        p.sub_(q * ce_scale.unsqueeze(1))
    else:
        if p.shape[1]:
            p.scatter_add_(1, t_loc.unsqueeze(1), torch.where(owned, -coef_t, zero).unsqueeze(1))
        if eps > 0.0:
            coef_w = (ce_scale * (eps / V)).unsqueeze(1)
            if weight is not None:
                p.addcmul_(coef_w, weight.to(p.dtype).unsqueeze(0), value=-1.0)
            else:
                p.sub_(coef_w)
    if ent_term is not None:
        p.sub_(ent_term)
    _chain(p, th, opts)


def _stats_into(st, x, M, s, target, weight, opts: Options, V, offset, probs, cdt):
    """Writes one chunk's statistics (fields x rows view ``st``) from its transformed logits
    ``x`` (``cdt``), row max ``M`` and ``s = sum exp(x - M)``."""
    V_local = x.shape[1]
    eps = opts.label_smoothing
    mref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    st[F_M] = M
    st[F_S] = s
    if probs or eps > 0.0:
        wq = _probs_q(target, weight, eps, V, cdt) if probs else (
            None if weight is None else weight.to(cdt))
        d = mref.unsqueeze(1) - x  # T = sum_c w_c (M - x_c): no cancellation for equal logits
        st[F_T] = (d * wq).sum(1) if wq is not None else d.sum(1)
        st[F_W] = wq.sum(-1) if wq is not None else V_local
    if not probs and V_local:
        t_loc, owned, _, _ = _target_info(target, opts.ignore_index, V, offset, V_local)
        x_t = x.gather(1, t_loc.unsqueeze(1)).squeeze(1)
        st[F_XT] = torch.where(owned, x_t, torch.zeros_like(x_t))
        w_t = weight.to(cdt)[t_loc] if weight is not None else torch.ones_like(x_t)
        st[F_WT] = torch.where(owned, w_t, torch.zeros_like(w_t))


def partials(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             opts: Options, *, offset: int, vocab_size: int):
    """Partial statistics of this shard's columns, per row: ``part`` ``(NUM_FIELDS, N, 1)`` and
    ``part_idx`` ``(N, 1)`` (global argmax column) with ``opts.argmax``."""
    N, V_local = logits.shape
    V, probs = vocab_size, opts.probs
    cdt = compute_dtype(logits.dtype)
    dev = logits.device
    part = torch.zeros((NUM_FIELDS, N, 1), dtype=cdt, device=dev)
    part_idx = torch.full((N, 1), offset, dtype=torch.int64, device=dev) if opts.argmax else None
    part[F_M].fill_(float("-inf"))
    if N == 0 or V_local == 0:
        return part, part_idx
    step = chunk_rows_for(V_local, cdt)
    for s in range(0, N, step):
        e = min(N, s + step)
        x = _transform(logits[s:e], cdt, opts)[0].to(cdt)
        M = x.amax(1)
        mref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
        xm = x - mref.unsqueeze(1)
        if opts.entropy:  # E = sum_c exp(x_c - M) (x_c - M)
            ex = xm.exp()
            ssum = ex.sum(1)
            part[F_E, s:e, 0] = _row_dot(ex, _finite_(xm))
        else:
            ssum = xm.exp_().sum(1)
        _stats_into(part[:, s:e, 0], x, M, ssum, target[s:e], weight, opts, V, offset, probs, cdt)
        if part_idx is not None:
            am = x.argmax(1) + offset  # the first NaN if any (torch.argmax): tagged
            part_idx[s:e, 0] = torch.where(x.isnan().any(1), am - NAN_TAG, am)
    return part, part_idx


def merge_parts(part: torch.Tensor, part_idx: torch.Tensor | None):
    """Log-sum-exp merge of ``part`` ``(NUM_FIELDS, N, P)`` into ``(NUM_FIELDS, N)`` (and the
    argmax of the part holding the maximum, the first one on a tie)."""
    m_k = part[F_M]
    M = m_k.amax(1)
    mref = torch.where(M == float("-inf"), torch.zeros_like(M), M).unsqueeze(1)
    mref_k = torch.where(m_k == float("-inf"), torch.zeros_like(m_k), m_k)
    st = part.sum(2)
    st[F_M] = M
    r_k = torch.exp(m_k - mref)
    st[F_S] = (part[F_S] * r_k).sum(1)
    st[F_E] = (r_k * (part[F_E] + (mref_k - mref) * part[F_S])).sum(1)
    W_k = part[F_W]
    shift = torch.where(W_k == 0, torch.zeros_like(W_k), W_k * (mref - mref_k))
    st[F_T] = (part[F_T] + shift).sum(1)
    idx = None
    if part_idx is not None:  # a NaN part's tag, else the first part holding the maximum
        idx = argmax_candidates(m_k, M.unsqueeze(1), part_idx).amin(1)
    return st, idx


class _RowInfo:
    """What the gradient of a chunk needs of its rows, from the merged statistics."""

    def __init__(self, st, target, weight, opts: Options, V, offset, V_local, probs, cdt):
        N = st.shape[1]
        if probs:
            self.ignored = self.invalid = torch.zeros(N, dtype=torch.bool, device=st.device)
            self.t_loc = self.owned = self.w_t = None
        else:
            self.t_loc, self.owned, self.ignored, self.invalid = _target_info(
                target, opts.ignore_index, V, offset, V_local)
            self.w_t = st[F_WT] if weight is not None else (~self.ignored & ~self.invalid).to(cdt)
        self.ce, self.z, self.lse = _row_loss(st, self.w_t, opts.label_smoothing, opts.z_loss, V,
                                              probs)

    def write(self, rows, st, idx, opts: Options):
        if rows is None:
            return
        r_ce, r_z, r_lse, r_loss, r_argmax, r_stats = rows
        ce = _mask_rows(self.ce, self.ignored, self.invalid)
        z = _mask_rows(self.z, self.ignored, self.invalid)
        r_ce.copy_(ce)
        r_z.copy_(z)
        r_lse.copy_(self.lse)
        if r_loss is not None:
            r_loss.copy_(ce + z if opts.z_loss else ce)
        if r_argmax is not None:
            r_argmax.copy_(argmax_untag(idx))
        if r_stats is not None:
            r_stats.copy_(st.to(r_stats.dtype))

    def grad(self, p, sl, kept, st, dens, g, g_lse, target, weight, th, opts, V, probs, cdt,
             ent=None):
        """The chunk ``sl``'s gradient, in place over its softmax ``p`` (``ent``: the aux
        entropy's ``(g_ent, x - M)`` of the chunk)."""
        q = _probs_q(target, weight, opts.label_smoothing, V, cdt) if probs else None
        if ent is not None:
            ent = (ent[0], ent[1], -st[F_E, sl] / st[F_S, sl])
        _grad_from_p(p, None if probs else self.t_loc[sl], None if probs else self.owned[sl],
                     kept, None if probs else self.w_t[sl], st[F_W, sl], self.lse[sl], dens, g,
                     g_lse, q, weight, th, opts, V, ent)


def _grad_target(x, lse, g, dens, weight, eps, cdt):
    """d loss / d q_c of class-probability targets: ``(1 - eps) w_c (lse - x_c)`` times the
    reduction's scale and the upstream gradient (PyTorch differentiates soft targets too)."""
    gt = (lse.unsqueeze(1) - x) * ((1.0 - eps) * g / dens[0]).unsqueeze(1)
    return gt * weight.to(cdt) if weight is not None else gt


def finish(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
           opts: Options, merged: torch.Tensor, merged_idx: torch.Tensor | None, *,
           dens: torch.Tensor, rows: tuple | None, grad: torch.Tensor | None, offset: int = 0,
           vocab_size: int | None = None, upstream: torch.Tensor | None = None,
           upstream_lse: torch.Tensor | None = None, upstream_ent: torch.Tensor | None = None,
           skip_unit: bool = True, grad_target: torch.Tensor | None = None) -> None:
    """Writes the row outputs into ``rows`` and the gradient of this shard's columns into
    ``grad`` from the merged statistics ``(NUM_FIELDS, N)`` (see the protocol). With
    ``upstream`` this is the backward's recompute: rows whose upstream is 1 (and lse upstream 0)
    are left as they are. ``grad_target``: also write d(loss)/d(target) of probabilities."""
    N, V_local = logits.shape
    V = V_local if vocab_size is None else vocab_size
    probs = opts.probs
    cdt = compute_dtype(logits.dtype)
    st, idx = merged.to(cdt), merged_idx
    info = _RowInfo(st, target, weight, opts, V, offset, V_local, probs, cdt)
    info.write(rows, st, idx, opts)
    if (grad is None and grad_target is None) or N == 0 or V_local == 0:
        return
    kept = ~info.ignored
    g = torch.ones(N, dtype=cdt, device=logits.device)  # per-row upstream gradient
    g_lse = g_ent = None
    write = None  # rows to write (None: all)
    if upstream is not None:
        g = upstream.to(cdt).expand(N)
        if upstream_lse is not None:
            g_lse = upstream_lse.to(cdt)
        if upstream_ent is not None:
            g_ent = upstream_ent.to(cdt)
        if skip_unit:
            write = kept & (g != 1)
            if g_lse is not None:
                write = write | (g_lse != 0)
            if g_ent is not None:
                write = write | (g_ent != 0)
            if logits.device.type == "cpu" and not bool(write.any()):
                return  # nothing to recompute (a free check on the CPU)
    step = chunk_rows_for(V_local, cdt)
    direct = grad is not None and grad.dtype == cdt and write is None
    for s in range(0, N, step):
        e = min(N, s + step)
        sl = slice(s, e)
        x, th = _transform(logits[sl], cdt, opts)
        x = x.to(cdt)
        xm = None  # x - M, before p may overwrite x (a gradient written over the logits)
        if g_ent is not None:
            M = st[F_M, sl]
            xm = x - torch.where(M == float("-inf"), torch.zeros_like(M), M).unsqueeze(1)
        if V_local == V:
            # The whole row: the forward's own softmax, so a recompute (a second backward, an
            # upstream other than 1) gives the forward's gradient bit for bit.
            p = torch.softmax(x, 1, out=grad[sl]) if direct else torch.softmax(x, 1)
        else:  # a shard of the row: the merged statistics
            M = st[F_M, sl]
            mref = torch.where(M == float("-inf"), torch.zeros_like(M), M).unsqueeze(1)
            p = torch.sub(x, mref, out=grad[sl]) if direct else x - mref
            p.exp_().div_(st[F_S, sl].unsqueeze(1))
        if grad_target is not None:
            grad_target[sl].copy_(_grad_target(x, info.lse[sl], g[sl], dens, weight,
                                               opts.label_smoothing, cdt))
        if grad is None:
            continue
        info.grad(p, sl, kept[sl], st, dens, g[sl], None if g_lse is None else g_lse[sl],
                  target[sl], weight, th, opts, V, probs, cdt,
                  None if g_ent is None else (g_ent[sl], xm))
        if write is not None:
            # The recompute writes only the rows whose upstream differs from 1.
            grad[sl][write[sl]] = p[write[sl]].to(grad.dtype)
        elif not direct:
            grad[sl].copy_(p)


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
            opts: Options, *, divisor: torch.Tensor | None = None,
            dens: torch.Tensor | None = None, compute_grad: bool, inplace: bool = False,
            grad_target: torch.Tensor | None = None) -> RowOutputs:
    """One process, the whole vocabulary, one pass per chunk of rows: a fused softmax gives the
    statistics and, in place, the gradient (merge: none). Returns ``RowOutputs`` (fields in the
    compute dtype)."""
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    dev = logits.device
    probs = opts.probs
    r_ce, r_z, r_lse, r_loss, r_argmax, r_stats = row_buffers(N, dev, opts, logits.dtype)
    if dens is None:
        dens = denominators(target, weight, opts, divisor=divisor, V=V, dtype=cdt)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    step = chunk_rows_for(V, cdt)
    for s in range(0, N, step):
        e = min(N, s + step)
        sl = slice(s, e)
        x, th = _transform(logits[sl], cdt, opts)
        M = x.amax(1).to(cdt)
        # One fused softmax (ATen's vectorised kernel) gives p, straight into the gradient slice
        # when that holds cdt (over the logits too: what is read from x is read before); the
        # row's s = 1 / max(p), as p's max sits at x's arg-max and is exp(0) / s (>= 1/V).
        st = r_stats[:, sl]
        xc = x.to(cdt)  # a copy only for 16-bit logits without a transform
        _stats_into(st, xc, M, M, target[sl], weight, opts, V, 0, probs, cdt)  # s: below
        idx = xc.argmax(1) if opts.argmax else None
        ones = torch.ones(e - s, dtype=cdt, device=dev)
        gt = None
        if grad_target is not None:
            lse = M + (xc - torch.where(M == float("-inf"), 0.0, M).unsqueeze(1)).exp().sum(1).log()
            gt = _grad_target(xc, lse, ones, dens, weight, opts.label_smoothing, cdt)
        xm = None
        if opts.entropy:  # x - M, read before p is written (over x itself when they alias)
            xm = xc - torch.where(M == float("-inf"), 0.0, M).unsqueeze(1)
        direct = grad is not None and grad.dtype == cdt
        p = torch.softmax(xc, 1, out=grad[sl]) if direct else torch.softmax(xc, 1)
        # (an all -inf row: s = 0, lse = -inf as torch.logsumexp; its softmax p is NaN)
        st[F_S] = torch.where(M == float("-inf"), 0.0, p.amax(1).reciprocal())
        if opts.entropy:  # E = s sum_c p_c (x_c - M), before p becomes the gradient
            st[F_E] = st[F_S] * _row_dot(p, _finite_(xm))
        info = _RowInfo(st, target[sl], weight, opts, V, 0, V, probs, cdt)
        info.write(tuple(None if t is None else t[sl] for t in (r_ce, r_z, r_lse, r_loss, r_argmax))
                   + (None,), st, idx, opts)
        if gt is not None:
            grad_target[sl].copy_(gt)
        if grad is None:
            continue
        info.grad(p, slice(0, e - s), ~info.ignored, st, dens, ones, None, target[sl], weight, th,
                  opts, V, probs, cdt)
        if not direct:
            grad[sl].copy_(p)
    return RowOutputs(r_ce, r_z, r_lse, r_loss, r_argmax, r_stats, dens, grad)


def denominators(target: torch.Tensor, weight: torch.Tensor | None, opts: Options, *,
                 divisor: torch.Tensor | None, V: int, dtype: torch.dtype) -> torch.Tensor:
    """``(D_ce, D_z)`` on the device, without a host sync (see the kernels)."""
    probs = opts.probs
    dev = target.device
    if opts.reduction != "mean":
        if divisor is not None:
            return divisor.to(dtype).reshape(1).expand(2).clone()
        return torch.full((2,), 1.0 / opts.inv_divisor, dtype=dtype, device=dev)
    if probs:
        return torch.full((2,), float(target.shape[0]), dtype=dtype, device=dev)
    keep = target != opts.ignore_index
    n_kept = keep.sum().to(dtype)
    if weight is None:
        return torch.stack([n_kept, n_kept])
    ok = keep & (target >= 0) & (target < V)
    w_kept = torch.where(ok, weight.to(dtype)[target.clamp(0, max(V - 1, 0))], 0).sum()
    return torch.stack([w_kept, n_kept])


def finalize(ce: torch.Tensor, z: torch.Tensor, dens: torch.Tensor, opts: Options
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, z_term)`` from per-row values: a mean's zero denominator gives NaN (0/0, as
    PyTorch), a sum's divisor divides as it is (``sum / 0`` is inf)."""
    d = dens.to(ce.dtype)
    loss_ce = ce.sum() / d[0]
    z_term = z.sum() / d[1] if opts.z_loss > 0.0 else torch.zeros_like(loss_ce)
    if opts.reduction == "mean":
        nan = torch.full((), float("nan"), dtype=ce.dtype, device=ce.device)
        loss_ce = torch.where(d[0] == 0, nan, loss_ce)
        z_term = torch.where(d[1] == 0, nan, z_term) if opts.z_loss > 0.0 else z_term
    return (loss_ce + z_term).to(opts.out_dtype), z_term


def scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t *= g`` in place (``g`` 0-d, or one value per row); skipped when ``g`` is 1 on the CPU,
    where reading it is free."""
    if t.numel() == 0:
        return t
    if t.device.type == "cpu" and bool((g == 1).all()):
        return t
    return t.mul_(g.to(t.dtype) if g.dim() == 0 else g.to(t.dtype).unsqueeze(1))
