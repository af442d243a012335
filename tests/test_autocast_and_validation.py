"""The drop-in contract under autocast and where values cannot be read: autocast of both ops
against PyTorch (no fp32 copy of the logits), the target range check under torch.compile,
FakeTensorMode and vmap, and the same on a GPU. Signatures and argument checks:
test_api_and_errors.py; the dispatcher and the interpreter: test_dispatch.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, compile_aot_eager, logits_targets, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import triton_xent
from triton_xent import (
    CrossEntropyInputError,
    cross_entropy,
    explain,
    linear_cross_entropy,
)
from triton_xent.reference import cross_entropy_reference

BACKENDS = ["torch", "triton"]

X, T = logits_targets()
H, W_HEAD = X[:, :7].contiguous(), torch.randn(40, 7)  # hidden states and a head with C=40


# ------------------------------------------------------------------------------------------------
# Item 6: autocast. F.cross_entropy is on autocast's fp32 list: a 16-bit input is upcast, the loss
# is fp32, the gradient keeps the input's dtype. We match it without an fp32 copy of the logits.


class _Fp32Copies(TorchDispatchMode):
    """Records every fp32 tensor of at least ``numel`` elements that an op produces."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_matches_torch_without_fp32_copy(backend, reduction, small_blocks):
    x, t = logits_targets(N=16, C=64, dtype=torch.bfloat16)
    w = torch.rand(64) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    xa = x.clone().requires_grad_()
    spy = _Fp32Copies(x.numel())
    with spy, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(xa, t, backend=backend, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.cross_entropy(x, t, **kw)
    assert loss.dtype == theirs.dtype == torch.float32
    assert spy.seen == [], f"an fp32 copy of the logits was made: {spy.seen}"
    # fp32 math on the exact bf16 values: the loss is as good as an fp32 loss.
    x64 = x.double().requires_grad_()
    ref = cross_entropy_reference(x64, t, weight=w.double(), reduction=reduction, label_smoothing=0.1)
    assert rel_err(loss, ref) <= TOL[torch.float32][0]
    g = torch.randn_like(ref)
    loss.backward(g.to(loss.dtype))
    ref.backward(g)
    assert xa.grad.dtype == torch.bfloat16
    assert rel_err(xa.grad, x64.grad) <= TOL[torch.bfloat16][1]


def test_autocast_dtypes_and_explicit_loss_dtype():
    x, t = logits_targets()
    p = torch.softmax(torch.randn(12, 40), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for inp, tgt in ((x.half(), t), (x, t), (x.double(), t), (x.bfloat16(), p)):
            assert cross_entropy(inp, tgt).dtype == F.cross_entropy(inp, tgt).dtype, (inp.dtype, tgt.dtype)
        assert cross_entropy(x.bfloat16(), t, loss_dtype=torch.bfloat16).dtype == torch.bfloat16
        m = triton_xent.CrossEntropyLoss()
        assert m(x.bfloat16(), t).dtype == torch.float32
    # Probability targets keep fp32 under autocast (PyTorch upcasts the logits, not the targets).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(x.bfloat16(), p, reduction="none")
    ref = cross_entropy_reference(x.bfloat16().double(), p.double(), reduction="none")
    assert rel_err(loss, ref) <= TOL[torch.float32][0]
    assert cross_entropy(x.bfloat16(), t).dtype == torch.bfloat16  # no autocast: the input's
    compiled = compile_aot_eager(lambda a, b: cross_entropy(a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x.bfloat16(), t).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_linear_matches_torch(dtype, reduction):
    """F.linear in bf16, F.cross_entropy upcast to fp32: torch's own result under autocast."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 16, generator=g).to(dtype)
    W = (torch.randn(50, 16, generator=g) * 0.3).to(dtype)
    b = torch.randn(50, generator=g).to(dtype)
    t = torch.randint(0, 50, (10,), generator=g)
    t[2] = -100
    ours_in = [a.clone().requires_grad_() for a in (h, W, b)]
    theirs_in = [a.clone().requires_grad_() for a in (h, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(ours_in[0], ours_in[1], t, linear_bias=ours_in[2],
                                    reduction=reduction, label_smoothing=0.1)
        theirs = F.cross_entropy(F.linear(*theirs_in), t, reduction=reduction, label_smoothing=0.1)
    assert ours.dtype == theirs.dtype == torch.float32
    # The bf16 GEMMs may round differently; the cross-entropy itself is fp32 on both sides.
    assert rel_err(ours, theirs) <= 1e-2
    up = torch.randn(theirs.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    ours.backward(up)
    theirs.backward(up)
    for a, c in zip(ours_in, theirs_in):
        assert a.grad.dtype == c.grad.dtype == dtype
        assert rel_err(a.grad, c.grad) <= TOL[torch.bfloat16][1]


def test_autocast_linear_leaves_float64_alone():
    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 20, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, t)
        theirs = F.cross_entropy(F.linear(h, W), t)
    assert ours.dtype == theirs.dtype == torch.float64
    assert rel_err(ours, cross_entropy_reference(h @ W.T, t)) <= TOL[torch.float64][0]


# ------------------------------------------------------------------------------------------------
# Items 8 and 14: the target range check where values cannot be read while tracing.


@pytest.mark.parametrize("validate", [True, None], ids=["validate", "cpu-default"])
def test_compiled_checks_targets_like_eager(validate):
    x, t = logits_targets()
    f = compile_aot_eager(lambda a, b: cross_entropy(a, b, validate=validate, backend="torch"))
    assert torch.allclose(f(x, t), F.cross_entropy(x, t), atol=1e-6)
    bad = t.clone()
    bad[5] = 40
    with pytest.raises(CrossEntropyInputError, match="Target 40 is out of bounds"):
        cross_entropy(x, bad)  # eager
    with pytest.raises(CrossEntropyInputError, match="Target 40 is out of bounds"):
        f(x, bad)


def test_compiled_linear_checks_targets_like_eager():
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    t = torch.randint(0, 20, (6,), generator=g)
    f = compile_aot_eager(lambda a, b: linear_cross_entropy(a, W, b, validate=True))
    assert torch.allclose(f(h, t), F.cross_entropy(h @ W.T, t), atol=1e-5)
    t[1] = -3
    with pytest.raises(CrossEntropyInputError, match="Target -3 is out of bounds"):
        f(h, t)


def test_validate_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t = logits_targets()
    with FakeTensorMode() as mode:
        fx, ft = mode.from_tensor(x), mode.from_tensor(t)
        assert cross_entropy(fx, ft, validate=True, backend="torch").shape == ()
        assert cross_entropy(fx, ft, reduction="none", backend="torch").shape == (12,)
        assert explain(fx, ft, validate=True).backend in ("torch", "triton")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_under_vmap_with_batched_targets(backend, compiled):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 5, 30, generator=g)
    T = torch.randint(0, 30, (3, 5), generator=g)
    T[1, 2] = -100
    f = torch.vmap(lambda a, b: cross_entropy(a, b, validate=True, backend=backend))
    if compiled:
        f = compile_aot_eager(f)
    out = f(X, T)
    ref = torch.stack([F.cross_entropy(X[i], T[i]) for i in range(3)])
    assert torch.allclose(out, ref, atol=1e-5)
    T[2, 4] = 30
    with pytest.raises(CrossEntropyInputError, match="Target 30 is out of bounds"):
        f(X, T)
    if not compiled:
        with pytest.raises(CrossEntropyInputError, match="Target 30 is out of bounds"):
            torch.vmap(lambda b: cross_entropy(X[0], b, backend=backend))(T)  # targets only


# ------------------------------------------------------------------------------------------------
# The same contract on a GPU (skipped without one). Run with the compiled kernels:
#   TRITON_INTERPRET=0 python -m pytest tests/test_autocast_and_validation.py -m gpu


def _cuda_kernels():
    from triton_xent.dispatch import interpreter_enabled

    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is on: these run the compiled kernels (TRITON_INTERPRET=0)")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_autocast(backend):
    dev = _cuda_kernels()
    x, t = logits_targets(N=64, C=5000, dtype=torch.bfloat16)
    x, t = x.to(dev).requires_grad_(), t.to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cross_entropy(x, t, backend=backend, label_smoothing=0.1)
        theirs = F.cross_entropy(x, t, label_smoothing=0.1)
        h = torch.randn(64, 32, device=dev)
        W = torch.randn(5000, 32, device=dev, requires_grad=True)
        lin = linear_cross_entropy(h, W, t, backend=backend)
        lin_theirs = F.cross_entropy(F.linear(h, W), t)
    assert loss.dtype == theirs.dtype == torch.float32 and lin.dtype == lin_theirs.dtype
    assert rel_err(loss, theirs) <= 1e-5 and rel_err(lin, lin_theirs) <= 1e-2
    loss.backward()
    lin.backward()
    assert x.grad.dtype == torch.bfloat16 and W.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_validate_compiled_and_captured(backend):
    """validate=True: compiled, it raises when the graph runs; inside a CUDA graph capture it
    must not sync (a device assert, only exercised here with valid targets)."""
    dev = _cuda_kernels()
    x, t = logits_targets(N=64, C=1000)
    x, t = x.to(dev), t.to(dev)
    f = compile_aot_eager(lambda a, b: cross_entropy(a, b, validate=True, backend=backend))
    assert rel_err(f(x, t), F.cross_entropy(x, t)) <= 1e-5
    bad = t.clone()
    bad[7] = 1000
    with pytest.raises(CrossEntropyInputError, match="Target 1000 is out of bounds"):
        f(x, bad)
    static_x, static_t = x.clone(), t.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        cross_entropy(static_x, static_t, validate=True, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cross_entropy(static_x, static_t, validate=True, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, F.cross_entropy(x, t)) <= 1e-5
