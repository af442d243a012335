"""The autograd contract of both ops against PyTorch in float64 (issue 11, op layer): functorch
transforms (vmap, torch.func.grad), probability targets that require grad, second derivatives,
the in-place gradient's safety, a zero total weight with smoothing, the rounding of the gradient
for an upstream gradient other than 1, and the aux outputs (differentiable lse, arg-max, token
accuracy).

The torch backend runs in float64 (compared to 1e-10), the Triton kernels in float32 through the
interpreter, with small forced blocks (and splits) so multi-block paths run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, rel_err

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy
from triton_xent.reference import cross_entropy_reference

BACKENDS = ["torch", "triton"]
REDUCTIONS = ["mean", "sum", "none"]


def _dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def _tol(dtype):
    return TOL[dtype][1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _targets(N, V, g, ignore=(1,)):
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -100
    return t


def _leaf(t, dtype=None):
    """A fresh leaf that requires grad (never the caller's tensor itself)."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _close(got, want, dtype, what=""):
    e = rel_err(got, want)
    assert e <= _tol(dtype), f"{what}: rel err {e:.3g} > {_tol(dtype)}"


@pytest.fixture
def no_vmap_fallback():
    """vmap without functorch's slow per-example fallback: an op without a vmap rule raises."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


# ---------------------------------------------------------------------------------------------
# 1. functorch transforms


@pytest.mark.parametrize("dims", ["logits", "target", "both"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_matches_pytorch(backend, reduction, dims, no_vmap_fallback, small_blocks):
    """``vmap(lambda a: cross_entropy(a @ W.T, t))(x).sum().backward()``: W.grad (and x.grad)
    as PyTorch's, in_dims over the logits, the targets, or both."""
    dt = _dtype(backend)
    B, N, D, V = 3, 5, 4, 37
    g = _gen(0)
    X = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    T = torch.stack([_targets(N, V, g, ignore=(i,)) for i in range(B)])
    W0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1)
    in_dims = {"logits": (0, None), "target": (None, 0), "both": (0, 0)}[dims]

    def args(x_in):
        return (x_in if dims != "target" else x_in[0]), (T if dims != "logits" else T[0])

    def ours(W, x_in):
        f = lambda a, b: cross_entropy(a @ W.T, b, w.to(dt), backend=backend, **kw)  # noqa: E731
        return torch.vmap(f, in_dims=in_dims)(*args(x_in))

    def reference(W, x_in):
        # What vmap means, as a loop: PyTorch's own F.cross_entropy cannot be vmapped over
        # targets with class weights (a masked_select inside).
        x, t = args(x_in)
        return torch.stack([F.cross_entropy((x if in_dims[0] is None else x[i]) @ W.T,
                                            t if in_dims[1] is None else t[i], w, **kw)
                            for i in range(B)])

    Wa, Xa = _leaf(W0, dt), _leaf(X, dt)
    out = ours(Wa, Xa)
    Wr, Xr = _leaf(W0), _leaf(X)
    ref = reference(Wr, Xr)
    assert out.shape == ref.shape
    _close(out, ref, dt, "loss")
    u = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * u.to(dt)).sum().backward()
    (ref * u).sum().backward()
    assert Wa.grad is not None, "vmap dropped the gradient"
    _close(Wa.grad, Wr.grad, dt, "W.grad")
    _close(Xa.grad, Xr.grad, dt, "x.grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_linear_cross_entropy(backend, reduction, no_vmap_fallback, small_blocks):
    dt = _dtype(backend)
    B, N, D, V = 2, 5, 4, 37
    g = _gen(1)
    X = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    T = torch.stack([_targets(N, V, g, ignore=(i,)) for i in range(B)])
    W0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    b0 = torch.randn(V, generator=g, dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)

    Wa, ba, Xa = (_leaf(t, dt) for t in (W0, b0, X))
    out = torch.vmap(lambda x, t: linear_cross_entropy(
        x, Wa, t, linear_bias=ba, backend=backend, chunk_size=2, **kw))(Xa, T)
    Wr, br, Xr = (_leaf(t) for t in (W0, b0, X))
    ref = torch.vmap(lambda x, t: cross_entropy_reference(F.linear(x, Wr, br), t, **kw))(Xr, T)
    _close(out, ref, dt, "loss")
    u = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * u.to(dt)).sum().backward()
    (ref * u).sum().backward()
    for name, a, r in (("W", Wa, Wr), ("b", ba, br), ("x", Xa, Xr)):
        assert a.grad is not None, f"vmap dropped d{name}"
        _close(a.grad, r.grad, dt, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_per_sample_gradients(backend, no_vmap_fallback, small_blocks):
    """torch.func.grad of the loss, and vmap(grad) (per-sample gradients), for both ops."""
    dt = _dtype(backend)
    N, D, V = 5, 4, 37
    g = _gen(2)
    x = torch.randn(N, V, generator=g, dtype=torch.float64)
    t = _targets(N, V, g)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    got = torch.func.grad(lambda a: cross_entropy(a, t, backend=backend, **kw))(x.to(dt))
    want = torch.func.grad(lambda a: cross_entropy_reference(a, t, **kw))(x)
    _close(got, want, dt, "func.grad")

    X = torch.randn(3, N, V, generator=g, dtype=torch.float64)
    T = torch.stack([_targets(N, V, g, ignore=(i,)) for i in range(3)])
    got = torch.vmap(torch.func.grad(lambda a, b: cross_entropy(a, b, backend=backend, **kw)))(
        X.to(dt), T)
    want = torch.vmap(torch.func.grad(lambda a, b: cross_entropy_reference(a, b, **kw)))(X, T)
    _close(got, want, dt, "vmap(grad)")

    H = torch.randn(3, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)

    def per_sample(fn, W, dtype):
        return torch.vmap(torch.func.grad(fn, argnums=1), in_dims=(0, None, 0))(H.to(dtype), W, T)

    got = per_sample(lambda h, w_, t_: linear_cross_entropy(h, w_, t_, backend=backend,
                                                            chunk_size=2, **kw), W.to(dt), dt)
    want = per_sample(lambda h, w_, t_: cross_entropy_reference(h @ w_.T, t_, **kw), W,
                      torch.float64)
    _close(got, want, dt, "per-sample dW")


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_second_derivative_under_transforms_is_a_clear_error(op):
    g = _gen(3)
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


# ---------------------------------------------------------------------------------------------
# 2. probability targets that require grad


PROB_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"label_smoothing": 0.2}, id="smooth"),
    pytest.param({"weight": True, "label_smoothing": 0.3}, id="weight-smooth"),
]


