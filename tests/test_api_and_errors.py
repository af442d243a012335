"""The public API and its errors: bad input gets a clear error naming the problem and the fix
(argument checks, the environment's values), PyTorch's signatures (positional order, legacy
size_average / reduce, explain() taking every argument), the options ``logit_scale`` and
``divisor`` on both ops and both backends against the float64 reference, the modules, and
diagnose() naming the mistakes."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import LOSS_TOL, assert_close, compare, logits_targets

import triton_xent
from triton_xent import (
    CrossEntropyInputError,
    cross_entropy,
    diagnose,
    explain,
    linear_cross_entropy,
)
from triton_xent.reference import cross_entropy_reference

X = torch.randn(4, 10)
T = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda: cross_entropy(X, torch.tensor([1, 2, 3])), r"Expected target size \(4,\)", id="short-target"),
        pytest.param(lambda: cross_entropy(X, T.view(4, 1)), r"squeeze\(-1\)", id="extra-dim"),
        pytest.param(lambda: cross_entropy(X, torch.nn.functional.one_hot(T, 10)), r"one-hot", id="one-hot-int"),
        pytest.param(lambda: cross_entropy(X, T.float()), r"target\.long\(\)", id="float-indices"),
        pytest.param(lambda: cross_entropy(X, torch.tensor([1, 2, 10, 4])), r"Target 10 is out of bounds.*\[0, 9\]", id="too-large"),
        pytest.param(lambda: cross_entropy(X, torch.tensor([1, -5, 3, 4])), r"Target -5 is out of bounds", id="negative"),
        pytest.param(lambda: cross_entropy(X, T, weight=torch.ones(9)), r"weight has shape \(9,\).*C=10", id="weight-len"),
        pytest.param(lambda: cross_entropy(X, T, weight=torch.ones(10, dtype=torch.long)), r"floating point", id="weight-int"),
        pytest.param(lambda: cross_entropy(X, T, label_smoothing=1.5), r"above 1 \(PyTorch refuses it too\)", id="smoothing"),
        pytest.param(lambda: cross_entropy(X, T, reduction="avg"), r"'mean'", id="reduction"),
        pytest.param(lambda: cross_entropy(torch.tensor(3.0), torch.tensor(1)), r"class dimension", id="0d-input"),
        pytest.param(lambda: cross_entropy(T, T), r"floating-point logits", id="int-input"),
        pytest.param(lambda: cross_entropy(X, T.bool()), r"integer tensor", id="bool-target"),
        pytest.param(lambda: cross_entropy(X, T, z_loss=-1.0), r"z_loss", id="zloss"),
        pytest.param(lambda: cross_entropy(X, T, softcap=0.0), r"softcap", id="softcap"),
        pytest.param(lambda: cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.long)), r"Expected target size \(2, 3\)", id="NCd-target"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(CrossEntropyInputError, match=match):
        call()


def test_errors_are_value_errors():
    """Code that catches F.cross_entropy's ValueError keeps working."""
    with pytest.raises(ValueError):
        cross_entropy(X, T, reduction="bogus")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8], ids=["int64", "int32", "uint8"])
def test_ignore_index_is_not_out_of_range(dtype, backend):
    """-100 (the default ignore_index) and a custom one in range pass the range check, and the
    ignored rows count for nothing: the loss is float64 PyTorch's. Other integer target dtypes
    are converted, not misread."""
    ignore = 255 if dtype == torch.uint8 else -100  # uint8 cannot hold -100
    t = torch.tensor([1, ignore, 3, ignore, 9], dtype=dtype)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)) * 3
    for reduction in ("mean", "none"):
        out = cross_entropy(x, t, ignore_index=ignore, reduction=reduction, label_smoothing=0.1,
                            backend=backend)
        ref = torch.nn.functional.cross_entropy(x.double(), t.long(), ignore_index=ignore,
                                                reduction=reduction, label_smoothing=0.1)
        assert_close(out, ref, LOSS_TOL[torch.float32], what=reduction)


def test_out_of_range_without_validation_gives_nan_rows(monkeypatch):
    """Where values are not checked (an accelerator without validate), a bad target gives a NaN
    loss for its row, never an out-of-bounds access. Exercise the backend directly."""
    from triton_xent.backends.protocol import Options
    from triton_xent.ops import cross_entropy as op

    t = torch.tensor([1, 12, 3, -100])
    for backend in ("torch", "triton"):
        call = op.Call(X, t, None, None, Options(reduction="none", backend=backend,
                                                   out_dtype=X.dtype))
        loss = op.forward(call, compute_grad=False).loss
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all() and loss[3] == 0


def test_validate_env(monkeypatch):
    from triton_xent._validation import validation_requested

    monkeypatch.setenv("TRITON_XENT_VALIDATE", "1")
    assert validation_requested(None)
    assert not validation_requested(False)
    monkeypatch.setenv("TRITON_XENT_VALIDATE", "0")
    assert not validation_requested(None)


