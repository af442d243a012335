"""``return_entropy=True``: each row's entropy in the same pass, differentiable.

``aux.entropy`` and the gradients against float64 autograd of ``-(softmax * log_softmax)``
(``0 log 0 = 0``) of the logits as the loss sees them, with random upstream gradients on the
loss, the lse and the entropy at once, on every backend path (torch, Triton fused, Triton split),
every reduction, the logit transforms (softcap, logit_scale, temperature) on and off; an
entropy-only upstream after a forward that wrote the loss's gradient; the fused linear head;
vocabulary parallelism (2 gloo ranks, a shard empty); torch.compile and vmap; -inf logits; the
refusals; and the traffic: no pass over the logits is added.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned ranks too)

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy
from triton_xent.reference import entropy_reference

IGNORE = -100
TOL = dict(rtol=2e-5, atol=3e-6)  # fp32 against float64
TRANSFORMS = [pytest.param({}, id="plain"),
              pytest.param(dict(softcap=3.0, logit_scale=1.3, temperature=0.7), id="transformed")]


def _seen(x, kw):
    y = x * kw["logit_scale"] if "logit_scale" in kw else x
    if "softcap" in kw:
        y = kw["softcap"] * torch.tanh(y / kw["softcap"])
    return y / kw["temperature"] if "temperature" in kw else y


def _problem(N=7, V=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * 3.0
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = IGNORE
    return x, t, g


def _upstreams(g, N, reduction):
    shape = (N,) if reduction == "none" else ()
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(N, generator=g, dtype=torch.float64),
            torch.randn(N, generator=g, dtype=torch.float64))


def _reference(x64, t, reduction, kw, *, smoothing=0.0):
    y = _seen(x64, kw)
    loss = F.cross_entropy(y, t, ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=smoothing)
    return loss, torch.logsumexp(y, -1), entropy_reference(y)


def test_entropy_reference_is_the_textbook_formula():
    x = torch.randn(5, 9, dtype=torch.float64)
    want = -(torch.softmax(x, 1) * torch.log_softmax(x, 1)).sum(1)
    torch.testing.assert_close(entropy_reference(x), want)
    x[0, :4] = float("-inf")  # 0 log 0 = 0: the remaining classes' entropy, a finite gradient
    xr = x.clone().requires_grad_(True)
    h = entropy_reference(xr)
    torch.testing.assert_close(h[0], entropy_reference(x[0, 4:]))
    h.sum().backward()
    assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("kw", TRANSFORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_against_float64(backend, reduction, kw):
    x, t, g = _problem()
    g_loss, g_lse, g_ent = _upstreams(g, x.shape[0], reduction)
    x32 = x.clone().requires_grad_(True)
    loss, aux = cross_entropy(x32, t, ignore_index=IGNORE, reduction=reduction,
                              label_smoothing=0.1, return_aux=True,
                              return_entropy=True, backend=backend, **kw)
    assert aux.entropy.dtype == torch.float32 and aux.entropy.shape == (x.shape[0],)
    x64 = x.double().requires_grad_(True)
    ref, lse, ent = _reference(x64, t, reduction, kw, smoothing=0.1)
    torch.testing.assert_close(aux.entropy.double(), ent.detach(), **TOL)  # ignored row too
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    out = (loss.double() * g_loss).sum() + (aux.lse.double() * g_lse).sum() + (
        aux.entropy.double() * g_ent).sum()
    out.backward()
    ((ref * g_loss).sum() + (lse * g_lse).sum() + (ent * g_ent).sum()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, **TOL)


@pytest.mark.parametrize("kw", TRANSFORMS)
def test_entropy_alone_after_the_losss_gradient(backend, kw):
    """A mean's forward writes the loss's gradient for an upstream of 1; a gradient on the
    entropy alone (and on the loss, with upstream 1) recomputes the rows it touches."""
    x, t, g = _problem(seed=3)
    x32 = x.clone().requires_grad_(True)
    loss, aux = cross_entropy(x32, t, ignore_index=IGNORE, return_aux=True,
                              return_entropy=True, backend=backend, **kw)
    g_ent = torch.randn(x.shape[0], generator=g, dtype=torch.float64)
    g_ent[4] = 0.0  # a row whose upstreams are (1, 0): the forward's gradient stands
    (loss + (aux.entropy.double() * g_ent).sum()).backward()
    x64 = x.double().requires_grad_(True)
    ref, _, ent = _reference(x64, t, "mean", kw)
    (ref + (ent * g_ent).sum()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, **TOL)
    # the entropy's gradient alone, the loss unused
    x32.grad = None
    _, aux = cross_entropy(x32, t, ignore_index=IGNORE, return_aux=True, return_entropy=True,
                           backend=backend, **kw)
    torch.autograd.backward(aux.entropy, g_ent.float())
    x64.grad = None
    (entropy_reference(_seen(x64, kw)) * g_ent).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_against_float64(backend, reduction):
    kw = dict(softcap=3.0, temperature=0.7)
    g = torch.Generator().manual_seed(5)
    N, D, V = 9, 8, 70
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = IGNORE
    g_loss, g_lse, g_ent = _upstreams(g, N, reduction)
    h32, W32 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, aux = linear_cross_entropy(h32, W32, t, reduction=reduction, return_aux=True,
                                     return_entropy=True, chunk_size=4, backend=backend, **kw)
    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    ref, lse, ent = _reference(h64 @ W64.T, t, reduction, kw)
    torch.testing.assert_close(aux.entropy.double(), ent.detach(), **TOL)
    ((loss.double() * g_loss).sum() + (aux.lse.double() * g_lse).sum()
     + (aux.entropy.double() * g_ent).sum()).backward()
    ((ref * g_loss).sum() + (lse * g_lse).sum() + (ent * g_ent).sum()).backward()
    torch.testing.assert_close(h32.grad.double(), h64.grad, **TOL)
    torch.testing.assert_close(W32.grad.double(), W64.grad, **TOL)


def test_neg_inf_logits_and_batched_shapes():
    """Masked classes (-inf) add nothing (0 log 0 = 0), the gradient stays finite; the entropy
    is shaped like a "none" loss."""
    for backend in ("torch", "triton"):
        x, t, _ = _problem()
        x[:, 50:] = float("-inf")
        x32 = x.view(1, 7, 70).transpose(1, 2).clone().requires_grad_(True)  # (B, C, T)
        _, aux = cross_entropy(x32, t.view(1, 7), return_aux=True, return_entropy=True,
                               backend=backend)
        assert aux.entropy.shape == (1, 7)
        torch.testing.assert_close(aux.entropy[0].double(),
                                   entropy_reference(x[:, :50].double()), **TOL)
        aux.entropy.sum().backward()
        assert torch.isfinite(x32.grad).all() and (x32.grad[0, 50:] == 0).all()


def test_compile_and_vmap():
    x, t, g = _problem(N=5, V=40)
    up = torch.randn(5, generator=g)

    def f(a):
        loss, aux = cross_entropy(a, t, reduction="none", return_aux=True, return_entropy=True,
                                  temperature=0.7, backend="torch")
        return (loss * up).sum() + (aux.entropy * up.flip(0)).sum()

    a = x.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    out.backward()
    x64 = x.double().requires_grad_(True)
    ref, _, ent = _reference(x64, t, "none", dict(temperature=0.7))
    want = (ref * up.double()).sum() + (ent * up.flip(0).double()).sum()
    want.backward()
    torch.testing.assert_close(out.double(), want.detach(), **TOL)
    torch.testing.assert_close(a.grad.double(), x64.grad, **TOL)
    # vmap over a batch of problems: forward and torch.func.grad
    xb = torch.stack([x, x.flip(1)])

    def ent_sum(a):
        return cross_entropy(a, t, return_aux=True, return_entropy=True,
                             backend="torch")[1].entropy.sum()

    got = torch.vmap(torch.func.grad(ent_sum))(xb)
    for i in range(2):
        xi = xb[i].double().requires_grad_(True)
        entropy_reference(xi).sum().backward()
        torch.testing.assert_close(got[i].double(), xi.grad, **TOL)


def test_second_derivative():
    x, t, _ = _problem(N=4, V=9)
    x64 = x.double().requires_grad_(True)

    def f(a):
        loss, aux = cross_entropy(a, t, ignore_index=IGNORE, return_aux=True,
                                  return_entropy=True, backend="torch")
        return loss + aux.entropy.square().sum()

    torch.autograd.gradgradcheck(f, (x64,))


def test_refusals():
    x, t, _ = _problem()
    for fn, args in ((cross_entropy, (x, t)),
                     (linear_cross_entropy, (torch.randn(7, 4), torch.randn(70, 4), t))):
        with pytest.raises(CrossEntropyInputError, match="return_aux=True"):
            fn(*args, return_entropy=True)
        with pytest.raises(CrossEntropyInputError, match="must be a bool"):
            fn(*args, return_aux=True, return_entropy=1)
    # in place, the logits are gone when the entropy's gradient arrives
    x32 = x.clone().requires_grad_(True)
    y = x32 * 1.0
    loss, aux = cross_entropy(y, t, return_aux=True, return_entropy=True, inplace_backward=True,
                              backend="torch")
    with pytest.raises(RuntimeError, match="entropy carries a gradient"):
        (loss + aux.entropy.sum()).backward()
    # the entropy of no classes is an empty sum
    _, aux = cross_entropy(torch.empty(3, 0), torch.full((3,), IGNORE), return_aux=True,
                           return_entropy=True)
    assert (aux.entropy == 0).all()


def test_no_extra_pass_over_the_logits():
    """Counted under the interpreter with an H100's plan: the entropy rides in the statistics
    pass (forward bytes as without it), and its gradient joins the loss's in one pass."""
    from bench.traffic import Meter

    g = torch.Generator().manual_seed(0)
    N, V = 16, 16000
    x = torch.randn(N, V, generator=g).bfloat16()
    t = torch.randint(0, V, (N,), generator=g)

    def counts(entropy: bool, grad: bool):
        a = x.clone().requires_grad_(grad)
        with Meter() as m:
            loss, aux = cross_entropy(a, t, reduction="none", return_aux=True,
                                      return_entropy=entropy, backend="triton")
        if not grad:
            return m.counts
        ups = [torch.randn(N, generator=g)]
        outs = [loss]
        if entropy:
            outs.append(aux.entropy)
            ups.append(torch.randn(N, generator=g))
        with Meter() as mb:
            torch.autograd.grad(outs, [a], ups)
        return m.counts, mb.counts

    without, with_ent = counts(False, False), counts(True, False)
    # the same read of the logits (the entropy needs more registers: the plan's blocks are
    # smaller, and the target logit is then gathered apart, 2 B per row)
    assert with_ent.triton_load <= without.triton_load + 2 * N
    assert with_ent.triton_launches == without.triton_launches
    (_, bw0), (_, bw1) = counts(False, True), counts(True, True)
    logit_bytes = N * V * 2
    # one read + one write of the logits in the backward, with or without the entropy's upstream
    assert bw1.triton_load + bw1.triton_store <= bw0.triton_load + bw0.triton_store + 0.01 * logit_bytes
    assert bw1.triton_launches == bw0.triton_launches


