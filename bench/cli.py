"""``python -m bench``: the sweep, its flags, and the default sizes for each kind of machine."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import os
import platform
import re
import subprocess
import sys
import time

import torch

from bench import report
from bench.cases import DTYPES, MODES, OPS, Case, Series
from bench.harness import run_sweep, unique_cases
from bench.providers import BASELINE, DEFAULT_PROVIDERS, OURS, PROVIDERS

# Default sweeps: curves of (op, x axis, fixed sizes, points), each point a size or a dict of
# sizes, measured in this order (fwd_bwd of every curve first).
# GPU: LLM sizes in bf16 (CE against V at N=8192 and against N at V=128256; the fused head at
# the three reference shapes: Llama 3, V=262144, and Gemma 2 2B with its softcap of 30).
# CPU: fp32, small enough for under 3 minutes on 2 cores (timed in bench/README.md).
_LLM_HEADS = [dict(N=8192, D=4096, V=128256), dict(N=8192, D=4096, V=262144),
              dict(N=8192, D=2304, V=256000, softcap=30.0)]
# The sizes that --N/--V/--D leave out when they are given.
_GPU_FIXED = {"cross_entropy": dict(N=8192, V=128256), "linear_cross_entropy": _LLM_HEADS[0]}
_CPU_FIXED = {"cross_entropy": dict(N=128, V=32000),
              "linear_cross_entropy": dict(N=256, D=128, V=32000)}
_CPU_QUICK_FIXED = {"cross_entropy": dict(N=64, V=4096),
                    "linear_cross_entropy": dict(N=64, D=64, V=4096)}
DEFAULTS = {
    # The decisive grid first (N = 16, 256, 8192 x V = 32000, 128256, 262144, then the fused
    # head at D=4096 V=128256), so that a run cut short by its budget still has it; then the
    # points between.
    ("cuda", False): dict(dtype="bfloat16", modes=["fwd_bwd", "fwd"], fixed=_GPU_FIXED, curves=[
        ("cross_entropy", "N", dict(V=32000), [16, 256, 8192]),
        ("cross_entropy", "N", dict(V=128256), [16, 256, 8192]),
        ("cross_entropy", "N", dict(V=262144), [16, 256, 8192]),
        ("linear_cross_entropy", "shape", {}, _LLM_HEADS[:1]),
        ("cross_entropy", "V", dict(N=8192), [32000, 50257, 128256, 152064, 262144]),
        ("cross_entropy", "N", dict(V=128256), [16, 256, 1024, 8192]),
        ("linear_cross_entropy", "shape", {}, _LLM_HEADS),
    ]),
    ("cuda", True): dict(dtype="bfloat16", modes=["fwd_bwd"], fixed=_GPU_FIXED, curves=[
        ("cross_entropy", "V", dict(N=8192), [32000, 128256, 262144]),
        ("linear_cross_entropy", "shape", {}, [_LLM_HEADS[0], _LLM_HEADS[2]]),
        ("cross_entropy", "N", dict(V=128256), [16, 1024, 8192]),
    ]),
    ("cpu", False): dict(dtype="float32", modes=["fwd_bwd"], fixed=_CPU_FIXED, curves=[
        ("cross_entropy", "V", dict(N=128), [8192, 32000, 65536, 128256]),
        ("cross_entropy", "N", dict(V=32000), [16, 64, 128, 512]),
        ("linear_cross_entropy", "V", dict(N=256, D=128), [8192, 16384, 32000, 65536]),
        ("linear_cross_entropy", "N", dict(V=32000, D=128), [64, 128, 256, 512]),
    ]),
    ("cpu", True): dict(dtype="float32", modes=["fwd_bwd"], fixed=_CPU_QUICK_FIXED, curves=[
        ("cross_entropy", "V", dict(N=64), [1024, 4096]),
        ("cross_entropy", "N", dict(V=4096), [16, 64]),
        ("linear_cross_entropy", "V", dict(N=64, D=64), [1024, 4096]),
        ("linear_cross_entropy", "N", dict(V=4096, D=64), [16, 64]),
    ]),
}
# Linear cross-entropy computes its gradients during the forward when inputs require grad
# (ours, Liger, CCE), so "fwd" would compare unlike things: by default it is timed fwd_bwd only.
LINEAR_DEFAULT_MODES = ["fwd_bwd"]
MODES_FIRST = ("fwd_bwd", "fwd")  # measuring order


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput, time and peak memory of cross-entropy implementations, against "
                    "V and against N. Without arguments: the default sweep for this machine "
                    "(GPU if present).")
    p.add_argument("--op", choices=[*OPS, "both"], default="both")
    p.add_argument("--mode", nargs="+", choices=MODES, help="default: fwd_bwd fwd for "
                   "cross_entropy on GPU, fwd_bwd otherwise")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: bfloat16 on GPU, "
                   "float32 on CPU")
    p.add_argument("--V", nargs="+", type=int, help="vocabulary sizes, e.g. 32000 50257 128256 "
                   "152064 262144 (with --N/--D: their product replaces the default curves)")
    p.add_argument("--N", nargs="+", type=int, help="token counts (rows)")
    p.add_argument("--D", nargs="+", type=int, help="hidden sizes (linear_cross_entropy)")
    p.add_argument("--softcap", type=float, default=0.0, help="Gemma-2-style logit softcap "
                   "(0: none) for the cases given by --N/--V/--D")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=DEFAULT_PROVIDERS,
                   help="default: all but triton_xent_torch")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", help="output folder (default bench/results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="fewer points, fewer repetitions (with "
                   "--compile-report: three cases)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="start no provider run after S seconds (the rest is reported skipped)")
    p.add_argument("--threads", type=int, default=1, metavar="T",
                   help="CPU only: torch threads (default 1: on a machine shared with other "
                        "jobs, a second thread mostly waits for a core; 0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--baseline", default=BASELINE, choices=list(PROVIDERS),
                   help="provider that speed-ups are relative to")
    p.add_argument("--native-batch-chunk", type=_chunk, default=1024,
                   help="batch_chunk_size of torch's LinearCrossEntropyOptions for the "
                        "torch_native_linear_ce provider (default 1024 rows; 'auto': torch's "
                        "aspect-ratio heuristic)")
    p.add_argument("--list-providers", action="store_true")
    p.add_argument("--list-cases", action="store_true", help="print the cases and exit")
    p.add_argument("--replot", metavar="DIR", help="redraw the PNGs and tables of DIR/results.csv "
                   "(a finished run) and exit")
    p.add_argument("--host", action="store_true",
                   help="print the host time of one public forward+backward with the kernel "
                   "launches recorded instead of run, next to F.cross_entropy's, and the files "
                   "and Python calls it runs (CPU, interpreter; see bench/host.py) and exit")
    p.add_argument("--traffic", action="store_true",
                   help="count bytes per logit and launches of every path under the Triton "
                   "interpreter (no GPU needed; see bench/traffic.py) and exit")
    p.add_argument("--compile-report", action="store_true",
                   help="compile every launch the launcher would make for sm_90 (no GPU) and "
                   "print registers, spills, occupancy, in-flight bytes (bench/compile_report.py)")
    p.add_argument("--roofline", action="store_true",
                   help="print the roofline model's expected times per case (bench/roofline.py)")
    return p


def _chunk(s: str):
    return "auto" if s == "auto" else int(s)


def device_info(device: str) -> tuple[str, str]:
    """(human name, folder slug) of the device that runs the sweep."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"{model} ({cores} cores, CPU)"
        model = f"cpu-{model}-{cores}c"
    slug = re.sub(r"[^a-z0-9]+", "-", (name if device == "cuda" else model).lower()).strip("-")
    return name, slug


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _series_of(cases: list[Case]) -> list[Series]:
    """Curves through a product grid: for each size that varies, one curve per value of the
    others (a grid of V x N gives curves against V and curves against N)."""
    out = []
    for x_name in ("V", "N", "D"):
        if len({getattr(c, x_name) for c in cases}) < 2:
            continue
        groups: dict[tuple, list[Case]] = {}
        for c in cases:
            key = tuple(v for k, v in c.to_dict().items() if k != x_name)
            groups.setdefault(key, []).append(c)
        out += [Series(x_name, tuple(g)) for g in groups.values()]
    return out or [Series("V", (c,)) for c in cases]


