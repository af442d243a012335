"""``diagnose``: plain-words checks for the usual cross-entropy mistakes. Opt-in; it syncs.

It looks at a sample of rows (at most ``max_rows``) so it stays cheap on 128k-class logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import _validation as V


@dataclass
class Diagnosis:
    """Findings of :func:`diagnose`; ``ok`` when there are none. ``str()`` gives a report."""

    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def __str__(self) -> str:
        if self.ok:
            return "triton_xent.diagnose: no problem found."
        return "triton_xent.diagnose found:\n" + "\n".join(f"- {f}" for f in self.findings)


def _rows(input: torch.Tensor, C: int) -> torch.Tensor:
    return input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1).reshape(-1, C)


def diagnose(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
    max_rows: int = 4096,
    logit_scale_limit: float = 1e4,
) -> Diagnosis:
    """Reports, in plain words, inputs that look like a common mistake.

    Checks: whatever :func:`triton_xent.cross_entropy` would raise for these arguments (target
    shape or dtype, class indices out of range), rows that look like probabilities or
    log-probabilities rather than logits (softmax applied before cross_entropy; tolerances fit
    to the input's dtype), one-hot float targets, NaN/+Inf logits, ``-inf`` logits where they
    make the loss infinite or NaN (a row masked entirely, a target on a masked class, label
    smoothing over masked classes; a ``-inf`` vocabulary mask is otherwise fine), all targets
    ignored, and extreme logit scales. It looks at the first ``max_rows`` rows and syncs.

    Args:
        input: logits, as for ``cross_entropy``.
        target: class indices or class probabilities, as for ``cross_entropy``.
        ignore_index: as for ``cross_entropy``.
        label_smoothing: as for ``cross_entropy`` (it spreads mass onto masked classes).
        max_rows: rows looked at.
        logit_scale_limit: logits beyond it in magnitude are reported.

    Examples::

        >>> print(triton_xent.diagnose(torch.softmax(logits, -1), target))
    """
    d = Diagnosis()
    try:
        p = V.prepare(input, target, None, ignore_index, check_values=True)
    except V.CrossEntropyInputError as exc:
        msg = str(exc)
        what = "cross_entropy raises for these arguments"
        if "is out of bounds" in msg:
            what = "target(s) out of range, so cross_entropy raises"
        elif msg.startswith("Expected target size"):
            what = "the target's shape does not match the input's, so cross_entropy raises"
        d.findings.append(f"{what}: {msg}")
        p = None
    if not isinstance(input, torch.Tensor) or input.dim() == 0 or not input.is_floating_point():
        return d
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    rows = (p.logits if p is not None else _rows(input, C))[:max_rows].detach().double()
    n = rows.shape[0]
    # Rows that count: with class indices, those whose target is not ignored.
    kept = torch.ones(n, dtype=torch.bool, device=rows.device)
    tgt = None
    if p is not None and not p.probs:
        tgt = p.target[:n]
        kept = tgt != ignore_index

    nan = torch.isnan(rows)
    pos_inf = rows == float("inf")
    neg_inf = rows == float("-inf")
    bad_rows = (nan | pos_inf).any(1) & kept
    if bool(bad_rows.any()):
        d.findings.append(
            f"{int(bad_rows.sum())} of the first {n} rows hold NaN or +Inf logits ("
            f"{int(nan.sum())} NaN, {int(pos_inf.sum())} +Inf): their loss will be NaN. Check "
            "the learning rate, the model's numerics (fp16 overflow) and the inputs."
        )
    if bool(neg_inf.any()) and C:
        # -inf is a legitimate mask (banned tokens, a padded vocabulary): a problem only where
        # the softmax or the target needs a masked class.
        masked_rows = neg_inf.all(1) & kept
        if bool(masked_rows.any()):
            d.findings.append(
                f"{int(masked_rows.sum())} row(s) are -inf for every class: their loss will be "
                "NaN. Leave at least one class unmasked, or ignore those rows (ignore_index)."
            )
        if tgt is not None:
            on_masked = kept & ~neg_inf.all(1) & neg_inf.gather(
                1, tgt.clamp(0, C - 1).unsqueeze(1)).squeeze(1) & (tgt >= 0) & (tgt < C)
            if bool(on_masked.any()):
                d.findings.append(
                    f"{int(on_masked.sum())} target(s) point at a class whose logit is -inf "
                    "(masked): their loss will be inf. Check the mask against the labels."
                )
        elif p is not None and p.probs:
            mass = (p.target[:n].double() > 0) & neg_inf
            if bool(mass.any()):
                d.findings.append(
                    "the target probabilities put mass on classes whose logit is -inf (masked): "
                    "the loss will be inf."
                )
        if label_smoothing > 0 and bool((neg_inf.any(1) & kept).any()):
            d.findings.append(
                f"label_smoothing={label_smoothing} spreads target mass onto every class, "
                "including the -inf (masked) ones: the loss will be inf. Use a large negative "
                "finite value for the mask, or label_smoothing=0."
            )

    finite_rows = torch.isfinite(rows).all(1) | (neg_inf.any(1) & ~(nan | pos_inf).any(1))
    sample = rows[finite_rows]
    if sample.numel() and C > 1:
        # Tolerances fit to the input's dtype: a bf16 softmax sums to 1 within ~2**-8.
        eps = torch.finfo(input.dtype).eps
        tol_p = max(1e-3, eps)
        tol_logp = max(1e-3, eps * (1.0 + math.log(C)))  # log-probs: error grows with |log p|
        if bool((sample >= 0).all()) and bool(((sample.sum(1) - 1).abs() <= tol_p).all()):
            d.findings.append(
                "every row is non-negative and sums to 1: these look like probabilities. "
                "cross_entropy applies log_softmax itself; pass the raw logits (softmax applied "
                "before cross_entropy?)."
            )
        elif bool((sample <= 0).all()) and bool(
                ((sample.exp().sum(1) - 1).abs() <= tol_logp).all()):
            d.findings.append(
                "every row's exp() sums to 1: these look like log-probabilities (log_softmax "
                "applied already). Pass the raw logits, or use nll_loss on log-probabilities."
            )
    finite = rows[torch.isfinite(rows)]
    if finite.numel():
        scale = float(finite.abs().max())
        if scale > logit_scale_limit:
            d.findings.append(
                f"logits reach |{scale:.3g}|, beyond {logit_scale_limit:g}: training is likely "
                "diverging (check the learning rate, or use softcap= / z_loss=)."
            )

    if p is not None and p.probs:
        tr = p.target[:n].detach().double()
        if bool(((tr == 0) | (tr == 1)).all()) and bool((tr.sum(-1) == 1).all()):
            d.findings.append(
                "target is one-hot float: that works as class probabilities, but class "
                "indices (target.argmax(-1)) are cheaper and allow ignore_index."
            )
        elif bool((tr < 0).any()) or bool(((tr.sum(-1) - 1).abs() > 1e-3).any()):
            d.findings.append(
                "float target rows are not probability distributions (negative values or "
                "rows not summing to 1)."
            )
    elif p is not None and p.target.numel() and bool((p.target == ignore_index).all()):
        d.findings.append(
            "every target equals ignore_index: a 'mean' loss is NaN (0/0). Check the label "
            "masking."
        )
    return d
