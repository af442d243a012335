"""Vocabulary-parallel cross-entropy against the unsharded float64 reference.

Each test spawns a gloo group of CPU processes (spawning is slow, so one spawn runs many option
combinations). Every rank builds the same full problem from a seed, keeps its shard of the
vocabulary (uneven sizes, an empty shard too), and checks the loss, the aux outputs and the
gradients of its shard (and the full gradient of the hidden states for the linear variant) against
``cross_entropy_reference`` in float64 on the full problem, with a random upstream gradient.
The public API with ``process_group=`` (and groups of one rank) is tested in
``tests/test_vocab_parallel_api.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (spawned children too)

import tempfile

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TOL, rel_err

import triton_xent
import triton_xent._config as config
from triton_xent.reference import cross_entropy_reference

IGNORE = -100


# ------------------------------------------------------------------------------------------------
# Process plumbing: one spawn of 3 ranks runs every part (spawning and importing torch in each
# process is what costs time); a part names how many ranks it uses (the first 2 or all 3).
# ------------------------------------------------------------------------------------------------

WORLD_SIZE = 3
part = gloo.Parts()
_GROUPS: dict[str, object] = {}
_bounds = gloo.bounds


def _entry(rank, world, init_method, out_dir):
    gloo.init(rank, world, init_method)
    try:
        _GROUPS["pair"] = dist.new_group([0, 1])  # every rank creates every group

        def call(fn, nranks):
            fn(rank, nranks, dist.group.WORLD if nranks == world else _GROUPS["pair"])
            return "ok"

        part.run(rank, out_dir, call)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results():
    """Runs every part on a gloo group of CPU processes, once; ``{rank: {part: "ok" | traceback}}``."""
    return gloo.spawn(_entry, WORLD_SIZE)


# ------------------------------------------------------------------------------------------------
# One comparison: the sharded call on every rank against the full float64 reference
# ------------------------------------------------------------------------------------------------


def _problem(shape, V, *, seed, ignore_frac=0.25, weight=False, dtype=torch.float64,
             ignore_index=IGNORE):
    """Full logits (class dim 1, or 0 for 1-D), global targets, class weights: equal on all ranks."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, V, tshape, generator=g)
    if ignore_frac and t.dim():
        t = torch.where(torch.rand(tshape, generator=g) < ignore_frac, torch.full_like(t, ignore_index), t)
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5) if weight else None
    return x, t, w


def _upstream(ref, seed):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(ref.shape, generator=g, dtype=torch.float64) + (0 if ref.dim() else 2)


def check_ce(rank, sizes, *, shape=(11,), dtype=torch.float64, weight=False, seed=0, backend="torch",
             ignore_frac=0.25, inplace=False, group=None, **opts):
    """Sharded cross_entropy vs the reference: loss, lse, z-term and this shard's gradient."""
    V = sum(sizes)
    full_shape = (V,) if shape == () else (shape[0], V, *shape[1:])
    x, t, w = _problem(full_shape, V, seed=seed, weight=weight, dtype=dtype, ignore_frac=ignore_frac,
                       ignore_index=opts.get("ignore_index", IGNORE))
    lo, hi = _bounds(sizes, rank)
    cdim = 0 if x.dim() == 1 else 1
    leaf = x.narrow(cdim, lo, hi - lo).clone().requires_grad_()
    # In place needs a non-leaf (an op's output); its gradient reaches the leaf unchanged.
    xs = leaf * 1.0 if inplace else leaf
    seen = []
    if inplace:
        xs.register_hook(lambda g: seen.append(g.data_ptr()))
    ptr = xs.data_ptr()
    ws = w[lo:hi].to(dtype) if w is not None else None
    loss, aux = triton_xent.cross_entropy(
        xs, t, ws, return_aux=True, inplace_backward=inplace, backend=backend,
        process_group=group or dist.group.WORLD, **opts)
    xr = x.double().requires_grad_()
    ref, lse, z = cross_entropy_reference(xr, t, w.to(dtype).double() if w is not None else None,
                                          return_aux=True, **opts)
    tol_loss, tol_grad = TOL[dtype]
    what = f"rank {rank} sizes={sizes} shape={shape} {dtype} weight={weight} {opts}"
    assert loss.dtype == dtype and loss.shape == ref.shape, what
    assert rel_err(loss, ref) <= tol_loss, f"loss {rel_err(loss, ref):.3g}: {what}"
    assert rel_err(aux.lse, lse) <= 2e-5, f"lse: {what}"
    assert rel_err(aux.z_loss, z) <= 2e-5, f"z: {what}"
    gup = _upstream(ref, seed)
    loss.backward(gup.to(dtype))
    ref.backward(gup)
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape, what
    e = rel_err(leaf.grad, xr.grad.narrow(cdim, lo, hi - lo))
    assert e <= tol_grad, f"grad rel err {e:.3g}: {what}"
    if inplace:
        assert seen == [ptr], f"inplace_backward: the gradient is not in the logits: {what}"
    return loss