def test_diagnose_finds_common_mistakes():
    logits = torch.randn(8, 50) * 2
    t = torch.randint(0, 50, (8,))
    assert diagnose(logits, t).ok
    assert "no problem" in str(diagnose(logits, t))
    assert "softmax applied before" in str(diagnose(torch.softmax(logits, 1), t))
    assert "log-probabilities" in str(diagnose(torch.log_softmax(logits, 1), t))
    onehot = torch.nn.functional.one_hot(t, 50).float()
    assert "one-hot" in str(diagnose(logits, onehot))
    bad = t.clone()
    bad[3] = 50
    assert "out of range" in str(diagnose(logits, bad))
    nan = logits.clone()
    nan[0, 0] = float("nan")
    assert "NaN" in str(diagnose(nan, t))
    assert "diverging" in str(diagnose(logits * 1e5, t))
    assert "ignore_index" in str(diagnose(logits, torch.full((8,), -100)))
    assert "does not match" in str(diagnose(logits, t[:5]))
    assert not triton_xent.diagnose(torch.randn(2, 7, 3), torch.randint(0, 7, (2, 3))).findings


BACKENDS = ["torch", "triton"]
XC, TC = logits_targets()
HC, W_HEAD = XC[:, :7].contiguous(), torch.randn(40, 7)  # hidden states and a head with C=40


