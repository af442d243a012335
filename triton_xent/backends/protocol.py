"""What every backend provides, and the records that travel between the layers.

The op layer (``triton_xent.ops.cross_entropy``) drives cross-entropy as one pipeline, partial
statistics -> merge -> gradient, through the :class:`Backend` entry points below. Two modules
implement them with these signatures (checked by a test): ``triton_xent.backends.triton_ce``
(the Triton kernels) and ``triton_xent.backends.torch_ce`` (pure torch, chunks of rows).

:class:`Options` holds every non-tensor argument of one call (validated once, by
``triton_xent._validation``); it flattens itself into one string for the custom ops' schema
(:meth:`Options.encode`) and rebuilds itself from it (:meth:`Options.decode`), so an option added
here reaches torch.compile with no other plumbing.
"""

from __future__ import annotations

import ast
import functools
from typing import NamedTuple, Protocol, runtime_checkable

import torch

REDUCTIONS = ("none", "sum", "mean")

# Fields of a statistics buffer, field-major ``(NUM_FIELDS, N[, parts])`` (the kernels' F_* too).
NUM_FIELDS = 7
F_M, F_S, F_T, F_W, F_XT, F_WT, F_E = range(NUM_FIELDS)  # max, sum exp(x - max), smoothing T
#     and W, target logit, target weight, sum exp(x - max) (x - max) (entropy)


def entropy_of(stats: torch.Tensor) -> torch.Tensor:
    """Each row's entropy from its merged statistics ``(NUM_FIELDS, N)``:
    ``H = lse - sum_c p_c x_c = log s - E / s`` (both terms >= 0: no cancellation)."""
    s = stats[F_S]
    return s.log() - stats[F_E] / s


# The dtype of the math for logits of each floating dtype: fp32 for fp32/fp16/bf16, fp64 for fp64.
# A dict's lookup (``compute_dtype(dtype)``), not a function: it runs on every call.
compute_dtype = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                 torch.float32: torch.float32, torch.float64: torch.float64}.__getitem__


