"""N * V above 2**31 on the torch backend, on the CPU.

bf16 logits of 16448 x 131073 = 2.156e9 elements (4.3 GB): rows from 16384 on start past 2**31
and row 16383 crosses it. Memory is bounded: the logits and their gradient (4.3 GB each), the
torch backend's chunks of 64 rows, and a float64 oracle that checks one chunk of rows at a time:
measured 9.4 GB of peak resident memory (under the ~12 GiB a shared 24 GiB machine allows a
test) and 27 to 81 s on 2 shared cores. Marked slow; the default run (``python -m pytest -q``, the README's
and CI's command) includes it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, LOSS_TOL, assert_close, upstream_like

from triton_xent import cross_entropy
from triton_xent.reference import cross_entropy_reference

N, V = 16448, 131073
IGNORE = -100
PEAK_BYTES = 2 * N * V * 2 + (1 << 30)  # the logits, their gradient, slack


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
    """fwd+bwd, "none" (fp32 rows) with an upstream per row; the rows past and across 2**31, the
    first rows and every 256th against float64 (the forward's gradient and the backward's
    recompute, alternately), every row finite."""
    assert (N - 65) * V < 2**31 < (N - 64) * V  # row N - 65 crosses 2**31; the 64 after it start past
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, V, dtype=torch.bfloat16).uniform_(-8.0, 8.0, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.1] = IGNORE
    t[-1], t[-2], t[N - 65] = V - 1, IGNORE, 0  # the buffer's last column is a target
    rows = torch.cat([torch.arange(0, 16), torch.arange(16, N - 65, 256), torch.arange(N - 65, N)])
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-4)

    x.requires_grad_(True)
    loss = cross_entropy(x, t, loss_dtype=torch.float32, backend="torch", **kw)
    # Upstream 1 keeps the forward's gradient of a row; any other value makes the backward
    # recompute the row from the logits. Half of the checked rows (alternately) take each path;
    # the rest keep 1 (recomputing all 2**31 elements would double the time).
    up = torch.ones(N, dtype=torch.float64)
    up[rows[::2]] = upstream_like(up[rows[::2]], torch.float32)
    loss.backward(up.float())
    grad = x.grad
    keep = t != IGNORE
    assert bool(torch.isfinite(loss).all()) and bool((loss[~keep] == 0).all())

    for s in range(0, rows.numel(), 64):
        r = rows[s:s + 64]
        xd = x[r].detach().double().requires_grad_(True)
        ref = cross_entropy_reference(xd, t[r], **kw)
        (ref_grad,) = torch.autograd.grad(ref, xd, up[r])
        where = f"rows {int(r[0])}..{int(r[-1])}"
        assert_close(loss[r], ref, LOSS_TOL[torch.float32], what=f"loss, {where}")
        assert_close(grad[r], ref_grad, GRAD_TOL[torch.bfloat16], dim=1, what=f"gradient, {where}")
