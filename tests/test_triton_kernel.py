"""The Triton launchers under the Triton interpreter (CPU tensors, no GPU needed).

The oracle is float64 autograd through ``log_softmax`` (not the kernels' own gradient formula):
``loss = sum_i ce_i / D_ce + z_i / D_z`` with random denominators ``D`` passed to the kernels.
Every buffer the launcher allocates is poisoned with a finite sentinel, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

import triton_xent._config as config
from triton_xent.backends import triton_ce as ops
from triton_xent.backends.protocol import NUM_FIELDS
from triton_xent.backends.protocol import Options as CEOptions
from triton_xent.backends.triton_ce import ce_finalize, ce_forward, plan

pytestmark = pytest.mark.skipif(
    not ops.INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set; these tests run the kernels "
    "on CPU tensors under the interpreter (run this file alone, or set it in conftest.py)",
)

IGNORE = -100
POISON = -7777.0

# Per-dtype tolerances (rtol, atol). Losses and lse are fp32 math on exactly-upcast inputs, so
# they are fp32-accurate for every dtype; the gradient is rounded to the logits' dtype.
TOL = {
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(2e-5, 1e-6)),
    torch.float16: dict(loss=(1e-5, 1e-5), grad=(2e-3, 1e-5)),
    torch.bfloat16: dict(loss=(1e-5, 1e-5), grad=(1e-2, 1e-5)),
}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Fills every tensor from torch.empty with POISON and records the shapes allocated."""
    real_empty = torch.empty
    shapes = []

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        shapes.append(tuple(out.shape))
        if out.is_floating_point():
            out.fill_(POISON)
        return out

    monkeypatch.setattr(torch, "empty", empty)
    return shapes


def reference(logits, target, weight, dens, *, eps=0.0, z_loss=0.0, softcap=None, ignore_index=IGNORE):
    """float64 (ce, z, lse, grad, keep); rows with an ignored or out-of-range target are not kept."""
    x = logits.detach().double().requires_grad_(True)
    V = x.shape[1]
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    logp = torch.log_softmax(xc, dim=-1)
    lse = torch.logsumexp(xc, dim=-1)
    keep = (target != ignore_index) & (target >= 0) & (target < V)
    t = torch.where(keep, target, 0)
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64)
    ce = -logp.gather(1, t[:, None]).squeeze(1) * w[t]
    if eps > 0:  # (skipped at 0: 0 * (-inf) would be NaN on rows with -inf logits)
        ce = (1 - eps) * ce + eps * (-(logp * w).sum(-1) / V)
    ce = torch.where(keep, ce, torch.zeros_like(ce))
    z = torch.where(keep, z_loss * lse**2, torch.zeros_like(lse))
    (ce / dens[0].double() + z / dens[1].double()).sum().backward()
    return ce.detach(), z.detach(), lse.detach(), x.grad, keep


def make_inputs(N, V, dtype, *, seed=0, strided=False, with_weight=False, ignore_every=4, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a slice of a wider buffer: row stride V + 40, stride(1) == 1
        base = (torch.randn(N, V + 40, generator=g) * scale).to(dtype)
        logits = base[:, 7 : 7 + V]
    else:
        logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        target[1::ignore_every] = IGNORE
    weight = torch.rand(V, generator=g) + 0.25 if with_weight else None
    # random denominators, not those of a mean
    dens = torch.rand(2, generator=g) + 0.5
    return logits, target, weight, dens


def run(logits, target, weight, dens, *, eps=0.0, z_loss=0.0, softcap=None, ignore_index=IGNORE,
        compute_grad=True, inplace=False, **kw):
    opts = CEOptions(ignore_index, "sum", eps, z_loss, softcap, all_rows=True)
    return ce_forward(logits, target, weight, opts, dens=dens, compute_grad=compute_grad,
                      inplace=inplace, **kw)


def assert_matches(out, ref, dtype, *, grad_expected=True, nan_rows=None):
    ce, z, lse, grad = out.ce, out.z, out.lse, out.grad
    ce_r, z_r, lse_r, grad_r, keep = ref
    N = ce.shape[0]
    nan_rows = torch.zeros(N, dtype=torch.bool) if nan_rows is None else nan_rows
    ok = ~nan_rows
    rl, al = TOL[dtype]["loss"]
    rg, ag = TOL[dtype]["grad"]
    assert ce.dtype == z.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), lse_r, rtol=rl, atol=al)
    torch.testing.assert_close(ce[ok].double(), ce_r[ok], rtol=rl, atol=al)
    torch.testing.assert_close(z[ok].double(), z_r[ok], rtol=rl, atol=al)
    assert ce[nan_rows].isnan().all() and z[nan_rows].isnan().all()
    if not grad_expected:
        assert grad is None
        return
    assert grad.dtype == dtype and grad.shape == grad_r.shape
    torch.testing.assert_close(grad[ok].double(), grad_r[ok], rtol=rg, atol=ag)
    assert grad[nan_rows].isnan().all()
    ignored = ~keep & ok
    assert (grad[ignored] == 0).all()


