"""``temperature=``: the logits as a sampler sees them, ``softcap(logit_scale * z) / T``.

Loss, ``aux.lse``, ``aux.argmax`` and the gradients against a float64 formula built by hand
(``F.cross_entropy(softcap * tanh(scale * x / softcap) / T, ...)``), with random upstream
gradients on the loss and on the lse, on every backend path (torch, Triton fused, Triton split),
every reduction, softcap and logit_scale each on and off, label smoothing and z-loss on; the
fused linear head; torch.compile; the ranks' agreement; the refusals; and the difference from
``logit_scale=1/T`` on a soft-capped head.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned ranks too)

import math
from types import SimpleNamespace

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import triton_xent
from triton_xent import CrossEntropyInputError, cross_entropy, linear_cross_entropy
from triton_xent.backends.protocol import Options

IGNORE = -100
T = 0.7
SMOOTH, ZL = 0.1, 1e-3
TOL = dict(rtol=2e-5, atol=2e-6)  # fp32 kernels against float64


def _seen(x64, softcap, scale, temperature):
    """The logits as the loss sees them, in float64, by hand."""
    y = x64 if scale is None else x64 * scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y if temperature is None else y / temperature


def _reference(x, t, reduction, softcap, scale, temperature, *, smoothing=SMOOTH, z_loss=ZL):
    """(loss, lse, argmax) of float64 logits ``x`` (differentiable)."""
    y = _seen(x, softcap, scale, temperature)
    ce = F.cross_entropy(y, t, ignore_index=IGNORE, reduction=reduction,
                         label_smoothing=smoothing)
    lse = torch.logsumexp(y, 1)
    kept = t != IGNORE
    z_rows = torch.where(kept, z_loss * lse.square(), torch.zeros_like(lse))
    z = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / kept.sum()}[reduction]
    argmax = torch.where(kept, y.argmax(1), torch.full_like(t, -1))
    return ce + z, lse, argmax


def _problem(N=7, V=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * 4.0  # wide enough for the softcap to bend the logits
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = IGNORE
    return x, t, g


CAP_SCALE = [pytest.param(None, None, id="plain"), pytest.param(3.0, None, id="cap"),
             pytest.param(None, 1.3, id="scale"), pytest.param(3.0, 1.3, id="cap-scale")]


@pytest.mark.parametrize("softcap,scale", CAP_SCALE)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_against_float64(backend, reduction, softcap, scale):
    x, t, g = _problem()
    x32 = x.clone().requires_grad_(True)
    loss, aux = cross_entropy(x32, t, ignore_index=IGNORE, reduction=reduction,
                              label_smoothing=SMOOTH, z_loss=ZL, softcap=softcap,
                              logit_scale=scale, temperature=T, return_aux=True,
                              return_argmax=True, backend=backend)
    x64 = x.double().requires_grad_(True)
    ref, ref_lse, ref_am = _reference(x64, t, reduction, softcap, scale, T)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(aux.lse.double(), ref_lse.detach(), **TOL)
    assert torch.equal(aux.argmax, ref_am)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    up_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    ((loss * up.float()).sum() + (aux.lse * up_lse.float()).sum()).backward()
    ((ref * up).sum() + (ref_lse * up_lse).sum()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_against_float64(backend, reduction):
    g = torch.Generator().manual_seed(1)
    N, D, V = 6, 8, 40
    x = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = IGNORE
    ins = [v.clone().requires_grad_(True) for v in (x, W, b)]
    loss, aux = linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2], reduction=reduction,
                                     label_smoothing=SMOOTH, z_loss=ZL, softcap=2.5,
                                     logit_scale=0.8, temperature=T, return_aux=True,
                                     return_argmax=True, backend=backend)
    ref_ins = [v.double().requires_grad_(True) for v in (x, W, b)]
    ref, ref_lse, ref_am = _reference(F.linear(*ref_ins), t, reduction, 2.5, 0.8, T)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(aux.lse.double(), ref_lse.detach(), **TOL)
    assert torch.equal(aux.argmax, ref_am)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    up_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    ((loss * up.float()).sum() + (aux.lse * up_lse.float()).sum()).backward()
    ((ref * up).sum() + (ref_lse * up_lse).sum()).backward()
    for got, want in zip(ins, ref_ins):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


def test_modules_and_explain_take_it(backend):
    x, t, _ = _problem()
    want = _reference(x.double(), t, "mean", 3.0, None, T, smoothing=0.0, z_loss=0.0)[0]
    m = triton_xent.CrossEntropyLoss(softcap=3.0, temperature=T, backend=backend)
    assert m.temperature == T
    torch.testing.assert_close(m(x, t).double(), want, **TOL)
    head = triton_xent.LinearCrossEntropyLoss(8, 40, softcap=3.0, temperature=T, backend=backend)
    h = torch.randn(5, 8)
    t5 = torch.randint(0, 40, (5,))
    want = _reference(F.linear(h.double(), head.linear.weight.detach().double()), t5, "mean",
                      3.0, None, T, smoothing=0.0, z_loss=0.0)[0]
    torch.testing.assert_close(head(h, t5).double(), want, **TOL)
    assert triton_xent.explain(x, t, temperature=T, backend=backend).backend == backend


def test_not_the_same_as_logit_scale_one_over_t():
    """On a soft-capped head, ``logit_scale=1/T`` caps ``z / T`` at ``softcap`` (the sampler
    caps first, then divides): a different distribution, off by a large amount at T=0.7."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 200, generator=g, dtype=torch.float64) * 20.0
    t = torch.randint(0, 200, (64,), generator=g)
    cap = 10.0
    want = F.cross_entropy(cap * torch.tanh(x / cap) / T, t)
    ours = cross_entropy(x, t, softcap=cap, temperature=T, backend="torch")
    wrong = cross_entropy(x, t, softcap=cap, logit_scale=1 / T, backend="torch")
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    assert (wrong - want).abs() > 0.1, float(wrong - want)
    # Without a softcap the two are the same function.
    torch.testing.assert_close(cross_entropy(x, t, temperature=T, backend="torch"),
                               cross_entropy(x, t, logit_scale=1 / T, backend="torch"))


