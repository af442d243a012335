"""Rows of equal large logits through the public API, both backends: the loss is log V and the
gradient p - q exactly, however large the logits, because the row maximum is subtracted before
anything is added (``lse - x_t`` rounds to 0 at |x| = 1e9 in fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from triton_xent import cross_entropy, linear_cross_entropy

BACKENDS = ["torch", "triton"]
VALUES = [-1e9, 1e8, torch.finfo(torch.float32).min, torch.finfo(torch.float32).max]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", VALUES, ids=["-1e9", "1e8", "fp32-min", "fp32-max"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equal_large_logits(backend, value, reduction, small_blocks):
    N, V, eps = 4, 100, 0.1
    x = torch.full((N, V), value, requires_grad=True)
    t = torch.tensor([0, 17, 63, 99])
    loss = cross_entropy(x, t, reduction=reduction, label_smoothing=eps, backend=backend)
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(V)), rtol=1e-6, atol=0)
    loss.sum().backward()
    scale = 1.0 / N if reduction == "mean" else 1.0
    want = torch.full((N, V), (1.0 - eps) / V)  # p_c - eps / V
    want[torch.arange(N), t] -= 1.0 - eps
    torch.testing.assert_close(x.grad, want * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_large_logits_z_loss_and_aux(backend, small_blocks):
    """lse itself is large (M + log V, rounded), but the loss keeps log V; z-loss uses lse."""
    x = torch.full((3, 50), -1e9)
    t = torch.tensor([1, 2, 3])
    loss, aux = cross_entropy(x, t, z_loss=1e-12, return_aux=True, backend=backend,
                              reduction="none")
    lse = torch.tensor(-1e9) + math.log(50)
    torch.testing.assert_close(aux.lse, lse.expand(3), rtol=1e-7, atol=0)
    torch.testing.assert_close(loss, math.log(50) + 1e-12 * aux.lse.double().square().float(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_equal_large_logits(backend, small_blocks):
    """The fused head: every logit equal (equal rows of W) and huge."""
    D, V = 4, 64
    x = torch.full((6, D), 1e4, requires_grad=True)
    w = torch.full((V, D), -2.5e4, requires_grad=True)  # logits = -1e9 everywhere
    t = torch.tensor([0, 5, 9, 33, 63, -100])
    loss = linear_cross_entropy(x, w, t, backend=backend, chunk_size=4)
    torch.testing.assert_close(loss, torch.tensor(math.log(V)), rtol=1e-6, atol=0)