# (N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap); block_v=None: the table
CASES = [
    pytest.param(8, 100, torch.float32, 32, None, False, 0.0, 0.0, None, id="fp32-V100-b32-plain"),
    pytest.param(6, 257, torch.float32, 64, None, False, 0.1, 0.0, None, id="fp32-V257-b64-smooth"),
    pytest.param(6, 257, torch.float32, 32, None, True, 0.0, 0.0, None, id="fp32-V257-b32-weight"),
    pytest.param(6, 100, torch.float32, 32, None, False, 0.0, 1e-2, None, id="fp32-V100-b32-zloss"),
    pytest.param(6, 100, torch.float32, 32, None, False, 0.0, 0.0, 4.0, id="fp32-V100-b32-softcap"),
    pytest.param(4, 1000, torch.float32, 256, None, True, 0.2, 1e-3, 5.0, id="fp32-V1000-b256-all"),
    pytest.param(6, 100, torch.float32, 32, None, True, 1.0, 0.0, None, id="fp32-V100-b32-weight-eps1"),
    pytest.param(4, 4099, torch.float32, None, None, True, 0.1, 1e-4, 30.0, id="fp32-V4099-auto-all"),
    pytest.param(6, 257, torch.bfloat16, 64, None, False, 0.0, 0.0, None, id="bf16-V257-b64-plain"),
    pytest.param(4, 1000, torch.bfloat16, 256, None, True, 0.1, 1e-3, 10.0, id="bf16-V1000-b256-all"),
    pytest.param(6, 257, torch.float16, 32, None, False, 0.1, 1e-2, None, id="fp16-V257-b32-smooth-z"),
    pytest.param(6, 100, torch.float32, 32, 2, False, 0.0, 0.0, None, id="fp32-V100-b32-split2-plain"),
    pytest.param(6, 257, torch.float32, 32, 3, True, 0.1, 0.0, None, id="fp32-V257-b32-split3-weight-smooth"),
    pytest.param(4, 1000, torch.float32, 64, 3, True, 0.1, 1e-3, 5.0, id="fp32-V1000-b64-split3-all"),
    pytest.param(4, 1000, torch.bfloat16, 128, 4, True, 0.1, 1e-3, 10.0, id="bf16-V1000-b128-split4-all"),
    pytest.param(6, 100, torch.float32, 32, 2, False, 0.0, 1e-2, 4.0, id="fp32-V100-b32-split2-z-softcap"),
]


@pytest.mark.parametrize("N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap", CASES)
def test_matches_autograd(
    poisoned_empty, N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap
):
    logits, target, weight, dens = make_inputs(N, V, dtype, with_weight=with_weight)
    out = run(logits, target, weight, dens, eps=eps, z_loss=z_loss, softcap=softcap,
              block_v=block_v, num_splits=num_splits)
    ref = reference(logits, target, weight, dens, eps=eps, z_loss=z_loss, softcap=softcap)
    assert_matches(out, ref, dtype)
    if num_splits is not None:  # the split path ran, with the asked number of chunks
        assert (NUM_FIELDS, N, num_splits) in poisoned_empty
    # the reduced loss, from the per-row values (one program, fixed order)
    loss, z_term = ce_finalize(out.ce, out.z, dens, has_z=z_loss > 0, out_dtype=torch.float32)
    want = (ref[0] / dens[0].double()).sum() + (ref[1] / dens[1].double()).sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_splits", [pytest.param(None, id="fused"), pytest.param(3, id="split3")])
