"""The offline compile report: every launch the launcher would make, compiled for sm_90, no GPU.

``python -m bench --compile-report [--quick] [--out FILE]`` runs the launchers of
``triton_xent/backends/triton_ce.py`` on meta tensors (no memory, no device) for a list of shapes
and options, records each kernel launch they make (grid, arguments, meta-parameters), specializes
the arguments exactly as Triton's JIT would at launch (the installed triton's own binder: 16-byte
alignment, divisibility by 16), compiles each distinct launch for sm_90 (PTX, then the bundled
ptxas) and prints one row per launch:

* registers per thread, spill bytes (stores + loads), shared memory per program;
* programs per SM: what fits (threads, registers, shared memory) and what the launcher's grid
  assumes (``ceil(grid / SMs)``); ``OVER`` when the grid assumes more than fits;
* the widest global load and store (bytes per thread per instruction) and the eviction hints the
  PTX carries;
* the logit bytes in flight per SM (programs that fit x one block of the row) and the L2 live set
  (the bytes a second sweep expects to find in L2: rows in flight x row bytes on the two-sweep
  path, the whole shard on the split path; 0 where the row is read once).

This is a model of one GPU (the planning H100: 132 SMs, 50 MB L2, 64 warps and 64K registers
and 228 KB shared memory per SM), from the compiler's output: no kernel runs.
tests/test_bench.py runs the quick report in CI and fails on any spill or over-subscribed grid.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import torch

WARPS_PER_SM = 64
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
PROGRAMS_PER_SM_MAX = 32

# (label, options) of the report: the launcher's constexpr switches that change the code.
OPTIONS = {
    "plain": {},
    "ls+z+cap": dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
    "all": dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.5, weight=True,
                argmax=True, temperature=0.7, entropy=True),
    "entropy": dict(entropy=True),
}
SHAPES = [(n, v) for n in (16, 256, 8192) for v in (32000, 128256, 262144)]
SHAPES += [(8192, 16000), (8192, 8000), (16, 16000)]  # one read per logit (single block)
QUICK = [(8192, 32000, "ls+z+cap"), (8192, 128256, "plain"), (16, 262144, "plain")]
LINEAR = (4096, 4096, 128256)  # rows of one chunk, D, V: the fused head's CE and scale_ launches


@dataclass
class Launch:
    case: str
    fn: object
    grid: int
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append((self.fn, math.prod(grid), args, kwargs))
        return record


@contextlib.contextmanager
def recording(sink: list):
    """Replaces the launcher's kernels by recorders while inside."""
    from triton_xent.backends import triton_ce as L

    names = [n for n in dir(L) if n.startswith("_") and n.endswith("_kernel")]
    saved = {n: getattr(L, n) for n in names}
    try:
        for n in names:
            setattr(L, n, _Recorder(saved[n], sink))
        yield
    finally:
        for n, f in saved.items():
            setattr(L, n, f)


def _opts(name: str, reduction: str = "mean"):
    from triton_xent.backends.protocol import Options

    o = OPTIONS[name]
    return Options(-100, reduction, o.get("label_smoothing", 0.0), o.get("z_loss", 0.0),
                     o.get("softcap"), logit_scale=o.get("logit_scale"),
                     argmax=o.get("argmax", False), temperature=o.get("temperature"),
                     entropy=o.get("entropy", False))


def launches_of(N: int, V: int, dtype: torch.dtype, opt: str) -> list[Launch]:
    """Every launch of fwd+bwd (mean; the backward at g != 1 recomputes, at g == 1 stops), of the
    forward alone, of reduction="none" (the gradient in the backward) and of the in-place
    backward (scale_), for one shape and option set."""
    from triton_xent.backends import triton_ce as L

    meta = dict(device="meta")
    logits = torch.empty(N, V, dtype=dtype, **meta)
    target = torch.empty(N, dtype=torch.int64, **meta)
    weight = torch.empty(V, dtype=torch.float32, **meta) if OPTIONS[opt].get("weight") else None
    out = []

    def phase(name, thunk):
        sink = []
        with recording(sink):
            thunk()
        out.extend(Launch(f"N={N} V={V} {dtype_name(dtype)} {opt} {name}", *r) for r in sink)

    mean, none = _opts(opt), _opts(opt, "none")

    def fwd_bwd():
        r = L.ce_forward(logits, target, weight, mean, compute_grad=True)
        L.ce_finalize(r.ce, r.z, r.dens, has_z=mean.z_loss > 0, out_dtype=dtype)
        L.finish(logits, target, weight, mean, r.stats, None, dens=r.dens, rows=None,
                 grad=r.grad, upstream=torch.empty((), **meta))

    def fwd():
        L.ce_forward(logits, target, weight, mean, compute_grad=False)

    def rows_none():
        r = L.ce_forward(logits, target, weight, none, compute_grad=False)
        L.finish(logits, target, weight, none, r.stats, None, dens=r.dens, rows=None,
                 grad=torch.empty_like(logits), skip_unit=False, upstream=torch.empty(N, **meta))

    phase("fwd+bwd", fwd_bwd)
    phase("fwd", fwd)
    phase("none", rows_none)
    phase("inplace bwd", lambda: L.scale_(logits, torch.empty((), **meta)))
    return out


