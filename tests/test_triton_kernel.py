"""The Triton launcher ``ce_forward`` under the Triton interpreter (CPU tensors, no GPU needed).

The oracle is float64 autograd through ``log_softmax`` (not the kernel's own gradient formula):
``loss = sum_i ce_scale * ce_i + z_scale * z_i``. Every buffer the launcher allocates is poisoned
with a finite sentinel, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from triton_xent.ops import cross_entropy as ops
from triton_xent.ops.cross_entropy import ce_forward

pytestmark = pytest.mark.skipif(
    not ops._INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set; these tests run the kernels "
    "on CPU tensors under the interpreter (run this file alone, or set it in conftest.py)",
)

IGNORE = -100
POISON = -7777.0

# Per-dtype tolerances (rtol, atol). Losses and lse are fp32 math on exactly-upcast inputs, so
# they are fp32-accurate for every dtype; the gradient is rounded to the logits' dtype.
TOL = {
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(2e-5, 1e-6)),
    torch.float16: dict(loss=(1e-5, 1e-5), grad=(2e-3, 1e-5)),
    torch.bfloat16: dict(loss=(1e-5, 1e-5), grad=(1e-2, 1e-5)),
}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Fills every tensor from torch.empty with POISON and records the shapes allocated."""
    real_empty = torch.empty
    shapes = []

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        shapes.append(tuple(out.shape))
        if out.is_floating_point():
            out.fill_(POISON)
        return out

    monkeypatch.setattr(torch, "empty", empty)
    return shapes


def reference(logits, target, weight, scales, *, eps=0.0, z_loss=0.0, softcap=None, ignore_index=IGNORE):
    """float64 (ce, z, lse, grad, keep); rows with an ignored or out-of-range target are not kept."""
    x = logits.detach().double().requires_grad_(True)
    V = x.shape[1]
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    logp = torch.log_softmax(xc, dim=-1)
    lse = torch.logsumexp(xc, dim=-1)
    keep = (target != ignore_index) & (target >= 0) & (target < V)
    t = torch.where(keep, target, 0)
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64)
    ce = -logp.gather(1, t[:, None]).squeeze(1) * w[t]
    if eps > 0:  # (skipped at 0: 0 * (-inf) would be NaN on rows with -inf logits)
        ce = (1 - eps) * ce + eps * (-(logp * w).sum(-1) / V)
    ce = torch.where(keep, ce, torch.zeros_like(ce))
    z = torch.where(keep, z_loss * lse**2, torch.zeros_like(lse))
    (scales[0].double() * ce + scales[1].double() * z).sum().backward()
    return ce.detach(), z.detach(), lse.detach(), x.grad, keep


def make_inputs(N, V, dtype, *, seed=0, strided=False, with_weight=False, ignore_every=4, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a slice of a wider buffer: row stride V + 40, stride(1) == 1
        base = (torch.randn(N, V + 40, generator=g) * scale).to(dtype)
        logits = base[:, 7 : 7 + V]
    else:
        logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        target[1::ignore_every] = IGNORE
    weight = torch.rand(V, generator=g) + 0.25 if with_weight else None
    # random upstream scales, not the 1/N of a mean
    scales = torch.rand(2, generator=g) + 0.5
    return logits, target, weight, scales


def assert_matches(out, ref, dtype, *, grad_expected=True, nan_rows=None):
    ce, z, lse, grad = out
    ce_r, z_r, lse_r, grad_r, keep = ref
    N = ce.shape[0]
    nan_rows = torch.zeros(N, dtype=torch.bool) if nan_rows is None else nan_rows
    ok = ~nan_rows
    rl, al = TOL[dtype]["loss"]
    rg, ag = TOL[dtype]["grad"]
    assert ce.dtype == z.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), lse_r, rtol=rl, atol=al)
    torch.testing.assert_close(ce[ok].double(), ce_r[ok], rtol=rl, atol=al)
    torch.testing.assert_close(z[ok].double(), z_r[ok], rtol=rl, atol=al)
    assert ce[nan_rows].isnan().all() and z[nan_rows].isnan().all()
    if not grad_expected:
        assert grad is None
        return
    assert grad.dtype == dtype and grad.shape == grad_r.shape
    torch.testing.assert_close(grad[ok].double(), grad_r[ok], rtol=rg, atol=ag)
    assert grad[nan_rows].isnan().all()
    ignored = ~keep & ok
    assert (grad[ignored] == 0).all()