def test_out_of_range_targets_give_nan_rows(num_splits):
    N, V = 8, 100
    logits, target, weight, dens = make_inputs(N, V, torch.float32, with_weight=True, ignore_every=0)
    target[1], target[3], target[4], target[6] = V, -1, 10**12, -(10**12)  # far away: a read would crash
    target[7] = IGNORE
    nan_rows = torch.zeros(N, dtype=torch.bool)
    nan_rows[[1, 3, 4, 6]] = True
    out = run(logits, target, weight, dens, eps=0.1, z_loss=1e-3, block_v=32, num_splits=num_splits)
    ref = reference(logits, target, weight, dens, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, torch.float32, nan_rows=nan_rows)
    assert out.ce[7] == 0 and out.z[7] == 0


def test_ignore_index_inside_vocabulary():
    N, V = 8, 100
    logits, target, _, dens = make_inputs(N, V, torch.float32, ignore_every=0)
    target[::3] = 5  # class 5 is the padding label
    out = run(logits, target, None, dens, eps=0.1, z_loss=1e-3, ignore_index=5, block_v=32)
    ref = reference(logits, target, None, dens, eps=0.1, z_loss=1e-3, ignore_index=5)
    assert_matches(out, ref, torch.float32)
    assert (out.ce[::3] == 0).all()


@pytest.mark.parametrize("num_splits", [pytest.param(None, id="fused"), pytest.param(2, id="split2")])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_no_grad_writes_nothing(poisoned_empty, num_splits, inplace):
    N, V = 6, 100
    logits, target, _, dens = make_inputs(N, V, torch.bfloat16)
    before = logits.clone()
    out = run(logits, target, None, dens, eps=0.1, z_loss=1e-3, compute_grad=False,
              inplace=inplace, block_v=32, num_splits=num_splits)
    assert out.grad is None
    assert torch.equal(logits, before)
    assert (N, V) not in poisoned_empty  # no N x V buffer allocated either
    ref = reference(logits, target, None, dens, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, torch.bfloat16, grad_expected=False)


@pytest.mark.parametrize(
    "dtype, num_splits, strided",
    [
        pytest.param(torch.float32, None, False, id="fp32-fused"),
        pytest.param(torch.bfloat16, None, True, id="bf16-fused-strided"),
        pytest.param(torch.float32, 3, True, id="fp32-split3-strided"),
        pytest.param(torch.bfloat16, 2, False, id="bf16-split2"),
    ],
)
@pytest.mark.parametrize("block_v", [64, None], ids=["b64", "one-block"])
def test_inplace_overwrites_logits(poisoned_empty, dtype, num_splits, strided, block_v):
    N, V = 6, 257
    logits, target, weight, dens = make_inputs(N, V, dtype, strided=strided, with_weight=True)
    original = logits.clone()
    base_before = logits._base.clone() if strided else None
    out = run(logits, target, weight, dens, eps=0.1, z_loss=1e-3, softcap=5.0, inplace=True,
              block_v=block_v, num_splits=num_splits)
    assert out.grad is logits
    assert (N, V) not in poisoned_empty
    ref = reference(original, target, weight, dens, eps=0.1, z_loss=1e-3, softcap=5.0)
    assert_matches(out, ref, dtype)
    if strided:  # columns around the view are untouched
        assert torch.equal(logits._base[:, :7], base_before[:, :7])
        assert torch.equal(logits._base[:, 7 + V :], base_before[:, 7 + V :])