def build_series(args, device: str) -> list[Series]:
    """The curves to measure: the machine's defaults in their listed order, or the product grid
    of --N/--V/--D. fwd_bwd comes before fwd, so that a run cut short by its time budget has
    the main mode of the first curves."""
    d = DEFAULTS[(device, args.quick)]
    ops = OPS if args.op == "both" else (args.op,)
    dtypes = args.dtype or [d["dtype"]]

    def modes(op: str) -> list[str]:
        m = args.mode or (d["modes"] if op == "cross_entropy" else LINEAR_DEFAULT_MODES)
        return sorted(m, key=("fwd_bwd", "fwd").index)

    out: list[tuple[int, Series]] = []
    if args.N or args.V or args.D:
        for op in ops:
            f = d["fixed"][op]  # sizes that the flags leave out
            Ns, Vs = args.N or [f["N"]], args.V or [f["V"]]
            Ds = [0] if op == "cross_entropy" else (args.D or [f["D"]])
            for mode in modes(op):
                cases = [Case(op, mode, dtype, N, V, D, device, args.softcap)
                         for dtype, N, D, V in itertools.product(dtypes, Ns, Ds, Vs)]
                out += [(MODES_FIRST.index(mode), s) for s in _series_of(cases)]
        return [s for _, s in sorted(out, key=lambda t: t[0])]
    for op, x_name, fixed, points in d["curves"]:
        if op not in ops:
            continue
        for mode, dtype in itertools.product(modes(op), dtypes):
            cases = []
            for p in points:
                sizes = {"N": 0, "D": 0, "V": 0, **fixed, **(p if isinstance(p, dict) else {x_name: p})}
                cases.append(Case(op, mode, dtype, sizes["N"], sizes["V"], sizes["D"], device,
                                  float(sizes.get("softcap", 0.0))))
            out.append((MODES_FIRST.index(mode), Series(x_name, tuple(cases))))
    return [s for _, s in sorted(out, key=lambda t: t[0])]  # stable: fwd_bwd first


