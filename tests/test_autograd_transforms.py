"""The autograd contract under functorch transforms, against PyTorch in float64: ``torch.vmap``
over the logits, the targets or both (every reduction, no per-example fallback), vmap of the fused
linear head, and ``torch.func.grad`` for per-sample gradients. (The transforms of the probability
targets, the aux outputs and the arg-max are with their features in test_autograd_contract.py;
second derivatives under transforms in test_autograd_second_order.py.)

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
    targets_with_ignored,
)

from triton_xent import cross_entropy, linear_cross_entropy
from triton_xent.reference import cross_entropy_reference

# ---------------------------------------------------------------------------------------------
# 1. functorch transforms


@pytest.mark.parametrize("dims", ["logits", "target", "both"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_matches_pytorch(backend, reduction, dims, no_vmap_fallback, small_blocks):
    """``vmap(lambda a: cross_entropy(a @ W.T, t))(x).sum().backward()``: W.grad (and x.grad)
    as PyTorch's, in_dims over the logits, the targets, or both."""
    dt = backend_dtype(backend)
    B, N, D, V = 3, 5, 4, 37
    g = gen(0)
    X = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    T = torch.stack([targets_with_ignored(N, V, g, ignore=(i,)) for i in range(B)])
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

    Wa, Xa = fresh_leaf(W0, dt), fresh_leaf(X, dt)
    out = ours(Wa, Xa)
    Wr, Xr = fresh_leaf(W0), fresh_leaf(X)
    ref = reference(Wr, Xr)
    assert out.shape == ref.shape
    close64(out, ref, dt, "loss")
    u = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * u.to(dt)).sum().backward()
    (ref * u).sum().backward()
    assert Wa.grad is not None, "vmap dropped the gradient"
    close64(Wa.grad, Wr.grad, dt, "W.grad")
    close64(Xa.grad, Xr.grad, dt, "x.grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_linear_cross_entropy(backend, reduction, no_vmap_fallback, small_blocks):
    dt = backend_dtype(backend)
    B, N, D, V = 2, 5, 4, 37
    g = gen(1)
    X = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    T = torch.stack([targets_with_ignored(N, V, g, ignore=(i,)) for i in range(B)])
    W0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    b0 = torch.randn(V, generator=g, dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)

    Wa, ba, Xa = (fresh_leaf(t, dt) for t in (W0, b0, X))
    out = torch.vmap(lambda x, t: linear_cross_entropy(
        x, Wa, t, linear_bias=ba, backend=backend, chunk_size=2, **kw))(Xa, T)
    Wr, br, Xr = (fresh_leaf(t) for t in (W0, b0, X))
    ref = torch.vmap(lambda x, t: cross_entropy_reference(F.linear(x, Wr, br), t, **kw))(Xr, T)
    close64(out, ref, dt, "loss")
    u = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * u.to(dt)).sum().backward()
    (ref * u).sum().backward()
    for name, a, r in (("W", Wa, Wr), ("b", ba, br), ("x", Xa, Xr)):
        assert a.grad is not None, f"vmap dropped d{name}"
        close64(a.grad, r.grad, dt, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_per_sample_gradients(backend, no_vmap_fallback, small_blocks):
    """torch.func.grad of the loss, and vmap(grad) (per-sample gradients), for both ops."""
    dt = backend_dtype(backend)
    N, D, V = 5, 4, 37
    g = gen(2)
    x = torch.randn(N, V, generator=g, dtype=torch.float64)
    t = targets_with_ignored(N, V, g)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    got = torch.func.grad(lambda a: cross_entropy(a, t, backend=backend, **kw))(x.to(dt))
    want = torch.func.grad(lambda a: cross_entropy_reference(a, t, **kw))(x)
    close64(got, want, dt, "func.grad")

    X = torch.randn(3, N, V, generator=g, dtype=torch.float64)
    T = torch.stack([targets_with_ignored(N, V, g, ignore=(i,)) for i in range(3)])
    got = torch.vmap(torch.func.grad(lambda a, b: cross_entropy(a, b, backend=backend, **kw)))(
        X.to(dt), T)
    want = torch.vmap(torch.func.grad(lambda a, b: cross_entropy_reference(a, b, **kw)))(X, T)
    close64(got, want, dt, "vmap(grad)")

    H = torch.randn(3, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)

    def per_sample(fn, W, dtype):
        return torch.vmap(torch.func.grad(fn, argnums=1), in_dims=(0, None, 0))(H.to(dtype), W, T)

    got = per_sample(lambda h, w_, t_: linear_cross_entropy(h, w_, t_, backend=backend,
                                                            chunk_size=2, **kw), W.to(dt), dt)
    want = per_sample(lambda h, w_, t_: cross_entropy_reference(h @ w_.T, t_, **kw), W,
                      torch.float64)
    close64(got, want, dt, "per-sample dW")