@pytest.mark.parametrize(
    "dtype, num_splits",
    [
        pytest.param(torch.float32, None, id="fp32-fused"),
        pytest.param(torch.float32, 3, id="fp32-split3"),
        pytest.param(torch.bfloat16, None, id="bf16-fused"),
    ],
)
def test_strided_rows(dtype, num_splits):
    N, V = 6, 257
    logits, target, weight, dens = make_inputs(N, V, dtype, strided=True, with_weight=True)
    assert logits.stride() == (V + 40, 1)
    out = run(logits, target, weight, dens, eps=0.1, z_loss=1e-3, block_v=64,
              num_splits=num_splits)
    assert out.grad.is_contiguous()
    ref = reference(logits, target, weight, dens, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize(
    "num_splits, softcap, block_v",
    [
        pytest.param(None, None, 32, id="fused"),
        pytest.param(None, None, None, id="fused-one-block"),
        pytest.param(None, 4.0, 32, id="fused-softcap"),
        pytest.param(4, None, 32, id="split4"),
    ],
)
def test_minus_inf_logits(num_splits, softcap, block_v):
    N, V = 5, 128
    logits, target, _, dens = make_inputs(N, V, torch.float32, ignore_every=0)
    ninf = float("-inf")
    logits[0, ::3] = ninf  # scattered
    logits[1, :32] = ninf  # the whole first block (and first chunk with 4 splits): max = -inf there
    logits[2, 32:64] = ninf  # a whole middle block
    logits[3, :-1] = ninf  # a single finite logit: lse = that logit
    target[:3] = torch.tensor([1, 40, 70])
    target[3] = V - 1
    target[4] = IGNORE
    out = run(logits, target, None, dens, z_loss=1e-3, softcap=softcap, block_v=block_v,
              num_splits=num_splits)
    ref = reference(logits, target, None, dens, z_loss=1e-3, softcap=softcap)
    assert torch.isfinite(out.ce).all() and torch.isfinite(out.lse).all()
    assert torch.isfinite(out.grad).all()
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize(
    "value", [-1e9, 1e8, torch.finfo(torch.float32).min, torch.finfo(torch.float32).max, 0.0],
    ids=["-1e9", "1e8", "fp32-min", "fp32-max", "0"])
@pytest.mark.parametrize(
    "block_v, num_splits", [(None, None), (32, None), (32, 3)],
    ids=["one-block", "two-sweeps", "split3"])
def test_equal_large_logits(value, block_v, num_splits):
    """A row of equal logits: loss log V and gradient p - q (q the smoothed one-hot), however large
    the logits (the maximum is subtracted before anything is added). With lse - x_t the loss
    rounds to 0."""
    import math

    N, V = 3, 100
    logits = torch.full((N, V), value)
    target = torch.tensor([1, 57, 99])
    out = run(logits, target, None, torch.ones(2), eps=0.1, block_v=block_v,
              num_splits=num_splits)
    torch.testing.assert_close(out.ce, torch.full((N,), math.log(V)), rtol=1e-6, atol=0)
    want = torch.full((N, V), 1.0 / V - 0.1 / V)  # p_c - eps / V (label smoothing 0.1)
    want[torch.arange(N), target] -= 0.9
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-7)


def test_bf16_gradient_rounds_to_nearest_even():
    """The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even; the kernels
    round on the bits, so CPU tests see the GPU's values: the bf16 gradient is exactly the
    fp32 gradient rounded by torch."""
    N, V = 16, 300
    logits, target, weight, dens = make_inputs(N, V, torch.bfloat16, with_weight=True)
    out = run(logits, target, weight, dens, eps=0.1, z_loss=1e-3)
    out32 = run(logits.float(), target, weight, dens, eps=0.1, z_loss=1e-3)
    rounded = out32.grad.to(torch.bfloat16)
    mismatched = (out.grad != rounded).sum().item()
    # (the fp32 math differs only in fp32 rounding, which may move a value across a bf16 tie)
    assert mismatched <= N * V // 1000, mismatched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_class(dtype):
    N, V = 4, 1
    logits, target, weight, dens = make_inputs(N, V, dtype, with_weight=True, ignore_every=0)
    target[:] = torch.tensor([0, 1, IGNORE, 0])  # 1 is out of range
    out = run(logits, target, weight, dens, eps=0.1, z_loss=1e-2)
    ref = reference(logits, target, weight, dens, eps=0.1, z_loss=1e-2)
    nan_rows = torch.tensor([False, True, False, False])
    assert_matches(out, ref, dtype, nan_rows=nan_rows)
    assert out.ce[0] == 0  # log p = 0 for the only class


@pytest.mark.parametrize(
    "compute_grad, inplace",
    [pytest.param(True, False, id="grad"), pytest.param(True, True, id="inplace"),
     pytest.param(False, False, id="no-grad")],
)
def test_empty_batch(compute_grad, inplace):
    logits = torch.empty(0, 50)
    out = run(logits, torch.empty(0, dtype=torch.int64), None, torch.ones(2),
              compute_grad=compute_grad, inplace=inplace)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in (out.ce, out.z, out.lse))
    if not compute_grad:
        assert out.grad is None
    elif inplace:
        assert out.grad is logits
    else:
        assert out.grad.shape == (0, 50)