def check_linear(rank, sizes, *, N=9, D=6, dtype=torch.float64, weight=False, bias=False, seed=0,
                 backend="torch", batch=None, group=None, chunk_size=4, skip_ignored=True, **opts):
    """Sharded linear cross-entropy vs the reference: loss, full d(input), shards of dW and db."""
    V = sum(sizes)
    g = torch.Generator().manual_seed(seed + 100)
    hid = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    Wf = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 3).to(dtype)
    bf = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    _, t, w = _problem((N, V), V, seed=seed, weight=weight, ignore_index=opts.get("ignore_index", IGNORE))
    if batch is not None:  # (B, T, D) hidden states, (B, T) targets
        hid, t = hid.view(*batch, D), t.view(*batch)
    lo, hi = _bounds(sizes, rank)
    xh = hid.clone().requires_grad_()
    Ws = Wf[lo:hi].clone().requires_grad_()
    bs = bf[lo:hi].clone().requires_grad_() if bias else None
    ws = w[lo:hi] if w is not None else None
    loss, aux = triton_xent.linear_cross_entropy(
        xh, Ws, t, linear_bias=bs, weight=ws, return_aux=True, backend=backend,
        process_group=group or dist.group.WORLD, chunk_size=chunk_size, skip_ignored=skip_ignored,
        **opts)
    xr = hid.double().requires_grad_()
    Wr = Wf.double().requires_grad_()
    br = bf.double().requires_grad_() if bias else None
    logits = F.linear(xr, Wr, br)
    if batch is not None:
        logits, t = logits.view(-1, V), t.view(-1)
    ref, lse, z = cross_entropy_reference(logits, t, w, return_aux=True, **opts)
    if batch is not None and opts.get("reduction") == "none":
        ref, lse, z = ref.view(batch), lse.view(batch), z.view(batch)
    tol_loss, tol_grad = TOL[dtype]
    what = f"linear rank {rank} sizes={sizes} {dtype} weight={weight} bias={bias} {opts}"
    assert loss.shape == ref.shape and loss.dtype == dtype, what
    assert rel_err(loss, ref) <= tol_loss, f"loss {rel_err(loss, ref):.3g}: {what}"
    kept = (t != opts.get("ignore_index", IGNORE)).reshape(-1)  # skipped rows have lse = 0
    assert rel_err(aux.lse.reshape(-1)[kept], lse.reshape(-1)[kept]) <= 2e-5, f"lse: {what}"
    gup = _upstream(ref, seed)
    loss.backward(gup.to(dtype))
    ref.backward(gup)
    for name, got, want in (("input", xh.grad, xr.grad), ("linear_weight", Ws.grad, Wr.grad[lo:hi]),
                            ("linear_bias", bs.grad if bias else None, br.grad[lo:hi] if bias else None)):
        if want is None:
            continue
        assert got is not None and got.shape == want.shape, f"{name}: {what}"
        e = rel_err(got, want)
        assert e <= tol_grad, f"d({name}) rel err {e:.3g}: {what}"


