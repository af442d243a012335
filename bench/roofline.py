"""A roofline MODEL of the cross-entropy cases: expected times on an H100 and an H200, no GPU.

``python -m bench --roofline`` prints, per case (bf16, N x V, fwd+bwd or forward only), from the
launch plan of ``triton_xent/backends/triton_ce.py`` (the same function the launcher calls):

* the bytes the design moves with no cache reuse (the traffic meter's count: 1 read + 1 write per
  logit where a row is read once, one more read on the two-sweep and split paths) and the bytes
  expected from DRAM: the second read is served by L2 when the live set between the two reads
  (rows in flight x row bytes; N x V on the split path) fits half the L2; above, the fused
  path's reverse gradient sweep finds about L2_KEEP x L2 of it, the split path none;
* the bandwidth the schedule can draw: ``min(copy bandwidth, busy SMs x bytes in flight per SM /
  latency)`` (Little's law; the bytes in flight per SM are the programs per SM x one block of
  logits);
* the launch count x a fixed cost per launch;
* expected time = launches x cost + DRAM bytes / bandwidth, and the target of the bandwidth issue
  (fwd+bwd: read + write of the logits at 85 % of the copy bandwidth for N = 8192, 60 % below).

Everything here is a MODEL with stated constants (below), not a measurement. The GPU run
(bench/gpu_check.sh) prints its measured times beside these so the first GPU minutes also say
where the model is wrong.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

# Model constants (assumptions, to be replaced by the first GPU run's figures).
LATENCY_S = 1.0e-6  # DRAM round trip under load
LAUNCH_S = 3.0e-6  # one launch on the stream, tail and gap included
GEMM_EFF = 0.70  # achieved fraction of the dense bf16 peak for the fused head's GEMMs
L2_BW_RATIO = 2.0  # L2 read bandwidth / the copy bandwidth (a second read that hits L2 costs this)
L2_KEEP = 0.6  # share of the L2 a reverse second sweep finds still holding its own row's data


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    l2_bytes: int
    copy_bw: float  # bytes/s a device-to-device copy reaches
    nominal_bw: float
    bf16_flops: float  # dense peak


GPUS = (
    Gpu("H100 SXM", 132, 50 << 20, 3.0e12, 3.35e12, 989e12),  # copy: ~3.0 TB/s measured
    Gpu("H200", 132, 50 << 20, 4.3e12, 4.8e12, 989e12),  # copy: assumed 90 % of nominal
)
SHAPES = [(n, v) for n in (16, 256, 8192) for v in (32000, 128256, 262144)]
LINEAR = [(n, 4096, 128256) for n in (8192, 16384)]


@dataclass
class Expect:
    case: str
    path: str
    counted: float  # bytes, no cache reuse
    dram: float
    inflight_sm: int
    l2_live: int
    launches: int
    bw: float
    seconds: float
    target: float | None


def expect(N: int, V: int, grad: bool, gpu: Gpu, dtype=torch.bfloat16) -> Expect:
    from triton_xent.backends import triton_ce as L

    spec = L.DeviceSpec(gpu.name, gpu.sms, gpu.l2_bytes)
    p = L.plan(N, V, dtype, spec, grad=grad)
    elt = torch.empty((), dtype=dtype).element_size()
    logits = N * V * elt
    two_reads = grad and not p.single_block  # a second read of the logits (the gradient sweep)
    counted = logits * (1 + (1 if two_reads else 0) + (1 if grad else 0))
    if p.path == "split":
        live = logits  # the partials read every chunk, then the finish reads it again
        per_sm = min(L.programs_per_sm(p.num_warps), -(-p.programs // gpu.sms))
        busy = min(gpu.sms, p.programs)
        launches = 2 + (1 if grad else 0) + 1  # partials, finish, (bwd check), finalize
    else:
        live = 0 if p.single_block else p.programs * V * elt
        per_sm = -(-p.programs // gpu.sms)
        busy = min(gpu.sms, p.programs)
        launches = 1 + (1 if grad else 0) + 1  # fused, (bwd check), finalize
    if not two_reads:
        live, hit = 0, 0.0
    elif live <= gpu.l2_bytes / 2:
        hit = 1.0
    else:
        hit = 0.0 if p.path == "split" else min(1.0, L2_KEEP * gpu.l2_bytes / live)
    dram = counted - logits * hit
    inflight = per_sm * min(p.block_v, V) * elt
    bw = min(gpu.copy_bw, busy * inflight / LATENCY_S)
    seconds = launches * LAUNCH_S + dram / bw + logits * hit / (L2_BW_RATIO * gpu.copy_bw)
    target = None
    if grad:
        target = 2 * logits / ((0.85 if N >= 8192 else 0.60) * gpu.copy_bw)
    return Expect(f"N={N} V={V} {'fwd+bwd' if grad else 'fwd'}", p.path +
                  ("" if p.path == "split" else " single" if p.single_block else " 2-sweep"),
                  counted, dram, inflight, live, launches, bw, seconds, target)


def linear_expect(N: int, D: int, V: int, gpu: Gpu) -> tuple[str, float]:
    """Three GEMMs (logits, dX, dW) at GEMM_EFF of the peak, plus the CE kernel on the logits
    (read + write in place, bf16) per chunk at the copy bandwidth."""
    flops = 3 * 2 * N * D * V
    return (f"linear N={N} D={D} V={V} fwd+bwd",
            flops / (GEMM_EFF * gpu.bf16_flops) + 4 * N * V / gpu.copy_bw)


def table() -> str:
    lines = ["MODEL, not a measurement (bench/roofline.py; constants: DRAM latency "
             f"{LATENCY_S * 1e6:.1f} us, {LAUNCH_S * 1e6:.0f} us per launch, L2 reads at "
             f"{L2_BW_RATIO:g} x the copy bandwidth, a reverse sweep keeps {L2_KEEP:.0%} of the "
             f"L2, GEMMs at "
             f"{GEMM_EFF:.0%} of the bf16 peak; copy bandwidth "
             + ", ".join(f"{g.name} {g.copy_bw / 1e12:.1f} TB/s" for g in GPUS) + ").", ""]
    head = "| case | path | launches | counted MB | DRAM MB | in flight /SM | L2 live MB |"
    for g in GPUS:
        head += f" {g.name} BW TB/s | {g.name} model us | {g.name} target us |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for grad in (True, False):
        for n, v in SHAPES:
            es = [expect(n, v, grad, g) for g in GPUS]
            e = es[0]
            row = (f"| {e.case} | {e.path} | {e.launches} | {e.counted / 1e6:.1f} | "
                   f"{e.dram / 1e6:.1f} | {e.inflight_sm // 1024} KB | {e.l2_live / 1e6:.1f} |")
            for x in es:
                tgt = f"{x.target * 1e6:.0f}" if x.target else "-"
                row += f" {x.bw / 1e12:.2f} | {x.seconds * 1e6:.0f} | {tgt} |"
            lines.append(row)
    lines += ["", "| fused head | " + " | ".join(f"{g.name} model ms" for g in GPUS) + " |",
              "|---|" + "---:|" * len(GPUS)]
    for n, d, v in LINEAR:
        cells = [linear_expect(n, d, v, g) for g in GPUS]
        lines.append(f"| {cells[0][0]} | " + " | ".join(f"{c[1] * 1e3:.1f}" for c in cells)
                     + " |")
    return "\n".join(lines)


def compare(csv_path: str) -> str:
    """The model beside a finished run's measured times (``results.csv`` of ``python -m
    bench``): each cross-entropy case of ours, the model's time for the run's GPU (an H200 when
    its name says so, else an H100) with the copy bandwidth measured in the same run, the
    measured median, and the other providers' medians."""
    import csv
    import dataclasses

    from bench import report

    rows = report.read_csv(csv_path)
    copies = [r for r in rows if r.kernel == "device_copy" and r.metric == "bandwidth"]
    with open(csv_path, newline="") as f:
        device = next(csv.DictReader(f), {}).get("device", "")
    gpu = GPUS[1] if "H200" in device else GPUS[0]
    if copies:
        gpu = dataclasses.replace(gpu, copy_bw=copies[0].p50 * 1e9)
    times = {}
    for r in rows:
        if r.kernel == "cross_entropy" and r.metric == "time":
            times.setdefault((r.mode, r.dtype, r.N, r.V), {})[r.provider] = r.p50 * 1e3
    others = sorted({p for t in times.values() for p in t if p != "triton_xent"})
    lines = [f"MODEL vs MEASURED ({device}; model of {gpu.name} at the run's copy bandwidth "
             f"{gpu.copy_bw / 1e12:.2f} TB/s; times in us)", "",
             "| case | path | model | ours | model / ours | " + " | ".join(others) + " |",
             "|" + "---|" * (5 + len(others))]
    for (mode, dtype, N, V), t in sorted(times.items()):
        e = expect(N, V, mode == "fwd_bwd", gpu, getattr(torch, dtype))
        ours = t.get("triton_xent")
        lines.append(f"| {mode} {dtype} N={N} V={V} | {e.path} | {e.seconds * 1e6:.0f} | "
                     + (f"{ours:.0f} | {e.seconds * 1e6 / ours:.2f} | " if ours else "- | - | ")
                     + " | ".join(f"{t[p]:.0f}" if p in t else "-" for p in others) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --roofline")
    p.add_argument("--compare", metavar="RESULTS_CSV",
                   help="print the model beside the measured times of a finished run")
    args, _ = p.parse_known_args(argv)
    print(compare(args.compare) if args.compare else table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