@pytest.mark.parametrize(
    "logits, match",
    [
        pytest.param(torch.randn(2, 2, 10), "2-D", id="logits-3d"),
        pytest.param(torch.randn(4, 10).double(), "dtype", id="logits-fp64"),
        pytest.param(torch.randn(10, 4).t(), "stride", id="logits-col-major"),
    ],
)
def test_bad_logits_raise(logits, match):
    with pytest.raises(ValueError, match=match):
        run(logits, torch.zeros(4, dtype=torch.int64), None, torch.ones(2))


def test_upstream_recompute_and_scale(monkeypatch):
    """ce_finish with an upstream gradient: rows whose upstream is 1 keep the forward's gradient
    (not rewritten), the others get g times the gradient, computed from the logits (rounded
    once); scale_ multiplies in place unless g == 1."""
    N, V = 6, 257
    logits, target, weight, dens = make_inputs(N, V, torch.bfloat16, with_weight=True)
    opts = CEOptions(IGNORE, "none", 0.1, 1e-3, None)
    out = ce_forward(logits, target, weight, opts, dens=dens, compute_grad=True, block_v=64)
    g = torch.tensor([1.0, 0.5, 1.0, -2.0, 3.0, 1.0])
    grad = out.grad.clone()
    grad[[0, 2, 5]] = 7.0  # sentinel: rows with g == 1 must not be rewritten
    monkeypatch.setattr(config, "TRITON_BLOCK_V", 64)
    ops.finish(logits, target, weight, opts, out.stats, None, dens=dens, rows=None, grad=grad,
               upstream=g)
    assert (grad[[0, 2, 5]] == 7.0).all()
    fresh = torch.empty_like(grad)
    ops.finish(logits, target, weight, opts, out.stats, None, dens=dens, rows=None, grad=fresh,
               upstream=g, skip_unit=False)
    ref = reference(logits, target, weight, dens, eps=0.1, z_loss=1e-3)
    want = (ref[3] * g.double().unsqueeze(1))
    keep = [1, 3, 4]
    torch.testing.assert_close(grad[keep].double(), want[keep], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(fresh.double(), want, rtol=1e-2, atol=1e-5)
    # the recomputed rows are the exact product, rounded once (not the bf16 gradient times g)
    exact = (out32 := ce_forward(logits.float(), target, weight, opts, dens=dens,
                                 compute_grad=True).grad) * g.unsqueeze(1)
    assert torch.equal(fresh[keep], exact[keep].to(torch.bfloat16)) or (
        (fresh[keep] != exact[keep].to(torch.bfloat16)).sum() <= 2)
    del out32
    t = torch.randn(5, 300)
    before = t.clone()
    ops.scale_(t, torch.tensor(1.0))
    assert torch.equal(t, before)
    ops.scale_(t, torch.tensor(2.5))
    torch.testing.assert_close(t, before * 2.5)
    rows = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0])
    ops.scale_(t, rows)
    torch.testing.assert_close(t, before * 2.5 * rows.unsqueeze(1))