def _prob_problem(seed, N=6, V=11):
    g = _gen(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), 1)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return x, q, w, g


def _prob_grads(fn, x, q, w, opts, reduction, u, weight_grad=False):
    x, q = _leaf(x), _leaf(q)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = w.clone().requires_grad_(weight_grad)
    loss = fn(x, q, reduction=reduction, **kw)
    (loss * u).sum().backward()
    return loss, x.grad, q.grad, kw["weight"].grad if weight_grad else None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", PROB_OPTIONS)
def test_probability_target_gradient(opts, reduction):
    """d(loss)/d(target) of class probabilities, as PyTorch: ``-w_c (1 - eps) log_softmax``
    times the reduction's scale and the upstream gradient (no row is ignored)."""
    x, q, w, g = _prob_problem(4)
    u = torch.randn(() if reduction != "none" else (6,), generator=g, dtype=torch.float64)
    got = _prob_grads(lambda *a, **k: cross_entropy(*a, backend="torch", **k), x, q, w, opts,
                      reduction, u)
    want = _prob_grads(F.cross_entropy, x, q, w, opts, reduction, u)
    for name, a, b in zip(("loss", "d(input)", "d(target)"), got, want):
        assert a is not None, f"{name} missing"
        assert rel_err(a, b) < 1e-12, f"{name}: {rel_err(a, b):.3g}"
    # ignore_index has no meaning for probabilities: PyTorch raises, and so do we
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(x, q, ignore_index=2)
    with pytest.raises(CrossEntropyInputError, match="ignore_index=2 with class-probability"):
        cross_entropy(x, q, ignore_index=2)


