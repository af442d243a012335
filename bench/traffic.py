"""The traffic meter: bytes moved per logit, and launches, of one call, counted on the CPU.

Speed on a GPU is bounded by bytes: reading the logits once and writing their gradient once
(2 x element size per logit, forward+backward) is the floor, and a design that moves more cannot
reach it on any GPU. This meter counts, for one call of a case run under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors, the launch plan an H100 would use):

* every Triton kernel's loads and stores: active lanes x element size, masked lanes excluded;
* every torch op outside the kernels (a ``TorchDispatchMode``): the bytes of its tensor inputs
  and outputs; views, allocations and metadata ops move nothing and launch nothing; gathers read
  only what they gather; matmuls also count their FLOPs;
* launches: Triton kernels, and torch ops (each is a kernel on a GPU).

The CPU-only check of the targets' range (a GPU skips it unless validation is asked) and the
backward's seed (``torch.ones_like(loss)``, made by the caller) are not counted. The figure is
traffic with no cache reuse: what the design asks of memory; a GPU's L2 may serve some of it
(the second sweep of a long row is scheduled for that).

``python -m bench --traffic`` prints the table (and a PNG next to the bench results);
tests/test_traffic.py holds every case to its budget.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that move no data and launch nothing: allocation, views, metadata.
_FREE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "reshape", "as_strided", "alias", "detach", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select", "slice", "narrow", "unbind", "split", "split_with_sizes",
    "chunk", "movedim", "set_", "lift_fresh", "_reshape_alias", "view_as", "unfold",
    "is_same_size", "resize_", "_local_scalar_dense", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "size", "stride", "dim", "numel", "is_contiguous",
    "storage_offset", "_has_compatible_shallow_copy_type", "result_type",
}
# Ops whose reads are what they gather (output-sized), not their whole source.
_GATHERS = {"gather", "index_select", "index", "embedding", "take", "masked_select"}
# Ops that write only (their input is the buffer they fill).
_WRITES_ONLY = {"fill_", "zero_", "zeros_like", "ones_like", "full_like", "zeros", "ones",
                "full", "arange", "fill", "new_zeros", "new_ones", "new_full", "scalar_tensor"}
_MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "matmul", "mv", "addmv",
            "addmv_"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree):
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(tree)
    return out


@dataclass
class Counts:
    """What one call moved: bytes and launches of Triton kernels and of torch ops, matmul FLOPs,
    and the kernels and ops by name."""

    triton_load: int = 0
    triton_store: int = 0
    triton_launches: int = 0
    torch_read: int = 0
    torch_write: int = 0
    torch_launches: int = 0
    flops: int = 0
    kernels: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)
    programs: dict = field(default_factory=dict)  # kernel -> the largest grid it launched

    @property
    def triton_bytes(self) -> int:
        return self.triton_load + self.triton_store

    @property
    def torch_bytes(self) -> int:
        return self.torch_read + self.torch_write

    @property
    def total_bytes(self) -> int:
        return self.triton_bytes + self.torch_bytes


class _TorchOps(TorchDispatchMode):
    def __init__(self, meter: Meter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        m = self.meter
        if m.paused or m.torch_paused:
            return out
        name = func.overloadpacket.__name__
        if name in _FREE or name.startswith("_local_scalar") or name.startswith("sym_"):
            return out
        out_kw = kwargs.get("out")
        ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        outs = _tensors(out) if out_kw is None else _tensors(out_kw)
        c = m.counts
        if name in _WRITES_ONLY:
            read, write = 0, sum(_nbytes(t) for t in outs) or sum(_nbytes(t) for t in ins[:1])
        elif name in _GATHERS:
            write = sum(_nbytes(t) for t in outs)
            read = write + sum(_nbytes(t) for t in ins if not t.is_floating_point())
        else:
            seen, read = set(), 0
            for t in ins:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if key not in seen:
                    seen.add(key)
                    read += _nbytes(t)
            write = sum(_nbytes(t) for t in outs)
            if name.endswith("_") and not outs and ins:  # an in-place op returning nothing
                write = _nbytes(ins[0])
        if name in _MATMULS:
            mats = [t for t in args if isinstance(t, torch.Tensor)]
            a, b = mats[-2], mats[-1]  # mm(a, b), addmm(c, a, b), mv(a, v), addmv(c, a, v)
            if a.dim() == 2 and b.dim() == 2:
                c.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            elif a.dim() == 2 and b.dim() == 1:
                c.flops += 2 * a.shape[0] * a.shape[1]
        c.torch_read += read
        c.torch_write += write
        c.torch_launches += 1
        c.ops[name] = c.ops.get(name, 0) + 1
        return out


class Meter:
    """Counts what runs inside ``with Meter() as m:``; ``m.counts`` afterwards. Needs the
    Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported)."""

    def __init__(self):
        self.counts = Counts()
        self.paused = 0  # nothing counted (the CPU-only target check)
        self.torch_paused = 0  # torch ops not counted (the interpreter's copies for a kernel)
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __enter__(self):
        from triton.runtime import interpreter as I

        if not isinstance(_kernel_sample(), I.InterpretedFunction):
            raise RuntimeError("the traffic meter runs the kernels under the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
        meter = self
        builder = I.interpreter_builder
        real_load, real_store = builder.create_masked_load, builder.create_masked_store
        real_call = I.GridExecutor.__call__

        def elt(ptrs):
            return ptrs.get_element_ty().primitive_bitwidth // 8

        def load(ptrs, mask, other, cache_policy, is_volatile):
            if not meter.paused:
                meter.counts.triton_load += int(mask.data.sum()) * elt(ptrs)
            return real_load(ptrs, mask, other, cache_policy, is_volatile)

        def store(ptrs, value, mask, cache_policy):
            if not meter.paused:
                meter.counts.triton_store += int(mask.data.sum()) * elt(ptrs)
            return real_store(ptrs, value, mask, cache_policy)

        def call(executor, *args, **kwargs):
            if not meter.paused:
                c = meter.counts
                c.triton_launches += 1
                name = executor.fn.__name__
                c.kernels[name] = c.kernels.get(name, 0) + 1
                grid = executor.grid(kwargs) if callable(executor.grid) else executor.grid
                n = 1
                for d in tuple(grid):
                    n *= int(d)
                c.programs[name] = max(c.programs.get(name, 0), n)
            with meter.pause_torch():  # the interpreter's own copies of the arguments
                return real_call(executor, *args, **kwargs)

        self._stack.callback(setattr, builder, "create_masked_load", real_load)
        self._stack.callback(setattr, builder, "create_masked_store", real_store)
        self._stack.callback(setattr, I.GridExecutor, "__call__", real_call)
        builder.create_masked_load = load
        builder.create_masked_store = store
        I.GridExecutor.__call__ = call
        # The CPU-only range check of the targets (a GPU skips it without validate=True).
        from triton_xent import _validation

        real_check = _validation._check_range_now

        def check(*a, **k):
            with meter.pause():
                return real_check(*a, **k)

        self._stack.callback(setattr, _validation, "_check_range_now", real_check)
        _validation._check_range_now = check
        self._stack.enter_context(_TorchOps(self))
        return self

    @contextlib.contextmanager
    def pause_torch(self):
        # Torch ops run by the interpreter for a kernel (argument copies) are the kernel's.
        self.torch_paused += 1
        try:
            yield
        finally:
            self.torch_paused -= 1

    def __exit__(self, *exc):
        self._stack.close()
        return False


def _kernel_sample():
    from triton_xent.kernels.cross_entropy import _ce_fused_kernel

    return _ce_fused_kernel


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficCase:
    """One call to count. ``kind``: "ce" or "linear"; ``upstream``: "one" (``loss.backward()``
    of the reduced loss, or of the summed rows for ``"none"``), "random" (a random upstream
    gradient) or "none" (forward only, no gradient); ``num_splits``: force the plan (None: the
    H100 plan)."""

    name: str
    kind: str = "ce"
    N: int = 16
    V: int = 32000
    D: int = 0
    dtype: str = "bfloat16"
    options: tuple = ()
    upstream: str = "one"
    inplace: bool = False
    num_splits: int | None = None
    chunk_size: int | None = None
    ignore_every: int = 0  # every k-th target is ignore_index (0: none)
    budget: float | None = None  # bytes per logit a test holds the case to
    max_triton_launches: int | None = None

    @property
    def floor(self) -> float:
        """Bytes per logit no design can go below: a forward reads the kept rows' logits (an
        ignored row's loss is 0); a gradient reads every row once (an ignored row's gradient is
        PyTorch's 0 x softmax, NaN where a logit is NaN or +inf) and writes it once."""
        elt = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        if self.upstream == "none":
            kept = 1.0 - (1.0 / self.ignore_every if self.ignore_every else 0.0)
            return elt * kept
        return elt * 2


