"""cross_entropy against the float64 reference: every option, both backends.

The ``backend`` fixture (conftest.py) runs each test three ways: the torch backend, and the
Triton kernel (through the interpreter on the CPU) on its fused path and on its forced
split-vocabulary path, with a small forced block so every row loops over several blocks.
Results are compared element by element with a seeded random upstream gradient (helpers.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import GRAD_TOL, LOSS_TOL, OPTIONS_GRID, assert_close, compare, upstream_like

import triton_xent
import triton_xent._config as config
from triton_xent import cross_entropy


def _data(shape, dtype, *, ignore_frac=0.25, seed=0, scale=3.0, probs=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    if probs:
        t = torch.softmax(torch.randn(shape, generator=g) * 2, dim=0 if len(shape) == 1 else 1)
        return x, t.to(dtype)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape, generator=g)
    if ignore_frac and t.dim():
        t = torch.where(torch.rand(tshape, generator=g) < ignore_frac, torch.full_like(t, -100), t)
    return x, t


def _fn(backend):
    return functools.partial(cross_entropy, backend=backend)


OPTIONS = OPTIONS_GRID


def _kwargs(opts, C, seed=1):
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = torch.rand(C, generator=torch.Generator().manual_seed(seed)) + 0.5
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_options_fp32(backend, opts, reduction):
    V = 100 if backend == "triton" else 1000  # above one block (32) and not a power of two
    x, t = _data((13, V), torch.float32)
    compare(_fn(backend), x, t, reduction=reduction, **_kwargs(opts, V))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dtypes(backend, dtype):
    x, t = _data((9, 77), dtype)
    compare(_fn(backend), x, t, label_smoothing=0.1, reduction="mean")
    compare(_fn(backend), x, t, reduction="none", weight=torch.rand(77) + 0.5)
    compare(_fn(backend), x, t, reduction="sum", z_loss=1e-2, softcap=4.0)


def test_float64_torch(small_blocks):
    """float64 never reaches the kernel: the torch backend keeps it exact."""
    x, t = _data((9, 77), torch.float64)
    compare(_fn("torch"), x, t, label_smoothing=0.1, reduction="mean", weight=torch.rand(77) + 0.5)
    compare(_fn("torch"), x, t, reduction="none", z_loss=1e-2, softcap=4.0)


@pytest.mark.parametrize(
    "shape", [(50,), (6, 50), (3, 50, 4), (2, 50, 3, 2)], ids=["C", "NC", "NCd", "NCdd"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shapes(backend, shape, reduction):
    x, t = _data(shape, torch.float32, ignore_frac=0.25 if len(shape) > 1 else 0.0)
    compare(_fn(backend), x, t, reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "weight": True}], ids=["plain", "smooth-w"])
def test_probability_targets(opts, reduction, small_blocks):
    for shape in [(7, 40), (3, 40, 5)]:
        x, t = _data(shape, torch.float32, probs=True)
        compare(_fn("auto"), x, t, reduction=reduction, **_kwargs(opts, 40))
    x, t = _data((7, 40), torch.bfloat16, probs=True)
    compare(_fn("auto"), x, t, reduction=reduction, **_kwargs(opts, 40))


def test_non_contiguous(backend):
    base = torch.randn(10, 140)
    t = torch.randint(0, 70, (10,))
    compare(_fn(backend), base[:, 10:80], t, label_smoothing=0.1)  # row stride 140
    compare(_fn(backend), torch.randn(70, 10).t(), t, reduction="none")  # class dim strided
    compare(_fn(backend), base[::2, :70], t[::2], reduction="sum")  # every other row


def test_int32_target_and_uint8(backend):
    x, t = _data((8, 60), torch.float32, ignore_frac=0)
    compare(_fn(backend), x, t.int())
    compare(_fn(backend), x, t.to(torch.uint8))


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_and_empty(backend, weighted):
    w = torch.rand(30) if weighted else None
    x = torch.randn(5, 30, requires_grad=True)
    t = torch.full((5,), -100)
    for smooth in (0.0, 0.1):
        out = cross_entropy(x, t, weight=w, label_smoothing=smooth, backend=backend)
        ref = F.cross_entropy(x.detach(), t, weight=w, label_smoothing=smooth)
        assert torch.isnan(out) and torch.isnan(ref)  # PyTorch's 0/0: NaN
        out.backward()
        assert torch.equal(x.grad, torch.zeros_like(x)), "ignored rows get a zero gradient"
        x.grad = None
        s = cross_entropy(x, t, weight=w, label_smoothing=smooth, reduction="sum", backend=backend)
        assert float(s.detach()) == 0.0
    e = torch.randn(0, 30, requires_grad=True)
    out = cross_entropy(e, torch.zeros(0, dtype=torch.long), backend=backend)
    assert torch.isnan(out)
    out.backward()
    assert e.grad.shape == (0, 30)
    assert cross_entropy(e, torch.zeros(0, dtype=torch.long), reduction="none", backend=backend).shape == (0,)


def test_custom_ignore_index_and_v1(backend):
    x, t = _data((9, 45), torch.float32, ignore_frac=0)
    t[::2] = 7
    compare(_fn(backend), x, t, ignore_index=7, label_smoothing=0.1)
    x1 = torch.randn(4, 1)
    compare(_fn(backend), x1, torch.zeros(4, dtype=torch.long))


def test_neg_inf_logits(backend):
    """A masked vocabulary (whole blocks of -inf, a whole split chunk on the split path): finite
    loss, zero gradient on the masked columns, the rest as float64 PyTorch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 100, generator=g) * 3
    x[:, 40:90] = float("-inf")
    x[1, :] = float("-inf")
    x[1, 3] = 0.5  # a row with a single finite logit
    t = torch.randint(0, 40, (6,), generator=g)
    t[1] = 3
    t[4] = -100
    for reduction in ("mean", "none"):
        out, _ = compare(_fn(backend), x, t, reduction=reduction, weight=torch.rand(100, generator=g) + 0.5)
        assert torch.isfinite(out).all()