def test_probability_target_gradient_compiled_and_transformed():
    x, q, w, g = _prob_problem(5)
    opts = {"weight": True, "label_smoothing": 0.1}
    for reduction in ("mean", "none"):
        torch._dynamo.reset()
        u = torch.randn(() if reduction != "none" else (6,), generator=g, dtype=torch.float64)
        f = torch.compile(lambda *a, **k: cross_entropy(*a, backend="torch", **k),
                          fullgraph=True, backend="aot_eager")
        got = _prob_grads(f, x, q, w, opts, reduction, u)
        want = _prob_grads(F.cross_entropy, x, q, w, opts, reduction, u)
        for name, a, b in zip(("loss", "d(input)", "d(target)"), got, want):
            assert rel_err(a, b) < 1e-12, f"compiled {reduction} {name}: {rel_err(a, b):.3g}"
    got = torch.func.grad(lambda p: cross_entropy(x, p, w, label_smoothing=0.1))(q)
    want = torch.func.grad(lambda p: F.cross_entropy(x, p, w, label_smoothing=0.1))(q)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_class_weight_that_requires_grad(compiled):
    """Probability targets: PyTorch differentiates the class weights, and so do we. Class
    indices: PyTorch raises, and so do we (never a silently missing gradient)."""
    x, q, w, g = _prob_problem(6)
    fn = lambda *a, **k: cross_entropy(*a, backend="torch", **k)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    opts = {"weight": True, "label_smoothing": 0.2}
    u = torch.randn((), generator=g, dtype=torch.float64)
    got = _prob_grads(fn, x, q, w, opts, "mean", u, weight_grad=True)
    want = _prob_grads(F.cross_entropy, x, q, w, opts, "mean", u, weight_grad=True)
    for name, a, b in zip(("loss", "d(input)", "d(target)", "d(weight)"), got, want):
        assert a is not None and rel_err(a, b) < 1e-12, name
    t = torch.randint(0, 11, (6,), generator=g)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.cross_entropy(_leaf(x), t, _leaf(w))
    for backend in BACKENDS:
        with pytest.raises(CrossEntropyInputError, match="weight.detach"):
            cross_entropy(x.float(), t, w.float().requires_grad_(), backend=backend)
    with pytest.raises(CrossEntropyInputError, match="weight.detach"):
        linear_cross_entropy(x, torch.randn(11, 11, dtype=torch.float64), t,
                             weight=_leaf(w))