def test_plan_table():
    """The launch plan on the H100 planning model (the table in backends/triton_ce.py)."""
    p = plan(8192, 16000, torch.bfloat16)  # one read: the row in registers, 32 per thread
    assert (p.path, p.single_block, p.block_v, p.num_warps) == ("fused", True, 16384, 16)
    assert p.programs == 132  # one 16-warp program per SM: the registers allow no more
    p = plan(8192, 8000, torch.bfloat16, heavy=True)  # options: 16 values per thread
    assert (p.single_block, p.block_v, p.num_warps, p.programs) == (True, 8192, 16, 132)
    assert plan(16, 16000, torch.bfloat16).programs == 16  # few rows: one program per row
    # V=32000: two sweeps of one 32768-column block (64 KB in flight; in registers it spills)
    p = plan(8192, 32000, torch.bfloat16)
    assert (p.path, p.single_block, p.block_v, p.num_warps, p.programs) == (
        "fused", False, 32768, 32, 132)
    assert plan(8192, 32000, torch.float32).block_v == 16384  # the same 64 KB in fp32
    p = plan(8192, 128256, torch.bfloat16)  # two sweeps, rows in flight within the L2
    assert (p.path, p.single_block, p.block_v, p.programs) == ("fused", False, 32768, 132)
    assert plan(8192, 128256, torch.bfloat16, heavy=True).block_v == 8192
    p = plan(16, 128256, torch.bfloat16)  # few long rows: split
    assert p.path == "split" and p.splits == 15 and p.chunk % 16 == 0 and p.block_v == 8192
    assert p.splits * p.chunk >= 128256 > (p.splits - 1) * p.chunk
    p = plan(16, 262144, torch.bfloat16)
    assert p.path == "split" and p.splits == 17
    # between SMs and 2 x SMs rows: split only while the N x V re-read fits half the L2
    assert plan(256, 32000, torch.bfloat16).path == "split"
    assert plan(256, 128256, torch.bfloat16).path == "fused"
    assert plan(300, 262144, torch.bfloat16).path == "fused"  # enough rows to fill the SMs
    assert plan(4, 1000, torch.float32, block_v=32, num_splits=3).splits == 3
    # persistent grids never assume more programs per SM than the registers allow
    assert [ops.programs_per_sm(w) for w in (4, 8, 16, 32)] == [4, 2, 1, 1]
    assert [ops.programs_per_sm(w, heavy=True) for w in (4, 8, 16, 32)] == [2, 1, 1, 1]


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_xent.kernels.cross_entropy as K
import triton_xent.kernels.scale as S

def compile_for_sm90(fn, dtype, num_warps, **constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr", "t_ptr", "loss_rows_ptr", "loss_ptr"):
            sig[name] = "*" + dtype
        elif name in ("target_ptr", "argmax_ptr", "part_idx_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("label_smoothing", "z_loss", "softcap", "logit_scale", "inv_divisor"):
            sig[name] = "fp32"
        elif name.startswith("stride_"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

on = dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SCALE=True, HAS_SOFTCAP=True,
          HAS_ARGMAX=True, HAS_ENTROPY=True)
off = {k: False for k in on}
for flags, dt in ((on, "bf16"), (off, "fp32")):
    for single in (True, False):
        compile_for_sm90(K._ce_fused_kernel, dt, 8, BLOCK_V=8192 if not single else 2048,
                         BLOCK_N=1024, SINGLE_BLOCK=single, REDUCTION=2, DENS_FROM_PTR=False,
                         HAS_DIVISOR=True, COMPUTE_GRAD=True, ALL_ROWS=True, WRITE_STATS=True,
                         EMULATE_RTNE=False, **flags)
    part = {k: v for k, v in flags.items() if k != "HAS_Z_LOSS"}
    compile_for_sm90(K._ce_partials_kernel, dt, 8, BLOCK_V=8192, BLOCK_N=1024, REDUCTION=2,
                     COMPUTE_DENS=True, HAS_DIVISOR=False, ALL_ROWS=False, **part)
    compile_for_sm90(K._ce_finish_kernel, dt, 8, BLOCK_V=8192, P_BLOCK=16, REDUCTION=0,
                     COMPUTE_LOSS=True, COMPUTE_GRAD=True, HAS_UPSTREAM=True,
                     HAS_UPSTREAM_LSE=True, HAS_UPSTREAM_ENT=flags["HAS_ENTROPY"], SKIP_UNIT=True, WRITE_STATS=True, EMULATE_RTNE=False,
                     **flags)
compile_for_sm90(K._ce_finalize_kernel, "fp32", 4, BLOCK_N=1024, HAS_Z_LOSS=True,
                 EMULATE_RTNE=False)
compile_for_sm90(S._scale_kernel, "bf16", 8, BLOCK=4096, EMULATE_RTNE=False)
compile_for_sm90(K._ce_dens_kernel, "fp32", 4, BLOCK_N=1024, REDUCTION=2, HAS_WEIGHT=True,
                 HAS_DIVISOR=False)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter is lenient with types; the real compiler (to sm_90 PTX and cubin, no GPU
    needed) checks the all-features and no-features variants of every kernel."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA backend in this triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; the default anyway
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
