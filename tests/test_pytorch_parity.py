"""Drop-in parity with PyTorch, checked by running PyTorch beside us: what it accepts we accept
(with its values), what it refuses we refuse; and the second round of the drop-in contract
(issue 22): dynamic shapes, in-place under transforms, repeated backward passes, divisors,
option types, backends agreeing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy

N, C = 6, 37


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=dtype)
    t = torch.randint(0, C, (N,), generator=g)
    t[2] = -100
    return x, t


def _probs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N, C, generator=g), 1)


# (name, args builder, kwargs): each is run through F.cross_entropy and through ours.
_X, _T = _data()
_CASES = [
    ("probs-ignore-100", lambda: (_X, _probs()), dict(ignore_index=-100)),
    ("probs-ignore-1", lambda: (_X, _probs()), dict(ignore_index=-1)),
    ("probs-ignore-5", lambda: (_X, _probs()), dict(ignore_index=-5)),
    ("probs-ignore0", lambda: (_X, _probs()), dict(ignore_index=0)),
    ("probs-ignore3", lambda: (_X, _probs()), dict(ignore_index=3)),
    ("probs-smooth-ignore-1", lambda: (_X, _probs()), dict(ignore_index=-1, label_smoothing=0.2)),
    ("smoothing-neg", lambda: (_X, _T), dict(label_smoothing=-0.1)),
    ("smoothing-big", lambda: (_X, _T), dict(label_smoothing=1.5)),
    ("smoothing-1", lambda: (_X, _T), dict(label_smoothing=1.0)),
    ("smoothing-nan", lambda: (_X, _T), dict(label_smoothing=float("nan"))),
    ("smoothing-inf", lambda: (_X, _T), dict(label_smoothing=float("inf"))),
    ("smoothing-neg-probs", lambda: (_X, _probs()), dict(label_smoothing=-0.5)),
    ("smoothing-np", lambda: (_X, _T), dict(label_smoothing=np.float32(0.25))),
    ("smoothing-0d", lambda: (_X, _T), dict(label_smoothing=torch.tensor(0.25))),
    ("reduction-bad", lambda: (_X, _T), dict(reduction="avg")),
    ("weight-short", lambda: (_X, _T), dict(weight=torch.rand(C - 1))),
    ("weight-2d", lambda: (_X, _T), dict(weight=torch.rand(1, C))),
    ("target-out-of-range", lambda: (_X, torch.full((N,), C)), {}),
    ("target-negative", lambda: (_X, torch.full((N,), -3)), {}),
    ("target-float-wrong-shape", lambda: (_X, _T.float()), {}),
    ("target-2d", lambda: (_X, _T.view(N, 1)), {}),
    ("input-int", lambda: (_T.view(N, 1).repeat(1, C), _T), {}),
    ("input-1d", lambda: (_X[0], _T[0]), {}),
    ("ignore-index-positive", lambda: (_X, _T), dict(ignore_index=5)),
]


def _outcome(fn, args, kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return "raises", exc


@pytest.mark.parametrize("name,make,kwargs", _CASES, ids=[c[0] for c in _CASES])
def test_accepts_and_refuses_as_pytorch(name, make, kwargs):
    args = make()
    want, ref = _outcome(F.cross_entropy, args, kwargs)
    got, ours = _outcome(cross_entropy, args, kwargs)
    assert got == want, f"PyTorch {want} ({ref!r}), ours {got} ({ours!r})"
    if got == "ok":
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6)
    else:
        assert isinstance(ours, CrossEntropyInputError), ours  # ours say how to fix it


def test_compile_dynamic_true(backend):
    """``torch.compile(dynamic=True)``: the checks trace on symbolic shapes and options."""
    x, t = _data()
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, s: cross_entropy(a, b, label_smoothing=s, backend=backend),
                      dynamic=True)
    for n in (N, N - 2):
        xa = x[:n].clone().requires_grad_()
        loss = f(xa, t[:n], 0.1)
        loss.backward()
        xr = x[:n].double().requires_grad_()
        ref = F.cross_entropy(xr, t[:n], label_smoothing=0.1)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    h = torch.randn(N, 8, requires_grad=True)
    w = torch.randn(C, 8, requires_grad=True)
    g = torch.compile(lambda a, b, c: linear_cross_entropy(a, b, c, backend=backend), dynamic=True)
    torch.testing.assert_close(g(h, w, t).double(), F.cross_entropy((h @ w.T).double(), t),
                               rtol=1e-5, atol=1e-6)


def test_inplace_backward_under_compile_and_func_grad(backend):
    """``inplace_backward=True`` where the gradient gets its own buffer: compiled, and under
    ``torch.func.grad`` (no data pointer on a functorch wrapper); the results are PyTorch's."""
    x, t = _data()
    want = torch.func.grad(lambda a: F.cross_entropy(a, t))(x)
    torch._dynamo.reset()
    f = torch.compile(lambda a: cross_entropy(a * 1.0, t, inplace_backward=True, backend=backend))
    xa = x.clone().requires_grad_()
    f(xa).backward()
    torch.testing.assert_close(xa.grad, want, rtol=1e-5, atol=1e-7)
    got = torch.func.grad(lambda a: cross_entropy(a * 1.0, t, inplace_backward=True,
                                                  backend=backend))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_accumulates(backend, reduction):
    """``retain_graph=True`` then a second backward: the gradients add up, as PyTorch's, for
    both ops (a second backward recomputes from the kept logits)."""
    x, t = _data()
    g1 = torch.rand(N) + 0.5 if reduction == "none" else torch.tensor(0.7)
    xa = x.clone().requires_grad_()
    loss = cross_entropy(xa * 1.0, t, reduction=reduction, label_smoothing=0.1, backend=backend)
    loss.backward(g1, retain_graph=True)
    loss.backward(torch.ones_like(g1))
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1)
    ref.backward(g1.double(), retain_graph=True)
    ref.backward(torch.ones_like(g1).double())
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    h = torch.randn(N, 8, requires_grad=True)
    w = torch.randn(C, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, backend=backend)
    loss.backward(g1, retain_graph=True)
    loss.backward(g1)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hr @ wr.T, t, reduction=reduction)
    ref.backward(2 * g1.double())
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_and_gradgradcheck():
    """PyTorch's own checkers run on both ops (float64: the torch backend), options on."""
    x, t = _data(torch.float64)
    x.requires_grad_()
    kw = dict(label_smoothing=0.1, z_loss=1e-2)
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda a: cross_entropy(a, t, **kw), (x,))
    h = torch.randn(N, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, **kw), (h, w))
    assert torch.autograd.gradgradcheck(lambda a, b: linear_cross_entropy(a, b, t, **kw), (h, w))


