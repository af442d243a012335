"""The drop-in contract in the corners: autocast, validation under torch.compile / FakeTensorMode /
vmap, no logging while compiling, environment variables, argument checks, PyTorch's positional
order and legacy arguments, diagnose(), out-of-range targets compiled on the CPU."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import triton_xent
from tests.helpers import TOL, rel_err
from triton_xent import (
    CrossEntropyInputError,
    cross_entropy,
    diagnose,
    explain,
    linear_cross_entropy,
)
from triton_xent.reference import cross_entropy_reference

BACKENDS = ["torch", "triton"]


def _data(N=12, C=40, dtype=torch.float32, seed=0, ignored=(3,)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * 2).to(dtype)
    t = torch.randint(0, C, (N,), generator=g)
    for i in ignored:
        t[i] = -100
    return x, t


X, T = _data()
H, W_HEAD = X[:, :7].contiguous(), torch.randn(40, 7)  # hidden states and a head with C=40


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


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
    x, t = _data(N=16, C=64, dtype=torch.bfloat16)
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
    x, t = _data()
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
    compiled = _compile(lambda a, b: cross_entropy(a, b))
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
    x, t = _data()
    f = _compile(lambda a, b: cross_entropy(a, b, validate=validate, backend="torch"))
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
    f = _compile(lambda a, b: linear_cross_entropy(a, W, b, validate=True))
    assert torch.allclose(f(h, t), F.cross_entropy(h @ W.T, t), atol=1e-5)
    t[1] = -3
    with pytest.raises(CrossEntropyInputError, match="Target -3 is out of bounds"):
        f(h, t)


def test_validate_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t = _data()
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
        f = _compile(f)
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
# Item 9: the dispatcher does not log while torch.compile traces (Dynamo cannot trace a logger).


def test_no_logging_while_compiling(caplog):
    x, t = _data(dtype=torch.float64)  # float64: auto falls back to torch and logs why
    triton_xent.dispatch._logged_reasons.clear()
    triton_xent.dispatch._choices.clear()
    with caplog.at_level(logging.INFO, logger="triton_xent"):
        loss = _compile(lambda a, b: cross_entropy(a, b))(x, t)
        assert torch.allclose(loss, F.cross_entropy(x, t))
        h, W = x[:, :8].contiguous(), torch.randn(40, 8, dtype=torch.float64)
        loss = _compile(lambda a, b: linear_cross_entropy(a, W, b))(h, t)
        assert torch.allclose(loss, F.cross_entropy(h @ W.T, t))
        assert not caplog.records
        cross_entropy(x, t)  # eager: logged, once
        cross_entropy(x, t)
    assert sum("torch backend" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------
# Item 10: environment variables and the interpreter.


@pytest.mark.parametrize("value, backend", [("true", "triton"), ("TRUE", "triton"), ("on", "triton"),
                                            ("1", "triton"), ("0", "torch"), ("false", "torch")])
def test_triton_interpret_values_as_triton_reads_them(monkeypatch, value, backend):
    x, t = _data()
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert explain(x, t).backend == backend


def test_triton_interpret_set_after_import_triton_falls_back():
    """Set after `import triton`, the interpreter cannot run the kernels: auto falls back with the
    reason, backend='triton' raises it, and nothing crashes. A fresh process, as it needs."""
    code = """
import os
import torch, triton
os.environ["TRITON_INTERPRET"] = "1"
import torch.nn.functional as F
import triton_xent
from triton_xent import BackendUnavailableError
x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, -100])
c = triton_xent.explain(x, t)
assert c.backend == "torch" and "before `import triton`" in c.reason, c
assert torch.allclose(triton_xent.cross_entropy(x, t), F.cross_entropy(x, t))
try:
    triton_xent.cross_entropy(x, t, backend="triton")
    raise SystemExit("no error")
except BackendUnavailableError as exc:
    assert "triton was imported before it was set" in str(exc), exc
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_XENT_BACKEND")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_interpreter_calls_are_serialised(monkeypatch, small_blocks):
    """The interpreter is not thread-safe: every kernel launch of an eager call runs under the
    interpreter lock, and concurrent calls give the right results."""
    import triton_xent.backends.triton_ce as launcher
    from triton_xent.dispatch import LOCK

    held = []
    launch = launcher.ce_forward

    def spy(*args, **kwargs):
        held.append(LOCK._is_owned())
        return launch(*args, **kwargs)

    monkeypatch.setattr(launcher, "ce_forward", spy)
    x, t = _data(N=4, C=40)
    cross_entropy(x.requires_grad_(), t, backend="triton").backward()
    linear_cross_entropy(H.clone().requires_grad_(), W_HEAD, T, backend="triton").backward()
    assert len(held) >= 2 and all(held), held
    monkeypatch.undo()

    errors, wrong = [], []

    def work(seed):
        xs, ts = _data(N=2, C=256, seed=seed, ignored=())
        for _ in range(3):
            try:
                if not torch.allclose(cross_entropy(xs, ts, backend="triton"), F.cross_entropy(xs, ts), atol=1e-5):
                    wrong.append(seed)
            except Exception as exc:  # what the interpreter raises when two kernels overlap
                errors.append(repr(exc))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors and not wrong, errors[:2]