def test_fullgraph_compile():
    torch._dynamo.reset()
    x, t, g = _problem()
    up = torch.randn(x.shape[0], generator=g)

    def f(a):
        loss, aux = cross_entropy(a, t, reduction="none", softcap=3.0, logit_scale=1.3,
                                  temperature=T, z_loss=ZL, return_aux=True, backend="torch")
        return (loss * up).sum() + aux.lse.sum()

    a = x.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    out.backward()
    x64 = x.double().requires_grad_(True)
    ref, lse, _ = _reference(x64, t, "none", 3.0, 1.3, T, smoothing=0.0)
    ((ref * up.double()).sum() + lse.sum()).backward()
    torch.testing.assert_close(out.double(), ((ref * up.double()).sum() + lse.sum()).detach(),
                               **TOL)
    torch.testing.assert_close(a.grad.double(), x64.grad, **TOL)


def test_options_carry_it_to_the_schema_and_the_ranks():
    """It survives the custom ops' schema string, and ranks passing different temperatures
    describe different calls (the agreement then raises)."""
    from triton_xent import parallel

    o = Options(reduction="sum", softcap=3.0, temperature=T)
    assert Options.decode(o.encode()) == o
    assert o.transform() == (1.0 / T, 3.0 / T)
    assert Options(temperature=T).transform() == (1.0 / T, None)
    assert Options(logit_scale=2.0).transform() == (2.0, None)

    def described(temperature):
        call = SimpleNamespace(opts=Options(temperature=temperature), weight=None,
                               logits=torch.empty(3, 5), divisor=None)
        return parallel._described(parallel.KIND_CE, call)["options"]

    assert described(T) != described(None) and described(T) != described(0.5)


@pytest.mark.parametrize("bad", [0, 0.0, -0.7, math.inf, math.nan, True,
                                 torch.tensor([0.7, 0.7]), "0.7"],
                         ids=["0", "0.0", "negative", "inf", "nan", "bool", "1-d", "str"])
def test_refusals(bad):
    x, t, _ = _problem()
    with pytest.raises(CrossEntropyInputError, match="temperature") as e:
        cross_entropy(x, t, temperature=bad)
    assert "None turns it off" in str(e.value)
    with pytest.raises(CrossEntropyInputError, match="temperature"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                             temperature=bad)
    with pytest.raises(CrossEntropyInputError, match="temperature"):
        triton_xent.explain(x, t, temperature=bad)


def test_a_0d_tensor_is_a_number():
    x, t, _ = _problem()
    torch.testing.assert_close(cross_entropy(x, t, temperature=torch.tensor(T)),
                               cross_entropy(x, t, temperature=T))


@pytest.mark.parametrize("V,budget", [(8000, 4.05), (32000, 6.05)], ids=["read-once", "split"])
def test_no_extra_traffic(V, budget):
    """The temperature adds no pass, launch or torch op: it folds into the kernels' scale and
    softcap scalars (bytes and launches counted under the interpreter, bench/traffic.py)."""
    from bench import traffic
    from triton_xent.backends import triton_ce

    if not triton_ce.INTERPRETED:
        pytest.skip("the traffic meter needs the interpreter")
    opts = (("label_smoothing", 0.1), ("z_loss", 1e-4), ("softcap", 30.0))
    base = traffic.run_case(traffic.TrafficCase("base", V=V, options=opts))
    hot = traffic.run_case(traffic.TrafficCase("T", V=V, options=opts + (("temperature", T),)))
    assert hot.counts.total_bytes == base.counts.total_bytes
    assert hot.counts.triton_launches == base.counts.triton_launches
    assert hot.counts.torch_launches == 0
    assert hot.per_logit <= budget