# (N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap); block_v=None: the table
CASES = [
    pytest.param(8, 100, torch.float32, 32, None, False, 0.0, 0.0, None, id="fp32-V100-b32-plain"),
    pytest.param(6, 257, torch.float32, 64, None, False, 0.1, 0.0, None, id="fp32-V257-b64-smooth"),
    pytest.param(6, 257, torch.float32, 32, None, True, 0.0, 0.0, None, id="fp32-V257-b32-weight"),
    pytest.param(6, 100, torch.float32, 32, None, False, 0.0, 1e-2, None, id="fp32-V100-b32-zloss"),
    pytest.param(6, 100, torch.float32, 32, None, False, 0.0, 0.0, 4.0, id="fp32-V100-b32-softcap"),
    pytest.param(4, 1000, torch.float32, 256, None, True, 0.2, 1e-3, 5.0, id="fp32-V1000-b256-all"),
    pytest.param(6, 100, torch.float32, 32, None, True, 1.0, 0.0, None, id="fp32-V100-b32-weight-eps1"),
    pytest.param(4, 4099, torch.float32, None, None, True, 0.1, 1e-4, 30.0, id="fp32-V4099-auto-all"),
    pytest.param(6, 257, torch.bfloat16, 64, None, False, 0.0, 0.0, None, id="bf16-V257-b64-plain"),
    pytest.param(4, 1000, torch.bfloat16, 256, None, True, 0.1, 1e-3, 10.0, id="bf16-V1000-b256-all"),
    pytest.param(6, 257, torch.float16, 32, None, False, 0.1, 1e-2, None, id="fp16-V257-b32-smooth-z"),
    pytest.param(6, 100, torch.float32, 32, 2, False, 0.0, 0.0, None, id="fp32-V100-b32-split2-plain"),
    pytest.param(6, 257, torch.float32, 32, 3, True, 0.1, 0.0, None, id="fp32-V257-b32-split3-weight-smooth"),
    pytest.param(4, 1000, torch.float32, 64, 3, True, 0.1, 1e-3, 5.0, id="fp32-V1000-b64-split3-all"),
    pytest.param(4, 1000, torch.bfloat16, 128, 4, True, 0.1, 1e-3, 10.0, id="bf16-V1000-b128-split4-all"),
    pytest.param(6, 100, torch.float32, 32, 2, False, 0.0, 1e-2, 4.0, id="fp32-V100-b32-split2-z-softcap"),
]


@pytest.mark.parametrize("N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap", CASES)
def test_matches_autograd(
    poisoned_empty, N, V, dtype, block_v, num_splits, with_weight, eps, z_loss, softcap
):
    logits, target, weight, scales = make_inputs(N, V, dtype, with_weight=with_weight)
    out = ce_forward(
        logits, target, weight, scales, ignore_index=IGNORE, label_smoothing=eps, z_loss=z_loss,
        softcap=softcap, compute_grad=True, inplace=False, block_v=block_v, num_splits=num_splits,
    )
    ref = reference(logits, target, weight, scales, eps=eps, z_loss=z_loss, softcap=softcap)
    assert_matches(out, ref, dtype)
    if num_splits is not None:  # the split path ran, with the asked number of chunks
        assert (N, num_splits) in poisoned_empty


@pytest.mark.parametrize("num_splits", [pytest.param(None, id="fused"), pytest.param(3, id="split3")])
def test_out_of_range_targets_give_nan_rows(num_splits):
    N, V = 8, 100
    logits, target, weight, scales = make_inputs(N, V, torch.float32, with_weight=True, ignore_every=0)
    target[1], target[3], target[4], target[6] = V, -1, 10**12, -(10**12)  # far away: a read would crash
    target[7] = IGNORE
    nan_rows = torch.zeros(N, dtype=torch.bool)
    nan_rows[[1, 3, 4, 6]] = True
    kwargs = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3, softcap=None)
    out = ce_forward(logits, target, weight, scales, **kwargs, compute_grad=True, inplace=False,
                     block_v=32, num_splits=num_splits)
    ref = reference(logits, target, weight, scales, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, torch.float32, nan_rows=nan_rows)
    assert out[0][7] == 0 and out[1][7] == 0


def test_ignore_index_inside_vocabulary():
    N, V = 8, 100
    logits, target, _, scales = make_inputs(N, V, torch.float32, ignore_every=0)
    target[::3] = 5  # class 5 is the padding label
    out = ce_forward(logits, target, None, scales, ignore_index=5, label_smoothing=0.1, z_loss=1e-3,
                     softcap=None, compute_grad=True, inplace=False, block_v=32)
    ref = reference(logits, target, None, scales, eps=0.1, z_loss=1e-3, ignore_index=5)
    assert_matches(out, ref, torch.float32)
    assert (out[0][::3] == 0).all()


