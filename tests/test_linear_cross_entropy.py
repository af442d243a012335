"""linear_cross_entropy against the float64 reference: every option, both backends.

The oracle is ``cross_entropy_reference(x @ W.T + b, ...)`` on float64 copies of the same
(dtype-rounded) inputs, differentiated by autograd, with seeded random upstream gradients,
compared element by element. The CPU grid uses tiny shapes (N=12, D=16, V=37) and a forced chunk
of 5 rows, so that chunk boundaries with N not a multiple of the chunk are hit; the Triton kernel
runs on it through the interpreter, fused and on its forced split-vocabulary path (conftest.py's
``backend`` fixture; with the small forced block V=37 takes two blocks, or three chunks). The GPU
grid at real sizes carries ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, GRAD_TOL, LOSS_TOL, OPTIONS_GRID, assert_close, rel_err, upstream_like

import triton_xent
from triton_xent import CrossEntropyInputError, linear_cross_entropy
from triton_xent.ops.linear_chunks import default_chunk_rows
from triton_xent.reference import cross_entropy_reference

IGNORE = -100
N, D, V = 12, 16, 37
CHUNK = 5
# The interpreter runs one program per row, serially (~0.05 s each): kernel tests use 7 rows in
# chunks of 3 (3 + 3 + 1).
ROWS = {"torch": ((N,), CHUNK), "triton": ((7,), 3)}

# Triton through the interpreter, fused and forced split (conftest.py's ``backend`` fixture).
TRITON_ONLY = [b for b in BACKENDS if b.startswith("triton")]


@pytest.fixture(autouse=True)
def _small(request):
    """Small kernel blocks and torch CE chunks for every CPU test here (see conftest.py); the
    GPU tests keep the heuristics."""
    if request.node.get_closest_marker("gpu") is None:
        request.getfixturevalue("small_blocks")
    yield


def _problem(batch=(N,), dtype=torch.float32, *, d=D, v=V, ignore_frac=0.25, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 2 / d**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, batch, generator=g)
    t = torch.where(torch.rand(batch, generator=g) < ignore_frac, torch.full_like(t, IGNORE), t)
    return x, w, b, t


def _reference(x, w, b, t, reduction, *, round_to=None, return_logits=False, **kw):
    """float64 reference of ``cross_entropy(x @ w.T + b)``. ``round_to``: round the logits to
    that dtype first, as the 16-bit GEMM that makes them does (the gradient passes straight
    through the rounding), so that a 16-bit comparison measures the cross-entropy's own error."""
    logits = x @ w.T + (b if b is not None else 0)
    if round_to is not None:
        logits = logits + (logits.detach().to(round_to).double() - logits.detach())
    out = cross_entropy_reference(logits.reshape(-1, w.shape[0]), t.reshape(-1),
                                  reduction=reduction, **kw)
    out = out.view(t.shape) if reduction == "none" else out
    return (out, logits) if return_logits else out


