"""GPU checks of the runtime contract: the real Triton kernels on CUDA with no host sync, under
CUDA-graph capture and ``torch.compile(fullgraph=True)`` (inductor), the in-place rules, and
out-of-range targets (skipped, with a reason, without CUDA). The grid of real sizes against
float64 and its helpers: test_gpu.py (whose ``_real_kernels`` fixture runs here too).

Run on the GPU machine with the interpreter OFF (``conftest.py`` turns it on by default)::

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py tests/test_gpu_runtime.py -m gpu -q -rs

``test_out_of_range_target`` is last in this file: a device assert would break every test after it.
"""

from __future__ import annotations

import pytest
import torch
from test_gpu import (  # noqa: F401 (_real_kernels: test_gpu.py's autouse fixture, used here too)
    DEV,
    IGNORE,
    _real_kernels,
    make_inputs,
    report,
    spy_launches,
    synchronize,
    upstream,
)

import triton_xent._config as xent_config
from triton_xent import CrossEntropyInputError, cross_entropy
from triton_xent.reference import cross_entropy_reference

pytestmark = pytest.mark.gpu


@pytest.fixture
def launches(monkeypatch):
    return spy_launches(monkeypatch)


SYNC_CASES = [
    pytest.param("triton", 4096, 32000, "mean", False, id="triton-fused-mean-copy"),
    pytest.param("triton", 4096, 32000, "none", True, id="triton-fused-none-inplace"),
    pytest.param("triton", 4, 131072, "mean", True, id="triton-split-mean-inplace"),
    pytest.param("triton", 4, 131072, "none", False, id="triton-split-none-copy"),
    pytest.param("torch", 1024, 32000, "mean", False, id="torch-mean-copy"),
]


@pytest.mark.parametrize("backend, N, V, reduction, inplace", SYNC_CASES)
def test_no_host_sync(backend, N, V, reduction, inplace):
    """Forward+backward under ``set_sync_debug_mode("error")``: any host sync in the library
    raises, with its traceback. Warmed up first (Triton compiles on the first call)."""
    x0, t, w = make_inputs(N, V, torch.bfloat16, weight=True, ignore=True, seed=5)
    g = upstream(reduction, N, torch.bfloat16)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-4, softcap=20.0,
              inplace_backward=inplace, backend=backend, return_aux=True)

    def step(x):
        logits = x * 1.0 if inplace else x  # in place needs an op's output, not a leaf
        loss, aux = cross_entropy(logits, t, **kw)
        loss.backward(g)
        return loss, aux

    step(x0.clone().requires_grad_(True))  # warm-up: compiles the kernels
    x = x0.clone().requires_grad_(True)  # (inputs are made before the check: a H2D copy syncs)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, aux = step(x)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ref_x = x0.clone().requires_grad_(True)
    ref_loss, _ = step(ref_x)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
    report("no_host_sync", case=f"{backend}-N{N}-V{V}-{reduction}-{'inplace' if inplace else 'copy'}")