def test_backward_twice_after_inplace_raises(backend):
    x, t = _data()
    xa = x.clone().requires_grad_()
    loss = cross_entropy(xa * 1.0, t, inplace_backward=True, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True wrote the gradient over them"):
        loss.backward()


def test_sum_divisor_zero_is_inf(backend):
    """A sum's divisor divides as it is (PyTorch's ``sum / 0`` is inf); a mean's 0/0 stays NaN."""
    x, t = _data()
    for op in ("ce", "linear"):
        h, w = torch.randn(N, 8), torch.randn(C, 8)
        ours = (cross_entropy(x, t, reduction="sum", divisor=torch.tensor(0.0), backend=backend)
                if op == "ce" else
                linear_cross_entropy(h, w, t, reduction="sum", divisor=torch.tensor(0.0),
                                     backend=backend))
        ref = (F.cross_entropy(x, t, reduction="sum") if op == "ce"
               else F.cross_entropy(h @ w.T, t, reduction="sum")) / torch.tensor(0.0)
        assert torch.isinf(ours) and ours == ref, (op, ours, ref)
    all_ignored = torch.full((N,), -100)
    assert torch.isnan(cross_entropy(x, all_ignored, backend=backend))


@pytest.mark.parametrize("scale", [np.float32(0.5), np.int64(2), torch.tensor(0.5), 2],
                         ids=["np.float32", "np.int64", "0-d", "int"])
def test_logit_scale_takes_real_numbers(backend, scale):
    x, t = _data()
    got = cross_entropy(x, t, logit_scale=scale, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x * float(scale), t), rtol=1e-5, atol=1e-6)
    for bad in (0, -1.0, float("inf"), float("nan"), True, torch.ones(2), "2"):
        with pytest.raises(CrossEntropyInputError, match="logit_scale"):
            cross_entropy(x, t, logit_scale=bad, backend=backend)


def test_inplace_on_a_leaf_under_no_grad_writes_nothing(backend):
    """An evaluation loop reusing a training loss module: nothing is written, nothing refused."""
    x, t = _data()
    leaf = x.clone().requires_grad_()
    loss_fn = triton_xent.CrossEntropyLoss(inplace_backward=True, backend=backend)
    with torch.no_grad():
        loss = loss_fn(leaf, t)
    assert torch.equal(leaf.detach(), x)
    torch.testing.assert_close(loss, F.cross_entropy(x, t), rtol=1e-5, atol=1e-6)
    with pytest.raises(CrossEntropyInputError, match="leaf"):  # where something would be
        loss_fn(leaf, t)


def test_inplace_needs_unit_stride_classes_on_both_backends(backend):
    x, t = _data()
    base = x.t().contiguous().requires_grad_()
    with pytest.raises(CrossEntropyInputError, match="unit-stride class"):
        cross_entropy((base * 1.0).t(), t, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("skip_ignored", [None, True, False])
def test_linear_aux_lse_of_ignored_rows_is_real(backend, skip_ignored):
    """One answer on every device default: an ignored row's aux lse is its log-sum-exp."""
    h, w = torch.randn(N, 8), torch.randn(C, 8)
    _, t = _data()
    _, aux = linear_cross_entropy(h, w, t, return_aux=True, skip_ignored=skip_ignored,
                                  backend=backend)
    torch.testing.assert_close(aux.lse, torch.logsumexp(h @ w.T, 1), rtol=1e-5, atol=1e-5)


_COMPILE_ONCE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import sys, torch
from torch._dynamo.testing import CompileCounter
import triton_xent
x, t = torch.randn(6, 37), torch.randint(0, 37, (6,))
counter = CompileCounter()
f = torch.compile(lambda a: triton_xent.cross_entropy(a, t, backend=sys.argv[1]), backend=counter)
for _ in range(3):
    f(x.clone().requires_grad_()).backward()
print("frames", counter.frame_count)
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_call_compiles_once(backend):
    """A compiled call compiles once for a repeated shape, on either backend, from a fresh
    process (no guard on a module-level cache that fills on the first call)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, backend], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frames 1" in out.stdout, out.stdout