# ---------------------------------------------------------------------------------------------
# 3. second derivatives (gradient penalties)


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
    dt = _dtype(backend)
    N, D, V = 6, 4, 37
    g = _gen(7)
    h0 = torch.randn(N, D, generator=g, dtype=torch.float64)
    W0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    t = _targets(N, V, g)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 1

    def make(fn, dtype):
        kw = dict(opts, reduction=reduction)
        if kw.pop("weight", False):
            kw["weight"] = w.to(dtype)
        if reduction == "sum" and "logit_scale" in opts:
            kw["divisor"] = 3.0
        return lambda h, W: fn(h @ W.T, t, **kw)

    leaves = [_leaf(h0, dt), _leaf(W0, dt)]
    got = _penalty(make(lambda *a, **k: cross_entropy(*a, backend=backend, **k), dt), leaves, 0, u)
    ref_leaves = [_leaf(h0), _leaf(W0)]
    want = _penalty(make(cross_entropy_reference, torch.float64), ref_leaves, 0, u)
    for name, a, b in zip(("h", "W"), got, want):
        _close(a, b, dt, f"d(penalty)/d{name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_probability_targets(reduction):
    x, q, w, g = _prob_problem(8)
    u = torch.randn(() if reduction != "none" else (6,), generator=g, dtype=torch.float64) + 1
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    got = _penalty(lambda a, b: cross_entropy(a, b, **kw),
                   [_leaf(x), _leaf(q)], 0, u)
    want = _penalty(lambda a, b: F.cross_entropy(a, b, **kw),
                    [_leaf(x), _leaf(q)], 0, u)
    for name, a, b in zip(("input", "target"), got, want):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_linear_cross_entropy(backend, reduction, small_blocks):
    dt = _dtype(backend)
    N, D, V = 6, 4, 37
    g = _gen(9)
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    b0 = torch.randn(V, generator=g, dtype=torch.float64)
    t = _targets(N, V, g)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 1
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
              logit_scale=0.8)
    got = _penalty(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, weight=w.to(dt),
                                                        backend=backend, chunk_size=4, **kw),
                   [_leaf(x, dt) for x in (h0, W0, b0)], 0, u)
    want = _penalty(lambda h, W, b: cross_entropy_reference(F.linear(h, W, b), t, w, **kw),
                    [_leaf(x) for x in (h0, W0, b0)], 0, u)
    for name, a, b in zip(("h", "W", "b"), got, want):
        _close(a, b, dt, f"d(penalty)/d{name}")


@pytest.mark.parametrize("skip_ignored", [False, True], ids=["all-rows", "skip-ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_aux_lse(backend, reduction, skip_ignored, small_blocks):
    """A gradient penalty on a loss that includes the user's own z-loss through ``aux.lse``
    and ``aux.z_loss``, for both ops; every row's lse is its log-sum-exp, ignored rows included,
    whatever ``skip_ignored`` says (return_aux computes the rows skipping would leave out)."""
    dt = _dtype(backend)
    N, D, V = 6, 4, 37
    g = _gen(18)
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    t = _targets(N, V, g, ignore=(1, 4))
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
        got = _penalty(fn, [_leaf(h0, dt), _leaf(W0, dt)], 0, u)
        want = _penalty(reference, [_leaf(h0), _leaf(W0)], 0, u)
        for leaf, a, b in zip(("h", "W"), got, want):
            _close(a, b, dt, f"{name}: d(penalty)/d{leaf}")


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


def _refused(backend, make, base, match):
    before = base.detach().clone()
    with pytest.raises(CrossEntropyInputError, match=match):
        cross_entropy(make(), torch.tensor([1, 2, 3]), inplace_backward=True, backend=backend)
    assert torch.equal(base.detach(), before), "written before the error"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_before_writing(backend):
    leaf = torch.randn(3, 40, requires_grad=True)
    _refused(backend, lambda: leaf, leaf, "leaf")
    flat = torch.randn(120, requires_grad=True)
    _refused(backend, lambda: flat.view(3, 40), flat, "leaf")
    param = torch.nn.Parameter(torch.randn(3, 40))
    _refused(backend, lambda: param[:, :], param, "leaf")
    row = torch.randn(1, 40, requires_grad=True) * 1.0  # a non-leaf row, expanded
    _refused(backend, lambda: row.expand(3, 40), row, "overlap")
    base = torch.randn(60, requires_grad=True) * 1.0
    _refused(backend, lambda: base.as_strided((3, 40), (1, 1)), base, "overlap")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_bumps_the_version_counter(backend):
    """The logits hold the gradient after the call: an op that saved them raises autograd's
    error in the backward instead of using the overwritten values."""
    for saver in (torch.sin, lambda z: z * torch.ones(40, requires_grad=True)):
        h = torch.randn(3, 5, requires_grad=True)
        logits = h @ torch.randn(5, 40)
        saved = saver(logits)
        version = logits._version
        loss = cross_entropy(logits, torch.tensor([1, -100, 3]), inplace_backward=True,
                             backend=backend)
        assert logits._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss + saved.sum()).backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_documented_use(backend, reduction, small_blocks):
    """A Linear layer's output, any reduction, a random upstream gradient: the gradient is
    PyTorch's (rounded twice where the upstream is not 1, see the README), in the logits'
    storage."""
    dt = _dtype(backend)
    N, D, V = 7, 5, 45
    g = _gen(10)
    lin = torch.nn.Linear(D, V, dtype=torch.float64)
    ref_lin = torch.nn.Linear(D, V, dtype=torch.float64)
    ref_lin.load_state_dict(lin.state_dict())
    lin = lin.to(dt)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    t = _targets(N, V, g)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64) + 2
    logits = lin(h.to(dt))
    seen = []
    logits.register_hook(lambda gr: seen.append(gr.data_ptr()))
    ptr = logits.data_ptr()
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    loss = cross_entropy(logits, t, w.to(dt), inplace_backward=True, backend=backend, **kw)
    loss.backward(u.to(dt))
    cross_entropy_reference(ref_lin(h), t, w, **kw).backward(u)
    assert seen == [ptr], "the gradient is not in the logits' storage"
    _close(lin.weight.grad, ref_lin.weight.grad, dt, "dW")
    _close(lin.bias.grad, ref_lin.bias.grad, dt, "db")


