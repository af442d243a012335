"""The traffic meter's budgets: bytes per logit and launches of every path, counted under the
interpreter with the launch plan of an H100 (see bench/traffic.py). A change that adds a pass
over the logits, a launch or a torch op around the kernels fails here."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from bench import traffic
from triton_xent.backends import triton_ce as ops

pytestmark = pytest.mark.skipif(not ops.INTERPRETED, reason="the meter needs the interpreter")


@pytest.mark.parametrize("case", traffic.CE_CASES, ids=[c.name for c in traffic.CE_CASES])
def test_cross_entropy_budget(case):
    r = traffic.run_case(case)
    c = r.counts
    assert r.per_logit <= case.budget, f"{r.per_logit:.4f} B/logit > {case.budget}: {c}"
    # no pass can hide below the budget: every logit is read (and its gradient written) once;
    # without a gradient, every kept row's logit
    assert r.per_logit >= case.floor - 1e-9
    assert c.triton_launches <= case.max_triton_launches, c.kernels
    assert c.torch_launches == 0, f"torch ops around the kernels: {c.ops}"


@pytest.mark.parametrize("case", traffic.LINEAR_CASES, ids=[c.name for c in traffic.LINEAR_CASES])
def test_linear_budget_and_flops(case):
    r = traffic.run_case(case)
    gemms = 4 if dict(case.options).get("reduction") == "none" else 3
    assert r.counts.flops == gemms * r.gemm_flops, (r.counts.flops / r.gemm_flops, r.counts.ops)
    assert r.per_logit <= case.budget, f"{r.per_logit:.4f} B/logit > {case.budget}"


def test_meter_counts_what_it_should():
    """The meter itself: a torch op's bytes, a masked load's active lanes only, and nothing for
    views and allocations."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def copy_half(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.randn(64)
    y = torch.empty(64)
    with traffic.Meter() as m:
        copy_half[(1,)](x, y, 40, BLOCK=64)  # 40 active lanes of 4 bytes, each way
        z = x.view(8, 8).t()  # a view: nothing
        w = torch.empty(100)  # an allocation: nothing
        (x * 2).sum()  # mul reads 256 B and writes 256 B; sum reads 256 B and writes 4 B
    del z, w
    c = m.counts
    assert (c.triton_load, c.triton_store, c.triton_launches) == (160, 160, 1)
    assert (c.torch_read, c.torch_write, c.torch_launches) == (512, 260, 2)



# The backward at upstream 1 ("free"): one launch per gradient, of a persistent grid (at most one
# wave of threads on the SMs whatever the number of rows), whose programs read the upstream
# gradient once and stop: no row is touched.
_SMS = ops.H100.sms


def _backward(loss, inputs, seed):
    with traffic.Meter() as m:
        torch.autograd.grad(loss, inputs, seed)
    return m.counts


def _assert_free(c, *, N):
    assert c.triton_store == 0, c
    assert c.triton_load <= 4 * N + 64, c  # the upstream gradient, once per item at most
    assert c.torch_launches == 0, c.ops


def test_backward_at_unit_upstream_is_one_persistent_launch(monkeypatch):
    import triton_xent

    # a planning GPU of 2 SMs, so that a few hundred rows are more than it runs at once
    small = ops.DeviceSpec("2-SM planning model", 2, ops.H100.l2_bytes)
    from triton_xent.backends import triton_plan

    monkeypatch.setattr(triton_plan, "H100", small)
    wave_warps = small.sms * ops.THREADS_PER_SM // 32
    N, V = 200, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    for reduction in ("mean", "sum"):
        loss = triton_xent.cross_entropy(x, t, reduction=reduction, backend="triton")
        c = _backward(loss, [x], torch.ones_like(loss))
        _assert_free(c, N=N)
        assert c.kernels == {"_ce_finish_kernel": 1}, c.kernels
        p = c.programs["_ce_finish_kernel"]
        warps = ops.plan(N, V, x.dtype, small).num_warps
        assert p < N and p * warps <= wave_warps, (p, warps)
    # a random upstream still writes every row (the same persistent grid, now looping)
    loss = triton_xent.cross_entropy(x, t, reduction="sum", backend="triton")
    c = _backward(loss, [x], torch.tensor(0.5))
    assert c.triton_store >= N * V * 2 and c.programs["_ce_finish_kernel"] < N


def test_inplace_and_shard_backward_at_unit_upstream():
    import triton_xent
    from triton_xent.backends.protocol import Options as CEOptions

    N, V = 300, 40
    g = torch.Generator().manual_seed(1)
    base = torch.randn(N, V, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    x = base * 1.0
    loss = triton_xent.cross_entropy(x, t, backend="triton", inplace_backward=True)
    c = _backward(loss, [x], torch.ones_like(loss))
    _assert_free(c, N=1)
    assert c.kernels == {"_scale_kernel": 1} and c.programs["_scale_kernel"] <= 4 * _SMS
    # a vocabulary shard's backward recompute: columns [40, 80) of 120, per-row upstream 1
    opts = CEOptions(-100, "none", 0.0, 0.0, None)
    stats, dens, up = torch.randn(6, N), torch.ones(2), torch.ones(N)
    grad = torch.full((N, V), 7.0, dtype=torch.bfloat16)
    with traffic.Meter() as m:
        ops.finish(base.detach(), t, None, opts, stats, None, dens=dens, rows=None, grad=grad,
                   offset=40, vocab_size=120, upstream=up)
    _assert_free(m.counts, N=N)
    assert (grad == 7.0).all()
    assert m.counts.programs["_ce_finish_kernel"] <= N


def test_scale_grid_is_persistent():
    """scale_ over a tensor of any size is one launch of at most 4 programs per SM; with g == 1
    it reads g and nothing else; with g != 1 every element is scaled exactly once."""
    for rows, row_len in ((1, 128256 * 4096), (8192, 128256), (16, 262144), (3, 10)):
        programs, parts, blocks = ops.scale_grid(rows, row_len)
        assert programs <= 4 * _SMS and parts <= blocks
        assert rows * parts >= programs  # no idle program
    t = torch.randn(7, 9000)
    before, one, ones = t.clone(), torch.tensor(1.0), torch.ones(7)
    with traffic.Meter() as m:
        ops.scale_(t, one)
        ops.scale_(t, ones)
    assert torch.equal(t, before) and m.counts.triton_store == 0
    # one read of g per program
    programs = ops.scale_grid(1, t.numel())[0] + ops.scale_grid(7, 9000)[0]
    assert m.counts.triton_load == 4 * programs
    gr = torch.tensor([1.0, 2.0, 1.0, -0.5, 1.0, 3.0, 1.0])
    with traffic.Meter() as m:
        ops.scale_(t, gr)
    assert torch.equal(t, before * gr.unsqueeze(1))
    assert m.counts.triton_store == 3 * 9000 * 4  # the three rows with g != 1, once each


def test_linear_head_backward_at_unit_upstream():
    """The fused head's dX, dW (and db) come from the forward: at upstream 1 each is one
    persistent ``scale_`` launch that reads g and stops."""
    import triton_xent

    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=g).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(96, 32, generator=g) / 6).to(torch.bfloat16).requires_grad_()
    b = torch.zeros(96, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 96, (64,), generator=g)
    loss = triton_xent.linear_cross_entropy(h, W, t, linear_bias=b, backend="triton",
                                            skip_ignored=False)
    c = _backward(loss, [h, W, b], torch.ones_like(loss))
    _assert_free(c, N=1)
    assert c.kernels == {"_scale_kernel": 3} and c.programs["_scale_kernel"] <= 4 * _SMS
