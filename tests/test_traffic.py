"""The traffic meter's budgets: bytes per logit and launches of every path, counted under the
interpreter with the launch plan of an H100 (see bench/traffic.py). A change that adds a pass
over the logits, a launch or a torch op around the kernels fails here."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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
