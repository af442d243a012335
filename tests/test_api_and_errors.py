"""Bad input gets a clear error naming the problem and the fix; diagnose() names the mistakes."""

from __future__ import annotations

import pytest
import torch
from helpers import LOSS_TOL, assert_close

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, diagnose

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