def linear_launches() -> list[Launch]:
    from triton_xent.backends import triton_ce as L

    rows, D, V = LINEAR
    meta = dict(device="meta")
    logits = torch.empty(rows, V, dtype=torch.bfloat16, **meta)
    target = torch.empty(rows, dtype=torch.int64, **meta)
    sink = []
    with recording(sink):
        dens = L.denominators(target, None, _opts("plain"), divisor=None, V=V, dtype=torch.float32)
        L.ce_forward(logits, target, None, _opts("plain"), dens=dens, compute_grad=True,
                     inplace=True)
        L.scale_(torch.empty(V, D, dtype=torch.bfloat16, **meta), torch.empty((), **meta))
    return [Launch(f"linear chunk {rows}x{V} D={D} bf16", *r) for r in sink]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")


# ------------------------------------------------------------------------------------------------
# Compiling offline
# ------------------------------------------------------------------------------------------------


def _compile(launch: Launch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = tuple(MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a
                 for a in launch.args)
    kwargs = {k: (MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v)
              for k, v in launch.kwargs.items()}
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), options.num_warps)
    return key, lambda: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                       options=options.__dict__)


def _build_with_log(build):
    """Compiles, capturing the ptxas ``-v`` log of Triton's own ptxas run (same ptxas, same
    options as a launch would use)."""
    import io

    from triton import knobs

    buf = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = build()
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    return k, buf.getvalue()


def _ptxas_usage(log: str) -> dict:
    m = re.search(r"Used (\d+) registers", log)
    if m is None:
        raise RuntimeError(f"no ptxas -v figures in the compile log: {log[-2000:]}")
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(m.group(1)), spill=int(st.group(1)) + int(st.group(2)) if st else 0)