def check(x, w, b, t, *, needs=(True, True, True), reduction="mean", backend="torch",
          chunk_size=None, seed=1, **kw):
    """Runs both, with a seeded random upstream gradient, and asserts loss and gradients agree
    element by element. A gradient of x, W or b is a matrix product of the logits' gradient G:
    its error is measured against |G| @ |W|, |G|.T @ |x| and sum |G| (see helpers.close_ratio)."""
    dtype = x.dtype
    leaves = [x, w, b]
    ours = [None if a is None else a.detach().clone().requires_grad_(n) for a, n in zip(leaves, needs)]
    refs = [None if a is None else a.detach().double().requires_grad_(n) for a, n in zip(leaves, needs)]
    weight = kw.pop("weight", None)
    only_ours = {k: kw.pop(k) for k in ("skip_ignored", "chunk_bytes") if k in kw}
    if chunk_size is None and "chunk_bytes" not in only_ours:
        chunk_size = ROWS[backend][1]
    out = linear_cross_entropy(ours[0], ours[1], t, linear_bias=ours[2], weight=weight,
                               reduction=reduction, backend=backend, chunk_size=chunk_size,
                               **only_ours, **kw)
    ref, logits = _reference(*refs, t, reduction, weight=None if weight is None else weight.double(),
                             round_to=None if dtype in (torch.float32, torch.float64) else dtype,
                             return_logits=True, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, LOSS_TOL[dtype], what="loss")
    pairs = [(o, r) for o, r in zip(ours, refs) if o is not None and o.requires_grad]
    if not pairs:
        assert not out.requires_grad
        return out, ref
    g = upstream_like(ref, dtype, seed)
    got = torch.autograd.grad(out, [o for o, _ in pairs], g.to(out.dtype))
    *want, G = torch.autograd.grad(ref, [r for _, r in pairs] + [logits], g)
    V_ = w.shape[0]
    G = G.abs().reshape(-1, V_)
    X = x.detach().double().abs().reshape(-1, x.shape[-1])
    scales = {0: (G @ w.detach().double().abs()).view(x.shape), 1: G.T @ X, 2: G.sum(0)}
    names = [i for i, a in enumerate(ours) if a is not None and a.requires_grad]
    for i, a, b_ in zip(names, got, want):
        name = ("input", "weight", "bias")[i]
        assert a.dtype == dtype and a.shape == b_.shape
        assert_close(a, b_, GRAD_TOL[dtype], scale=scales[i], what=f"d{name}")
    return out, ref


OPTIONS = OPTIONS_GRID


