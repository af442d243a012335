"""N * V above 2**31 on the torch backend, on the CPU.

bf16 logits of 16448 x 131073 = 2.156e9 elements (4.3 GB): rows from 16384 on start past 2**31
and row 16383 crosses it. Memory is bounded: the call runs in place (the gradient overwrites the
logits), the torch backend works in chunks of 64 rows, and the float64 oracle checks one chunk
of rows at a time: the peak resident memory measured 5.3 GB (well under the ~12 GiB a shared
24 GiB machine allows a test). Time: measured 67 s on 2 cores (generating the logits, a no-grad
forward and one forward+backward; the oracle only sees the rows it checks). Marked slow; the
default run (``python -m pytest -q``, the README's and CI's command) includes it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, LOSS_TOL, assert_close

from triton_xent import cross_entropy
from triton_xent.reference import cross_entropy_reference

N, V = 16448, 131073
IGNORE = -100
PEAK_BYTES = N * V * 2 + (1 << 30)  # measured: 5.3 GB of peak resident memory


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: try


@pytest.mark.slow
@pytest.mark.skipif(_available_bytes() < PEAK_BYTES + (1 << 30),
                    reason=f"needs about {PEAK_BYTES / 2**30:.1f} GiB of free memory, plus 1 GiB of room")
def test_more_than_2_31_elements_torch_backend():
    """The per-row losses of every row ("none", no grad, fp32) and the in-place fwd+bwd of the
    summed loss; the rows past and across 2**31, the first rows and every 256th against float64.
    (Not "none" with a gradient: its backward would allocate fp32 copies of the whole gradient,
    see test_cross_entropy.py::test_backward_allocates_no_logits_sized_buffer.)"""
    assert (N - 65) * V < 2**31 < (N - 64) * V  # row N - 65 crosses 2**31; the 64 after it start past
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, V, dtype=torch.bfloat16).uniform_(-8.0, 8.0, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.1] = IGNORE
    t[-1], t[-2], t[N - 65] = V - 1, IGNORE, 0  # the buffer's last column is a target
    rows = torch.cat([torch.arange(0, 16), torch.arange(16, N - 65, 256), torch.arange(N - 65, N)])
    saved = x[rows].clone()  # the call below overwrites the logits with their gradient
    kw = dict(label_smoothing=0.1, z_loss=1e-4)

    with torch.no_grad():
        row_loss = cross_entropy(x, t, reduction="none", loss_dtype=torch.float32, backend="torch", **kw)
    x.requires_grad_(True)
    loss = cross_entropy(x, t, reduction="sum", loss_dtype=torch.float32, inplace_backward=True,
                         backend="torch", **kw)
    up = torch.tensor(0.75)
    loss.backward(up)
    assert x.grad.data_ptr() == x.data_ptr(), "inplace_backward: the gradient is not in the logits"
    keep = t != IGNORE
    assert bool(torch.isfinite(row_loss).all()) and bool((row_loss[~keep] == 0).all())
    # The sum is the sum of the rows (float64 of the fp32 rows: one rounding each).
    assert_close(loss, row_loss.double().sum(), LOSS_TOL[torch.float32], what="sum of the rows")

    for s in range(0, rows.numel(), 64):
        r = rows[s:s + 64]
        xd = saved[s:s + 64].double().requires_grad_(True)
        ref = cross_entropy_reference(xd, t[r], reduction="none", **kw)
        (ref_grad,) = torch.autograd.grad(ref.sum() * 0.75, xd)
        where = f"rows {int(r[0])}..{int(r[-1])}"
        assert_close(row_loss[r], ref, LOSS_TOL[torch.float32], what=f"loss, {where}")
        assert_close(x.grad[r], ref_grad, GRAD_TOL[torch.bfloat16], dim=1, what=f"gradient, {where}")
