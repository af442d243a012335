"""``linear_logprobs``: per-token log-probs (entropy, arg-max) of a linear head.

Against float64 autograd of ``log_softmax(softcap(logit_scale * z) / T).gather(target)`` and
``-(softmax * log_softmax).sum(-1)`` with random upstream gradients on both, on every backend path (torch, Triton fused and split under the
interpreter), with a bias, ignored rows and several chunks; bf16 hidden states with fp32
outputs; the no-grad path allocating nothing of size V per row beyond the chunk buffer; and the
refusal of class-probability targets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import triton_xent
from triton_xent import CrossEntropyInputError, linear_logprobs

IGNORE = -100
N, D, VOCAB = 7, 12, 70
TOL = dict(rtol=2e-5, atol=2e-6)  # fp32 results against float64

OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"temperature": 0.7}, id="temp"),
    pytest.param({"softcap": 3.0, "logit_scale": 1.3, "temperature": 0.7}, id="cap-scale-temp"),
]


def _problem(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(VOCAB, D, generator=g) * 0.8
    b = torch.randn(VOCAB, generator=g) if bias else None
    t = torch.randint(0, VOCAB, (N,), generator=g)
    t[2] = IGNORE
    return x, w, b, t, g


def _reference(x, w, b, t, softcap=None, logit_scale=None, temperature=None):
    """(logprobs, entropy, argmax) in float64 autograd, 0 / -1 on ignored rows."""
    y = F.linear(x, w, b)
    if logit_scale is not None:
        y = y * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    if temperature is not None:
        y = y / temperature
    logp = torch.log_softmax(y, -1)
    kept = t != IGNORE
    lp = logp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(kept, lp, torch.zeros_like(lp))
    ent = -(logp.exp() * logp).sum(-1)
    am = torch.where(kept, y.argmax(-1), torch.full_like(t, -1))
    return lp, ent, am


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
            for t in ts]


@pytest.mark.parametrize("options", OPTIONS)
def test_against_float64(backend, options):
    x, w, b, t, g = _problem()
    up, up_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    x32, w32, b32 = _leaves(x, w, b)
    out = linear_logprobs(x32, w32, t, linear_bias=b32, return_entropy=True, return_argmax=True,
                          chunk_size=3, backend=backend, **options)
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    assert out.logprobs.shape == out.entropy.shape == t.shape
    x64, w64, b64 = _leaves(x, w, b, dtype=torch.float64)
    lp, ent, am = _reference(x64, w64, b64, t, **options)
    torch.testing.assert_close(out.logprobs.double(), lp.detach(), **TOL)
    torch.testing.assert_close(out.entropy.double(), ent.detach(), **TOL)  # ignored rows too
    assert torch.equal(out.argmax, am)
    assert out.logprobs[2].item() == 0.0 and not torch.signbit(out.logprobs[2])
    (out.logprobs.double() * up + out.entropy.double() * up_ent).sum().backward()
    (lp * up + ent * up_ent).sum().backward()
    for got, want in ((x32, x64), (w32, w64), (b32, b64)):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


def test_batch_dims_and_no_bias(backend):
    x, w, _, t, g = _problem(seed=1, bias=False)
    x3, t3 = x[:6].view(2, 3, D), t[:6].view(2, 3)
    out = linear_logprobs(x3, w, t3, temperature=1.5, backend=backend)
    lp, _, _ = _reference(x3.double(), w.double(), None, t3, temperature=1.5)
    assert out.logprobs.shape == (2, 3)
    torch.testing.assert_close(out.logprobs.double(), lp, **TOL)


def test_bf16_hidden_states_give_fp32_logprobs():
    x, w, b, t, g = _problem(seed=2)
    up = torch.randn(N, generator=g)
    xb, wb, bb = _leaves(x, w, b, dtype=torch.bfloat16)
    out = linear_logprobs(xb, wb, t, linear_bias=bb, temperature=0.7, chunk_size=4,
                          backend="torch")
    assert out.logprobs.dtype == torch.float32
    # The fused head's logits are the bf16 GEMM's (rounded to bf16 once); after that, fp32.
    logits = F.linear(xb.detach(), wb.detach(), bb.detach()).double() / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
    want = torch.where(t != IGNORE, want, 0.0)
    torch.testing.assert_close(out.logprobs.double(), want, **TOL)
    (out.logprobs * up).sum().backward()
    x64, w64, b64 = _leaves(xb, wb, bb, dtype=torch.float64)
    lp, _, _ = _reference(x64, w64, b64, t, temperature=0.7)
    (lp * up.double()).sum().backward()
    for got, ref in ((xb, x64), (wb, w64), (bb, b64)):
        assert got.grad.dtype == torch.bfloat16
        # d(logits) is rounded to bf16 before its GEMMs: bf16's rounding, relative to the norm
        err = (got.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert err < 1e-2, err


class _Allocations(TorchDispatchMode):
    """The largest storage any op allocates, in bytes (views of their operands and zero-stride
    expands are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_no_grad_is_lean(backend_name):
    """Old/reference log-probs: no gradient, and no tensor larger than the (chunk, V) buffer."""
    g = torch.Generator().manual_seed(3)
    n, chunk = 48, 6
    x = torch.randn(n, D, generator=g, requires_grad=True)
    w = torch.randn(VOCAB, D, generator=g, requires_grad=True)
    t = torch.randint(0, VOCAB, (n,), generator=g)
    with torch.no_grad(), _Allocations() as seen:
        out = linear_logprobs(x, w, t, temperature=0.7, chunk_size=chunk, return_argmax=True,
                              return_entropy=True, backend=backend_name)
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    assert seen.largest <= chunk * VOCAB * 4, (seen.largest, chunk * VOCAB * 4)  # fp32 chunk
    lp, ent, am = _reference(x.detach().double(), w.detach().double(), None, t, temperature=0.7)
    torch.testing.assert_close(out.logprobs.double(), lp, **TOL)
    torch.testing.assert_close(out.entropy.double(), ent, **TOL)
    assert torch.equal(out.argmax, am)


def test_refusals():
    x, w, b, t, _ = _problem()
    with pytest.raises(CrossEntropyInputError, match="class indices"):
        linear_logprobs(x, w, torch.softmax(torch.randn(N, VOCAB), -1))
    with pytest.raises(CrossEntropyInputError, match="return_entropy must be a bool"):
        linear_logprobs(x, w, t, return_entropy=1)
    with pytest.raises(TypeError):
        linear_logprobs(x, w, t, label_smoothing=0.1)  # not a log-probability
    assert triton_xent.LogProbs is type(linear_logprobs(x, w, t))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_entropy_where_the_gradient_overwrites_the_logits(backend_name):
    """aux.entropy of the calls whose forward writes the gradient over the logits (the fused
    head's "mean"/"sum" with a gradient, ``inplace_backward``): read before it is overwritten."""
    x, w, _, t, _ = _problem(seed=4, bias=False)
    _, ent, _ = _reference(x.double(), w.double(), None, t)
    for reduction in ("mean", "sum"):
        _, aux = triton_xent.linear_cross_entropy(
            x.clone().requires_grad_(), w, t, reduction=reduction, return_aux=True,
            return_entropy=True, backend=backend_name, chunk_size=3)
        torch.testing.assert_close(aux.entropy.double(), ent, **TOL)
        logits = F.linear(x, w).requires_grad_() * 1.0  # not a leaf: may be overwritten
        _, aux = triton_xent.cross_entropy(logits, t, reduction=reduction, return_aux=True,
                                           return_entropy=True, backend=backend_name,
                                           inplace_backward=True)
        torch.testing.assert_close(aux.entropy.double(), ent, **TOL)