def test_probability_targets_and_second_derivatives():
    """Class-probability targets (the torch backend; the linear head's unfused path) and
    ``create_graph=True`` (the op's differentiable reference formula) see the temperature."""
    x, _, g = _problem()
    p = torch.softmax(torch.randn(x.shape, generator=g), 1)
    x64 = x.double().requires_grad_(True)
    want = F.cross_entropy(_seen(x64, 3.0, 1.3, T), p.double(), label_smoothing=SMOOTH)
    a = x.clone().requires_grad_(True)
    got = cross_entropy(a, p, softcap=3.0, logit_scale=1.3, temperature=T,
                        label_smoothing=SMOOTH)
    torch.testing.assert_close(got.double(), want.detach(), **TOL)
    h, W = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    p6 = torch.softmax(torch.randn(4, 6, generator=g), 1)
    torch.testing.assert_close(
        linear_cross_entropy(h, W, p6, softcap=3.0, temperature=T).double(),
        F.cross_entropy(_seen(F.linear(h.double(), W.double()), 3.0, None, T), p6.double()),
        **TOL)
    # second derivatives: d/dx of (dL/dx . v)
    (gx,) = torch.autograd.grad(got, a, create_graph=True)
    (gx64,) = torch.autograd.grad(want, x64, create_graph=True)
    v = torch.randn(x.shape, generator=g)
    (hv,) = torch.autograd.grad((gx * v).sum(), a)
    (hv64,) = torch.autograd.grad((gx64 * v.double()).sum(), x64)
    torch.testing.assert_close(hv.double(), hv64, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Vocabulary parallelism: 2 gloo ranks on the CPU, uneven shards (tests/gloo.py)
# ------------------------------------------------------------------------------------------------

part = gloo.Parts()


def _entry(rank, world, init_method, out_dir):
    gloo.run(rank, world, init_method, out_dir, part,
             lambda fn, n: fn(rank, dist.group.WORLD) or "ok")


@part(2)
def sharded_against_float64(rank, group):
    import triton_xent._config as config

    config.TRITON_BLOCK_V = 8  # several blocks per shard
    x, t, g = _problem(N=6, V=30)
    lo, hi = gloo.bounds([17, 13], rank)
    x64 = x.double().requires_grad_(True)
    ref, ref_lse, ref_am = _reference(x64, t, "none", 3.0, 1.3, T)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    up_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    ((ref * up).sum() + (ref_lse * up_lse).sum()).backward()
    for backend in ("torch", "triton"):
        xs = x[:, lo:hi].clone().requires_grad_(True)
        loss, aux = cross_entropy(xs, t, ignore_index=IGNORE, reduction="none",
                                  label_smoothing=SMOOTH, z_loss=ZL, softcap=3.0, logit_scale=1.3,
                                  temperature=T, return_aux=True, return_argmax=True,
                                  backend=backend, process_group=group)
        torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
        torch.testing.assert_close(aux.lse.double(), ref_lse.detach(), **TOL)
        assert torch.equal(aux.argmax, ref_am), backend
        ((loss * up.float()).sum() + (aux.lse * up_lse.float()).sum()).backward()
        torch.testing.assert_close(xs.grad.double(), x64.grad[:, lo:hi], **TOL)
    # the linear head: the full input gradient on every rank, the weight's shard
    h, W = torch.randn(6, 5, generator=g), torch.randn(30, 5, generator=g)
    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    ref = _reference(F.linear(h64, W64), t, "mean", 3.0, None, T)[0]
    ref.backward()
    hs, Ws = h.clone().requires_grad_(True), W[lo:hi].clone().requires_grad_(True)
    loss = linear_cross_entropy(hs, Ws, t, label_smoothing=SMOOTH, z_loss=ZL, softcap=3.0,
                                temperature=T, backend="triton", process_group=group)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(hs.grad.double(), h64.grad, **TOL)
    torch.testing.assert_close(Ws.grad.double(), W64.grad[lo:hi], **TOL)


@part(2)
def ranks_must_agree(rank, group):
    x, t, _ = _problem(N=6, V=30)
    lo, hi = gloo.bounds([17, 13], rank)
    with pytest.raises(CrossEntropyInputError, match="temperature"):
        cross_entropy(x[:, lo:hi], t, temperature=0.7 if rank else 0.8, process_group=group,
                      validate=True)


@pytest.fixture(scope="module")
def gloo_results():
    return gloo.spawn(_entry, 2)


@pytest.mark.parametrize("name", list(part.parts))
def test_vocabulary_parallel(gloo_results, name):
    gloo.check_part(gloo_results, part, name)