def _opts(opts, dtype=torch.float32):
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = (torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype)
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_options_fp64_torch(opts, reduction):
    x, w, b, t = _problem(dtype=torch.float64)
    check(x, w, b, t, reduction=reduction, **_opts(opts, torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_options_fp32_torch(opts, reduction):
    x, w, b, t = _problem()
    check(x, w, b, t, reduction=reduction, **_opts(opts))


# Every option with "mean"; "none" (the recomputing backward) and "sum" (the scale only differs)
# with all of them on.
TRITON_CASES = [pytest.param(o.values[0], "mean", id=f"{o.id}-mean") for o in OPTIONS]
TRITON_CASES += [pytest.param(OPTIONS[-1].values[0], r, id=f"all-{r}") for r in ("sum", "none")]
TRITON_CASES.append(pytest.param({}, "none", id="plain-none"))


@pytest.mark.parametrize("opts, reduction", TRITON_CASES)
@pytest.mark.parametrize("backend", TRITON_ONLY, indirect=True)
def test_options_fp32_triton(backend, opts, reduction):
    x, w, b, t = _problem(ROWS[backend][0])
    check(x, w, b, t, reduction=reduction, backend=backend, **_opts(opts))


SUBSETS = [s for s in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("needs", SUBSETS, ids=lambda s: "".join("xwb"[i] if f else "-" for i, f in enumerate(s)))
def test_requires_grad_subsets(needs, reduction):
    x, w, b, t = _problem(dtype=torch.float64)
    check(x, w, b, t, needs=needs, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["x", "wb", "b"])
def test_requires_grad_subsets_fp32(backend, needs):
    x, w, b, t = _problem(ROWS[backend][0])
    check(x, w, b, t, needs=needs, backend=backend, softcap=5.0)
    check(x, w, b, t, needs=needs, backend=backend, reduction="none")


def test_3d_input_and_views(backend):
    x, w, b, t = _problem(batch=(3, 4) if backend == "torch" else (2, 3))  # (B, T, D)
    check(x, w, b, t, backend=backend, reduction="none", label_smoothing=0.1)
    check(x, w, None, t, backend=backend)
    # A non-contiguous (T, B, D) view, and a 1-D input with a 0-d target.
    check(x.transpose(0, 1), w, b, t.transpose(0, 1), backend=backend, reduction="none")
    check(x[0, 0], w, b, t.flatten()[1], backend=backend, reduction="sum")


@pytest.mark.parametrize("skip_ignored", [True, False])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf * 0
def test_all_rows_ignored(backend, skip_ignored):
    x, w, b, t = _problem(ROWS[backend][0], ignore_frac=1.0)
    for reduction in ("mean", "sum", "none") if backend == "torch" else ("mean", "none"):
        out, _ = check(x, w, b, t, reduction=reduction, backend=backend, skip_ignored=skip_ignored,
                       z_loss=1e-2, label_smoothing=0.1)
        if reduction == "mean":
            assert torch.isnan(out)  # 0/0, as in PyTorch
    # Gradients are zeros (not NaN) even for the NaN mean.
    xs = x.clone().requires_grad_()
    linear_cross_entropy(xs, w, t, linear_bias=b, backend=backend, skip_ignored=skip_ignored).backward()
    assert torch.equal(xs.grad, torch.zeros_like(x))


def test_skip_ignored_off_and_chunk_sizes(backend):
    x, w, b, t = _problem(ROWS[backend][0], ignore_frac=0.5)
    for chunk in (2, 64) if backend == "triton" else (1, 5, 12, 64):
        check(x, w, b, t, backend=backend, chunk_size=chunk, skip_ignored=False, z_loss=1e-3)
    check(x, w, b, t, backend=backend, chunk_size=None, chunk_bytes=4 * V * 3)  # 3 fp32 rows


def test_aux_lse():
    x, w, b, t = _problem(dtype=torch.float64)
    loss, aux = linear_cross_entropy(x, w, t, linear_bias=b, return_aux=True, z_loss=1e-2,
                                     chunk_size=CHUNK, reduction="none")
    _, lse, z = cross_entropy_reference(x @ w.T + b, t, z_loss=1e-2, return_aux=True)
    keep = t != IGNORE
    assert torch.allclose(aux.lse, lse)  # ignored rows too (skip_ignored skips none with aux)
    assert torch.allclose(aux.z_loss.sum() / keep.sum(), z) and aux.z_loss.shape == (N,)
    _, aux = linear_cross_entropy(x, w, t, linear_bias=b, return_aux=True, skip_ignored=False)
    assert torch.allclose(aux.lse, lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, dtype):
    x, w, b, t = _problem(ROWS[backend][0], dtype=dtype)
    check(x, w, b, t, backend=backend, label_smoothing=0.1)
    check(x, w, b, t, backend=backend, reduction="none", softcap=4.0)


def test_bf16_fp32_dw_accumulation():
    """Many chunks of one row each: summing them in bf16 (the default, the weight's dtype)
    drifts, accum_dtype=torch.float32 does not."""
    n, d, v = 128, 8, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(torch.bfloat16)
    w = torch.randn(v, d, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    w64 = w.detach().double().requires_grad_()
    _reference(x.double(), w64, None, t, "sum").backward()

    errs = {}
    for acc in (torch.float32, None):
        w.grad = None
        linear_cross_entropy(x, w, t, reduction="sum", chunk_size=1, accum_dtype=acc,
                             backend="torch").backward()
        assert w.grad.dtype == torch.bfloat16
        errs[acc] = rel_err(w.grad, w64.grad)
    assert errs[torch.float32] <= 8e-3  # one bf16 rounding of the final sum
    assert errs[None] > 2 * errs[torch.float32], errs


def test_fullgraph_compile(backend):
    torch._dynamo.reset()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(D, D)
            self.head = torch.nn.Linear(D, V)

        def forward(self, h, t, reduction):
            z = torch.tanh(self.body(h))
            loss = linear_cross_entropy(z, self.head.weight, t, linear_bias=self.head.bias,
                                        reduction=reduction, label_smoothing=0.1,
                                        backend=backend, chunk_size=CHUNK)
            return loss if reduction != "none" else (loss * torch.arange(loss.numel())).sum()

    torch.manual_seed(0)
    m = LM()
    h, t = torch.randn(N, D), _problem()[3]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    # One graph each (compiling is the slow part): "none" runs the backward op, "mean" the
    # gradients saved by the forward.
    for reduction in ("none",) if backend == "torch" else ("mean",):
        loss = compiled(h, t, reduction)
        loss.backward()
        grads = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        z = torch.tanh(m.body(h))
        ref = F.cross_entropy(m.head(z), t, label_smoothing=0.1, reduction=reduction)
        ref = ref if reduction != "none" else (ref * torch.arange(ref.numel())).sum()
        ref.backward()
        assert torch.allclose(loss, ref, atol=1e-5)
        for a, p in zip(grads, m.parameters()):
            assert torch.allclose(a, p.grad, atol=1e-5)
        m.zero_grad()


@pytest.mark.parametrize("backend", ["torch", "triton-fused"], indirect=True)
def test_opcheck_custom_ops(backend):
    """torch.library's checks of both custom ops on both backends (the split path changes
    nothing at the op's boundary; test_dispatch.py's opcheck runs it for cross_entropy)."""
    from triton_xent.backends.protocol import Options
    from triton_xent.ops.linear_cross_entropy import linear_ce_backward_op, linear_ce_forward_op

    (n,), chunk = ROWS[backend]
    x, w, b, t = _problem((n,))
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    opts = Options(IGNORE, "mean", 0.1, 1e-3, 3.0, None, 1.0, True, True, backend,
                   out_dtype=torch.float32, chunk_rows=chunk, skip_ignored=True,
                   need=(True, True, True))
    torch.library.opcheck(linear_ce_forward_op, (x, w, b, t, None, None, opts.encode()))
    none = opts._replace(reduction="none", entropy=True, skip_ignored=False).encode()
    torch.library.opcheck(linear_ce_forward_op, (x, w, None, t, torch.rand(V), None, none))
    out = linear_ce_forward_op(x, w, b, t, None, None, none)
    stats, dens = out[5].detach(), out[6].detach()
    torch.library.opcheck(linear_ce_backward_op, (torch.randn(n), torch.randn(n), torch.randn(n),
                                                  stats, dens, x.detach(), w.detach(),
                                                  b.detach(), t, None, None, none))
    # logit_scale, and a sum with a device divisor
    total = opts._replace(reduction="sum", label_smoothing=0.0, z_loss=0.0, softcap=None,
                          logit_scale=0.7).encode()
    torch.library.opcheck(linear_ce_forward_op, (x, w, b, t, None, torch.tensor(5.0), total))


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"),
                    reason=f"torch {torch.__version__} has no F.linear_cross_entropy / "
                    "nn.LinearCrossEntropyLoss (torch >= 2.13)")
def test_matches_torch_native_and_module():
    x, w, b, t = _problem()
    ref = F.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    kw = dict(linear_bias=b, label_smoothing=0.1, backend="torch")
    assert torch.allclose(linear_cross_entropy(x, w, t, **kw), ref, rtol=1e-5)
    # ignore_index=None means -100, as in torch
    assert torch.allclose(linear_cross_entropy(x, w, t, ignore_index=None, **kw), ref, rtol=1e-5)

    torch.manual_seed(0)
    ours = triton_xent.LinearCrossEntropyLoss(D, V, bias=True, label_smoothing=0.1, chunk_size=CHUNK,
                                              backend="torch")
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, bias=True, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    a, c = ours(x, t), theirs(x, t)
    a.backward()
    c.backward()
    assert torch.allclose(a, c, rtol=1e-5)
    assert torch.allclose(ours.linear.weight.grad, theirs.linear.weight.grad, atol=1e-6)
    assert torch.allclose(ours.linear.bias.grad, theirs.linear.bias.grad, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_run_unfused(reduction):
    """Class probabilities (unfused: the logits are formed): loss and the gradients of x, W and
    b against float64, with smoothing, class weights, z-loss and a random upstream."""
    x, w, b, _ = _problem(batch=(3, 4), dtype=torch.float64)
    q = torch.softmax(torch.randn(3, 4, V, dtype=torch.float64, generator=torch.Generator().manual_seed(8)), -1)
    cw = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=cw, z_loss=1e-3)
    ours = [a.clone().requires_grad_() for a in (x, w, b)]
    refs = [a.clone().requires_grad_() for a in (x, w, b)]
    out = linear_cross_entropy(ours[0], ours[1], q, linear_bias=ours[2], **kw)
    ref = cross_entropy_reference((refs[0] @ refs[1].T + refs[2]).reshape(-1, V), q.reshape(-1, V), **kw)
    ref = ref.view(3, 4) if reduction == "none" else ref
    assert out.shape == ref.shape
    assert_close(out, ref, LOSS_TOL[torch.float64], what="loss")
    g = upstream_like(ref, torch.float64)
    out.backward(g)
    ref.backward(g)
    for name, a, r in zip(("input", "weight", "bias"), ours, refs):
        assert_close(a.grad, r.grad, GRAD_TOL[torch.float64], what=f"d{name}")


def test_second_backward_accumulates_and_no_grad():
    x, w, b, t = _problem()
    xs = x.clone().requires_grad_()
    loss = linear_cross_entropy(xs, w, t, backend="torch")
    loss.backward(retain_graph=True)
    once = xs.grad.clone()
    loss.backward()  # recomputed from the inputs: the gradients add up, as PyTorch's
    torch.testing.assert_close(xs.grad, 2 * once)
    with torch.no_grad():
        assert not linear_cross_entropy(xs, w, t, backend="torch").requires_grad


def test_autocast_cpu():
    x, w, b, t = _problem()
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(xs, ws, t, backend="torch")
    out.backward()
    assert out.dtype == torch.float32 and ws.grad.dtype == torch.float32
    # The reference: float64 on the bf16-rounded operands, logits rounded to bf16 as autocast's
    # GEMM returns them.
    x16, w16 = x.bfloat16().double().requires_grad_(), w.bfloat16().double().requires_grad_()
    ref, logits = _reference(x16, w16, None, t, "mean", round_to=torch.bfloat16, return_logits=True)
    dW, G = torch.autograd.grad(ref, [w16, logits])
    assert_close(out, ref, LOSS_TOL[torch.bfloat16], what="loss")
    assert_close(ws.grad, dW, GRAD_TOL[torch.bfloat16], scale=G.abs().T @ x16.detach().abs(), what="dW")


def test_errors():
    x, w, b, t = _problem()
    with pytest.raises(CrossEntropyInputError, match="transposed"):
        linear_cross_entropy(x, torch.randn(D, V), t)
    with pytest.raises(CrossEntropyInputError, match="Expected target shape"):
        linear_cross_entropy(x, w, t[:5])
    with pytest.raises(CrossEntropyInputError, match="squeeze"):
        linear_cross_entropy(x, w, t.unsqueeze(1))
    with pytest.raises(CrossEntropyInputError, match="dtype|bfloat16"):
        linear_cross_entropy(x, w.bfloat16(), t)
    with pytest.raises(CrossEntropyInputError, match="linear_bias"):
        linear_cross_entropy(x, w, t, linear_bias=torch.randn(V + 1))
    with pytest.raises(CrossEntropyInputError, match="not both"):
        linear_cross_entropy(x, w, t, chunk_size=4, chunk_bytes=1 << 20)
    with pytest.raises(CrossEntropyInputError, match="accum_dtype"):
        linear_cross_entropy(x, w, t, accum_dtype=torch.float16)
    with pytest.raises(CrossEntropyInputError, match="out of bounds"):
        linear_cross_entropy(x, w, torch.full_like(t, V))


def test_default_chunk_rows():
    # A fifth of the gradients' bytes, in multiples of 64 rows, at most 1 GiB, at least what the
    # GEMMs need: min(512, 2 D acc_elt / (3 elt)) rows.
    assert default_chunk_rows(8192, 4096, 128256, torch.bfloat16) == 832  # reference shape
    assert default_chunk_rows(8192, 2304, 256000, torch.bfloat16) == 512  # Gemma-2-2B: 512 rows
    assert default_chunk_rows(8192, 3584, 152064, torch.bfloat16) == 704  # Qwen2.5-7B head
    assert default_chunk_rows(2048, 512, 65536, torch.float32) == 384  # 2 D / 3 = 341 rows
    assert default_chunk_rows(2048, 256, 65536, torch.float32) == 192  # 48 MiB at small D
    assert default_chunk_rows(16, 8, 10, torch.float32) == 64
    assert default_chunk_rows(8, 4096, 4 << 20, torch.bfloat16) == 128  # the 1 GiB cap
    # an fp32 accumulator counts towards the gradients' bytes
    assert default_chunk_rows(8192, 4096, 128256, torch.bfloat16, fp32_accum=True) == 2496
    assert default_chunk_rows(10, 4, 10, torch.float32, chunk_bytes=100) == 2


# ---------------------------------------------------------------------------------------------
# GPU: real sizes (skipped without CUDA).

GPU_CASES = [
    pytest.param(4096, 2048, 50257, torch.bfloat16, {}, id="N4k-D2k-V50257-bf16"),
    pytest.param(4096, 4096, 128256, torch.bfloat16, {"label_smoothing": 0.1, "z_loss": 1e-4},
                 id="N4k-D4k-V128k-bf16-smooth-z"),
    pytest.param(2048, 1024, 32000, torch.float32, {"softcap": 30.0}, id="N2k-D1k-V32k-fp32-softcap"),
    pytest.param(3000, 2048, 65536, torch.float16, {"reduction": "none"}, id="N3000-D2k-V64k-fp16-none"),
]


# An absolute floor under "no worse than twice the same-dtype torch error": about the error of
# one rounding of the result in the dtype (fp32: a few ulps, not the 1e-4 that would pass a term
# 100x larger than fp32 rounding).
ERR_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


@pytest.mark.gpu
@pytest.mark.parametrize("n, d, v, dtype, kw", GPU_CASES)
def test_gpu_grid(n, d, v, dtype, kw):
    """Errors no worse than the same-dtype unfused torch computation (plus a small margin), and
    peak memory within the documented budget: dW (and its fp32 accumulator for 16-bit weights),
    dX, one logits chunk (default_chunk_rows), slack."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g).to(dtype)
    w = (torch.randn(v, d, device=dev, generator=g) / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    t[::3] = IGNORE
    kw = dict(kw)
    reduction = kw.pop("reduction", "mean")
    up = torch.randn(n, device=dev, generator=g) if reduction == "none" else None

    def run(fn, xx, ww):
        xx, ww = xx.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(xx, ww)
        out.backward(up.to(out.dtype) if up is not None else None)
        torch.cuda.synchronize()
        return out.detach(), xx.grad, ww.grad, torch.cuda.max_memory_allocated() - base

    ours = run(lambda a, c: linear_cross_entropy(a, c, t, reduction=reduction, **kw), x, w)
    same = run(lambda a, c: cross_entropy_reference(a @ c.T, t, reduction=reduction, **kw), x, w)
    exact = run(lambda a, c: cross_entropy_reference(a @ c.T, t, reduction=reduction, **kw),
                x.double(), w.double())
    for i, name in enumerate(("loss", "dX", "dW")):
        e_ours, e_same = rel_err(ours[i], exact[i]), rel_err(same[i], exact[i])
        floor = ERR_FLOOR[dtype]
        assert e_ours <= 2 * e_same + floor, f"{name}: ours {e_ours:.3g}, same-dtype torch {e_same:.3g}"
    isz = x.element_size()
    chunk = default_chunk_rows(n, d, v, dtype) * v * isz
    budget = v * d * (isz + (4 if isz == 2 else 0)) + n * d * isz + chunk + (256 << 20)
    assert ours[3] <= budget, f"peak memory {ours[3] / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp32_dw_accumulation(dtype):
    """The fused fp32-output GEMM (or its blocked fallback) adds bf16/fp16 products into fp32."""
    from triton_xent.ops.linear_chunks import accumulate_dw

    g = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(3000, 256, device="cuda", generator=g)
    dl = torch.randn(64, 3000, device="cuda", generator=g).to(dtype)
    xc = torch.randn(64, 256, device="cuda", generator=g).to(dtype)
    want = acc.double() + dl.double().T @ xc.double()
    accumulate_dw(acc, dl, xc, first=False)
    assert rel_err(acc, want) < 1e-5


@pytest.mark.gpu
def test_gpu_skip_ignored_off_matches():
    """skip_ignored on and off, each against float64 (not against each other): errors no worse
    than twice the same-dtype unfused torch computation's, plus the bf16 floor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(50257, 512, device="cuda", generator=g, dtype=torch.bfloat16) / 512**0.5
    t = torch.randint(0, 50257, (1000,), device="cuda", generator=g)
    t[t % 2 == 0] = IGNORE

    def run(fn, xx, ww):
        xs, ws = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        loss = fn(xs, ws)
        loss.backward()
        return loss.detach(), xs.grad, ws.grad

    exact = run(lambda a, c: cross_entropy_reference(a @ c.T, t), x.double(), w.double())
    same = run(lambda a, c: cross_entropy_reference(a @ c.T, t), x, w)
    for skip in (True, False):
        ours = run(lambda a, c, s=skip: linear_cross_entropy(a, c, t, skip_ignored=s, chunk_size=256), x, w)
        for name, o, s_, e in zip(("loss", "dX", "dW"), ours, same, exact):
            e_ours, e_same = rel_err(o, e), rel_err(s_, e)
            assert e_ours <= 2 * e_same + ERR_FLOOR[torch.bfloat16], (
                f"skip_ignored={skip} {name}: ours {e_ours:.3g}, same-dtype torch {e_same:.3g}")


def test_loss_dtype_float32():
    """bf16 hidden states and head: loss_dtype=torch.float32 returns the loss unrounded."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 16, generator=g).bfloat16()
    w = torch.randn(37, 16, generator=g).bfloat16()
    t = torch.randint(0, 37, (40,), generator=g)
    # The logits themselves come from a bf16 GEMM: the reference uses those, in float64.
    ref = F.cross_entropy((x @ w.T).double(), t, reduction="sum")
    out = linear_cross_entropy(x, w, t, reduction="sum", loss_dtype=torch.float32)
    default = linear_cross_entropy(x, w, t, reduction="sum")
    assert out.dtype == torch.float32 and default.dtype == torch.bfloat16
    assert abs(float(out) - float(ref)) < 1e-5 * abs(float(ref)) < abs(float(default) - float(ref))


def test_dw_accuracy_against_eager():
    """bf16 dW accumulated in bf16 (the default: each chunk's GEMM adds into dW, rounded once per
    chunk) against float64, next to eager PyTorch's own bf16 error, at the reference shape's
    chunk count scaled down (N=1024, D=256, V=8192, 8 chunks; the reference N=8192, D=4096,
    V=128256 runs 10). Measured: eager 1.67e-3 (relative Frobenius), ours 3.1e-3 with bf16
    accumulation, 1.67e-3 with accum_dtype=torch.float32 or one chunk."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 1024, 256, 8192
    x = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) / d**0.5).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    w64 = w.double().requires_grad_()
    F.cross_entropy(F.linear(x.double(), w64), t).backward()

    def err(grad):
        return float((grad.double() - w64.grad).norm() / w64.grad.norm())

    we = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, we).float(), t).backward()  # eager bf16, as training code does
    eager = err(we.grad)
    errs = {}
    for acc in (None, torch.float32):
        wo = w.clone().requires_grad_()
        linear_cross_entropy(x, wo, t, chunk_size=128, accum_dtype=acc, backend="torch").backward()
        errs[acc] = err(wo.grad)
    assert errs[torch.float32] <= 1.05 * eager, (errs, eager)
    assert errs[None] <= 2.5 * eager, (errs, eager)
