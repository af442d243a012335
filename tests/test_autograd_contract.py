"""The autograd contract of both ops against PyTorch in float64 (issue 11, op layer), feature by
feature: probability targets and class weights that require grad (eager, compiled, transformed),
the in-place gradient's safety, a zero total weight with smoothing, the rounding of the gradient
for an upstream gradient other than 1, and the aux outputs (differentiable lse, arg-max, token
accuracy). Transforms of the plain ops: test_autograd_transforms.py; second derivatives:
test_autograd_second_order.py.

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

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy
from triton_xent.reference import cross_entropy_reference

PROB_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"label_smoothing": 0.2}, id="smooth"),
    pytest.param({"weight": True, "label_smoothing": 0.3}, id="weight-smooth"),
]


def _prob_grads(fn, x, q, w, opts, reduction, u, weight_grad=False):
    x, q = fresh_leaf(x), fresh_leaf(q)
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
    x, q, w, g = prob_problem(4)
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
    x, q, w, g = prob_problem(5)
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
    x, q, w, g = prob_problem(6)
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
        F.cross_entropy(fresh_leaf(x), t, fresh_leaf(w))
    for backend in BACKENDS:
        with pytest.raises(CrossEntropyInputError, match="weight.detach"):
            cross_entropy(x.float(), t, w.float().requires_grad_(), backend=backend)
    with pytest.raises(CrossEntropyInputError, match="weight.detach"):
        linear_cross_entropy(x, torch.randn(11, 11, dtype=torch.float64), t,
                             weight=fresh_leaf(w))


# ---------------------------------------------------------------------------------------------
# 3. second derivatives (gradient penalties)


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
    dt = backend_dtype(backend)
    N, D, V = 7, 5, 45
    g = gen(10)
    lin = torch.nn.Linear(D, V, dtype=torch.float64)
    ref_lin = torch.nn.Linear(D, V, dtype=torch.float64)
    ref_lin.load_state_dict(lin.state_dict())
    lin = lin.to(dt)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    t = targets_with_ignored(N, V, g)
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
    close64(lin.weight.grad, ref_lin.weight.grad, dt, "dW")
    close64(lin.bias.grad, ref_lin.bias.grad, dt, "db")


# ---------------------------------------------------------------------------------------------
# 5. zero total weight with label smoothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_total_weight_with_smoothing_is_nan(backend):
    """A weighted mean over kept targets whose weights are all 0: 0/0 plus the smoothing term
    is NaN in PyTorch (loss, and the kept rows' gradient; an ignored row's stays 0); so is
    ours, in both ops."""
    dt = backend_dtype(backend)
    g = gen(11)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, -100, 3, 1])
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    w[[1, 2, 3]] = 0.0  # every kept target has weight 0; other classes do not
    xr = fresh_leaf(x)
    ref = F.cross_entropy(xr, t, w, label_smoothing=0.1)
    ref.backward()
    nan_rows = torch.tensor([True, True, False, True, True])
    assert torch.isnan(ref) and torch.equal(torch.isnan(xr.grad).all(1), nan_rows)
    assert torch.equal(xr.grad[2], torch.zeros(9, dtype=torch.float64))
    xa = fresh_leaf(x, dt)
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
    g = gen(12)
    N, V = 24, 515
    x = (torch.randn(N, V, generator=g) * 3).bfloat16()
    t = targets_with_ignored(N, V, g, ignore=(0, 7))
    kw = dict(reduction=reduction, label_smoothing=0.1)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, **kw)
    up = (torch.rand(ref.shape, generator=g, dtype=torch.float64) * 3 + 0.1).bfloat16()
    ref.backward(up.double())
    xt = fresh_leaf(x)
    F.cross_entropy(xt, t, **kw).backward(up)
    torch_mismatch, torch_ulps = _ulp_errors(xt.grad, x64.grad)
    xa = fresh_leaf(x)
    cross_entropy(xa, t, backend=backend, **kw).backward(up)
    mismatch, ulps = _ulp_errors(xa.grad, x64.grad)
    assert ulps <= 0.55 and mismatch <= x.numel() // 1000, (mismatch, ulps)
    assert ulps < torch_ulps and mismatch < torch_mismatch
    leaf = fresh_leaf(x)
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
    dt = backend_dtype(backend)
    g = gen(13)
    N, V = 8, 45
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = targets_with_ignored(N, V, g, ignore=(0, 5))
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=5.0, logit_scale=0.8,
              z_loss=1e-2)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5  # weighted mean: D_ce != D_z
    v = torch.randn(N, generator=g, dtype=torch.float64)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64)
    for with_loss in (False, True):
        xa, xr = fresh_leaf(x, dt), fresh_leaf(x)
        loss, aux = cross_entropy(xa, t, w.to(dt), return_aux=True, backend=backend, **kw)
        ref, lse, z = cross_entropy_reference(xr, t, w, return_aux=True, **kw)
        assert aux.lse.requires_grad and aux.z_loss.requires_grad
        close64(aux.lse, lse, dt, "lse")
        obj = (aux.lse.square() * v.to(dt)).sum()
        robj = (lse.square() * v).sum()
        if with_loss:
            obj = obj + (loss * u.to(dt)).sum() + (aux.z_loss * u.to(dt)).sum() * 3
            robj = robj + (ref * u).sum() + (z * u).sum() * 3
        obj.backward()
        robj.backward()
        close64(xa.grad, xr.grad, dt, f"grad with_loss={with_loss}")
    # In place, the logits are gone: differentiating the lse says so.
    loss, aux = cross_entropy(fresh_leaf(x, dt) * 1, t, return_aux=True,
                              inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        (loss + aux.lse.sum()).backward()


@pytest.mark.parametrize("skip_ignored", [False, True], ids=["all-rows", "skip-ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_aux_lse_is_differentiable(backend, reduction, skip_ignored, small_blocks):
    """The same through the fused head; with ``return_aux`` every row's lse is its log-sum-exp,
    ignored rows included, whatever ``skip_ignored`` says (as cross_entropy's)."""
    dt = backend_dtype(backend)
    g = gen(14)
    N, D, V = 7, 4, 45
    h0, W0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, D), (V, D)))
    t = targets_with_ignored(N, V, g, ignore=(0, 4))
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    v = torch.randn(N, generator=g, dtype=torch.float64)
    u = torch.randn(() if reduction != "none" else (N,), generator=g, dtype=torch.float64)
    h, W = fresh_leaf(h0, dt), fresh_leaf(W0, dt)
    loss, aux = linear_cross_entropy(h, W, t, return_aux=True, backend=backend, chunk_size=3,
                                     skip_ignored=skip_ignored, **kw)
    hr, Wr = fresh_leaf(h0), fresh_leaf(W0)
    ref, lse, z = cross_entropy_reference(hr @ Wr.T, t, return_aux=True, **kw)
    close64(aux.lse, lse, dt, "lse")
    # (a linear term too: an ignored row's lse passes its gradient)
    ((aux.lse.square() * v.to(dt) + aux.lse).sum() + (loss * u.to(dt)).sum()
     + 3 * (aux.z_loss * u.to(dt)).sum()).backward()
    ((lse.square() * v + lse).sum() + (ref * u).sum() + 3 * (z * u).sum()).backward()
    close64(h.grad, hr.grad, dt, "dh")
    close64(W.grad, Wr.grad, dt, "dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_gradients_compiled_and_vmapped(backend, no_vmap_fallback):
    """``aux.lse`` and ``aux.z_loss`` carry their gradients on the functional path too."""
    dt = backend_dtype(backend)
    g = gen(15)
    x = torch.randn(6, 30, generator=g, dtype=torch.float64)
    t = targets_with_ignored(6, 30, g)
    kw = dict(z_loss=1e-2, label_smoothing=0.1)
    xr = fresh_leaf(x)
    ref, lse, z = cross_entropy_reference(xr, t, return_aux=True, **kw)
    (ref + lse.square().mean() + 3 * z).backward()
    torch._dynamo.reset()
    f = torch.compile(lambda a: cross_entropy(a, t, return_aux=True, backend=backend, **kw),
                      fullgraph=True, backend="aot_eager")
    xa = fresh_leaf(x, dt)
    loss, aux = f(xa)
    (loss + aux.lse.square().mean() + 3 * aux.z_loss).backward()
    close64(xa.grad, xr.grad, dt, "compiled")
    xv = fresh_leaf(x, dt)

    def one(a, b):
        loss, aux = cross_entropy(a, b, return_aux=True, reduction="none", backend=backend, **kw)
        return loss + aux.lse.square() + 3 * aux.z_loss

    (torch.vmap(one)(xv.view(2, 3, 30), t.view(2, 3)).sum()).backward()
    xr.grad = None
    ref, lse, z = cross_entropy_reference(xr, t, return_aux=True, reduction="none", **kw)
    (ref + lse.square() + 3 * z).sum().backward()
    close64(xv.grad, xr.grad, dt, "vmapped")


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
    g = gen(16)
    N, V = 9, 75
    x = _tied_logits(N, V, g)
    t = torch.randint(0, V, (N,), generator=g)
    t[3], t[4], t[5] = -100, int(x[4].argmax()), int(x[5].argmax())
    dt = backend_dtype(backend)
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
    g = gen(17)
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
