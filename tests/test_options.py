"""``logit_scale`` and ``divisor`` on both ops and both backends, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compare

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy
from triton_xent.reference import cross_entropy_reference

BACKENDS = ["torch", "triton"]


def _inputs(N=9, V=77, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * 4).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    return x, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "cap"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_scale(backend, dtype, softcap, reduction, small_blocks):
    x, t = _inputs(dtype=dtype)
    fn = lambda a, b, **kw: cross_entropy(a, b, backend=backend, **kw)  # noqa: E731
    compare(fn, x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=softcap,
            logit_scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_divisor(backend, as_tensor, small_blocks):
    x, t = _inputs()
    d = torch.tensor(13.0) if as_tensor else 13
    fn = lambda a, b, **kw: cross_entropy(a, b, backend=backend, **kw)  # noqa: E731
    compare(fn, x, t, reduction="sum", z_loss=1e-3, label_smoothing=0.05, divisor=d)
    # the same as dividing a sum by hand, value and gradient
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = cross_entropy(a, t, reduction="sum", divisor=d, backend=backend)
    lb = cross_entropy(b, t, reduction="sum", backend=backend) / 13
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_divisor_errors():
    x, t = _inputs()
    with pytest.raises(CrossEntropyInputError, match="reduction='sum'"):
        cross_entropy(x, t, divisor=4)
    with pytest.raises(CrossEntropyInputError, match="detach"):
        cross_entropy(x, t, reduction="sum", divisor=torch.tensor(4.0, requires_grad=True))
    with pytest.raises(CrossEntropyInputError, match="0-d"):
        cross_entropy(x, t, reduction="sum", divisor=torch.ones(2))
    with pytest.raises(CrossEntropyInputError, match="non-zero"):
        cross_entropy(x, t, reduction="sum", divisor=0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(CrossEntropyInputError, match="logit_scale"):
            cross_entropy(x, t, logit_scale=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_divisor_and_scale(backend):
    x, t = _inputs()
    mod = triton_xent.CrossEntropyLoss(reduction="sum", logit_scale=2.0, backend=backend)
    out = mod(x, t, divisor=5.0)
    ref = cross_entropy_reference(x.double(), t, reduction="sum", logit_scale=2.0, divisor=5.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_scale_and_divisor(backend, reduction, small_blocks):
    g = torch.Generator().manual_seed(1)
    N, D, V = 11, 8, 53
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100
    div = torch.tensor(6.0) if reduction == "sum" else None
    kw = dict(softcap=7.0, logit_scale=0.6, label_smoothing=0.1, reduction=reduction)
    out = linear_cross_entropy(x, w, t, linear_bias=b, divisor=div, backend=backend, chunk_size=4,
                               **kw)
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    ref = cross_entropy_reference(F.linear(x64, w64, b64), t, divisor=div, **kw)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(up.float())
    ref.backward(up)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for a, r in ((x, x64), (w, w64), (b, b64)):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-6)
