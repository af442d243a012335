"""``tests/test_gpu.py``'s helpers, run on the CPU through the Triton interpreter in tiny cases.

The GPU tests only run on a lent GPU; their oracle, tolerance, launch-spy and tail-check helpers
are device-agnostic, so CI runs them here on small shapes (with the small forced block, fused and
forced split) and they cannot rot between GPU sessions. This also checks that the helpers can
fail: a wrong gradient must trip ``check_grad_rows``.
"""

from __future__ import annotations

import pytest
import test_gpu as G
import torch

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

CASES = [
    G.Case(5, 100, fp32, "none", inplace=True, **G.ALL),
    G.Case(6, 77, bf16, "mean", **G.ALL),
    G.Case(1, 50, fp16, "sum", weight=True, eps=0.1, z_loss=1e-4),
    G.Case(4, 70, bf16, "none", backend="torch", **G.ALL),
]


@pytest.mark.parametrize("splits", [1, 3], ids=["fused", "split3"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_run_case_on_cpu(case, splits, small_blocks, monkeypatch):
    small_blocks.TRITON_NUM_SPLITS = splits
    spies = G.spy_launches(monkeypatch)
    log = G.run_case(case, spies, device="cpu")
    if case.backend == "triton":
        assert log["splits"] == G.expected_splits(case.N, case.V, "cpu", heavy=case.heavy)
        assert (log["splits"] > 1) == (splits > 1 and case.V > 16), log
    assert 0.0 <= log["grad_worst_over_tol"] <= 1.0


@pytest.mark.parametrize("splits", [1, 3], ids=["fused", "split3"])
def test_run_tail_check_on_cpu(splits, small_blocks, monkeypatch):
    small_blocks.TRITON_NUM_SPLITS = splits
    spies = G.spy_launches(monkeypatch)
    log = G.run_tail_check(8, 100, 3, spies, device="cpu")
    assert log["splits"] == G.expected_splits(8, 100, "cpu", heavy=True)


def test_check_grad_rows_fails_on_a_wrong_gradient():
    """A gradient missing the label-smoothing term (eps * w_c / V, small next to the row's max)
    is caught element by element."""
    x, t, w = G.make_inputs(4, 64, bf16, weight=True, seed=1, device="cpu")
    g = G.upstream("none", 4, bf16, device="cpu")
    a_ce, a_z = G.row_coefficients(t, w, "none", g, 64)
    kw = dict(z_loss=0.0, softcap=None, a_ce=a_ce, a_z=a_z, up_abs=g.double().abs(), dtype=bf16)
    (_, _, _, _, with_smoothing), = G.reference_chunks(x, t, w, eps=0.1, z_loss=0.0, softcap=None,
                                                       a_ce=a_ce, a_z=a_z)
    G.check_grad_rows(with_smoothing.to(bf16), x, t, w, eps=0.1, **kw)  # the right one passes
    with pytest.raises(AssertionError, match="gradient outside tolerance"):
        G.check_grad_rows(with_smoothing.to(bf16), x, t, w, eps=0.0, **kw)