class Options(NamedTuple):
    """The non-tensor arguments of one call (already validated).

    ``inv_divisor`` is ``1 / divisor`` for a number divisor of a ``"sum"`` (a tensor divisor
    travels as a tensor); ``all_rows`` asks for the statistics of ignored rows too: their lse, or
    their gradient (PyTorch's ``0 x softmax``, NaN where a logit is NaN or +inf), which a backward
    recompute writes from them (their logits are not read otherwise, and a gradient written later
    from such statistics is 0: the kernels mark them unread); ``argmax`` for each row's predicted
    class; ``probs``: class-probability targets; ``out_dtype``: the loss's dtype; ``group``:
    the process group's name ("" for one process). The next four are the fused linear head's
    chunking and the gradients it computes. ``entropy``: also each row's entropy (one more
    merged statistic, ``F_E``).
    ``temperature`` divides the logits last: ``softcap(logit_scale * z) / temperature``; the
    backends run it folded into the other two (:meth:`transform`).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float | None = None
    inv_divisor: float = 1.0
    all_rows: bool = False
    argmax: bool = False
    backend: str = "torch"
    probs: bool = False
    out_dtype: torch.dtype = torch.float32
    group: str = ""
    chunk_rows: int = 0
    fp32_accum: bool = False
    skip_ignored: bool = False
    need: tuple[bool, bool, bool] = (False, False, False)  # gradients of (input, weight, bias)
    temperature: float | None = None
    entropy: bool = False

    def transform(self) -> tuple[float | None, float | None]:
        """``(logit_scale, softcap)`` with the temperature folded in, exactly:
        ``c * tanh(s * z / c) / T == (c / T) * tanh((s / T) * z / (c / T))``, and ``s * z / T``
        without a softcap (None: that part is off). The backends transform the logits, and
        chain their gradient (which then includes ``1 / T``), with these two alone."""
        T = self.temperature
        if T is None:
            return self.logit_scale, self.softcap
        scale = (1.0 if self.logit_scale is None else self.logit_scale) / T
        return scale, None if self.softcap is None else self.softcap / T

    def encode(self) -> str:
        """One string for a custom op's schema (dtypes by name)."""
        return repr(tuple(str(v) if isinstance(v, torch.dtype) else v for v in self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(spec: str) -> Options:
        """The options :meth:`encode` wrote (cached: a compiled graph passes the same string)."""
        values = list(ast.literal_eval(spec))
        i = Options._fields.index("out_dtype")
        values[i] = getattr(torch, values[i].removeprefix("torch."))
        return Options(*values)


class RowOutputs(NamedTuple):
    """Per-row results of a forward (either backend): ``ce``, ``z``, ``lse`` (fp32, fp64 for
    fp64); ``loss_rows`` in the output dtype (``"none"`` only); ``argmax`` (int64, when asked);
    ``stats`` (merged statistics, field-major ``(NUM_FIELDS, N)``) and ``dens`` ``(2,)`` (the
    reduction's denominators), both kept for a backward recompute; ``grad`` (or None)."""

    ce: torch.Tensor
    z: torch.Tensor
    lse: torch.Tensor
    loss_rows: torch.Tensor | None
    argmax: torch.Tensor | None
    stats: torch.Tensor
    dens: torch.Tensor
    grad: torch.Tensor | None


@runtime_checkable
class Backend(Protocol):
    """The entry points of a backend (module functions; ``self`` is not part of them).

    ``logits`` are rows ``(N, V_local)`` with a unit-stride class dimension (the Triton backend)
    or any strides (torch); ``target`` ``(N,)`` int64 class ids, global with a shard, or
    ``(N, V_local)`` probabilities (torch only, ``opts.probs``); ``weight`` ``(V_local,)`` or
    None. Tuning (block sizes, splits, chunk rows) is each backend's own
    (``triton_xent._config`` overrides it for tests)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                opts: Options, *, divisor: torch.Tensor | None = None,
                dens: torch.Tensor | None = None, compute_grad: bool, inplace: bool = False,
                grad_target: torch.Tensor | None = None) -> RowOutputs:
        """One process, the whole vocabulary: statistics merged within the row, row losses and
        (``compute_grad``) the gradient for an upstream gradient of 1, over the logits with
        ``inplace``. ``dens``: the reduction's denominators, else computed from ``target``;
        ``grad_target``: receives d(loss)/d(target) of probabilities."""

    def partials(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 opts: Options, *, offset: int, vocab_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Partial statistics ``(NUM_FIELDS, N, P)`` of this shard's columns
        ``[offset, offset + V_local)`` of ``vocab_size`` classes, and the global arg-max column
        of each part ``(N, P)`` with ``opts.argmax``."""

    def finish(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
               opts: Options, merged: torch.Tensor, merged_idx: torch.Tensor | None, *,
               dens: torch.Tensor, rows: tuple | None, grad: torch.Tensor | None,
               offset: int = 0, vocab_size: int | None = None,
               upstream: torch.Tensor | None = None, upstream_lse: torch.Tensor | None = None,
               upstream_ent: torch.Tensor | None = None, skip_unit: bool = True,
               grad_target: torch.Tensor | None = None) -> None:
        """From statistics merged over the whole vocabulary (``(NUM_FIELDS, N)``): the row
        outputs into ``rows`` (:meth:`row_buffers`; None: none) and this shard's gradient into
        ``grad``. With ``upstream`` (0-d or per row), ``upstream_lse`` and ``upstream_ent`` (per
        row: of the aux lse and entropy) it is the backward's recompute: with ``skip_unit`` the
        rows whose upstream is exactly 1 (and the aux upstreams 0) keep what the forward wrote."""

    def finalize(self, ce: torch.Tensor, z: torch.Tensor, dens: torch.Tensor, opts: Options
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, z_term)``: the reduced loss (0-d, ``opts.out_dtype``) and z-loss term (0-d)
        from the rows' ``ce`` and ``z`` and the denominators. A mean's zero denominator gives
        NaN (0/0, as PyTorch); a sum's divisor divides as it is."""

    def denominators(self, target: torch.Tensor, weight: torch.Tensor | None, opts: Options, *,
                     divisor: torch.Tensor | None, V: int, dtype: torch.dtype) -> torch.Tensor:
        """``(D_ce, D_z)``, the reduction's denominators, on the device (no host sync)."""

    def scale_(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``t *= g`` in place (``g`` 0-d, or one per row of a 2-D ``t``); nothing moves where
        ``g`` is exactly 1."""

    def row_buffers(self, N: int, device: torch.device, opts: Options,
                    dtype: torch.dtype) -> tuple:
        """``(ce, z, lse, loss_rows, argmax, stats)`` for :meth:`finish` to fill."""
