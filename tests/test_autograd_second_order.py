"""Second derivatives of both ops against PyTorch in float64: gradient penalties
(``autograd.grad(..., create_graph=True)`` then backward) over the options, probability targets,
the fused linear head and the differentiable aux lse; the clear errors where a second derivative
is not supported (backward twice, under functorch transforms).

The torch backend runs in float64 (compared to 1e-10), the Triton kernels in float32 through the
interpreter, with small forced blocks (and splits) so multi-block paths run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS_64 as BACKENDS
from helpers import (
    REDUCTIONS,
    backend_dtype,
    close64,
    fresh_leaf,
    gen,
    prob_problem,
    rel_err,
    targets_with_ignored,
)

from triton_xent import cross_entropy, linear_cross_entropy
from triton_xent.reference import cross_entropy_reference

DOUBLE_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True, "label_smoothing": 0.1}, id="weight-smooth"),
    pytest.param({"z_loss": 1e-2, "softcap": 3.0, "logit_scale": 0.7}, id="zloss-cap-scale"),
    pytest.param({"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0,
                  "logit_scale": 1.3}, id="all"),
]


def _penalty(loss_fn, leaves, wrt, u):
    """``autograd.grad(f(loss), wrt, create_graph=True)``, then backward through a function of
    that gradient (a gradient penalty); returns the leaves' gradients. ``f`` is not linear, so
    the loss's upstream gradient depends on the loss itself."""
    loss = loss_fn(*leaves)
    objective = ((loss + 0.3 * loss.square()) * u.to(loss.dtype)).sum()
    (gx,) = torch.autograd.grad(objective, leaves[wrt], create_graph=True)
    (gx.square().sum() + (gx * leaves[wrt].detach().sin()).sum()).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", DOUBLE_OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_cross_entropy(backend, opts, reduction, small_blocks):
    dt = backend_dtype(backend)
    N, D, V = 6, 4, 37
    g = gen(7)
    h0 = torch.randn(N, D, generator=g, dtype=torch.float64)
    W0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    t = targets_with_ignored(N, V, g)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 1

    def make(fn, dtype):
        kw = dict(opts, reduction=reduction)
        if kw.pop("weight", False):
            kw["weight"] = w.to(dtype)
        if reduction == "sum" and "logit_scale" in opts:
            kw["divisor"] = 3.0
        return lambda h, W: fn(h @ W.T, t, **kw)

    leaves = [fresh_leaf(h0, dt), fresh_leaf(W0, dt)]
    got = _penalty(make(lambda *a, **k: cross_entropy(*a, backend=backend, **k), dt), leaves, 0, u)
    ref_leaves = [fresh_leaf(h0), fresh_leaf(W0)]
    want = _penalty(make(cross_entropy_reference, torch.float64), ref_leaves, 0, u)
    for name, a, b in zip(("h", "W"), got, want):
        close64(a, b, dt, f"d(penalty)/d{name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_probability_targets(reduction):
    x, q, w, g = prob_problem(8)
    u = torch.randn(() if reduction != "none" else (6,), generator=g, dtype=torch.float64) + 1
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    got = _penalty(lambda a, b: cross_entropy(a, b, **kw),
                   [fresh_leaf(x), fresh_leaf(q)], 0, u)
    want = _penalty(lambda a, b: F.cross_entropy(a, b, **kw),
                    [fresh_leaf(x), fresh_leaf(q)], 0, u)
    for name, a, b in zip(("input", "target"), got, want):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_linear_cross_entropy(backend, reduction, small_blocks):
    dt = backend_dtype(backend)
    N, D, V = 6, 4, 37
    g = gen(9)
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    b0 = torch.randn(V, generator=g, dtype=torch.float64)
    t = targets_with_ignored(N, V, g)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 1
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
              logit_scale=0.8)
    got = _penalty(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, weight=w.to(dt),
                                                        backend=backend, chunk_size=4, **kw),
                   [fresh_leaf(x, dt) for x in (h0, W0, b0)], 0, u)
    want = _penalty(lambda h, W, b: cross_entropy_reference(F.linear(h, W, b), t, w, **kw),
                    [fresh_leaf(x) for x in (h0, W0, b0)], 0, u)
    for name, a, b in zip(("h", "W", "b"), got, want):
        close64(a, b, dt, f"d(penalty)/d{name}")


@pytest.mark.parametrize("skip_ignored", [False, True], ids=["all-rows", "skip-ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_aux_lse(backend, reduction, skip_ignored, small_blocks):
    """A gradient penalty on a loss that includes the user's own z-loss through ``aux.lse``
    and ``aux.z_loss``, for both ops; every row's lse is its log-sum-exp, ignored rows included,
    whatever ``skip_ignored`` says (return_aux computes the rows skipping would leave out)."""
    dt = backend_dtype(backend)
    N, D, V = 6, 4, 37
    g = gen(18)
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    t = targets_with_ignored(N, V, g, ignore=(1, 4))
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 1
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)

    def total(loss, lse, z_term):
        z = 0.1 * lse.square() + 0.05 * lse
        return loss + (z if reduction == "none" else z.sum()) + 2 * z_term

    def ce(h, W):
        loss, aux = cross_entropy(h @ W.T, t, return_aux=True, backend=backend, **kw)
        return total(loss, aux.lse, aux.z_loss)

    def lin(h, W):
        loss, aux = linear_cross_entropy(h, W, t, return_aux=True, backend=backend, chunk_size=4,
                                         skip_ignored=skip_ignored, **kw)
        return total(loss, aux.lse, aux.z_loss)

    def reference(h, W):
        loss, lse, z_term = cross_entropy_reference(h @ W.T, t, return_aux=True, **kw)
        return total(loss, lse, z_term)

    for name, fn in (("cross_entropy", ce), ("linear", lin)):
        got = _penalty(fn, [fresh_leaf(h0, dt), fresh_leaf(W0, dt)], 0, u)
        want = _penalty(reference, [fresh_leaf(h0), fresh_leaf(W0)], 0, u)
        for leaf, a, b in zip(("h", "W"), got, want):
            close64(a, b, dt, f"{name}: d(penalty)/d{leaf}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_clear_errors(backend):
    """Where a second derivative cannot be had, it raises (never a silent zero): in place (the
    logits are gone) and compiled."""
    x = torch.randn(4, 9, dtype=torch.float32, requires_grad=True)
    t = torch.tensor([1, 2, -100, 5])
    loss = cross_entropy(x * 1.0, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)
    torch._dynamo.reset()
    f = torch.compile(lambda a: cross_entropy(a, t, backend=backend), fullgraph=True,
                      backend="aot_eager")
    (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|second derivative"):
        gx.square().sum().backward()


# ---------------------------------------------------------------------------------------------
# 4. inplace_backward safety


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_second_derivative_under_transforms_is_a_clear_error(op):
    g = gen(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, -100, 5])
    if op == "cross_entropy":
        f = lambda a: cross_entropy(a, t)  # noqa: E731
    else:
        W = torch.randn(9, 6, generator=g, dtype=torch.float64)
        f = lambda a: linear_cross_entropy(a, W, t)  # noqa: E731
    assert torch.func.grad(f)(x).shape == x.shape
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.func.jacrev(torch.func.jacrev(f))(x)
    with pytest.raises(RuntimeError, match="jvp"):  # forward mode: PyTorch's own error
        torch.func.hessian(f)(x)