def test_validate_env_values(monkeypatch):
    from triton_xent._validation import validation_requested

    for value, on in (("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TRITON_XENT_VALIDATE", value)
        assert validation_requested(None) is on
    x, t = _data()
    monkeypatch.setenv("TRITON_XENT_VALIDATE", "maybe")
    for call in (lambda: cross_entropy(x, t), lambda: explain(x, t),
                 lambda: linear_cross_entropy(H, W_HEAD, t)):
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
        "cross_entropy": lambda: cross_entropy(X, T, **kwargs),
        "explain": lambda: explain(X, T, **kwargs),
        "linear_cross_entropy": lambda: linear_cross_entropy(H, W_HEAD, T, **kwargs),
    }[fn]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_as_0d_tensor(backend):
    for ls in (torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64)):
        ours = cross_entropy(X, T, label_smoothing=ls, backend=backend)
        assert torch.allclose(ours, F.cross_entropy(X, T, label_smoothing=ls), atol=1e-6)
        assert torch.equal(ours, cross_entropy(X, T, label_smoothing=0.1, backend=backend))


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
    c = explain(X, T, None, None, -100, None, "sum", 0.1, z_loss=1e-4, softcap=30.0, return_aux=True,
                validate=True, process_group=None, loss_dtype=torch.float32, divisor=7.0,
                logit_scale=0.5)
    assert c.backend == "triton"
    # The same errors as the call, for the keywords explain() used to skip.
    for kw, match in ((dict(divisor=7.0), "divisor= needs reduction='sum'"),
                      (dict(logit_scale=-1.0), "logit_scale=-1.0 must be a positive"),
                      (dict(loss_dtype=torch.int32), "loss_dtype")):
        for fn in (cross_entropy, explain):
            with pytest.raises(CrossEntropyInputError, match=match):
                fn(X, T, **kw)


# ------------------------------------------------------------------------------------------------
# Item 12: PyTorch's positional order, with size_average / reduce as PyTorch maps them.


def test_pytorch_positional_order():
    w = torch.rand(40) + 0.5
    args = (w, None, 7, None, "sum", 0.1)  # weight, size_average, ignore_index, reduce, reduction, ls
    t = T.clamp_min(0)
    t[0] = 7
    assert torch.allclose(cross_entropy(X, t, *args), F.cross_entropy(X, t, *args), atol=1e-5)
    assert explain(X, t, *args).backend == "triton"
    ours = triton_xent.CrossEntropyLoss(*args)
    theirs = torch.nn.CrossEntropyLoss(*args)
    assert ours.reduction == theirs.reduction == "sum" and ours.ignore_index == 7
    assert torch.allclose(ours(X, t), theirs(X, t), atol=1e-5)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_size_average_and_reduce(size_average, reduce):
    with warnings.catch_warnings(record=True) as theirs_w:
        warnings.simplefilter("always")
        theirs = F.cross_entropy(X, T, None, size_average, -100, reduce, "sum")
        theirs_mod = torch.nn.CrossEntropyLoss(None, size_average, -100, reduce, "sum")
    with warnings.catch_warnings(record=True) as ours_w:
        warnings.simplefilter("always")
        ours = cross_entropy(X, T, None, size_average, -100, reduce, "sum")
        ours_mod = triton_xent.CrossEntropyLoss(None, size_average, -100, reduce, "sum")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours_mod.reduction == theirs_mod.reduction
    assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs_w]
    if size_average is not None or reduce is not None:
        assert any("size_average and reduce args will be deprecated" in str(w.message) for w in ours_w)


def test_old_positional_order_is_refused():
    """An ignore_index passed where PyTorch has size_average would silently pick a reduction."""
    for call in (lambda: cross_entropy(X, T, None, 0), lambda: cross_entropy(X, T, None, -100, "sum"),
                 lambda: triton_xent.CrossEntropyLoss(None, -100)):
        with pytest.raises(CrossEntropyInputError, match="positional order is PyTorch's"):
            call()


# ------------------------------------------------------------------------------------------------
# Item 13: diagnose().


def test_diagnose_vocabulary_mask_is_not_a_problem():
    x, t = _data(N=8, C=50)
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
    x, t = _data(N=8, C=50)
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
# The same contract on a GPU (skipped without one). Run with the compiled kernels:
#   TRITON_INTERPRET=0 python -m pytest tests/test_contract.py -m gpu


def _cuda_kernels():
    from triton_xent.dispatch import interpreter_enabled

    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is on: these run the compiled kernels (TRITON_INTERPRET=0)")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_autocast(backend):
    dev = _cuda_kernels()
    x, t = _data(N=64, C=5000, dtype=torch.bfloat16)
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
    x, t = _data(N=64, C=1000)
    x, t = x.to(dev), t.to(dev)
    f = _compile(lambda a, b: cross_entropy(a, b, validate=True, backend=backend))
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