@dataclass
class Record:
    case: TrafficCase
    counts: Counts

    @property
    def logits(self) -> int:
        return self.case.N * self.case.V

    @property
    def per_logit(self) -> float:
        return self.counts.total_bytes / self.logits

    @property
    def gemm_flops(self) -> int:
        return 2 * self.case.N * self.case.D * self.case.V


def run_case(case: TrafficCase, seed: int = 0) -> Record:
    """Runs one call of ``case`` under the meter and returns what it moved."""
    import triton_xent
    from triton_xent import _config

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(seed)
    opts = dict(case.options)
    target = torch.randint(0, case.V, (case.N,), generator=g)
    if case.ignore_every:
        target[:: case.ignore_every] = -100
    saved = _config.TRITON_NUM_SPLITS
    _config.TRITON_NUM_SPLITS = case.num_splits
    grad = case.upstream != "none"
    try:
        if case.kind == "ce":
            base = (torch.randn(case.N, case.V, generator=g) * 3).to(dtype).requires_grad_(grad)
            x = base * 1.0 if case.inplace else base  # in place needs an op's output
            args = (x, target)

            def fn():
                return triton_xent.cross_entropy(*args, backend="triton",
                                                 inplace_backward=case.inplace, **opts)
        else:
            h = torch.randn(case.N, case.D, generator=g).to(dtype).requires_grad_(grad)
            W = (torch.randn(case.V, case.D, generator=g) / case.D**0.5).to(dtype)
            W.requires_grad_(grad)

            args = (h, W)

            def fn():  # skip_ignored=False: the GPU default (no host sync)
                return triton_xent.linear_cross_entropy(h, W, target, backend="triton",
                                                        chunk_size=case.chunk_size,
                                                        skip_ignored=False, **opts)
        with torch.no_grad() if not grad else contextlib.nullcontext():
            with Meter() as m:
                loss = fn()
            if grad:
                seed_grad = (torch.randn(loss.shape, generator=g, dtype=loss.dtype)
                             if case.upstream == "random" else torch.ones_like(loss))
                # autograd.grad to the op's own inputs: the backward of the op that made the
                # logits (the caller's) is not counted
                with Meter() as mb:
                    torch.autograd.grad(loss, [a for a in args if a.requires_grad], seed_grad)
                _add(m.counts, mb.counts)
    finally:
        _config.TRITON_NUM_SPLITS = saved
    return Record(case, m.counts)