# ---------------------------------------------------------------------------------------------
# 5. zero total weight with label smoothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_total_weight_with_smoothing_is_nan(backend):
    """A weighted mean over kept targets whose weights are all 0: 0/0 plus the smoothing term
    is NaN in PyTorch (loss, and the kept rows' gradient; an ignored row's stays 0); so is
    ours, in both ops."""
    dt = _dtype(backend)
    g = _gen(11)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, -100, 3, 1])
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    w[[1, 2, 3]] = 0.0  # every kept target has weight 0; other classes do not
    xr = _leaf(x)
    ref = F.cross_entropy(xr, t, w, label_smoothing=0.1)
    ref.backward()
    nan_rows = torch.tensor([True, True, False, True, True])
    assert torch.isnan(ref) and torch.equal(torch.isnan(xr.grad).all(1), nan_rows)
    assert torch.equal(xr.grad[2], torch.zeros(9, dtype=torch.float64))
    xa = _leaf(x, dt)
    loss = cross_entropy(xa, t, w.to(dt), label_smoothing=0.1, backend=backend)
    loss.backward()
    assert torch.isnan(loss), f"got {loss}, PyTorch gives NaN"
    assert torch.equal(torch.isnan(xa.grad).all(1), nan_rows)
    assert torch.equal(xa.grad[2], torch.zeros(9, dtype=dt))
    h = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dt)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64).to(dt).requires_grad_()
    loss = linear_cross_entropy(h, W, t, weight=w.to(dt), label_smoothing=0.1, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(W.grad).all()  # every class sees a NaN row


# ---------------------------------------------------------------------------------------------
# 15. the gradient is rounded once for any upstream gradient


def _ulp_errors(got: torch.Tensor, exact: torch.Tensor):
    """``(mismatches, max error in ulps)`` of a bf16 tensor against the float64 value rounded
    once to bf16."""
    once = exact.to(torch.bfloat16)
    exp = torch.frexp(once.float())[1]
    ulp = torch.ldexp(torch.ones_like(exact), exp - 8)  # bf16: 8 significant bits
    err = ((got.double() - exact).abs() / ulp)[once != 0]
    return int((got != once).sum()), float(err.max())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_rounded_once_for_any_upstream(backend, reduction):
    """With an upstream gradient other than 1, the bf16 gradient is the exact one rounded once
    (to within the fp32 math: <= 0.55 ulp, a handful of ties), where PyTorch's own bf16 is far
    coarser; ``inplace_backward`` scales an already rounded gradient (rounded twice, < 1.5 ulp,
    as the README says)."""
    g = _gen(12)
    N, V = 24, 515
    x = (torch.randn(N, V, generator=g) * 3).bfloat16()
    t = _targets(N, V, g, ignore=(0, 7))
    kw = dict(reduction=reduction, label_smoothing=0.1)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, **kw)
    up = (torch.rand(ref.shape, generator=g, dtype=torch.float64) * 3 + 0.1).bfloat16()
    ref.backward(up.double())
    xt = _leaf(x)
    F.cross_entropy(xt, t, **kw).backward(up)
    torch_mismatch, torch_ulps = _ulp_errors(xt.grad, x64.grad)
    xa = _leaf(x)
    cross_entropy(xa, t, backend=backend, **kw).backward(up)
    mismatch, ulps = _ulp_errors(xa.grad, x64.grad)
    assert ulps <= 0.55 and mismatch <= x.numel() // 1000, (mismatch, ulps)
    assert ulps < torch_ulps and mismatch < torch_mismatch
    leaf = _leaf(x)
    cross_entropy(leaf * 1, t, backend=backend, inplace_backward=True, **kw).backward(up)
    _, ulps_inplace = _ulp_errors(leaf.grad, x64.grad)
    assert ulps_inplace < 1.5, ulps_inplace