def _raises(match, fn):
    with pytest.raises(triton_xent.CrossEntropyInputError, match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# Workers: each runs a batch of combinations on every rank
# ------------------------------------------------------------------------------------------------

CE_CASES = [  # (shape without the class dim, options)
    ((11,), dict(reduction="mean")),
    ((11,), dict(reduction="sum", weight=True)),
    ((11,), dict(reduction="none", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)),
    ((11,), dict(reduction="mean", weight=True, label_smoothing=0.2, z_loss=1e-3)),
    ((11,), dict(reduction="mean", label_smoothing=0.3, softcap=2.0)),
    ((4, 3), dict(reduction="mean", label_smoothing=0.1)),  # (N, V, d)
    ((4, 3), dict(reduction="none", weight=True)),
    ((), dict(reduction="sum", label_smoothing=0.1, ignore_frac=0)),  # 1-D logits (V,)
    ((10,), dict(reduction="mean", ignore_index=5, label_smoothing=0.1)),  # class id
    ((11,), dict(reduction="mean", inplace=True, z_loss=1e-2, softcap=5.0, label_smoothing=0.1)),
]


def _ce_grid(rank, sizes, group, dtype=torch.float64, backend="torch", cases=CE_CASES):
    for i, (shape, opts) in enumerate(cases):
        check_ce(rank, sizes, shape=shape, dtype=dtype, seed=i, backend=backend, group=group, **opts)


@part(2)
def two_ranks_options(rank, world, group):
    """Every option, V = 37 split 19/18, float64; then fp32 and bf16 with a 30/7 split."""
    _ce_grid(rank, [19, 18], group)
    check_ce(rank, [30, 7], dtype=torch.float32, weight=True, label_smoothing=0.1, z_loss=1e-3,
             reduction="mean", group=group)
    check_ce(rank, [30, 7], dtype=torch.bfloat16, label_smoothing=0.1, reduction="none", group=group)


@part(2)
def two_ranks_linear(rank, world, group):
    sizes = [19, 18]
    check_linear(rank, sizes, weight=True, bias=True, label_smoothing=0.1, z_loss=1e-2, group=group)
    check_linear(rank, sizes, reduction="none", softcap=3.0, bias=True, batch=(3, 3), group=group)
    check_linear(rank, [30, 7], reduction="sum", weight=True, label_smoothing=0.2, group=group)
    check_linear(rank, sizes, dtype=torch.float32, reduction="mean", weight=True, bias=True,
                 label_smoothing=0.1, group=group, skip_ignored=False)
    check_linear(rank, sizes, reduction="none", weight=True, group=group, chunk_size=None,
                 skip_ignored=False, z_loss=1e-3)


@part(3)
def three_ranks_uneven(rank, world, group):
    """V = 37 over 3 ranks (13/12/12), several chunks of rows in the torch backend."""
    config.TORCH_CHUNK_ROWS = 4
    try:
        _ce_grid(rank, [13, 12, 12], group)
        check_linear(rank, [13, 12, 12], weight=True, bias=True, label_smoothing=0.1, z_loss=1e-2,
                     softcap=4.0, group=group)
        check_linear(rank, [13, 12, 12], reduction="none", weight=True, ignore_index=3, group=group)
    finally:
        config.TORCH_CHUNK_ROWS = None


@part(3)
def three_ranks_empty_shard(rank, world, group):
    """V = 37 split 20/0/17: a rank without classes still takes part."""
    _ce_grid(rank, [20, 0, 17], group, cases=CE_CASES[:5])
    check_linear(rank, [20, 0, 17], weight=True, bias=True, label_smoothing=0.1, group=group)


@part(3)
def three_ranks_triton(rank, world, group):
    """The Triton kernels of the local phases, run by the interpreter (fp32, tiny shapes)."""
    from triton_xent.backends import triton_ce as ops

    assert ops.INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"
    saved = config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS = 8, 2  # several blocks and chunks per shard
    try:
        cases = [
            ((6,), dict(reduction="mean", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)),
            ((6,), dict(reduction="none", inplace=True, label_smoothing=0.2)),
            ((6,), dict(reduction="sum", ignore_index=4)),
        ]
        # Shards above 16 columns: 2 chunks of 16-aligned columns per row, 8-column blocks.
        sizes = [40, 35, 33]
        _ce_grid(rank, sizes, group, dtype=torch.float32, backend="triton", cases=cases)
        check_linear(rank, sizes, N=6, dtype=torch.float32, backend="triton", weight=True,
                     bias=True, label_smoothing=0.1, z_loss=1e-2, group=group)
    finally:
        config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS = saved


@part(3)
def edge_cases(rank, world, group):
    """All-ignored mean (NaN, zero gradient), no-grad calls, -inf logits (a whole shard of them)."""
    sizes = [13, 12, 12]
    V = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    t = torch.full((5,), IGNORE)
    for w in (None, torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))):
        xs = torch.randn(5, hi - lo, dtype=torch.float64, requires_grad=True)
        loss = triton_xent.cross_entropy(xs, t, None if w is None else w[lo:hi],
                                            label_smoothing=0.1, process_group=group)
        assert torch.isnan(loss)
        loss.backward()
        assert torch.equal(xs.grad, torch.zeros_like(xs))
    x, t, _ = _problem((6, V), V, seed=3)
    with torch.no_grad():
        loss = triton_xent.cross_entropy(x[:, lo:hi], t, label_smoothing=0.1, process_group=group)
    assert rel_err(loss, cross_entropy_reference(x, t, label_smoothing=0.1)) < 1e-10
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, V, dtype=torch.float64, generator=g)
    x[:, 3:] = float("-inf")
    t = torch.randint(0, 3, (6,), generator=g)
    loss = triton_xent.cross_entropy(x[:, lo:hi], t, process_group=group)
    assert rel_err(loss, F.cross_entropy(x, t)) < 1e-10