def _add(a: Counts, b: Counts) -> None:
    for f in ("triton_load", "triton_store", "triton_launches", "torch_read", "torch_write",
              "torch_launches", "flops"):
        setattr(a, f, getattr(a, f) + getattr(b, f))
    for d_a, d_b in ((a.kernels, b.kernels), (a.ops, b.ops)):
        for k, v in d_b.items():
            d_a[k] = d_a.get(k, 0) + v
    for k, v in b.programs.items():
        a.programs[k] = max(a.programs.get(k, 0), v)


# The README's table. bf16, N=16 rows (none ignored unless said), forward+backward with the upstream
# gradient of loss.backward() unless said. Budgets: the floor (4 B/logit in bf16) plus 0.05 where
# a row is read once (held in registers: V <= 16384, or 8192 with options that need registers),
# 6.05 where it is read twice (two sweeps on the fused path, or the split path: partials, then
# merge + gradient), 2.05 forward only.
CE_CASES = [
    TrafficCase("CE mean V=16000: the row read once, into registers", V=16000, budget=4.05,
                max_triton_launches=3),
    TrafficCase("CE smoothing 0.1 + z-loss V=8000: read once", V=8000,
                options=(("label_smoothing", 0.1), ("z_loss", 1e-4)), budget=4.05,
                max_triton_launches=3),
    TrafficCase("CE mean V=32000 (split path at N=16)", V=32000, budget=6.05,
                max_triton_launches=4),
    TrafficCase("CE mean V=128256 (fused, 2 sweeps)", V=128256, num_splits=1, budget=6.05,
                max_triton_launches=3),
    TrafficCase("CE mean V=262144 (fused, 2 sweeps)", V=262144, num_splits=1, budget=6.05,
                max_triton_launches=3),
    TrafficCase("CE mean V=128256 (split path, H100 plan)", V=128256, budget=6.05,
                max_triton_launches=4),
    TrafficCase("CE smoothing 0.1 + z-loss V=32000", V=32000,
                options=(("label_smoothing", 0.1), ("z_loss", 1e-4)), budget=6.05,
                max_triton_launches=4),
    TrafficCase("CE sum V=32000", V=32000, options=(("reduction", "sum"),), budget=6.05,
                max_triton_launches=4),
    # "none": the gradient is made in the backward with the rows' upstream folded in (they are
    # rarely all 1): a read for the loss, a read and a write for the gradient.
    TrafficCase("CE none V=32000, upstream 1", V=32000, options=(("reduction", "none"),),
                budget=6.05, max_triton_launches=3),
    TrafficCase("CE none V=32000, random upstream", V=32000,
                options=(("reduction", "none"),), upstream="random", budget=6.05,
                max_triton_launches=3),
    TrafficCase("CE mean V=16000, inplace_backward", V=16000, inplace=True, budget=4.05,
                max_triton_launches=3),
    # An ignored row is read once for its gradient (NaN where a logit is NaN or +inf, as in
    # PyTorch), not at all without one. (N=16 at V=32000 is the split path: a kept row is read
    # twice, an ignored one once: 5 B/logit.)
    TrafficCase("CE mean V=32000, half the targets ignored", V=32000, ignore_every=2,
                budget=5.05, max_triton_launches=4),
    TrafficCase("CE forward only V=32000, half the targets ignored (no grad)", V=32000,
                ignore_every=2, upstream="none", budget=1.05, max_triton_launches=3),
    TrafficCase("CE forward only V=32000 (no grad)", V=32000, upstream="none", budget=2.05,
                max_triton_launches=3),
    TrafficCase("CE forward only V=128256 (no grad, split)", V=128256, upstream="none",
                budget=2.05, max_triton_launches=3),
]
# The fused head. Bytes per logit count the GEMMs' own operands too: per logit, writing the
# logits and reading them twice as d(logits) (3 x element size), plus x, W, dX and dW, which are
# O(D / V) and O(D / N) per logit (the cases keep D / N = 1/4 and D / V = 1/32, as N=1024,
# D=256, V=8192 would). One chunk at fp32: the GEMMs move
# 15.375 B/logit and the cross-entropy kernel 8 (read + write in place) = 23.375, the design's
# floor; more chunks re-read W and read-modify-write dW once per chunk (inside the GEMM). The
# budgets hold the design to its passes.
LINEAR_CASES = [
    TrafficCase("linear fp32 N=512 D=128 V=4096, one chunk", kind="linear", N=512, D=128,
                V=4096, dtype="float32", chunk_size=512, budget=23.45),
    TrafficCase("linear bf16 N=512 D=128 V=4096, one chunk", kind="linear", N=512, D=128,
                V=4096, chunk_size=512, budget=11.75),
    TrafficCase("linear bf16 N=512 D=128 V=4096, 4 chunks", kind="linear", N=512, D=128,
                V=4096, chunk_size=128, budget=17.75),
    TrafficCase("linear bf16 none, random upstream (4 GEMMs)", kind="linear", N=256, D=128,
                V=4096, chunk_size=256, options=(("reduction", "none"),), upstream="random",
                budget=18.35),
]