def _widths(ptx: str, op: str) -> int:
    best = 0
    for m in re.finditer(rf"\b{op}\.global[\w.:]*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b", ptx):
        best = max(best, int(m.group(1) or 1) * int(m.group(2)) // 8)
    return best


@dataclass
class Row:
    case: str
    kernel: str
    warps: int
    grid: int
    regs: int
    spill: int
    smem: int
    fit: int
    assumed: int
    ld: int
    st: int
    hints: str
    inflight: int
    l2_live: int
    block: int


def _fit(warps: int, regs: int, smem: int) -> int:
    per_warp = math.ceil(regs * 32 / 256) * 256
    fits = [WARPS_PER_SM // warps, REGS_PER_SM // (warps * per_warp), PROGRAMS_PER_SM_MAX]
    if smem:
        fits.append(SMEM_PER_SM // (smem + 1024))
    return max(0, min(fits))


def _row_geometry(launch: Launch, fit: int, sms: int) -> tuple[int, int, int]:
    """(block columns, in-flight logit bytes per SM, L2 live bytes) of one launch."""
    a = dict(zip(launch.fn.arg_names, launch.args)) | launch.kwargs
    block = a.get("BLOCK_V") or a.get("BLOCK") or 0
    logits = a.get("logits_ptr") if "logits_ptr" in a else a.get("t_ptr")
    if not isinstance(logits, torch.Tensor) or not block:
        return block, 0, 0
    elt = logits.element_size()
    per_sm = min(fit, max(1, math.ceil(launch.grid / sms)))
    inflight = per_sm * block * elt
    name = launch.fn.__name__
    live = 0
    if name == "_ce_fused_kernel" and not a.get("SINGLE_BLOCK"):
        live = min(launch.grid, logits.shape[0]) * logits.shape[1] * elt
    elif name == "_ce_partials_kernel":
        live = logits.shape[0] * logits.shape[1] * elt  # the finish re-reads the whole shard
    return block, inflight, live


def report(launches: list[Launch], log=print) -> list[Row]:
    from triton_xent.backends import triton_ce as L

    sms = L.H100.sms
    compiled: dict = {}
    rows = []
    for launch in launches:
        key, build = _compile(launch)
        if key not in compiled:
            k, log_text = _build_with_log(build)
            ptx = k.asm["ptx"]
            usage = _ptxas_usage(log_text)
            hints = ",".join(h for h in ("evict_last", "evict_first") if h in ptx) or "-"
            compiled[key] = dict(usage, smem=int(k.metadata.shared), ld=_widths(ptx, "ld"),
                                 st=_widths(ptx, "st"), hints=hints,
                                 warps=k.metadata.num_warps)
            log(f"  compiled {key[0]} ({len(compiled)})", file=sys.stderr)
        c = compiled[key]
        fit = _fit(c["warps"], c["regs"], c["smem"])
        block, inflight, live = _row_geometry(launch, fit, sms)
        rows.append(Row(launch.case, launch.fn.__name__.strip("_"), c["warps"], launch.grid,
                        c["regs"], c["spill"], c["smem"], fit,
                        max(1, math.ceil(launch.grid / sms)), c["ld"], c["st"], c["hints"],
                        inflight, live, block))
    return rows


def problems(rows: list[Row]) -> list[str]:
    """What the report flags: a spill, or a grid that assumes more programs per SM than fit
    (a persistent grid's extra programs would wait for a second wave)."""
    from triton_xent.backends import triton_ce as L

    out = []
    for r in rows:
        if r.spill:
            out.append(f"{r.case}: {r.kernel} spills {r.spill} B")
        # a persistent grid (fewer programs than work items) must fit in one wave
        if r.kernel in ("ce_fused_kernel", "ce_finish_kernel", "scale_kernel") and \
                r.grid > r.fit * L.H100.sms:
            out.append(f"{r.case}: {r.kernel} grid {r.grid} > {r.fit} x {L.H100.sms} SMs")
    return out


def table(rows: list[Row]) -> str:
    head = ("| case | kernel | warps | block | grid | regs | spill B | smem B | programs/SM fit | "
            "grid/SM | ld B | st B | eviction | in flight /SM | L2 live |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.case} | {r.kernel} | {r.warps} | {r.block or '-'} | {r.grid} | "
                     f"{r.regs} | {r.spill} | {r.smem} | {r.fit} | {r.assumed} | {r.ld} | "
                     f"{r.st} | {r.hints} | {_kb(r.inflight)} | {_mb(r.l2_live)} |")
    return "\n".join(lines)


def _kb(b):
    return f"{b / 1024:.0f} KB" if b else "-"


def _mb(b):
    return f"{b / 1e6:.1f} MB" if b else "-"


def all_launches(quick: bool, cases=None) -> list[Launch]:
    out = []
    if quick or cases:
        for n, v, opt in cases or QUICK:
            out += launches_of(n, v, torch.bfloat16, opt)
        return out
    for opt in OPTIONS:
        for n, v in SHAPES:
            out += launches_of(n, v, torch.bfloat16, opt)
    for n, v in ((8192, 16000), (8192, 32000), (8192, 128256)):
        out += launches_of(n, v, torch.float32, "plain")
    return out + linear_launches()


def main(argv: list[str] | None = None) -> int:
    import triton

    p = argparse.ArgumentParser(prog="python -m bench --compile-report")
    p.add_argument("--compile-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="three cases (CI)")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--case", action="append", metavar="N,V,OPTIONS",
                   help=f"only this case (repeatable); OPTIONS one of {', '.join(OPTIONS)}")
    args, _ = p.parse_known_args(argv)
    cases = None
    if args.case:
        cases = [(int(n), int(v), o) for n, v, o in (c.split(",") for c in args.case)]
    from triton_xent.backends import triton_ce as L

    if L.INTERPRETED:
        raise SystemExit("the compile report compiles the kernels: unset TRITON_INTERPRET")
    import tempfile

    # a fresh cache, so that every kernel goes through ptxas and its -v log is seen
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-report-")
    rows = report(all_launches(args.quick, cases), log=print)
    bad = problems(rows)
    cmd = "python -m bench --compile-report" + (" --quick" if args.quick else "")
    text = (f"Compiled for sm_90 (no GPU) with triton {triton.__version__}, torch "
            f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
            f"UTC, `{cmd}`. Programs/SM fit: by threads, registers and shared memory of an H100 "
            f"SM; grid/SM: what the launcher's grid puts on each of {L.H100.sms} SMs. "
            "In flight: logit bytes one block load brings per SM; L2 live: bytes a second read "
            "expects to find in L2 (50 MB on an H100/H200).\n\n" + table(rows) + "\n\n"
            + ("Problems:\n" + "\n".join(f"- {b}" for b in bad) if bad else "No spill; every "
               "persistent grid fits one wave.") + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bad else 0


def run_compiled(argv: list[str]) -> int:
    """``python -m bench --compile-report``: this module in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.call([sys.executable, "-m", "bench.compile_report", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
