"""The dispatcher: its choices, explain(), the environment variables (TRITON_XENT_BACKEND,
TRITON_INTERPRET as Triton reads it), the fallback without the interpreter and its log (never
while compiling), the interpreter lock, torch.compile, opcheck of the custom ops, and the
``Backend`` protocol both backends implement."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import LOSS_TOL, assert_close, compile_aot_eager, logits_targets

import triton_xent
from triton_xent import (
    BackendUnavailableError,
    cross_entropy,
    explain,
    linear_cross_entropy,
)
from triton_xent.reference import cross_entropy_reference

X = torch.randn(4, 40)
T = torch.tensor([1, 2, 3, -100])


def test_interpreter_picks_kernel():
    c = explain(X, T)
    assert c.backend == "triton" and "TRITON_INTERPRET=1" in c.reason


def test_cpu_without_interpreter_falls_back(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = explain(X, T)
    assert c.backend == "torch" and "CUDA" in c.reason
    with pytest.raises(BackendUnavailableError, match="needs a CUDA/ROCm tensor"):
        cross_entropy(X, T, backend="triton")
    triton_xent.dispatch._logged_reasons.clear()
    triton_xent.dispatch._choices.clear()
    with caplog.at_level(logging.INFO, logger="triton_xent"):
        for _ in range(3):
            cross_entropy(X, T)
    assert sum("torch backend" in r.message for r in caplog.records) == 1  # once per reason


def test_uncovered_cases_fall_back():
    assert explain(X.double(), T).backend == "torch"
    probs = torch.softmax(torch.randn(4, 40), 1)
    c = explain(X, probs)
    assert c.backend == "torch" and "probability" in c.reason
    with pytest.raises(BackendUnavailableError, match="probability"):
        cross_entropy(X, probs, backend="triton")


def test_env_and_keyword(monkeypatch):
    monkeypatch.setenv("TRITON_XENT_BACKEND", "torch")
    assert explain(X, T).backend == "torch"
    assert explain(X, T, backend="triton").backend == "triton"  # the keyword wins
    monkeypatch.setenv("TRITON_XENT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TRITON_XENT_BACKEND"):
        explain(X, T)
    with pytest.raises(ValueError, match="not a backend"):
        explain(X, T, backend="fast")
    with pytest.raises(TypeError, match="unexpected"):
        explain(X, T, z_los=0.1)


def test_missing_triton(monkeypatch):
    monkeypatch.setattr(triton_xent.dispatch, "triton_import_error", lambda: "triton cannot be imported (x)")
    monkeypatch.setattr(triton_xent.dispatch, "_choices", {})
    assert explain(X, T).backend == "torch"
    with pytest.raises(BackendUnavailableError, match="cannot be imported"):
        cross_entropy(X, T, backend="triton")


def test_opcheck_custom_op(backend):
    """torch.library's checks of the custom ops (schema, fake tensor, autograd registration, AOT
    dispatch) on every path: the torch backend and the Triton kernel, fused and split."""
    from triton_xent.backends.protocol import Options
    from triton_xent.ops.cross_entropy import ce_backward_op, ce_forward_op

    x = torch.randn(5, 30, requires_grad=True)
    t = torch.tensor([1, 2, -100, 4, 29])
    w = torch.rand(30)
    for reduction in ("mean", "none"):
        spec = Options(-100, reduction, 0.1, 1e-3, 3.0, None, 1.0, True, False, backend,
                       entropy=reduction == "none").encode()
        fwd = (x, t, w, None, spec)
        torch.library.opcheck(ce_forward_op, fwd)
        _, _, _, _, _, stats, dens = (t.detach() for t in ce_forward_op(*fwd))
        g = torch.randn(5) if reduction == "none" else torch.tensor(1.5)
        g_ent = torch.randn(5) if reduction == "none" else None
        torch.library.opcheck(ce_backward_op, (x.detach(), t, w, None, stats, dens, g, None,
                                               g_ent, spec, False))
    # logit_scale, and a sum with a device divisor
    spec = Options(-100, "sum", logit_scale=0.5, argmax=True, backend=backend).encode()
    torch.library.opcheck(ce_forward_op, (x, t, None, torch.tensor(7.0), spec))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile(backend, reduction):
    """A Linear head compiled with fullgraph=True: loss and gradients against float64 eager.
    "none" is weighted by a random per-row upstream, so the per-row backward is exercised."""
    torch._dynamo.reset()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 50)

        def forward(self, h, t, up):
            loss = cross_entropy(self.proj(h), t, label_smoothing=0.1, z_loss=1e-3,
                                 reduction=reduction, backend=backend)
            return (loss * up).sum()

    torch.manual_seed(0)
    m = Head()
    h = torch.randn(6, 16)
    t = torch.tensor([1, 2, 3, -100, 5, 49])
    up = torch.randn(6) if reduction == "none" else torch.tensor(1.7)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(h, t, up)
    loss.backward()

    ref_m = Head().double()
    ref_m.load_state_dict(m.state_dict())
    ref = cross_entropy_reference(ref_m.proj(h.double()), t, label_smoothing=0.1, z_loss=1e-3,
                                  reduction=reduction)
    ref = (ref * up.double()).sum()
    ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], what="loss")
    # The head's gradients are GEMMs over 6 rows of the logits' gradient (fp32 accumulation).
    for name, p in m.named_parameters():
        assert_close(p.grad, dict(ref_m.named_parameters())[name].grad, (2e-5, 2e-6, 0.0),
                     what=f"d{name}")


@pytest.mark.parametrize("name", ["torch_ce", "triton_ce"])
def test_backends_implement_the_protocol(name):
    """Both backend modules provide every entry point of ``Backend`` with its exact signature
    (names, kinds, defaults): the op layer drives either through one pipeline."""
    import importlib

    from triton_xent.backends.protocol import Backend

    module = importlib.import_module(f"triton_xent.backends.{name}")
    assert isinstance(module, Backend)
    entry_points = [n for n, v in vars(Backend).items()
                    if callable(v) and not n.startswith("_")]
    assert len(entry_points) == 7, entry_points
    for entry in entry_points:
        want = inspect.signature(getattr(Backend, entry))
        want = want.replace(parameters=list(want.parameters.values())[1:])  # no self
        got = inspect.signature(getattr(module, entry))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in want.parameters.values()], (name, entry)


# ------------------------------------------------------------------------------------------------
# Item 9: the dispatcher does not log while torch.compile traces (Dynamo cannot trace a logger).


def test_no_logging_while_compiling(caplog):
    x, t = logits_targets(dtype=torch.float64)  # float64: auto falls back to torch and logs why
    triton_xent.dispatch._logged_reasons.clear()
    triton_xent.dispatch._choices.clear()
    with caplog.at_level(logging.INFO, logger="triton_xent"):
        loss = compile_aot_eager(lambda a, b: cross_entropy(a, b))(x, t)
        assert torch.allclose(loss, F.cross_entropy(x, t))
        h, W = x[:, :8].contiguous(), torch.randn(40, 8, dtype=torch.float64)
        loss = compile_aot_eager(lambda a, b: linear_cross_entropy(a, W, b))(h, t)
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
    x, t = logits_targets()
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
    x, t = logits_targets(N=4, C=40)
    cross_entropy(x.requires_grad_(), t, backend="triton").backward()
    xc, tc = logits_targets()
    h, w = xc[:, :7].contiguous(), torch.randn(40, 7)  # hidden states and a head with C=40
    linear_cross_entropy(h.requires_grad_(), w, tc, backend="triton").backward()
    assert len(held) >= 2 and all(held), held
    monkeypatch.undo()

    errors, wrong = [], []

    def work(seed):
        xs, ts = logits_targets(N=2, C=256, seed=seed, ignored=())
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