def table(records: list[Record]) -> str:
    lines = ["| case | B/logit | floor | Triton kernels (launches) | torch ops (launches) | "
             "matmul FLOPs / (2 N D V) |",
             "|---|---:|---:|---|---|---:|"]
    for r in records:
        c = r.counts
        kern = ", ".join(f"{k.strip('_')}" + (f" x{v}" if v > 1 else "")
                         for k, v in c.kernels.items())
        ops = ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in sorted(c.ops.items()))
        fl = f"{c.flops / r.gemm_flops:.2f}" if r.case.kind == "linear" else ""
        lines.append(f"| {r.case.name} | {r.per_logit:.3f} | {r.case.floor:g} | "
                     f"{kern or '-'} ({c.triton_launches}) | {ops or '-'} ({c.torch_launches}) | "
                     f"{fl} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --traffic",
                                description="Counts bytes per logit and launches per call.")
    p.add_argument("--traffic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["ce", "linear"], help="one op's cases")
    p.add_argument("--out", help="folder for traffic.md and traffic.png "
                   "(default bench/results/traffic)")
    args, _ = p.parse_known_args(argv)
    cases = [c for c in CE_CASES + LINEAR_CASES if args.only in (None, c.kind)]
    records = []
    for c in cases:
        records.append(run_case(c))
        print(f"  {c.name}: {records[-1].per_logit:.3f} B/logit", flush=True)
    text = table(records)
    print(text)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "traffic")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "traffic.md"), "w") as f:
        f.write(text + "\n")
    try:
        from bench import report

        report.plot_traffic([(r.case.name, r.per_logit, r.case.floor) for r in records
                             if r.case.kind == "ce"], os.path.join(out, "traffic.png"))
    except ImportError as exc:  # matplotlib missing: the table is the result
        print(f"(no PNG: {exc})")
    return 0


def run_in_interpreter(argv: list[str]) -> int:
    """``python -m bench --traffic``: this module in a process with the interpreter on (it must
    be set before triton is imported)."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "bench.traffic", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