@pytest.mark.parametrize("num_splits", [pytest.param(None, id="fused"), pytest.param(2, id="split2")])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_no_grad_writes_nothing(poisoned_empty, num_splits, inplace):
    N, V = 6, 100
    logits, target, _, scales = make_inputs(N, V, torch.bfloat16)
    before = logits.clone()
    out = ce_forward(logits, target, None, scales, ignore_index=IGNORE, label_smoothing=0.1,
                     z_loss=1e-3, softcap=None, compute_grad=False, inplace=inplace, block_v=32,
                     num_splits=num_splits)
    assert out[3] is None
    assert torch.equal(logits, before)
    assert (N, V) not in poisoned_empty  # no N x V buffer allocated either
    ref = reference(logits, target, None, scales, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, torch.bfloat16, grad_expected=False)


@pytest.mark.parametrize(
    "dtype, num_splits, strided",
    [
        pytest.param(torch.float32, None, False, id="fp32-fused"),
        pytest.param(torch.bfloat16, None, True, id="bf16-fused-strided"),
        pytest.param(torch.float32, 3, True, id="fp32-split3-strided"),
        pytest.param(torch.bfloat16, 2, False, id="bf16-split2"),
    ],
)
def test_inplace_overwrites_logits(poisoned_empty, dtype, num_splits, strided):
    N, V = 6, 257
    logits, target, weight, scales = make_inputs(N, V, dtype, strided=strided, with_weight=True)
    original = logits.clone()
    base_before = logits._base.clone() if strided else None
    out = ce_forward(logits, target, weight, scales, ignore_index=IGNORE, label_smoothing=0.1,
                     z_loss=1e-3, softcap=5.0, compute_grad=True, inplace=True, block_v=64,
                     num_splits=num_splits)
    assert out[3] is logits
    assert (N, V) not in poisoned_empty
    ref = reference(original, target, weight, scales, eps=0.1, z_loss=1e-3, softcap=5.0)
    assert_matches(out, ref, dtype)
    if strided:  # columns around the view are untouched
        assert torch.equal(logits._base[:, :7], base_before[:, :7])
        assert torch.equal(logits._base[:, 7 + V :], base_before[:, 7 + V :])


@pytest.mark.parametrize(
    "dtype, num_splits",
    [
        pytest.param(torch.float32, None, id="fp32-fused"),
        pytest.param(torch.float32, 3, id="fp32-split3"),
        pytest.param(torch.bfloat16, None, id="bf16-fused"),
    ],
)
def test_strided_rows(dtype, num_splits):
    N, V = 6, 257
    logits, target, weight, scales = make_inputs(N, V, dtype, strided=True, with_weight=True)
    assert logits.stride() == (V + 40, 1)
    out = ce_forward(logits, target, weight, scales, ignore_index=IGNORE, label_smoothing=0.1,
                     z_loss=1e-3, softcap=None, compute_grad=True, inplace=False, block_v=64,
                     num_splits=num_splits)
    assert out[3].is_contiguous()
    ref = reference(logits, target, weight, scales, eps=0.1, z_loss=1e-3)
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize(
    "num_splits, softcap",
    [
        pytest.param(None, None, id="fused"),
        pytest.param(None, 4.0, id="fused-softcap"),
        pytest.param(4, None, id="split4"),
    ],
)
def test_minus_inf_logits(num_splits, softcap):
    N, V = 5, 128
    logits, target, _, scales = make_inputs(N, V, torch.float32, ignore_every=0)
    ninf = float("-inf")
    logits[0, ::3] = ninf  # scattered
    logits[1, :32] = ninf  # the whole first block (and first chunk with 4 splits): max = -inf there
    logits[2, 32:64] = ninf  # a whole middle block
    logits[3, :-1] = ninf  # a single finite logit: lse = that logit
    target[:3] = torch.tensor([1, 40, 70])
    target[3] = V - 1
    target[4] = IGNORE
    out = ce_forward(logits, target, None, scales, ignore_index=IGNORE, label_smoothing=0.0,
                     z_loss=1e-3, softcap=softcap, compute_grad=True, inplace=False, block_v=32,
                     num_splits=num_splits)
    ref = reference(logits, target, None, scales, z_loss=1e-3, softcap=softcap)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.isfinite(out[3]).all()
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_class(dtype):
    N, V = 4, 1
    logits, target, weight, scales = make_inputs(N, V, dtype, with_weight=True, ignore_every=0)
    target[:] = torch.tensor([0, 1, IGNORE, 0])  # 1 is out of range
    out = ce_forward(logits, target, weight, scales, ignore_index=IGNORE, label_smoothing=0.1,
                     z_loss=1e-2, softcap=None, compute_grad=True, inplace=False)
    ref = reference(logits, target, weight, scales, eps=0.1, z_loss=1e-2)
    nan_rows = torch.tensor([False, True, False, False])
    assert_matches(out, ref, dtype, nan_rows=nan_rows)
    assert out[0][0] == 0  # log p = 0 for the only class