# ---- vocabulary parallelism: 2 gloo ranks, each holding a shard of the classes -----------------

part = gloo.Parts()


@part(2)
def vocab_parallel_entropy(rank, group):
    x, t, g = _problem(N=6, V=50, seed=11)
    g_loss, _, g_ent = _upstreams(g, 6, "none")
    for backend, sizes in (("torch", (30, 20)), ("triton", (50, 0))):  # an empty shard too
        lo = sum(sizes[:rank])
        xs = x[:, lo:lo + sizes[rank]].clone().requires_grad_(True)
        loss, aux = cross_entropy(xs, t, ignore_index=IGNORE, reduction="none", return_aux=True,
                                  return_entropy=True, temperature=0.7, process_group=group,
                                  backend=backend)
        x64 = x.double().requires_grad_(True)
        ref, _, ent = _reference(x64, t, "none", dict(temperature=0.7))
        torch.testing.assert_close(aux.entropy.double(), ent.detach(), **TOL)
        ((loss.double() * g_loss).sum() + (aux.entropy.double() * g_ent).sum()).backward()
        ((ref * g_loss).sum() + (ent * g_ent).sum()).backward()
        torch.testing.assert_close(xs.grad.double(), x64.grad[:, lo:lo + sizes[rank]], **TOL)


def _entry(rank, world, init_method, out_dir):
    gloo.run(rank, world, init_method, out_dir, part,
             lambda fn, n: fn(rank, dist.group.WORLD) or "ok")


@pytest.fixture(scope="module")
def gloo_results():
    return gloo.spawn(_entry, 2)


@pytest.mark.parametrize("name", list(part.parts))
def test_vocabulary_parallel(gloo_results, name):
    gloo.check_part(gloo_results, part, name)


def test_public_names():
    assert "entropy" in triton_xent.CrossEntropyAux._fields