def test_validate_env_values(monkeypatch):
    from triton_xent._validation import validation_requested

    for value, on in (("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TRITON_XENT_VALIDATE", value)
        assert validation_requested(None) is on
    x, t = logits_targets()
    monkeypatch.setenv("TRITON_XENT_VALIDATE", "maybe")
    for call in (lambda: cross_entropy(x, t), lambda: explain(x, t),
                 lambda: linear_cross_entropy(HC, W_HEAD, t)):
        with pytest.raises(ValueError, match="TRITON_XENT_VALIDATE='maybe'"):
            call()
    monkeypatch.delenv("TRITON_XENT_VALIDATE")
    with pytest.raises(CrossEntropyInputError, match="validate='yes' must be True, False or None"):
        cross_entropy(x, t, validate="yes")


# ------------------------------------------------------------------------------------------------
# Item 11: argument checks.



@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(z_loss=float("nan")), r"z_loss=nan must be a finite", id="z_loss-nan"),
    pytest.param(dict(z_loss=float("inf")), r"z_loss=inf must be a finite", id="z_loss-inf"),
    pytest.param(dict(softcap=float("inf")), r"For no cap pass None, not inf", id="softcap-inf"),
    pytest.param(dict(softcap=float("nan")), r"softcap=nan must be a positive finite", id="softcap-nan"),
    pytest.param(dict(label_smoothing=torch.tensor(0.1, requires_grad=True)), r"requires grad", id="smoothing-grad"),
    pytest.param(dict(label_smoothing=torch.tensor([0.1])), r"0-d real tensor", id="smoothing-1d"),
    pytest.param(dict(loss_dtype=torch.long), r"loss_dtype=torch.int64 must be a floating-point torch.dtype", id="loss_dtype-long"),
    pytest.param(dict(loss_dtype="float32"), r"loss_dtype='float32' must be a floating-point torch.dtype \(torch.float32", id="loss_dtype-str"),
    pytest.param(dict(backend="cuda"), r"not a backend", id="backend"),
])
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy", "explain"])
def test_argument_errors(fn, kwargs, match):
    call = {
        "cross_entropy": lambda: cross_entropy(XC, TC, **kwargs),
        "explain": lambda: explain(XC, TC, **kwargs),
        "linear_cross_entropy": lambda: linear_cross_entropy(HC, W_HEAD, TC, **kwargs),
    }[fn]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_as_0d_tensor(backend):
    for ls in (torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64)):
        ours = cross_entropy(XC, TC, label_smoothing=ls, backend=backend)
        assert torch.allclose(ours, F.cross_entropy(XC, TC, label_smoothing=ls), atol=1e-6)
        assert torch.equal(ours, cross_entropy(XC, TC, label_smoothing=0.1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_gives_pytorchs_result(backend, reduction):
    """C=0 with every target ignored (index targets) or probability targets: PyTorch's values."""
    for target in (torch.full((3,), -100), torch.zeros(3, 0)):
        x = torch.randn(3, 0, requires_grad=True)
        ours = cross_entropy(x, target, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(x.detach(), target, reduction=reduction)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.allclose(ours, theirs, equal_nan=True), (ours, theirs)
        ours.sum().backward()
        assert x.grad.shape == (3, 0)
    loss, aux = cross_entropy(torch.randn(3, 0), torch.full((3,), -100), reduction="none",
                              return_aux=True, backend=backend)
    assert aux.lse.shape == (3,) and bool((aux.lse == float("-inf")).all())
    with pytest.raises(CrossEntropyInputError, match=r"no classes \(C=0\)"):
        cross_entropy(torch.randn(3, 0), torch.tensor([0, -100, -100]), backend=backend)


def test_explain_takes_every_argument_of_cross_entropy():
    ours = inspect.signature(cross_entropy).parameters
    theirs = inspect.signature(explain).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default and ours[k].kind == theirs[k].kind for k in ours)
    c = explain(XC, TC, None, None, -100, None, "sum", 0.1, z_loss=1e-4, softcap=30.0, return_aux=True,
                validate=True, process_group=None, loss_dtype=torch.float32, divisor=7.0,
                logit_scale=0.5)
    assert c.backend == "triton"
    # The same errors as the call, for the keywords explain() used to skip.
    for kw, match in ((dict(divisor=7.0), "divisor= needs reduction='sum'"),
                      (dict(logit_scale=-1.0), "logit_scale=-1.0 must be a positive"),
                      (dict(loss_dtype=torch.int32), "loss_dtype")):
        for fn in (cross_entropy, explain):
            with pytest.raises(CrossEntropyInputError, match=match):
                fn(XC, TC, **kw)


# ------------------------------------------------------------------------------------------------
# Item 12: PyTorch's positional order, with size_average / reduce as PyTorch maps them.


def test_pytorch_positional_order():
    w = torch.rand(40) + 0.5
    args = (w, None, 7, None, "sum", 0.1)  # weight, size_average, ignore_index, reduce, reduction, ls
    t = TC.clamp_min(0)
    t[0] = 7
    assert torch.allclose(cross_entropy(XC, t, *args), F.cross_entropy(XC, t, *args), atol=1e-5)
    assert explain(XC, t, *args).backend == "triton"
    ours = triton_xent.CrossEntropyLoss(*args)
    theirs = torch.nn.CrossEntropyLoss(*args)
    assert ours.reduction == theirs.reduction == "sum" and ours.ignore_index == 7
    assert torch.allclose(ours(XC, t), theirs(XC, t), atol=1e-5)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_size_average_and_reduce(size_average, reduce):
    with warnings.catch_warnings(record=True) as theirs_w:
        warnings.simplefilter("always")
        theirs = F.cross_entropy(XC, TC, None, size_average, -100, reduce, "sum")
        theirs_mod = torch.nn.CrossEntropyLoss(None, size_average, -100, reduce, "sum")
    with warnings.catch_warnings(record=True) as ours_w:
        warnings.simplefilter("always")
        ours = cross_entropy(XC, TC, None, size_average, -100, reduce, "sum")
        ours_mod = triton_xent.CrossEntropyLoss(None, size_average, -100, reduce, "sum")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours_mod.reduction == theirs_mod.reduction
    assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs_w]
    if size_average is not None or reduce is not None:
        assert any("size_average and reduce args will be deprecated" in str(w.message) for w in ours_w)


def test_old_positional_order_is_refused():
    """An ignore_index passed where PyTorch has size_average would silently pick a reduction."""
    for call in (lambda: cross_entropy(XC, TC, None, 0), lambda: cross_entropy(XC, TC, None, -100, "sum"),
                 lambda: triton_xent.CrossEntropyLoss(None, -100)):
        with pytest.raises(CrossEntropyInputError, match="positional order is PyTorch's"):
            call()


# ------------------------------------------------------------------------------------------------
# Item 13: diagnose().


def test_diagnose_vocabulary_mask_is_not_a_problem():
    x, t = logits_targets(N=8, C=50)
    t = torch.where(t >= 0, t % 45, t)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[45:] = True  # padded vocabulary
    xm = x.masked_fill(mask, float("-inf"))
    assert diagnose(xm, t).ok, str(diagnose(xm, t))
    loss = F.cross_entropy(xm, t)
    assert torch.isfinite(loss)

    on_mask = t.clone()
    on_mask[0] = 47
    assert "point at a class whose logit is -inf" in str(diagnose(xm, on_mask))
    assert torch.isinf(F.cross_entropy(xm, on_mask))
    ignored = on_mask.clone()
    ignored[0] = -100  # the masked target is ignored: fine again
    assert diagnose(xm, ignored).ok
    assert "label_smoothing=0.1" in str(diagnose(xm, t, label_smoothing=0.1))
    assert torch.isinf(F.cross_entropy(xm, t, label_smoothing=0.1))
    whole = xm.clone()
    whole[2] = float("-inf")
    assert "-inf for every class" in str(diagnose(whole, t))
    assert torch.isnan(F.cross_entropy(whole, t))
    pinf = x.clone()
    pinf[1, 3] = float("inf")
    assert "NaN or +Inf" in str(diagnose(pinf, t))


def test_diagnose_reports_what_the_call_raises():
    x, t = logits_targets(N=8, C=50)
    d = diagnose(x, t.bool())
    assert not d.ok and "integer tensor" in str(d)
    with pytest.raises(CrossEntropyInputError):
        cross_entropy(x, t.bool())
    assert "target.long()" in str(diagnose(x, t.float()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diagnose_16bit_probabilities(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32000, generator=g) * 5
    t = torch.randint(0, 32000, (64,), generator=g)
    assert "look like probabilities" in str(diagnose(torch.softmax(x, 1).to(dtype), t))
    assert "log-probabilities" in str(diagnose(torch.log_softmax(x, 1).to(dtype), t))
    assert diagnose(x.to(dtype), t).ok


# ------------------------------------------------------------------------------------------------
# The options logit_scale and divisor on both ops and both backends, against the float64 reference;
# the modules.


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