@part(3)
def errors(rank, world, group):
    """Mismatches raise the same clear error on every rank; the group stays usable afterwards."""
    sizes = [13, 12, 12]
    V = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    x, t, w = _problem((6, V), V, seed=5, weight=True)
    xs, ws = x[:, lo:hi], w[lo:hi]
    call = lambda **kw: triton_xent.cross_entropy(**{"input": xs, "target": t, "process_group": group, **kw})
    last = rank == world - 1
    # A weight shard of the wrong length on one rank only.
    bad_w = torch.cat([ws, ws[:1]]) if last else ws
    _raises(r"weight has \d+ entries|rank\(s\) \[\d\] .*rejected", lambda: call(weight=bad_w))
    # The full weight vector instead of the shard, everywhere.
    _raises(r"weight has \d+ entries", lambda: call(weight=w))
    # Targets that differ across ranks (same shape), or a different number of rows.
    t2 = t.clone()
    if last:
        t2[0] = (t2[0] + 1) % V if t2[0] >= 0 else 1
    # (Values are compared only with validate=True: a host sync on every call.)
    _raises("target differs across the ranks", lambda: call(target=t2, validate=True))
    # (Configurations already seen by some ranks, e.g. in other parts, are checked again only
    # with validate=True.)
    if last:
        _raises("different numbers of rows", lambda: call(input=xs[:5], target=t[:5], validate=True))
    else:
        _raises("different numbers of rows", lambda: call(validate=True))
    # Different options.
    _raises("different options", lambda: call(reduction="sum" if last else "mean", validate=True))
    # A target outside the global vocabulary (checked on the CPU, as in the single-process call).
    t3 = t.clone()
    t3[1] = V
    _raises(r"Target \d+ is out of bounds", lambda: call(target=t3))
    # Class probabilities on one rank, class ids on the others. (This configuration was seen
    # before on the other ranks, so only validate=True makes them check again.)
    _raises("different options", lambda: call(target=torch.rand(6, hi - lo, dtype=torch.float64)
                                              if last else t, validate=True))
    # Linear: a bias shard that does not match the weight shard, on one rank.
    D = 4
    Ws = torch.randn(hi - lo, D, dtype=torch.float64)
    bb = torch.zeros(hi - lo + (1 if last else 0), dtype=torch.float64)
    _raises(r"linear_bias must have shape|rejected", lambda: triton_xent.linear_cross_entropy(
        torch.randn(6, D, dtype=torch.float64), Ws, t, linear_bias=bb, process_group=group))
    # Different hidden states on the ranks.
    h = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    _raises("input differs", lambda: triton_xent.linear_cross_entropy(h, Ws, t, process_group=group,
                                                                         validate=True))
    # The group still works.
    loss = call(weight=ws)
    assert rel_err(loss, cross_entropy_reference(x, t, w)) < 1e-10
    # Agreement is checked once per configuration: repeated calls do not all_gather (no host
    # sync); validate=True does, every time.
    gathers = []
    real = dist.all_gather
    dist.all_gather = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
    try:
        for _ in range(3):
            call(weight=ws, label_smoothing=0.05)
        assert len(gathers) == 1, gathers
        call(weight=ws, label_smoothing=0.05, validate=True)
        assert len(gathers) == 2, gathers
    finally:
        dist.all_gather = real


