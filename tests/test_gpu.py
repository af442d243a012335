"""GPU checks: the real Triton kernels at LLM sizes, on CUDA (skipped, with a reason, without one).

Run on the GPU machine with the interpreter OFF (``conftest.py`` turns it on by default)::

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py -m gpu -q -rs --durations=10

What runs (see ``tests/GPU.md``): a curated grid of real sizes against a float64 oracle computed
chunk-wise on the GPU, the split-vocabulary path checked through its launches, N*V above 2**31,
peak memory of fwd+bwd, and the helpers those use (test_gpu_helpers.py dry-runs them on the CPU).
Out-of-range targets, no host sync, CUDA-graph capture, ``torch.compile(fullgraph=True)`` and the
in-place rules: test_gpu_runtime.py, which uses this file's helpers and ``_real_kernels``. Each check prints a ``GPU-CHECK {json}`` line with the errors
it measured, appended to the file named by ``TRITON_XENT_GPU_REPORT`` when that is set.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os

import pytest
import torch

import triton_xent._config as xent_config
from triton_xent import cross_entropy
from triton_xent.reference import cross_entropy_reference

pytestmark = pytest.mark.gpu

DEV = "cuda"
IGNORE = -100
MiB = 1 << 20

# Per-dtype tolerances of the gradient, elementwise, against float64 on the same (rounded) logits:
#   |g - ref| <= rtol * |ref| + step * (|upstream of the row| + 1) + ROW_ATOL * max_c |ref[row, c]|
# rtol: twice the largest relative rounding error of the dtype (2 * 2**-8 bf16, 2 * 2**-11 fp16)
# with a 2x margin. The forward rounds the fp32 gradient to the dtype once, and the backward's
# in-place multiplication by an upstream gradient other than 1 rounds it again (the fp32 math
# itself is ~1e-6 relative).
# step: where those two roundings land in fp16's subnormals (below 6.1e-5: p_c of a large V),
# each is off by up to half a step of 2**-24, the first one scaled by the upstream gradient.
# ROW_ATOL: fp32 cancellation where p_c * coef meets the smoothing term eps * w_c / V.
GRAD_TOL = {  # (rtol, step)
    torch.float32: (1e-4, 0.0),
    torch.float16: (2e-3, 2.0**-24),
    torch.bfloat16: (1.6e-2, 0.0),
}
ROW_ATOL = 1e-6
# The loss comes back in the logits' dtype: about 4x half an ulp of it; lse stays fp32.
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_TOL = dict(rtol=2e-6, atol=2e-5)
# float64 oracle chunks: rows per chunk so that one float64 chunk is about this many bytes.
REF_CHUNK_BYTES = 256 * MiB
# fwd+bwd may allocate beyond the gradient buffer (none with inplace_backward): small per-row
# buffers and split partials for the kernel, row chunks of fp32 scratch for the torch backend.
PEAK_SLACK = {"triton": 64 * MiB, "torch": 512 * MiB}

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def report(check: str, **fields) -> None:
    """Prints one ``GPU-CHECK`` JSON line and appends it to ``$TRITON_XENT_GPU_REPORT``."""
    line = json.dumps({"check": check, **fields}, default=str)
    print("GPU-CHECK", line)
    path = os.environ.get("TRITON_XENT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(autouse=True)
def _real_kernels(monkeypatch):
    """Refuses to run the kernels through the interpreter; heuristics on; frees memory after."""
    from triton_xent.backends import triton_ce as ops

    if ops.INTERPRETED:
        pytest.fail(
            "TRITON_INTERPRET=1 is set, so the 'GPU' tests would run the Triton interpreter on "
            "CUDA tensors (hours, and not the compiled kernels). Run them with "
            "TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py -m gpu"
        )
    monkeypatch.delenv("TRITON_XENT_VALIDATE", raising=False)
    monkeypatch.delenv("TRITON_XENT_BACKEND", raising=False)
    for name in ("TRITON_BLOCK_V", "TRITON_NUM_SPLITS", "TORCH_CHUNK_ROWS"):
        monkeypatch.setattr(xent_config, name, None)
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Helpers (device-agnostic, so that they can be dry-run on CPU tensors under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel: records each launch grid, then launches it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


KERNELS = ("_ce_fused_kernel", "_ce_partials_kernel", "_ce_finish_kernel", "_ce_finalize_kernel",
           "_scale_kernel")


def spy_launches(monkeypatch) -> dict[str, LaunchSpy]:
    from triton_xent.backends import triton_ce as ops

    spies = {name: LaunchSpy(getattr(ops, name)) for name in KERNELS}
    for name, spy in spies.items():
        monkeypatch.setattr(ops, name, spy)
    return spies


@pytest.fixture
def launches(monkeypatch):
    return spy_launches(monkeypatch)


def launch_plan(N: int, V: int, dtype, device, heavy: bool = False):
    """The launcher's plan for this call (``ops.plan``, with the test overrides), not re-derived;
    ``heavy``: options that need registers (``ops.heavy_features``)."""
    from triton_xent.backends import triton_ce as ops

    return ops.plan(N, V, dtype, ops.device_spec(torch.device(device)),
                    block_v=xent_config.TRITON_BLOCK_V, num_splits=xent_config.TRITON_NUM_SPLITS,
                    heavy=heavy)


def expected_splits(N: int, V: int, device, dtype=torch.bfloat16, heavy: bool = False) -> int:
    """Chunks per row the launcher will use (1: the fused path)."""
    return launch_plan(N, V, dtype, device, heavy).splits


def assert_path(spies: dict[str, LaunchSpy], N: int, V: int, device, dtype=torch.bfloat16,
                heavy: bool = False) -> int:
    """Asserts the forward's launches match the plan's path; returns the splits S. (A backward
    may launch the finish kernel again, to recompute rows whose upstream is not 1.)"""
    from triton_xent.backends import triton_ce as ops

    p = launch_plan(N, V, dtype, device, heavy)
    grids = {name: spy.grids for name, spy in spies.items()}
    if p.splits == 1:
        assert grids["_ce_fused_kernel"] == [(p.programs,)], grids
        assert not grids["_ce_partials_kernel"], grids
    else:
        assert not grids["_ce_fused_kernel"], grids
        # N x S chunk programs, plus one for the mean's denominators; the finish is persistent
        assert grids["_ce_partials_kernel"] == [(N * p.splits + 1,)], grids
        finish = ops.persistent_programs(N * p.splits, p.num_warps,
                                         ops.device_spec(torch.device(device)), heavy)
        assert grids["_ce_finish_kernel"][:1] == [(finish,)], grids
    return p.splits


def make_inputs(N, V, dtype, *, weight=False, ignore=False, seed=0, scale=4.0, device=None):
    """Logits ~ N(0, scale^2) in ``dtype``; targets with the edge classes 0 and V-1 and, with
    ``ignore`` (N > 1 only), about 10% ignored rows plus row N // 2; class weights in [0.5, 1.5)."""
    device = device or DEV
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, V, generator=g, device=device, dtype=dtype).mul_(scale)
    t = torch.randint(0, V, (N,), generator=g, device=device)
    if N > 1:
        t[0], t[-1] = V - 1, 0
    if ignore and N > 1:
        drop = torch.rand(N, generator=g, device=device) < 0.1
        drop[N // 2] = True
        drop[0] = drop[-1] = False
        t = torch.where(drop, torch.full_like(t, IGNORE), t)
    w = torch.rand(V, generator=g, device=device) + 0.5 if weight else None
    return x, t, w


def upstream(reduction, N, dtype, *, seed=1, device=None):
    """The gradient fed to ``loss.backward``: random per row for "none", 1.5 (exact) otherwise."""
    device = device or DEV
    if reduction == "none":
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(N, generator=g, device=device).to(dtype)
    return torch.tensor(1.5, device=device, dtype=dtype)


def op_output(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the output of an op (``x + 0`` with a 0-d leaf), in a fresh buffer: what
    ``inplace_backward`` needs (it refuses a leaf), and ``x`` stays unchanged for the oracle."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    return x.detach() + zero


def capture_grad(x: torch.Tensor) -> list:
    """Registers a hook that keeps the gradient reaching ``x`` (a leaf or not): ``[grad]``."""
    seen = []
    x.register_hook(lambda grad: seen.append(grad))
    return seen


def row_coefficients(target, weight, reduction, g, V):
    """float64 ``(a_ce, a_z)`` per row: the loss is ``sum_i a_ce[i] ce_i + a_z[i] z_i`` (after
    multiplying by the upstream gradient), so its gradient needs no batch-wide chunk."""
    N = target.shape[0]
    g64 = g.double()
    if reduction == "none":
        return g64, g64
    ones = torch.ones(N, dtype=torch.float64, device=target.device)
    if reduction == "sum":
        return ones * g64, ones * g64
    keep = target != IGNORE
    w_t = weight.double()[target.clamp(0, V - 1)] if weight is not None else ones
    w_kept = torch.where(keep, w_t, 0.0).sum()
    n_kept = keep.sum().double()
    return ones * g64 / w_kept, ones * g64 / n_kept


def reference_chunks(x, target, weight, *, eps, z_loss, softcap, a_ce, a_z, rows=None):
    """float64 oracle, rows in chunks: yields ``(rows, ce, z, lse, grad)`` per chunk.

    ``rows`` (a slice, default all) limits it to some rows. Never holds more than one float64
    chunk of ``(rows, V)``; the gradient is that of ``sum_i a_ce[i] ce_i + a_z[i] z_i``.
    """
    N, V = x.shape
    rows = rows or slice(0, N)
    start, stop, _ = rows.indices(N)
    step = max(1, REF_CHUNK_BYTES // (V * 8))
    w64 = None if weight is None else weight.double()
    for s in range(start, stop, step):
        sl = slice(s, min(stop, s + step))
        xc = x[sl].detach().double().requires_grad_(True)
        loss, lse, z = cross_entropy_reference(
            xc, target[sl], w64, IGNORE, "none", eps, z_loss=z_loss, softcap=softcap,
            return_aux=True,
        )
        ce = loss - z if z_loss else loss
        (grad,) = torch.autograd.grad((a_ce[sl] * ce + a_z[sl] * z).sum(), xc)
        yield sl, ce.detach(), z.detach(), lse.detach(), grad
        del xc, loss, lse, z, ce, grad


def grad_errors(got, ref, dtype, up_abs):
    """``(worst, rel)`` for one chunk: ``worst`` = max |err| / allowed (passes at <= 1, NaN or
    inf where a value is not finite), ``rel`` = max |err| / max|ref row| (for the log)."""
    rtol, step = GRAD_TOL[dtype]
    got = got.detach().double()
    err = (got - ref).abs()
    row_max = ref.abs().amax(1, keepdim=True)
    allowed = rtol * ref.abs() + step * (up_abs[:, None] + 1) + ROW_ATOL * row_max
    ratio = torch.where(err == 0, 0.0, err / allowed.clamp_min(1e-300))
    ratio = ratio.nan_to_num(nan=math.inf)  # a NaN gradient where the oracle is finite fails
    worst = float(ratio.max()) if ratio.numel() else 0.0
    rel = float((err / row_max.clamp_min(1e-300)).max()) if err.numel() else 0.0
    return worst, rel


def check_grad_rows(grad, x_orig, target, weight, *, eps, z_loss, softcap, a_ce, a_z, up_abs,
                    dtype, rows=None):
    """Compares the gradient with the float64 oracle chunk by chunk; returns the per-row
    ``(ce, z, lse)`` of the oracle (float64, for the rows asked) and the error summary."""
    N = x_orig.shape[0]
    rows = rows or slice(0, N)
    start, stop, _ = rows.indices(N)
    ce_all = torch.empty(stop - start, dtype=torch.float64, device=x_orig.device)
    z_all, lse_all = torch.empty_like(ce_all), torch.empty_like(ce_all)
    worst, rel, worst_row = 0.0, 0.0, -1
    for sl, ce, z, lse, ref in reference_chunks(
        x_orig, target, weight, eps=eps, z_loss=z_loss, softcap=softcap, a_ce=a_ce, a_z=a_z,
        rows=rows,
    ):
        out = slice(sl.start - start, sl.stop - start)
        ce_all[out], z_all[out], lse_all[out] = ce, z, lse
        got = grad[sl]
        assert got.dtype == dtype, f"gradient dtype {got.dtype}, expected {dtype}"
        ignored = target[sl] == IGNORE
        assert bool((got[ignored] == 0).all()), "an ignored row has a nonzero gradient"
        w, r = grad_errors(got, ref, dtype, up_abs[sl])
        if not w <= worst:  # also catches NaN
            worst, worst_row = w, sl.start
        rel = max(rel, r)
    summary = dict(grad_worst_over_tol=worst, grad_max_err_over_row_max=rel)
    assert worst <= 1.0, (
        f"gradient outside tolerance {GRAD_TOL[dtype]} + {ROW_ATOL} * row max: worst ratio "
        f"{worst:.3g} in the chunk starting at row {worst_row} ({summary})"
    )
    return ce_all, z_all, lse_all, summary


def expected_loss(ce, z, target, weight, reduction, V):
    """The float64 loss (and z term) from the oracle's rows, reduced as the library does."""
    if reduction == "none":
        return ce + z, z
    if reduction == "sum":
        return (ce + z).sum(), z.sum()
    keep = target != IGNORE
    w_t = weight.double()[target.clamp(0, V - 1)] if weight is not None else torch.ones_like(ce)
    z_mean = z.sum() / keep.sum()
    return ce.sum() / torch.where(keep, w_t, 0.0).sum() + z_mean, z_mean


def synchronize() -> None:
    if torch.device(DEV).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Bytes allocated on the device beyond those held on entry, at the peak (0 off CUDA)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.extra = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base


# ------------------------------------------------------------------------------------------------
# Real sizes against float64
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    V: int
    dtype: torch.dtype
    reduction: str = "mean"
    inplace: bool = False
    weight: bool = False
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    ignore: bool = False
    backend: str = "triton"

    @property
    def heavy(self) -> bool:
        """Options the plan gives more registers (``ops.heavy_features``)."""
        return bool(self.weight or self.eps or self.z_loss or self.softcap is not None)

    @property
    def id(self) -> str:
        feats = [n for n, on in (("weight", self.weight), ("smooth", self.eps), ("z", self.z_loss),
                                 ("softcap", self.softcap), ("ignore", self.ignore)) if on]
        parts = [f"N{self.N}", f"V{self.V}", _SHORT[self.dtype], self.reduction,
                 "inplace" if self.inplace else "copy", "+".join(feats) or "plain"]
        if self.backend != "triton":
            parts.append(self.backend)
        return "-".join(parts)


ALL = dict(weight=True, eps=0.1, z_loss=1e-4, softcap=20.0, ignore=True)
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# Every V with N = 8192 (fused path), N = 1 and N = 7 (split path from V = 50257 on: the heuristic
# caps the splits at V // 16384, so V = 32000 stays fused); each dtype, reduction and feature, and
# inplace on and off, at least twice across the grid. Ignored rows need N > 1.
CASES = [
    Case(8192, 32000, bf16),
    Case(8192, 32000, fp16, "none", inplace=True, **ALL),
    Case(8192, 50257, bf16, "none", inplace=True, **ALL),
    Case(8192, 50257, fp32, "mean", eps=0.1, ignore=True),
    Case(8192, 128256, bf16, "mean", inplace=True, **ALL),
    Case(8192, 128256, fp16, "sum", weight=True, z_loss=1e-4, ignore=True),
    Case(8192, 262144, bf16, "none", **ALL),
    Case(8192, 262144, fp32, "mean", inplace=True, weight=True, eps=0.1, ignore=True),
    Case(8192, 262144, fp16, "mean", z_loss=1e-4, softcap=20.0),
    Case(1, 32000, fp32, "none", weight=True, eps=0.1, z_loss=1e-4, softcap=20.0),
    Case(1, 50257, bf16, "mean", inplace=True, **ALL),
    Case(1, 128256, fp16, "mean", eps=0.1, z_loss=1e-4),
    Case(1, 262144, fp32, "none", inplace=True, weight=True, softcap=20.0),
    Case(7, 32000, bf16, "none", inplace=True, **ALL),
    Case(7, 50257, fp32, "none"),
    Case(7, 128256, bf16, "none", inplace=True, **ALL),
    Case(7, 262144, bf16, "mean", **ALL),
    Case(7, 262144, fp16, "sum", inplace=True, **ALL),
    # The torch backend on CUDA once, at size (it runs where the kernel does not).
    Case(8192, 128256, bf16, "none", backend="torch", **ALL),
]


def run_case(c: Case, spies: dict[str, LaunchSpy], device=None, seed=0) -> dict:
    """One forward+backward of ``cross_entropy`` against the float64 oracle; returns the log."""
    device = device or DEV
    x0, t, w = make_inputs(c.N, c.V, c.dtype, weight=c.weight, ignore=c.ignore and c.N > 1,
                           seed=seed, device=device)
    g = upstream(c.reduction, c.N, c.dtype, device=device)
    # inplace: the call overwrites its input, so it gets its own buffer and x0 stays for the oracle.
    x = op_output(x0) if c.inplace else x0.detach().requires_grad_(True)
    seen = capture_grad(x)
    nv_bytes = c.N * c.V * x0.element_size()

    with PeakMemory(device) as peak:
        loss, aux = cross_entropy(
            x, t, w, ignore_index=IGNORE, reduction=c.reduction, label_smoothing=c.eps,
            z_loss=c.z_loss, softcap=c.softcap, return_aux=True, inplace_backward=c.inplace,
            backend=c.backend,
        )
        loss.backward(g)

    S = None
    if c.backend == "triton":
        S = assert_path(spies, c.N, c.V, device, c.dtype, c.heavy)
        if c.N <= 7 and c.V >= 50257:
            assert S > 1, f"N={c.N}, V={c.V}: the heuristic should split the vocabulary, S={S}"
    else:
        assert not any(s.grids for s in spies.values()), "backend='torch' launched a Triton kernel"

    a_ce, a_z = row_coefficients(t, w, c.reduction, g, c.V)
    (grad,) = seen
    ce, z, lse, log = check_grad_rows(
        grad, x0, t, w, eps=c.eps, z_loss=c.z_loss, softcap=c.softcap, a_ce=a_ce, a_z=a_z,
        up_abs=g.double().abs().expand(c.N), dtype=c.dtype,
    )
    ref_loss, ref_z = expected_loss(ce, z, t, w, c.reduction, c.V)
    assert loss.dtype == c.dtype and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=LOSS_RTOL[c.dtype], atol=1e-6)
    torch.testing.assert_close(aux.lse.double(), lse, **LSE_TOL)
    torch.testing.assert_close(aux.z_loss.double(), ref_z, rtol=1e-5, atol=1e-7)
    if c.reduction == "none":
        assert bool((loss[t == IGNORE] == 0).all())

    if c.inplace:
        assert grad.data_ptr() == x.data_ptr(), "inplace_backward: the gradient is not in x"
        assert peak.extra <= PEAK_SLACK[c.backend], f"inplace fwd+bwd allocated {peak.extra / MiB:.0f} MiB"
    else:
        assert peak.extra <= 1.05 * nv_bytes + PEAK_SLACK[c.backend], (
            f"fwd+bwd allocated {peak.extra / MiB:.0f} MiB beyond its inputs, for a "
            f"{nv_bytes / MiB:.0f} MiB gradient: was the gradient copied?"
        )
    loss_err = float(((loss.detach().double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)).max())
    return dict(log, splits=S, loss_max_rel_err=loss_err, peak_extra_mib=round(peak.extra / MiB, 1),
                grad_mib=round(nv_bytes / MiB, 1))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_real_sizes_against_float64(case, launches):
    log = run_case(case, launches)
    report("real_sizes", case=case.id, **log)


# ------------------------------------------------------------------------------------------------
# More than 2**31 elements
# ------------------------------------------------------------------------------------------------

def run_tail_check(N, V, tail_rows, spies, device=None, seed=3) -> dict:
    """bf16 fwd+bwd with ``inplace_backward`` over ``(N, V)`` logits, reduction "none" with a
    random upstream gradient; the last ``tail_rows`` rows against float64 (their logits are
    saved before the call overwrites them), the other rows only checked finite."""
    device = device or DEV
    x, t, _ = make_inputs(N, V, torch.bfloat16, ignore=True, seed=seed, device=device)
    t[-2], t[-3] = V - 1, IGNORE  # the last column of the buffer is a target; an ignored row there
    rows = slice(N - tail_rows, N)
    tail = x[rows].clone()
    g = upstream("none", N, torch.bfloat16, device=device)
    x = op_output(x)  # in place needs an op's output (its own buffer; the input is freed)
    seen = capture_grad(x)
    with PeakMemory(device) as peak:
        loss, aux = cross_entropy(x, t, reduction="none", label_smoothing=0.1, z_loss=1e-4,
                                  return_aux=True, inplace_backward=True, backend="triton")
        loss.backward(g)
    S = assert_path(spies, N, V, device, heavy=True)  # label smoothing and z-loss
    assert peak.extra <= PEAK_SLACK["triton"], f"allocated {peak.extra / MiB:.0f} MiB"
    (grad,) = seen
    assert grad.data_ptr() == x.data_ptr()
    keep = t != IGNORE
    assert bool(torch.isfinite(loss[keep]).all()) and bool(torch.isfinite(aux.lse).all())

    t_tail, g_tail = t[rows], g[rows].double()
    ce, z, lse, log = check_grad_rows(
        grad[rows], tail, t_tail, None, eps=0.1, z_loss=1e-4, softcap=None,
        a_ce=g_tail, a_z=g_tail, up_abs=g_tail.abs(), dtype=torch.bfloat16,
    )
    torch.testing.assert_close(loss[rows].double(), ce + z, rtol=LOSS_RTOL[torch.bfloat16], atol=1e-6)
    torch.testing.assert_close(aux.lse[rows].double(), lse, **LSE_TOL)
    return dict(log, splits=S, peak_extra_mib=round(peak.extra / MiB, 1))


BIG_N, BIG_V = 16448, 131073  # 2.156e9 elements (4.3 GB in bf16); rows >= 16384 start past 2**31
BIG_TAIL = 80  # rows checked against float64: the one that crosses 2**31 and all those after


@pytest.mark.parametrize("splits", [pytest.param(None, id="fused"), pytest.param(4, id="split4")])
def test_more_than_2_31_elements(splits, launches, monkeypatch):
    assert BIG_N * BIG_V > 2**31 and (BIG_N - BIG_TAIL + 16) * BIG_V > 2**31
    need = 2 * BIG_N * BIG_V * 2 + 4 * 1024**3  # the logits twice while op_output copies them
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs about {need / 1024**3:.1f} GiB free on the GPU, {free / 1024**3:.1f} free")
    monkeypatch.setattr(xent_config, "TRITON_NUM_SPLITS", splits)  # None: heuristic (fused here)
    log = run_tail_check(BIG_N, BIG_V, BIG_TAIL, launches)
    assert log["splits"] == (splits or 1)
    report("above_2_31", N=BIG_N, V=BIG_V, elements=BIG_N * BIG_V, **log)
