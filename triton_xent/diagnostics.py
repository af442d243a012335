"""``diagnose``: plain-words checks for the usual cross-entropy mistakes. Opt-in; it syncs.

It looks at a sample of rows (at most ``max_rows``) so it stays cheap on 128k-class logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def diagnose(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    *,
    max_rows: int = 4096,
    logit_scale_limit: float = 1e4,
) -> Diagnosis:
    """Reports, in plain words, inputs that look like a common mistake.

    Checks: rows that look like probabilities or log-probabilities rather than logits (softmax
    applied before cross_entropy), one-hot float targets where class indices were meant, class
    indices out of range, NaN/Inf logits, extreme logit scales, and shape mismatches.

    Examples::

        >>> print(triton_xent.diagnose(torch.softmax(logits, -1), target))
    """
    d = Diagnosis()
    if input.dim() == 0:
        d.findings.append("input is 0-d: logits need a class dimension, (N, C).")
        return d
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    rows = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1).reshape(-1, C)
    rows = rows[:max_rows].detach().double()

    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(rows).sum())
        n_inf = int(torch.isinf(rows).sum())
        d.findings.append(
            f"logits contain {n_nan} NaN and {n_inf} Inf values (in the first {rows.shape[0]} "
            "rows): the loss will be NaN. Check the learning rate, the model's numerics (fp16 "
            "overflow) and the inputs."
        )
    vals = rows[finite]
    if vals.numel() and C > 1:
        sums = rows.sum(1)
        if bool((rows >= 0).all()) and bool(((sums - 1).abs() < 1e-3).all()):
            d.findings.append(
                "every row is non-negative and sums to 1: these look like probabilities. "
                "cross_entropy applies log_softmax itself; pass the raw logits (softmax applied "
                "before cross_entropy?)."
            )
        elif bool((rows <= 0).all()) and bool(((rows.exp().sum(1) - 1).abs() < 1e-3).all()):
            d.findings.append(
                "every row's exp() sums to 1: these look like log-probabilities (log_softmax "
                "applied already). Pass the raw logits, or use nll_loss on log-probabilities."
            )
        scale = float(vals.abs().max())
        if scale > logit_scale_limit:
            d.findings.append(
                f"logits reach |{scale:.3g}|, beyond {logit_scale_limit:g}: training is likely "
                "diverging (check the learning rate, or use softcap= / z_loss=)."
            )

    if target.is_floating_point():
        t = target.detach()
        if t.shape == input.shape:
            tr = t.movedim(1, -1).reshape(-1, C) if t.dim() > 2 else t.reshape(-1, C)
            tr = tr[:max_rows].double()
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
        else:
            d.findings.append(
                f"float target of shape {tuple(t.shape)} for input {tuple(input.shape)}: class "
                "indices must be an integer tensor (target.long()); probabilities must have the "
                "input's shape."
            )
    else:
        t = target.detach().reshape(-1)
        bad = (t != ignore_index) & ((t < 0) | (t >= C))
        if bool(bad.any()):
            d.findings.append(
                f"{int(bad.sum())} target(s) out of range, e.g. {int(t[bad][0])}: with C={C} "
                f"classes indices must be in [0, {C - 1}] or equal ignore_index={ignore_index}."
            )
        if t.numel() and bool((t == ignore_index).all()):
            d.findings.append(
                "every target equals ignore_index: a 'mean' loss is NaN (0/0). Check the label "
                "masking."
            )
        expected = (input.shape[0], *input.shape[2:]) if input.dim() > 1 else ()
        if tuple(target.shape) != tuple(expected):
            d.findings.append(
                f"target shape {tuple(target.shape)} does not match the expected {expected} for "
                f"input {tuple(input.shape)}."
            )
    return d
