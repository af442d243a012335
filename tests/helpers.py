"""Shared test helpers: the float64 oracle comparison and per-dtype tolerances.

Results are compared element by element (``assert_close``): a bound normalised by the largest
value (max|err| / max|ref|) lets a small term vanish under the big ones -- at bf16's tolerance it
passes a gradient with the whole label-smoothing term missing.
"""

from __future__ import annotations

import math

import pytest
import torch

from triton_xent.reference import cross_entropy_reference

# How the Triton runs through the public API are parametrized (conftest.py's ``backend``
# fixture): the fused path (one program per row) and the split-vocabulary path forced with 3
# chunks per row (2 on short rows: a chunk keeps >= 16 columns), both with a small forced block so
# that every chunk loops over several blocks.
TRITON_PATHS = {"fused": 1, "split3": 3}
SMALL_BLOCK_V = 32
BACKENDS = ["torch"] + [f"triton-{path}" for path in TRITON_PATHS]

# Elementwise tolerances ``(rtol, atol, step)``, against the float64 reference of the same
# (dtype-rounded) inputs and upstream gradient:
#
#     |out - ref| <= rtol * |ref| + atol * max|ref| + step
#
# where max|ref| is taken over one row of classes for a gradient (one row of a "none" loss is
# one value, so a loss uses the max over the whole tensor).
# rtol: the dtype's rounding. The forward rounds the fp32 gradient to the logits' dtype once and
#   the backward's multiplication by an upstream gradient other than 1 rounds it again: 2 half
#   ulps (2**-8 bf16, 2**-11 fp16), times 2 because the Triton interpreter's fp32 -> bf16 cast
#   truncates instead of rounding to nearest. The loss is rounded to the dtype once.
# atol: fp32 cancellation, where p_c * coef meets the smoothing term eps * w_c / V or a loss row
#   lse - x_t is small next to lse: ~2**-24 of the largest value, with a margin.
# step: fp16 subnormals (below 6.1e-5, where a small p_c of a large V lands): each of the two
#   roundings is off by up to half a step of 2**-24 (the first times |upstream| <= ~4).
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12, 0.0),
    torch.float32: (2e-5, 1e-6, 0.0),
    torch.float16: (2e-3, 1e-6, 2.0**-22),
    torch.bfloat16: (1.6e-2, 1e-6, 0.0),
}
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12, 0.0),
    torch.float32: (1e-5, 1e-6, 0.0),
    torch.float16: (1e-3, 1e-6, 0.0),
    torch.bfloat16: (8e-3, 1e-6, 0.0),
}

# Max-normalised tolerances (loss, gradient) for ``rel_err``, kept for the launcher-level tests
# that still use it; new tests use ``assert_close`` with the tables above.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (NaN where both are NaN counts as equal). Coarse: a term much
    smaller than the largest value can be missing entirely; prefer ``assert_close``."""
    out, ref = out.detach().double(), ref.detach().double()
    both_nan = torch.isnan(out) & torch.isnan(ref)
    if bool((torch.isnan(out) ^ torch.isnan(ref)).any()):
        return float("inf")
    diff = (out - ref).masked_fill(both_nan, 0).abs().max() if out.numel() else torch.tensor(0.0)
    scale = ref.masked_fill(both_nan, 0).abs().max() if ref.numel() else torch.tensor(0.0)
    return float(diff / scale.clamp_min(1e-30)) if float(diff) > 0 else 0.0


def close_ratio(out: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float, float], *,
                dim: int | None = None, scale: torch.Tensor | None = None) -> float:
    """The worst ``|out - ref| / allowed`` over the elements (see the tables above); passes at
    <= 1. NaN must meet NaN and an infinity the same infinity; anything else not finite is inf.
    ``dim``: the class dimension, over which max|ref| is taken (None: the whole tensor).
    ``scale``: the magnitude the error is relative to, in place of |ref|; for a matrix product
    ``A @ B`` it is ``|A| @ |B|`` (the product's rounding is relative to that, not to the result,
    which may cancel to near zero)."""
    rtol, atol, step = tol
    assert out.shape == ref.shape, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0
    out, ref = out.detach().double(), ref.detach().double()
    same = (torch.isnan(out) & torch.isnan(ref)) | (torch.isinf(ref) & (out == ref))
    if not bool((torch.isfinite(ref) | same).all()):
        return math.inf  # an infinity or NaN in the reference that the result does not share
    ref0 = ref.masked_fill(same, 0.0)
    err = (out.masked_fill(same, 0.0) - ref0).abs()
    mag = ref0.abs() if scale is None else scale.detach().double().abs().expand_as(ref0)
    big = mag.max() if dim is None else mag.amax(dim, keepdim=True)
    allowed = rtol * mag + atol * big + step
    ratio = torch.where(err == 0, 0.0, err / allowed.clamp_min(1e-300))
    return float(ratio.nan_to_num(nan=math.inf).max())  # NaN where the reference is finite: inf


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float, float], *,
                 dim: int | None = None, scale: torch.Tensor | None = None,
                 what: str = "value") -> None:
    """Asserts ``close_ratio(out, ref, tol, dim=dim, scale=scale) <= 1``, naming the worst
    element."""
    r = close_ratio(out, ref, tol, dim=dim, scale=scale)
    if r <= 1.0:
        return
    o, f = out.detach().double(), ref.detach().double()
    err = (o - f).abs().nan_to_num(nan=math.inf).flatten()
    i = int(err.argmax()) if err.numel() else 0
    raise AssertionError(
        f"{what}: worst error {r:.3g}x the tolerance {tol} (at flat index {i}: got "
        f"{o.flatten()[i].item():.8g}, expected {f.flatten()[i].item():.8g})"
    )


def upstream_like(ref: torch.Tensor, dtype: torch.dtype, seed: int = 1234) -> torch.Tensor:
    """A seeded random upstream gradient for ``ref`` (float64), already rounded to ``dtype`` so
    that the result and the reference see the same one; a 0-d one is kept away from zero."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    if up.dim() == 0:
        up = up + 2
    return up.to(dtype).double()