@pytest.mark.parametrize(
    "compute_grad, inplace",
    [pytest.param(True, False, id="grad"), pytest.param(True, True, id="inplace"),
     pytest.param(False, False, id="no-grad")],
)
def test_empty_batch(compute_grad, inplace):
    logits = torch.empty(0, 50)
    out = ce_forward(logits, torch.empty(0, dtype=torch.int64), None, torch.ones(2),
                     ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, softcap=None,
                     compute_grad=compute_grad, inplace=inplace)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in out[:3])
    if not compute_grad:
        assert out[3] is None
    elif inplace:
        assert out[3] is logits
    else:
        assert out[3].shape == (0, 50)


def _bad(**overrides):
    args = dict(logits=torch.randn(4, 10), target=torch.zeros(4, dtype=torch.int64), weight=None,
                scales=torch.ones(2))
    kwargs = dict(ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  compute_grad=True, inplace=False)
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v
    return args, kwargs


@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param(dict(logits=torch.randn(2, 2, 10)), "2-D", id="logits-3d"),
        pytest.param(dict(logits=torch.randn(4, 10).double()), "dtype", id="logits-fp64"),
        pytest.param(dict(logits=torch.randn(10, 4).t()), "stride", id="logits-col-major"),
        pytest.param(dict(logits=torch.randn(4, 0)), "V = 0", id="logits-no-class"),
        pytest.param(dict(target=torch.zeros(4, dtype=torch.int32)), "int64", id="target-int32"),
        pytest.param(dict(target=torch.zeros(3, dtype=torch.int64)), "shape", id="target-shape"),
        pytest.param(dict(weight=torch.ones(10).half()), "float32", id="weight-fp16"),
        pytest.param(dict(weight=torch.ones(9)), "shape", id="weight-shape"),
        pytest.param(dict(scales=torch.ones(3)), "scales", id="scales-shape"),
        pytest.param(dict(scales=torch.ones(2).double()), "scales", id="scales-fp64"),
        pytest.param(dict(label_smoothing=1.5), "label_smoothing", id="eps-above-1"),
        pytest.param(dict(z_loss=-1.0), "z_loss", id="z-loss-negative"),
        pytest.param(dict(softcap=0.0), "softcap", id="softcap-zero"),
        pytest.param(dict(block_v=48), "power of two", id="block-not-pow2"),
        pytest.param(dict(num_splits=0), "num_splits", id="splits-zero"),
    ],
)
def test_bad_arguments_raise(overrides, match):
    args, kwargs = _bad(**overrides)
    with pytest.raises(ValueError, match=match):
        ce_forward(args["logits"], args["target"], args["weight"], args["scales"], **kwargs)


def test_heuristic_tables(monkeypatch):
    # Block table (CUDA rows, then the interpreter's).
    assert ops._block_v_and_warps(1000, torch.bfloat16, False) == (1024, 4)
    assert ops._block_v_and_warps(4099, torch.float32, False) == (8192, 8)
    assert ops._block_v_and_warps(128256, torch.float32, False) == (8192, 16)
    assert ops._block_v_and_warps(128256, torch.bfloat16, False) == (8192, 8)
    assert ops._block_v_and_warps(128256, torch.bfloat16, True) == (4096, 4)
    # Split table: the examples of its comment, with a fake 132-SM device (no GPU queried).
    assert ops._auto_num_splits(1, 131072, torch.device("cpu")) == 1

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    got = [ops._auto_num_splits(n, 131072, cuda) for n in (1, 64, 256, 512)]
    assert got == [8, 8, 3, 1]
    assert ops._auto_num_splits(1, 8192, cuda) == 1  # too short to split


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_xent.kernels.cross_entropy as K

def compile_for_sm90(fn, dtype, num_warps, **constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            sig[name] = "*" + dtype
        elif name == "target_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("label_smoothing", "z_loss", "softcap"):
            sig[name] = "fp32"
        elif name.startswith("stride_"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

on = dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True)
off = {k: False for k in on}
compile_for_sm90(K._ce_fwd_kernel, "bf16", 8, BLOCK_V=8192, COMPUTE_GRAD=True, **on)
compile_for_sm90(K._ce_fwd_kernel, "fp32", 16, BLOCK_V=8192, COMPUTE_GRAD=False, **off)
stats = {k: v for k, v in on.items() if k != "HAS_Z_LOSS"}
compile_for_sm90(K._ce_split_stats_kernel, "bf16", 8, BLOCK_V=8192, **stats)
compile_for_sm90(K._ce_split_merge_kernel, "bf16", 1, SPLIT_BLOCK=8, **on)
compile_for_sm90(K._ce_split_grad_kernel, "bf16", 8, BLOCK_V=8192, SPLIT_BLOCK=8, **on)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter is lenient with types; the real compiler (to sm_90 PTX and cubin, no GPU
    needed) checks the all-features and no-features variants of every kernel."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA backend in this triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; the default anyway
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