@part(3)
def aux_outputs_and_second_order(rank, world, group):
    """The aux outputs over a sharded vocabulary: the arg-max (the first maximal class when the
    maximum sits on several ranks), the accuracy, a gradient through aux.lse; a second
    derivative raises on every rank."""
    sizes = [13, 12, 12]
    V = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    g = torch.Generator().manual_seed(21)
    x = torch.randint(-3, 4, (7, V), generator=g).double()  # integer logits: ties
    x[0, [30, 5, 20]] = 9.0  # the maximum on every rank: class 5 (rank 0)
    x[1, [36, 14]] = 9.0  # on ranks 1 and 2: class 14
    x[2] = 0.0  # all tied: class 0
    t = torch.randint(0, V, (7,), generator=g)
    t[3], t[4] = IGNORE, int(x[4].argmax())
    kept = t != IGNORE
    want = torch.where(kept, x.argmax(1), -1)
    acc = ((want == t) & kept).sum() / kept.sum()
    saved = config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS = 8, 2
    try:
        for backend, dt in (("torch", torch.float64), ("triton", torch.float32)):
            xs = x[:, lo:hi].to(dt).clone().requires_grad_()
            loss, aux = triton_xent.cross_entropy(xs, t, return_aux=True, return_argmax=True,
                                                     backend=backend, process_group=group)
            assert torch.equal(aux.argmax, want), (backend, aux.argmax, want)
            assert abs(float(aux.accuracy) - float(acc)) < 1e-7
            (loss + aux.lse.square().sum()).backward()
            xr = x.clone().requires_grad_()
            ref, lse, _ = cross_entropy_reference(xr, t, return_aux=True)
            (ref + lse.square().sum()).backward()
            assert rel_err(xs.grad, xr.grad[:, lo:hi]) <= TOL[dt][1], backend
    finally:
        config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS = saved
    h = torch.randn(7, 5, dtype=torch.float64, generator=g)
    W = torch.randn(V, 5, dtype=torch.float64, generator=g)
    _, aux = triton_xent.linear_cross_entropy(h, W[lo:hi], t, return_aux=True,
                                                 return_argmax=True, process_group=group)
    assert torch.equal(aux.argmax, torch.where(kept, (h @ W.T).argmax(1), -1))
    xs = x[:, lo:hi].clone().requires_grad_()
    loss = triton_xent.cross_entropy(xs, t, process_group=group)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, xs, create_graph=True)
    hs = h.clone().requires_grad_()
    loss = triton_xent.linear_cross_entropy(hs, W[lo:hi], t, process_group=group)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, hs, create_graph=True)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(part.parts))
def test_gloo(name, gloo_results):
    """One part of the gloo run (see the part's docstring); every rank that ran it passed."""
    gloo.check_part(gloo_results, part, name)


def test_no_group_is_single_process():
    """process_group=None: the single-process call, no torch.distributed needed; checked against
    float64 (not against cross_entropy, which would compare the code with itself)."""
    x, t, w = _problem((7, 30), 30, seed=2, weight=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction="none")
    a, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = triton_xent.cross_entropy(a, t, w, **kw)
    ref = cross_entropy_reference(xr, t, w, **kw)
    g = _upstream(ref, 2)
    la.backward(g)
    ref.backward(g)
    assert rel_err(la, ref) < 1e-10 and rel_err(a.grad, xr.grad) < 1e-10
    # The linear variant without a group.
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    loss = triton_xent.linear_cross_entropy(h, W, t, weight=w, label_smoothing=0.1)
    hr, Wr = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    ref = cross_entropy_reference(hr @ Wr.T, t, w, label_smoothing=0.1)
    loss.backward()
    ref.backward()
    assert rel_err(loss, ref) < 1e-10
    assert rel_err(h.grad, hr.grad) < 1e-10 and rel_err(W.grad, Wr.grad) < 1e-10


def _nccl_entry(rank, world, init_method):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world)
    try:
        dev = torch.device("cuda", rank)
        V, sizes = 50257, [25129, 25128]
        lo, hi = _bounds(sizes, rank)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, V, generator=g) * 3
        t = torch.randint(0, V, (64,), generator=g)
        t[::5] = IGNORE
        w = torch.rand(V, generator=g) + 0.5
        xs = x[:, lo:hi].to(dev, torch.bfloat16).requires_grad_()
        loss = triton_xent.cross_entropy(xs, t.to(dev), w[lo:hi].to(dev), label_smoothing=0.1,
                                            z_loss=1e-4, process_group=dist.group.WORLD)
        xr = x.to(torch.bfloat16).double().requires_grad_()
        ref = cross_entropy_reference(xr, t, w.double(), label_smoothing=0.1, z_loss=1e-4)
        loss.backward()
        ref.backward()
        assert rel_err(loss.cpu(), ref) < TOL[torch.bfloat16][0]
        assert rel_err(xs.grad.cpu(), xr.grad[:, lo:hi]) < TOL[torch.bfloat16][1]
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL test needs 2 CUDA devices")
def test_nccl_two_gpus():
    """Two GPUs, NCCL, the Triton backend, bf16 logits of a GPT-2-sized vocabulary."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_nccl_entry, args=(2, f"file://{d}/rendezvous"), nprocs=2, join=True)