@pytest.mark.parametrize(
    "N, V, reduction",
    [pytest.param(2048, 32000, "mean", id="fused-mean"),
     pytest.param(4, 131072, "mean", id="split-mean"),
     pytest.param(4, 131072, "none", id="split-none")],
)
def test_cuda_graph_capture(N, V, reduction):
    """Forward+backward captured once; replays on new logits, targets (a new ignored-row
    pattern, so a new weighted-mean denominator) and upstream gradient equal eager, bitwise."""
    dtype = torch.bfloat16
    _, _, w = make_inputs(1, V, dtype, weight=True, seed=7)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-4, softcap=20.0,
              backend="triton")
    static_x = torch.zeros(N, V, device=DEV, dtype=dtype, requires_grad=True)
    static_t = torch.zeros(N, device=DEV, dtype=torch.int64)
    static_g = upstream(reduction, N, dtype).clone()

    def load(seed):
        x, t, _ = make_inputs(N, V, dtype, ignore=True, seed=seed)
        if N <= 7:
            t[seed % N] = IGNORE  # make_inputs ignores row N // 2; move the pattern per seed
        g = upstream(reduction, N, dtype, seed=seed) * (1 + seed % 3)
        with torch.no_grad():
            static_x.copy_(x)
            static_t.copy_(t)
            static_g.copy_(g)
        return x, t, g

    def step():
        loss = cross_entropy(static_x, static_t, **kw)
        loss.backward(static_g)
        return loss

    load(10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton compiles, autograd initialises, off the graph
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    static_grad = static_x.grad
    assert static_grad is not None

    for seed in (11, 12):
        x, t, g = load(seed)
        graph.replay()
        xe = x.clone().requires_grad_(True)
        loss = cross_entropy(xe, t, **kw)
        loss.backward(g)
        torch.testing.assert_close(static_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(static_grad, xe.grad, rtol=0, atol=0)
    report("cuda_graph", case=f"N{N}-V{V}-{reduction}")


COMPILE_SHAPE = (1024, 256, 32000)  # rows, hidden size, vocabulary


def test_torch_compile_fullgraph_inductor(launches):
    """A small model head calling cross_entropy twice (weighted mean with every extra, and
    "none" times a per-row weight), compiled with ``fullgraph=True`` and the default inductor
    backend: loss and gradients equal eager. fp32, so that a dropped term (z-loss is ~1e-3 of
    the loss) shows above the rounding; bf16 runs everywhere else."""
    torch._dynamo.reset()
    N, D, V = COMPILE_SHAPE
    dtype = torch.float32

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, V, bias=False, device=DEV, dtype=dtype)

        def forward(self, h, t, w, g):
            logits = self.proj(h)
            mean = cross_entropy(logits, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=20.0,
                                 backend="triton")
            rows = cross_entropy(logits, t, reduction="none", backend="triton")
            return 2.0 * mean + (rows * g).sum() / N

    torch.manual_seed(0)
    model = Head()
    h = torch.randn(N, D, device=DEV, dtype=dtype)
    _, t, w = make_inputs(N, V, dtype, weight=True, ignore=True, seed=9)
    g = torch.randn(N, device=DEV)

    def run(fn):
        model.zero_grad(set_to_none=True)
        hh = h.clone().requires_grad_(True)
        loss = fn(hh, t, w, g)
        loss.backward()
        return loss.detach(), hh.grad, model.proj.weight.grad

    eager = run(model)
    compiled_model = torch.compile(model, fullgraph=True)
    for spy in launches.values():
        spy.grids.clear()
    compiled = run(compiled_model)
    assert launches["_ce_fused_kernel"].grids, "the compiled model did not run the Triton kernel"
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    errs = {}
    for name, a, b in (("h.grad", compiled[1], eager[1]), ("weight.grad", compiled[2], eager[2])):
        errs[name] = float((a.double() - b.double()).abs().max() / b.double().abs().max())
        assert errs[name] <= 1e-4, f"{name}: compiled vs eager max err / max = {errs[name]:.3g}"
    compiled_again = run(compiled_model)  # a second call reuses the graph
    torch.testing.assert_close(compiled_again[0], compiled[0], rtol=0, atol=0)
    torch._dynamo.reset()
    report("torch_compile", loss=float(compiled[0]), eager=float(eager[0]), **errs)


# ------------------------------------------------------------------------------------------------
# inplace_backward and autograd's version counter
# ------------------------------------------------------------------------------------------------

INPLACE_PATHS = [pytest.param("triton", 1, id="triton-fused"), pytest.param("triton", 4, id="triton-split4"),
                 pytest.param("torch", None, id="torch")]
@pytest.mark.parametrize("backend, splits", INPLACE_PATHS)
def test_inplace_bumps_the_version_counter(backend, splits, monkeypatch):
    """The forward's write over the logits bumps their version counter, as an in-place torch op
    does (a CUDA launch alone would not), so that autograd sees a tensor saved before the call
    and read after it."""
    monkeypatch.setattr(xent_config, "TRITON_NUM_SPLITS", splits)
    x, t, _ = make_inputs(64, 32000, torch.bfloat16, ignore=True, seed=21)
    logits = x.requires_grad_(True) * 1.0  # a non-leaf, as a Linear head's output
    version = logits._version
    cross_entropy(logits, t, inplace_backward=True, backend=backend)
    synchronize()
    assert logits._version > version, "the forward overwrote the logits without bumping their version"
    report("inplace_version", case=f"{backend}-splits{splits}")


@pytest.mark.parametrize("backend, splits", INPLACE_PATHS)
def test_inplace_logits_saved_by_their_producer(backend, splits, monkeypatch):
    """Logits that their producer saved for its backward (exp keeps its output), overwritten by
    inplace_backward: backward must raise autograd's in-place error, never feed the gradient to
    exp's backward as if it were exp's output."""
    monkeypatch.setattr(xent_config, "TRITON_NUM_SPLITS", splits)
    x, t, _ = make_inputs(64, 32000, torch.float32, ignore=True, seed=22, scale=1.0)
    z = x.requires_grad_(True)
    loss = cross_entropy(z.exp(), t, reduction="none", inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(upstream("none", 64, torch.float32))
    report("inplace_saved_by_producer", case=f"{backend}-splits{splits}")


# ------------------------------------------------------------------------------------------------
# Out-of-range targets (last: a device-side assert would poison the CUDA context)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, N, V",
    [pytest.param("triton", 8, 8000, id="triton-fused"),  # one read: V <= 8192 with options
     pytest.param("triton", 3, 131072, id="triton-split"),
     pytest.param("torch", 8, 32000, id="torch")],
)
def test_out_of_range_target(backend, N, V, launches):
    """Without validation a bad class index gives its row a NaN loss and gradient, never a
    device assert; with ``validate=True`` the CPU's CrossEntropyInputError, word for word."""
    x0, t, w = make_inputs(N, V, torch.float32, weight=True, seed=13)
    t[1] = V  # one past the end
    t[-1] = -5  # negative, not ignore_index
    bad = torch.zeros(N, dtype=torch.bool, device=DEV)
    bad[1] = bad[-1] = True

    x = x0.clone().requires_grad_(True)
    loss = cross_entropy(x, t, w, reduction="none", label_smoothing=0.1, backend=backend)
    loss.backward(torch.ones_like(loss))
    mean = cross_entropy(x0, t, w, label_smoothing=0.1, backend=backend)
    synchronize()  # a device-side assert would surface here
    if backend == "triton":
        assert launches["_ce_fused_kernel"].grids or launches["_ce_partials_kernel"].grids
        if N <= 7:
            assert launches["_ce_partials_kernel"].grids, "the split path did not run"
    assert bool(loss[bad].isnan().all()) and bool(torch.isfinite(loss[~bad]).all())
    assert bool(x.grad[bad].isnan().all()) and bool(torch.isfinite(x.grad[~bad]).all())
    assert bool(mean.isnan())
    ref = cross_entropy_reference(x0[~bad].double(), t[~bad], w.double(), reduction="none",
                                  label_smoothing=0.1)
    torch.testing.assert_close(loss[~bad].double(), ref, rtol=1e-5, atol=1e-6)

    # The context still works.
    y = torch.arange(10, device=DEV, dtype=torch.float32)
    assert float((y * 2).sum()) == 90.0
    synchronize()

    with pytest.raises(CrossEntropyInputError) as on_gpu:
        cross_entropy(x0, t, w, label_smoothing=0.1, backend=backend, validate=True)
    with pytest.raises(CrossEntropyInputError) as on_cpu:
        cross_entropy(x0.cpu(), t.cpu(), w.cpu(), label_smoothing=0.1)  # CPU: always checked
    assert str(on_gpu.value) == str(on_cpu.value)
    assert f"Target {V} is out of bounds" in str(on_gpu.value)
    report("out_of_range_target", case=f"{backend}-N{N}-V{V}")
