"""cross_entropy against the float64 reference: every option, both backends.

The torch backend runs the whole grid; the Triton kernel runs (through the interpreter on the
CPU) a grid of small shapes with small forced blocks, so multi-block loops are exercised.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import compare, rel_err

import triton_xent
from triton_xent import cross_entropy

BACKENDS = ["torch", "triton"]


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


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.15}, id="smooth"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"weight": True, "label_smoothing": 0.3}, id="weight-smooth"),
    pytest.param({"z_loss": 1e-2}, id="zloss"),
    pytest.param({"softcap": 4.0}, id="softcap"),
    pytest.param({"softcap": 4.0, "z_loss": 1e-3, "label_smoothing": 0.1, "weight": True}, id="all"),
]


def _kwargs(opts, C, seed=1):
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = torch.rand(C, generator=torch.Generator().manual_seed(seed)) + 0.5
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_fp32(backend, opts, reduction, small_blocks):
    V = 100 if backend == "triton" else 1000  # above one block (32) and not a power of two
    x, t = _data((13, V), torch.float32)
    compare(_fn(backend), x, t, reduction=reduction, **_kwargs(opts, V))


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", torch.bfloat16), ("torch", torch.float16), ("torch", torch.float64),
     ("triton", torch.bfloat16), ("triton", torch.float16)],  # float64 never reaches the kernel
    ids=["torch-bf16", "torch-fp16", "torch-fp64", "triton-bf16", "triton-fp16"],
)
def test_dtypes(backend, dtype, small_blocks):
    x, t = _data((9, 77), dtype)
    compare(_fn(backend), x, t, label_smoothing=0.1, reduction="mean")
    compare(_fn(backend), x, t, reduction="none", weight=torch.rand(77) + 0.5)


@pytest.mark.parametrize(
    "shape", [(50,), (6, 50), (3, 50, 4), (2, 50, 3, 2)], ids=["C", "NC", "NCd", "NCdd"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes(backend, shape, reduction, small_blocks):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, small_blocks):
    base = torch.randn(10, 140)
    t = torch.randint(0, 70, (10,))
    compare(_fn(backend), base[:, 10:80], t, label_smoothing=0.1)  # row stride 140
    compare(_fn(backend), torch.randn(70, 10).t(), t, reduction="none")  # class dim strided
    compare(_fn(backend), base[::2, :70], t[::2], reduction="sum")  # every other row


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_target_and_uint8(backend, small_blocks):
    x, t = _data((8, 60), torch.float32, ignore_frac=0)
    compare(_fn(backend), x, t.int())
    compare(_fn(backend), x, t.to(torch.uint8))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty(backend, weighted, small_blocks):
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
        assert float(s) == 0.0
    e = torch.randn(0, 30, requires_grad=True)
    out = cross_entropy(e, torch.zeros(0, dtype=torch.long), backend=backend)
    assert torch.isnan(out)
    out.backward()
    assert e.grad.shape == (0, 30)
    assert cross_entropy(e, torch.zeros(0, dtype=torch.long), reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_v1(backend, small_blocks):
    x, t = _data((9, 45), torch.float32, ignore_frac=0)
    t[::2] = 7
    compare(_fn(backend), x, t, ignore_index=7, label_smoothing=0.1)
    x1 = torch.randn(4, 1)
    compare(_fn(backend), x1, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits(backend, small_blocks):
    x = torch.randn(6, 100)
    x[:, 40:90] = float("-inf")  # masked vocabulary, whole blocks of -inf
    t = torch.randint(0, 40, (6,))
    out = cross_entropy(x.clone().requires_grad_(), t, backend=backend)
    ref = F.cross_entropy(x.double(), t)
    assert torch.isfinite(out) and abs(float(out) - float(ref)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_outputs(backend, small_blocks):
    x, t = _data((11, 90), torch.float32)
    for reduction in ("mean", "sum", "none"):
        loss, aux = cross_entropy(x, t, reduction=reduction, z_loss=1e-2, softcap=5.0,
                                  return_aux=True, backend=backend)
        ref, lse, z = triton_xent.reference.cross_entropy_reference(
            x.double(), t, reduction=reduction, z_loss=1e-2, softcap=5.0, return_aux=True)
        assert rel_err(aux.lse, lse) < 1e-5
        assert rel_err(aux.z_loss, z) < 1e-5
        assert aux.lse.shape == (11,) and aux.z_loss.shape == loss.shape
        assert not aux.lse.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend, small_blocks):
    x, t = _data((12, 70), torch.float32)
    ref_x = x.double().requires_grad_()
    F.cross_entropy(ref_x, t, label_smoothing=0.1).backward()
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a matmul's output (a leaf is refused)
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True, backend=backend)
    assert not torch.equal(logits.detach(), x), "the logits were overwritten by the gradient"
    loss.backward()
    assert seen == [ptr], "the gradient lives in the logits' storage"
    assert rel_err(leaf.grad, ref_x.grad) < 2e-5


def test_inplace_needs_rows():
    x = torch.randn(2, 10, 3, requires_grad=True)
    with pytest.raises(triton_xent.CrossEntropyInputError, match="inplace_backward"):
        cross_entropy(x, torch.zeros(2, 3, dtype=torch.long), inplace_backward=True, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_second_backward(backend, small_blocks):
    x, t = _data((5, 40), torch.float32)
    with torch.no_grad():
        compare(_fn(backend), x, t, grad=False)
    xr = x.clone().requires_grad_()
    loss = cross_entropy(xr, t, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_module_matches_functional():
    x, t = _data((6, 33), torch.float32)
    w = torch.rand(33)
    m = triton_xent.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum", backend="torch")
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    assert torch.allclose(m(x, t), ref(x, t), atol=1e-5)
    assert "label_smoothing=0.1" in repr(m)
    m2 = triton_xent.CrossEntropyLoss(return_aux=True, z_loss=1e-3)
    loss, aux = m2(x, t)
    assert aux.lse.shape == (6,)


def test_gradient_buffer_is_adopted_not_cloned(monkeypatch):
    """The eager path hands the gradient computed in the forward to autograd, which must adopt
    it as ``x.grad`` rather than copy it: fwd+bwd then holds one N x V buffer, not two."""
    from triton_xent.backends import torch_ce

    seen = []
    real = torch_ce.ce_forward

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.grad.data_ptr())
        return out

    monkeypatch.setattr(torch_ce, "ce_forward", spy)
    x = torch.randn(64, 512, requires_grad=True)
    cross_entropy(x, torch.randint(0, 512, (64,)), backend="torch").backward()
    assert seen and x.grad.data_ptr() == seen[0]


def test_loss_dtype_keeps_the_fp32_loss():
    """bf16 logits: loss_dtype=torch.float32 returns the fp32 loss, unrounded; the gradient is
    the same as with the default bf16 loss."""
    x, t = _data((64, 300), torch.bfloat16, ignore_frac=0.1)
    ref = F.cross_entropy(x.double(), t, reduction="sum")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = cross_entropy(xa, t, reduction="sum", backend="torch")
    b = cross_entropy(xb, t, reduction="sum", backend="torch", loss_dtype=torch.float32)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert abs(float(b) - float(ref)) < 1e-5 * float(ref) < abs(float(a) - float(ref))
    a.backward()
    b.backward()
    assert torch.equal(xa.grad, xb.grad)
    m = triton_xent.CrossEntropyLoss(loss_dtype=torch.float32)
    assert m(x, t).dtype == torch.float32