class _Progress:
    """tqdm when installed, else one line per step (a bar on a terminal)."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, time.time()
        self.bar = None
        if sys.stderr.isatty():  # logs get one plain line per step
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, label: str) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.set_description(label[-60:])
            self.bar.update(1)
            return
        done = int(20 * (self.i - 1) / max(self.total, 1))
        line = (f"[{'#' * done}{'.' * (20 - done)}] {self.i}/{self.total} "
                f"{time.time() - self.t0:5.0f}s {label}")
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            if sys.stderr.isatty():
                sys.stderr.write("\n")
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\n")


def _versions() -> str:
    """Versions of the measured libraries that are importable here."""
    from importlib import metadata

    out = []
    for dist in ("triton", "liger-kernel", "cut-cross-entropy"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def output_files(out: str) -> list[str]:
    """The files a run writes (and replaces) in its output folder."""
    return [os.path.join(out, f) for f in sorted(os.listdir(out))
            if f in ("results.csv", "skipped.csv")
            or (f.endswith(".png") and f.startswith(tuple(f"{op}_" for op in OPS)))]


def _plots(rows, out: str, name: str, baseline: str) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench: no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    return report.plot_all(rows, out, name, baseline)


def _replot(folder: str, baseline: str, no_plots: bool) -> int:
    path = os.path.join(folder, "results.csv")
    rows = report.read_csv(path)
    with open(path, newline="") as f:
        first = next(csv.DictReader(f), {})
    pngs = [] if no_plots else _plots(rows, folder, first.get("device", "?"), baseline)
    print(f"{path}: {len(rows)} rows, {len(pngs)} PNG(s) redrawn")
    print(report.table(rows, baseline))
    print()
    print(report.summary(rows, OURS))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep; returns 0, or 3 when the time budget or an interrupt cut it short."""
    args = _parser().parse_args(argv)
    if args.list_providers:
        for p in PROVIDERS.values():
            print(f"{p.name:<24} {', '.join(p.ops):<36} {p.doc}")
        return 0
    if args.traffic:
        from bench import traffic

        return traffic.run_in_interpreter(["--out", args.out] if args.out else [])
    if args.host:
        from bench import host

        return host.run_in_interpreter(["--quick"] if args.quick else [])
    if args.compile_report:
        from bench import compile_report

        return compile_report.run_compiled((["--out", args.out] if args.out else [])
                                           + (["--quick"] if args.quick else []))
    if args.roofline:
        from bench import roofline

        return roofline.main([])
    if args.replot:
        return _replot(args.replot, args.baseline, args.no_plots)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    series = build_series(args, device)
    cases, _ = unique_cases(series)
    if args.list_cases:  # also without the device: to see what a GPU run would measure
        for c in cases:
            print(c.label())
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    t0 = time.time()
    name, slug = device_info(device)
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        n = torch.get_num_threads()
        name = f"{name[:-1]}, {n} thread{'s' if n > 1 else ''})"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", slug)
    os.makedirs(out, exist_ok=True)
    n_steps = sum(1 for c in cases for p in args.providers if c.op in PROVIDERS[p].ops)
    print(f"bench: {len(cases)} cases x providers = {n_steps} runs on {name}; torch "
          f"{torch.__version__}; output {out}", flush=True)
    if device == "cpu":
        print("bench: on CPU, triton_xent's backend='auto' is its torch backend (the Triton "
              "kernel needs CUDA; the interpreter is not timed)", flush=True)

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    meta = {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": _commit(), "time": started}
    # A folder holds one run: drop the outputs of an earlier one (e.g. plots of another op).
    for f in output_files(out):
        os.remove(f)
    csv_path = os.path.join(out, "results.csv")

    def save(res) -> None:  # after every case: a run cut short keeps what it measured
        report.write_csv(csv_path, res.all_rows(), meta)
        report.write_skipped(os.path.join(out, "skipped.csv"), res)

    progress = _Progress(n_steps)
    deadline = t0 + args.time_budget if args.time_budget is not None else None
    try:
        res = run_sweep(series, list(args.providers),
                        opts={"native_batch_chunk": args.native_batch_chunk},
                        memory=not args.no_memory, quick=args.quick, deadline=deadline,
                        progress=progress, log=progress.log, on_case=save)
    finally:
        progress.close()
    save(res)
    rows = res.all_rows()
    pngs = [] if args.no_plots else _plots(rows, out, name, args.baseline)

    print()
    print(f"== {name} | torch {meta['torch']} | {_versions()} | commit {meta['commit']} | "
          f"{meta['time']} ==")
    if res.skipped:
        print("skipped:")
        seen = set()
        for s in res.skipped:
            key = (s["kernel"], s["provider"], s["reason"])
            if key not in seen:
                seen.add(key)
                print(f"  {s['kernel']:<21} {s['provider']:<23} {s['reason']}")
    print(f"wrote {csv_path}, skipped.csv and {len(pngs)} PNG(s); sweep took "
          f"{time.time() - t0:.0f}s{'' if res.complete else ' (CUT SHORT: see skipped)'}")
    print(report.table(rows, args.baseline))
    print()
    print(report.summary(rows, OURS))
    return 0 if res.complete else 3