def test_aux_outputs(backend):
    """The loss with return_aux=True, the per-row lse and the z term, all against float64."""
    x, t = _data((11, 90), torch.float32)
    w = torch.rand(90, generator=torch.Generator().manual_seed(2)) + 0.5
    for reduction in ("mean", "sum", "none"):
        kw = dict(reduction=reduction, z_loss=1e-2, softcap=5.0, label_smoothing=0.1)
        loss, aux = cross_entropy(x, t, w, return_aux=True, backend=backend, **kw)
        ref, lse, z = triton_xent.reference.cross_entropy_reference(
            x.double(), t, w.double(), return_aux=True, **kw)
        assert_close(loss, ref, LOSS_TOL[torch.float32], what=f"loss {reduction}")
        assert_close(aux.lse, lse, LOSS_TOL[torch.float32], what=f"lse {reduction}")
        assert_close(aux.z_loss, z, LOSS_TOL[torch.float32], what=f"z term {reduction}")
        assert aux.lse.shape == (11,) and aux.z_loss.shape == loss.shape
        assert aux.lse.dtype == aux.z_loss.dtype == torch.float32
        assert not aux.lse.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(backend, reduction):
    """Logits that are an op's output (a leaf is refused): the gradient is written over them,
    reaches the leaf unchanged, and is right."""
    x, t = _data((12, 70), torch.float32)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ref_x = x.double().requires_grad_()
    ref = triton_xent.reference.cross_entropy_reference(ref_x, t, **kw)
    g = upstream_like(ref, torch.float32)
    ref.backward(g)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a matmul's output
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, t, inplace_backward=True, backend=backend, **kw)
    assert not torch.equal(logits.detach(), x), "the logits were overwritten by the gradient"
    assert_close(loss, ref.detach(), LOSS_TOL[torch.float32], what="loss")
    loss.backward(g.float())
    assert seen == [ptr], "the gradient lives in the logits' storage"
    assert_close(leaf.grad, ref_x.grad, GRAD_TOL[torch.float32], dim=1, what="gradient")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_linear_output(backend, reduction):
    """The documented use: the non-leaf output of a Linear head (addmm does not save it). The
    gradient reaching the logits, and through them the head and the hidden states, is right."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, 16, generator=g)
    W = torch.randn(70, 16, generator=g) / 2
    b = torch.randn(70, generator=g)
    t = torch.randint(0, 70, (12,), generator=g)
    t[::4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=6.0)

    leaves = [a.clone().requires_grad_() for a in (h, W, b)]
    logits = torch.nn.functional.linear(*leaves)
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.clone()))
    loss = cross_entropy(logits, t, inplace_backward=True, backend=backend, **kw)

    refs = [a.double().requires_grad_() for a in (h, W, b)]
    ref_logits = torch.nn.functional.linear(*refs)
    ref_logits.retain_grad()
    ref = triton_xent.reference.cross_entropy_reference(ref_logits, t, **kw)
    up = upstream_like(ref, torch.float32, seed=7)
    assert_close(loss, ref.detach(), LOSS_TOL[torch.float32], what="loss")
    loss.backward(up.float())
    ref.backward(up)
    assert_close(seen[0], ref_logits.grad, GRAD_TOL[torch.float32], dim=1, what="d logits")
    # The head's gradients are torch GEMMs of that gradient: fp32 accumulation of <= 16 terms.
    for name, got, want in zip(("h", "W", "b"), leaves, refs):
        assert_close(got.grad, want.grad, (2e-5, 2e-6, 0.0), what=f"d{name}")


def test_inplace_logits_saved_by_their_producer(backend):
    """Logits that their producer saved for its own backward (exp keeps its output): the
    gradient written over them must not reach exp's backward silently; autograd raises its
    in-place error instead."""
    x, t = _data((6, 40), torch.float32, scale=1.0)
    z = x.clone().requires_grad_()
    loss = cross_entropy(z.exp(), t, reduction="none", inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.randn(6))


def test_inplace_bumps_the_version_counter(backend):
    """The forward's write over the logits bumps their version counter, as any in-place torch
    op does, so that autograd sees a tensor saved before the call and read after it."""
    x, t = _data((6, 40), torch.float32)
    logits = (x.clone().requires_grad_() * 1.0)
    version = logits._version
    cross_entropy(logits, t, inplace_backward=True, backend=backend)
    assert logits._version > version, "the forward overwrote the logits without bumping their version"
def test_inplace_needs_rows():
    x = torch.randn(2, 10, 3, requires_grad=True)
    with pytest.raises(triton_xent.CrossEntropyInputError, match="inplace_backward"):
        cross_entropy(x, torch.zeros(2, 3, dtype=torch.long), inplace_backward=True, backend="torch")


def test_no_grad_and_second_backward(backend):
    x, t = _data((5, 40), torch.float32)
    with torch.no_grad():
        compare(_fn(backend), x, t, grad=False)
    xr = x.clone().requires_grad_()
    loss = cross_entropy(xr, t, backend=backend)
    loss.backward(retain_graph=True)
    once = xr.grad.clone()
    loss.backward()  # recomputed from the kept logits: the gradients add up, as PyTorch's
    torch.testing.assert_close(xr.grad, 2 * once)


def test_module_matches_functional(backend):
    x, t = _data((6, 33), torch.float32, ignore_frac=0)
    w = torch.rand(33)
    m = triton_xent.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum", backend=backend)
    ref = torch.nn.CrossEntropyLoss(weight=w.double(), label_smoothing=0.1, reduction="sum")
    assert_close(m(x, t), ref(x.double(), t), LOSS_TOL[torch.float32])
    assert "label_smoothing=0.1" in repr(m)
    # Every option through the module: loss, aux and gradient against float64.
    kw = dict(ignore_index=5, reduction="none", label_smoothing=0.2, z_loss=1e-3, softcap=3.0)
    t2 = t.clone()
    t2[1] = 5
    m2 = triton_xent.CrossEntropyLoss(w, return_aux=True, backend=backend, **kw)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    loss, aux = m2(xs, t2)
    ref, lse, z = triton_xent.reference.cross_entropy_reference(xr, t2, w.double(), return_aux=True, **kw)
    assert_close(loss, ref, LOSS_TOL[torch.float32], what="loss")
    assert_close(aux.lse, lse, LOSS_TOL[torch.float32], what="lse")
    assert_close(aux.z_loss, z, LOSS_TOL[torch.float32], what="z term")
    g = upstream_like(ref, torch.float32)
    loss.backward(g.float())
    ref.backward(g)
    assert_close(xs.grad, xr.grad, GRAD_TOL[torch.float32], dim=1, what="gradient")


def test_gradient_buffer_is_adopted_not_cloned(monkeypatch):
    """The eager path hands the gradient computed in the forward to autograd, which must adopt
    it as ``x.grad`` rather than copy it: fwd+bwd then holds one N x V buffer, not two."""
    from triton_xent.backends import torch_ce

    seen = []
    real = torch_ce.forward

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.grad.data_ptr())
        return out

    monkeypatch.setattr(torch_ce, "forward", spy)
    x = torch.randn(64, 512, requires_grad=True)
    cross_entropy(x, torch.randint(0, 512, (64,)), backend="torch").backward()
    assert seen and x.grad.data_ptr() == seen[0]


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_loss_dtype_keeps_the_fp32_loss(backend, reduction):
    """bf16 logits: loss_dtype=torch.float32 returns the fp32 loss, unrounded; the gradient is
    the same as with the default bf16 loss, and right."""
    config.TRITON_BLOCK_V = 128  # (small_blocks restores it) 3 blocks a row: blocks are not under test
    x, t = _data((24, 300), torch.bfloat16, ignore_frac=0.1)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=0.1, backend=backend)
    a = cross_entropy(xa, t, **kw)
    b = cross_entropy(xb, t, loss_dtype=torch.float32, **kw)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert_close(b, ref, LOSS_TOL[torch.float32], what="fp32 loss")
    assert_close(a, ref, LOSS_TOL[torch.bfloat16], what="bf16 loss")
    # The fp32 loss is closer than bf16 rounding allows: it was not rounded to bf16 on the way.
    err_b, err_a, top = ((b.double() - ref).abs().max(), (a.double() - ref).abs().max(), ref.abs().max())
    assert float(err_b.detach()) < 1e-5 * float(top.detach()) < 0.1 * float(err_a.detach())
    g = upstream_like(ref, torch.bfloat16)
    a.backward(g.bfloat16())
    b.backward(g.float())
    ref.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert_close(xb.grad, xr.grad, GRAD_TOL[torch.bfloat16], dim=1, what="gradient")
    m = triton_xent.CrossEntropyLoss(loss_dtype=torch.float32, backend=backend)
    assert m(x, t).dtype == torch.float32
