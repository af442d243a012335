"""``python -m bench``: the sweep, its flags, and the default sizes for each kind of machine."""

from __future__ import annotations

import argparse
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
from bench.cases import DTYPES, MODES, OPS, Case
from bench.harness import run_sweep
from bench.providers import BASELINE, PROVIDERS

# Default sweeps. GPU: LLM-sized points in bf16, sized to finish in about 5 minutes on an H100.
# CPU: small enough for about 3 minutes on 2 cores, child-process memory measurements included.
DEFAULTS = {
    ("cuda", False): {
        "cross_entropy": dict(N=[8192], D=[0], V=[32000, 50257, 128256, 152064, 262144]),
        "linear_cross_entropy": dict(N=[8192], D=[4096], V=[32000, 128256, 262144]),
        "modes": ["fwd", "fwd_bwd"], "dtypes": ["bfloat16"],
    },
    ("cuda", True): {
        "cross_entropy": dict(N=[4096], D=[0], V=[32000, 128256]),
        "linear_cross_entropy": dict(N=[4096], D=[2048], V=[128256]),
        "modes": ["fwd_bwd"], "dtypes": ["bfloat16"],
    },
    ("cpu", False): {
        "cross_entropy": dict(N=[512], D=[0], V=[32000, 128256]),
        "linear_cross_entropy": dict(N=[512], D=[256], V=[32000]),
        "modes": ["fwd_bwd"], "dtypes": ["float32"],
    },
    ("cpu", True): {
        "cross_entropy": dict(N=[256], D=[0], V=[4096, 32000]),
        "linear_cross_entropy": dict(N=[256], D=[128], V=[8192]),
        "modes": ["fwd_bwd"], "dtypes": ["float32"],
    },
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time, bandwidth/TFLOP/s and peak memory of cross-entropy implementations. "
                    "Without arguments: the default sweep for this machine (GPU if present).")
    p.add_argument("--op", choices=[*OPS, "both"], default="both")
    p.add_argument("--mode", nargs="+", choices=MODES, help="default: fwd fwd_bwd on GPU, "
                   "fwd_bwd on CPU")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: bfloat16 on GPU, "
                   "float32 on CPU")
    p.add_argument("--V", nargs="+", type=int, help="vocabulary sizes, e.g. 32000 50257 128256 "
                   "152064 262144")
    p.add_argument("--N", nargs="+", type=int, help="token counts (rows)")
    p.add_argument("--D", nargs="+", type=int, help="hidden sizes (linear_cross_entropy)")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", help="output folder (default bench/results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="a few small points, fewer repetitions")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--baseline", default=BASELINE, choices=list(PROVIDERS),
                   help="provider that speed-ups are relative to")
    p.add_argument("--native-batch-chunk", type=_chunk, default=1024,
                   help="batch_chunk_size of torch's LinearCrossEntropyOptions for the "
                        "torch_native_linear_ce provider (default 1024 rows; 'auto': torch's "
                        "aspect-ratio heuristic)")
    p.add_argument("--list-providers", action="store_true")
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


def build_cases(args, device: str) -> tuple[list[Case], dict[str, str]]:
    d = DEFAULTS[(device, args.quick)]
    ops = OPS if args.op == "both" else (args.op,)
    modes = args.mode or d["modes"]
    dtypes = args.dtype or d["dtypes"]
    cases = []
    for op in ops:
        Ns = args.N or d[op]["N"]
        Ds = [0] if op == "cross_entropy" else (args.D or d[op]["D"])
        Vs = args.V or d[op]["V"]
        for mode, dtype, N, D, V in itertools.product(modes, dtypes, Ns, Ds, Vs):
            cases.append(Case(op, mode, dtype, N, V, D, device))
    # x axis, per op: V unless only another dimension varies.
    x_names = {}
    for op in ops:
        mine = [c for c in cases if c.op == op]
        x_names[op] = next((k for k in ("V", "N", "D") if len({getattr(c, k) for c in mine}) > 1),
                           "V")
    return cases, x_names


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_providers:
        for p in PROVIDERS.values():
            print(f"{p.name:<24} {', '.join(p.ops):<36} {p.doc}")
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    name, slug = device_info(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", slug)
    os.makedirs(out, exist_ok=True)
    cases, x_names = build_cases(args, device)
    n_steps = sum(1 for c in cases for p in args.providers if c.op in PROVIDERS[p].ops)
    print(f"bench: {len(cases)} cases x providers = {n_steps} runs on {name}; torch "
          f"{torch.__version__}; output {out}", flush=True)
    if device == "cpu":
        print("bench: on CPU, triton_xent's backend='auto' is its torch backend (the Triton "
              "kernel needs CUDA; the interpreter is not timed)", flush=True)

    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    progress = _Progress(n_steps)
    try:
        res = run_sweep(cases, list(args.providers), x_names=x_names,
                        opts={"native_batch_chunk": args.native_batch_chunk},
                        memory=not args.no_memory, quick=args.quick, progress=progress,
                        log=progress.log)
    finally:
        progress.close()

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    meta = {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": _commit(),
            "time": started}
    # A folder holds one run: drop the outputs of an earlier one (e.g. plots of another op).
    for f in ["results.csv", "skipped.csv"] + [f"{op}_{what}.png" for op in OPS
                                               for what in ("time", "memory", "speedup")]:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    csv_path = os.path.join(out, "results.csv")
    report.write_csv(csv_path, res.rows, meta)
    report.write_skipped(os.path.join(out, "skipped.csv"), res)
    pngs = [] if args.no_plots else report.plot_all(res.rows, out, name, args.baseline)

    print()
    print(f"== {name} | torch {meta['torch']} | triton {triton_version} | commit "
          f"{meta['commit']} | {meta['time']} ==")
    if res.skipped:
        print("skipped:")
        seen = set()
        for s in res.skipped:
            key = (s["kernel"], s["provider"], s["reason"])
            if key not in seen:
                seen.add(key)
                print(f"  {s['kernel']:<21} {s['provider']:<23} {s['reason']}")
    print(f"wrote {csv_path}, skipped.csv and {len(pngs)} PNG(s); sweep took "
          f"{time.time() - t0:.0f}s")
    print(report.table(res.rows, args.baseline))
    return 0