def class_dim(x: torch.Tensor) -> int:
    """The class dimension of logits: 0 for ``(C,)``, else 1."""
    return 0 if x.dim() == 1 else 1


def compare(fn, input: torch.Tensor, target: torch.Tensor, *args, grad=True, seed=1234, **kwargs):
    """Runs ``fn`` (triton_xent.cross_entropy with its backend bound) and the float64 reference
    on the same inputs, with a seeded random upstream gradient, and asserts both agree element
    by element (loss and gradient). Returns ``(out, ref)``."""
    dtype = input.dtype
    x = input.detach().clone().requires_grad_(grad)
    ref_in = input.detach().double().requires_grad_(grad)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    w = kwargs.get("weight")
    ref_kwargs = dict(kwargs)
    if w is not None:
        ref_kwargs["weight"] = w.double()
    tgt64 = target.double() if target.is_floating_point() else target.long()

    out = fn(x, target, *args, **kwargs)
    ref = cross_entropy_reference(ref_in, tgt64, *args64, **ref_kwargs)
    assert out.dtype == dtype, f"loss dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"loss shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert_close(out, ref, LOSS_TOL[dtype], what="loss")
    if grad:
        g = upstream_like(ref, dtype, seed)
        out.backward(g.to(out.dtype))
        ref.backward(g)
        assert x.grad is not None and x.grad.shape == x.shape
        assert x.grad.dtype == dtype, f"gradient dtype {x.grad.dtype}, expected {dtype}"
        assert_close(x.grad, ref_in.grad, GRAD_TOL[dtype], dim=class_dim(x), what="gradient")
    return out, ref


# The autograd-contract files (test_autograd_*.py): the torch backend runs in float64 (compared to
# 1e-10), the Triton kernels in float32 through the interpreter.
BACKENDS_64 = ["torch", "triton"]
REDUCTIONS = ["mean", "sum", "none"]


def backend_dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def dtype_tol(dtype):
    return TOL[dtype][1]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def targets_with_ignored(N, V, g, ignore=(1,)):
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -100
    return t


def fresh_leaf(t, dtype=None):
    """A fresh leaf that requires grad (never the caller's tensor itself)."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def close64(got, want, dtype, what=""):
    e = rel_err(got, want)
    assert e <= dtype_tol(dtype), f"{what}: rel err {e:.3g} > {dtype_tol(dtype)}"


def prob_problem(seed, N=6, V=11):
    g = gen(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), 1)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return x, q, w, g


# The drop-in contract's files (test_autocast_and_validation.py, test_api_and_errors.py,
# test_dispatch.py): int targets with ignored rows, and a fullgraph compile without inductor.
def logits_targets(N=12, C=40, dtype=torch.float32, seed=0, ignored=(3,)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * 2).to(dtype)
    t = torch.randint(0, C, (N,), generator=g)
    for i in ignored:
        t[i] = -100
    return x, t


def compile_aot_eager(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


# The options grid of both ops' float64 checks (test_cross_entropy.py, test_linear_cross_entropy.py):
# "weight": True stands for a class-weight vector the test draws.
OPTIONS_GRID = [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.15}, id="smooth"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"weight": True, "label_smoothing": 0.3}, id="weight-smooth"),
    pytest.param({"z_loss": 1e-2}, id="zloss"),
    pytest.param({"softcap": 4.0}, id="softcap"),
    pytest.param({"softcap": 4.0, "z_loss": 1e-3, "label_smoothing": 0.1, "weight": True}, id="all"),
]