# ---------------------------------------------------------------------------------------------
# 16. aux outputs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_lse_is_differentiable(backend, reduction, small_blocks):
    """A user's own z-loss through ``aux.lse`` (ignored rows included), alone or with the loss
    (and ``aux.z_loss``), equals PyTorch's (logsumexp of the transformed logits)."""
    dt = _dtype(backend)
    g = _gen(13)
    N, V = 8, 45
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = _targets(N, V, g, ignore=(0, 5))
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=5.0, logit_scale=0.8,
              z_loss=1e-2)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5  # weighted mean: D_ce != D_z
    v = torch.randn(N, generator=g, dtype=torch.float64)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64)
    for with_loss in (False, True):
        xa, xr = _leaf(x, dt), _leaf(x)
        loss, aux = cross_entropy(xa, t, w.to(dt), return_aux=True, backend=backend, **kw)
        ref, lse, z = cross_entropy_reference(xr, t, w, return_aux=True, **kw)
        assert aux.lse.requires_grad and aux.z_loss.requires_grad
        _close(aux.lse, lse, dt, "lse")
        obj = (aux.lse.square() * v.to(dt)).sum()
        robj = (lse.square() * v).sum()
        if with_loss:
            obj = obj + (loss * u.to(dt)).sum() + (aux.z_loss * u.to(dt)).sum() * 3
            robj = robj + (ref * u).sum() + (z * u).sum() * 3
        obj.backward()
        robj.backward()
        _close(xa.grad, xr.grad, dt, f"grad with_loss={with_loss}")
    # In place, the logits are gone: differentiating the lse says so.
    loss, aux = cross_entropy(_leaf(x, dt) * 1, t, return_aux=True,
                              inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        (loss + aux.lse.sum()).backward()


@pytest.mark.parametrize("skip_ignored", [False, True], ids=["all-rows", "skip-ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_aux_lse_is_differentiable(backend, reduction, skip_ignored, small_blocks):
    """The same through the fused head; with ``return_aux`` every row's lse is its log-sum-exp,
    ignored rows included, whatever ``skip_ignored`` says (as cross_entropy's)."""
    dt = _dtype(backend)
    g = _gen(14)
    N, D, V = 7, 4, 45
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    t = _targets(N, V, g, ignore=(0, 4))
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    v = torch.randn(N, generator=g, dtype=torch.float64)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64)
    h, W = _leaf(h0, dt), _leaf(W0, dt)
    loss, aux = linear_cross_entropy(h, W, t, return_aux=True, backend=backend, chunk_size=3,
                                     skip_ignored=skip_ignored, **kw)
    hr, Wr = _leaf(h0), _leaf(W0)
    ref, lse, z = cross_entropy_reference(hr @ Wr.T, t, return_aux=True, **kw)
    _close(aux.lse, lse, dt, "lse")
    # (a linear term too: an ignored row's lse passes its gradient)
    ((aux.lse.square() * v.to(dt) + aux.lse).sum() + (loss * u.to(dt)).sum()
     + 3 * (aux.z_loss * u.to(dt)).sum()).backward()
    ((lse.square() * v + lse).sum() + (ref * u).sum() + 3 * (z * u).sum()).backward()
    _close(h.grad, hr.grad, dt, "dh")
    _close(W.grad, Wr.grad, dt, "dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_gradients_compiled_and_vmapped(backend, no_vmap_fallback):
    """``aux.lse`` and ``aux.z_loss`` carry their gradients on the functional path too."""
    dt = _dtype(backend)
    g = _gen(15)
    x = torch.randn(6, 30, generator=g, dtype=torch.float64)
    t = _targets(6, 30, g)
    kw = dict(z_loss=1e-2, label_smoothing=0.1)
    xr = _leaf(x)
    ref, lse, z = cross_entropy_reference(xr, t, return_aux=True, **kw)
    (ref + lse.square().mean() + 3 * z).backward()
    torch._dynamo.reset()
    f = torch.compile(lambda a: cross_entropy(a, t, return_aux=True, backend=backend, **kw),
                      fullgraph=True, backend="aot_eager")
    xa = _leaf(x, dt)
    loss, aux = f(xa)
    (loss + aux.lse.square().mean() + 3 * aux.z_loss).backward()
    _close(xa.grad, xr.grad, dt, "compiled")
    xv = _leaf(x, dt)

    def one(a, b):
        loss, aux = cross_entropy(a, b, return_aux=True, reduction="none", backend=backend, **kw)
        return loss + aux.lse.square() + 3 * aux.z_loss

    (torch.vmap(one)(xv.view(2, 3, 30), t.view(2, 3)).sum()).backward()
    xr.grad = None
    ref, lse, z = cross_entropy_reference(xr, t, return_aux=True, reduction="none", **kw)
    (ref + lse.square() + 3 * z).sum().backward()
    _close(xv.grad, xr.grad, dt, "vmapped")


def _tied_logits(N, V, g):
    """Integer logits (many ties), with rows whose maximum occurs in several blocks."""
    x = torch.randint(-4, 5, (N, V), generator=g).double()
    x[0] = 0.0  # all tied: class 0
    x[1, [5, V // 2, V - 3]] = 9.0  # first maximum in the first block
    x[2, [V - 1, V // 2 - 1]] = 9.0  # in a later block
    return x


def _check_argmax(aux, x, t, ignore_index=-100):
    kept = t != ignore_index
    want = torch.where(kept, x.argmax(-1), -1)
    assert aux.argmax is not None and aux.argmax.dtype == torch.int64
    assert torch.equal(aux.argmax, want), (aux.argmax, want)
    acc = ((want == t) & kept).sum() / kept.sum()
    assert aux.accuracy is not None and abs(float(aux.accuracy) - float(acc)) < 1e-7


@pytest.mark.parametrize("splits", [None, 3], ids=["fused", "split"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_and_accuracy(backend, splits, small_blocks):
    """``return_argmax=True``: the first maximal class of each row (torch.argmax's tie rule),
    -1 on ignored rows, and the accuracy over the kept rows; for both ops."""
    small_blocks.TRITON_NUM_SPLITS = splits
    g = _gen(16)
    N, V = 9, 75
    x = _tied_logits(N, V, g)
    t = torch.randint(0, V, (N,), generator=g)
    t[3], t[4], t[5] = -100, int(x[4].argmax()), int(x[5].argmax())
    dt = _dtype(backend)
    for kw in ({}, {"softcap": 20.0, "logit_scale": 0.5}, {"reduction": "none"}):
        _, aux = cross_entropy(x.to(dt), t, return_aux=True, return_argmax=True,
                               backend=backend, **kw)
        _check_argmax(aux, x, t)
    # (N, C, d) input: shaped like the target
    x3 = x.view(3, 3, V).transpose(1, 2)
    _, aux = cross_entropy(x3.to(dt), t.view(3, 3), return_aux=True, return_argmax=True,
                           backend=backend)
    assert aux.argmax.shape == (3, 3)
    _check_argmax(aux._replace(argmax=aux.argmax.reshape(-1)), x, t)
    # ignore_index=-1: an ignored row's -1 is not a correct prediction
    t1 = torch.where(t == -100, -1, t)
    _, aux = cross_entropy(x.to(dt), t1, ignore_index=-1, return_aux=True, return_argmax=True,
                           backend=backend)
    _check_argmax(aux, x, t1, ignore_index=-1)
    # every row ignored: accuracy NaN, as a mean over no rows
    _, aux = cross_entropy(x.to(dt), torch.full((N,), -100), return_aux=True,
                           return_argmax=True, backend=backend)
    assert torch.isnan(aux.accuracy) and bool((aux.argmax == -1).all())
    # the fused head, rows skipped as ignored or not (random logits: no ties)
    h = torch.randn(N, 6, generator=g).to(dt)
    W = torch.randn(V, 6, generator=g).to(dt)
    for skip in (False, True):
        _, aux = linear_cross_entropy(h, W, t, return_aux=True, return_argmax=True,
                                      backend=backend, chunk_size=4, skip_ignored=skip)
        _check_argmax(aux, h.double() @ W.double().T, t)


def test_argmax_options_and_errors():
    x = torch.randn(4, 10, dtype=torch.float64)
    t = torch.tensor([1, 2, -100, 3])
    with pytest.raises(CrossEntropyInputError, match="return_aux=True"):
        cross_entropy(x, t, return_argmax=True)
    with pytest.raises(CrossEntropyInputError, match="return_aux=True"):
        linear_cross_entropy(x, torch.randn(7, 10, dtype=torch.float64), t, return_argmax=True)
    _, aux = cross_entropy(x, t, return_aux=True)
    assert aux.argmax is None and aux.accuracy is None
    q = torch.softmax(torch.randn(4, 10, dtype=torch.float64), 1)
    _, aux = cross_entropy(x, q, return_aux=True, return_argmax=True)
    assert torch.equal(aux.argmax, x.argmax(1)) and aux.accuracy is None
    m = triton_xent.CrossEntropyLoss(return_aux=True, return_argmax=True)
    _check_argmax(m(x, t)[1], x, t)
    lm = triton_xent.LinearCrossEntropyLoss(10, 7, dtype=torch.float64, return_aux=True,
                                            return_argmax=True)
    _check_argmax(lm(x, t)[1], x @ lm.linear.weight.detach().T, t)
    _, aux = cross_entropy(torch.empty(4, 0), torch.full((4,), -100), return_aux=True,
                           return_argmax=True)
    assert torch.isnan(aux.accuracy) and bool((aux.argmax == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_compiled_and_vmapped(backend, no_vmap_fallback):
    g = _gen(17)
    x = _tied_logits(6, 40, g).float()
    t = torch.randint(0, 40, (6,), generator=g)
    t[2] = -100
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: cross_entropy(a, b, return_aux=True, return_argmax=True,
                                                 backend=backend), fullgraph=True,
                      backend="aot_eager")
    _check_argmax(f(x, t)[1], x, t)
    W = torch.randn(40, 5, generator=g)
    h = torch.randn(6, 5, generator=g)
    f = torch.compile(lambda a, b: linear_cross_entropy(a, W, b, return_aux=True,
                                                        return_argmax=True, backend=backend),
                      fullgraph=True, backend="aot_eager")
    _check_argmax(f(h, t)[1], h @ W.T, t)
    am = torch.vmap(lambda a, b: cross_entropy(a, b, return_aux=True, return_argmax=True,
                                               reduction="none", backend=backend)[1].argmax)(
        x.view(2, 3, 40), t.view(2, 3))
    assert torch.equal(am.view(-1), torch.where(t != -100, x.argmax(1), -1))
