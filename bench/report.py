"""Outputs of a sweep: the CSV (one row per kernel, provider, mode, metric and x), skipped.csv,
PNG plots (time, peak memory and speed-up against x, device name in the title), a stdout table.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import asdict

from bench.harness import Row, SweepResult

CSV_COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x", "p50", "p20", "p80",
               "dtype", "N", "D", "V", "device", "torch", "triton", "commit", "time", "note"]
REFERENCE_KERNELS = ("device_copy", "matmul")


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_csv(path: str, rows: list[Row], meta: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            d = {**asdict(r), **meta}
            w.writerow({k: _fmt(d[k]) for k in CSV_COLUMNS})


def write_skipped(path: str, res: SweepResult) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kernel", "provider", "case", "reason"])
        w.writeheader()
        w.writerows(res.skipped)


# --- plots -------------------------------------------------------------------------------------

def _group_key(r: Row) -> tuple:
    dims = [(k, getattr(r, k)) for k in ("N", "D", "V") if k != r.x_name]
    if r.kernel == "cross_entropy":
        dims = [(k, v) for k, v in dims if k != "D"]
    return (r.mode, r.dtype, *(f"{k}={v}" for k, v in dims))


def _series(rows: list[Row], kernel: str, metric: str):
    """{group: {provider: [(x, p50, p20, p80)]}} sorted by x."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.kernel == kernel and r.metric == metric:
            out[_group_key(r)][r.provider].append((r.x, r.p50, r.p20, r.p80))
    for g in out.values():
        for pts in g.values():
            pts.sort()
    return out


def _speedups(rows: list[Row], kernel: str, baseline: str):
    t = _series(rows, kernel, "time")
    out: dict = defaultdict(lambda: defaultdict(list))
    for g, provs in t.items():
        base = dict((x, p50) for x, p50, _, _ in provs.get(baseline, []))
        for p, pts in provs.items():
            for x, p50, _, _ in pts:
                if x in base:
                    out[g][p].append((x, base[x] / p50, None, None))
    return out


def _order(provider: str) -> int:
    from bench.providers import PROVIDERS

    names = list(PROVIDERS)
    return names.index(provider) if provider in names else len(names)


def _color(provider: str) -> str:
    return f"C{_order(provider) % 10}"  # the same colour for a provider in every figure


def plot_all(rows: list[Row], out_dir: str, device_name: str, baseline: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kernels = sorted({r.kernel for r in rows} - set(REFERENCE_KERNELS))
    for kernel in kernels:
        x_name = next(r.x_name for r in rows if r.kernel == kernel)
        panels = [
            ("time", _series(rows, kernel, "time"), "time (ms, median, 20-80% band)", True),
            ("memory", _series(rows, kernel, "peak_memory"), "peak memory beyond inputs (MiB)",
             False),
            ("speedup", _speedups(rows, kernel, baseline), f"speed-up over {baseline}", False),
        ]
        for what, series, ylabel, logy in panels:
            if not series:
                continue
            groups = sorted(series)
            ncols = min(len(groups), 2)
            nrows = math.ceil(len(groups) / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows),
                                     squeeze=False)
            for ax, g in zip(axes.flat, groups):
                for prov, pts in sorted(series[g].items(), key=lambda kv: _order(kv[0])):
                    xs = [p[0] for p in pts]
                    ys = [p[1] for p in pts]
                    k = _order(prov)  # marker and size differ so that equal curves stay visible
                    (line,) = ax.plot(xs, ys, marker="os^vDP*X"[k % 8], ms=9 - 0.6 * (k % 8),
                                      ls=("-", "--", ":", "-.")[k % 4], label=prov,
                                      color=_color(prov))
                    if pts[0][2] is not None and len(pts) > 1:
                        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts],
                                        alpha=0.2, color=line.get_color())
                xs_all = sorted({p[0] for pts in series[g].values() for p in pts})
                if xs_all and xs_all[-1] > 4 * xs_all[0]:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(xs_all, [str(x) for x in xs_all], rotation=30, fontsize=8)
                ax.minorticks_off()
                if logy and any(p[1] > 0 for s in series[g].values() for p in s):
                    ax.set_yscale("log")
                if what == "speedup":
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_title(" ".join(g), fontsize=10)
                ax.set_xlabel(x_name)
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            for ax in list(axes.flat)[len(groups):]:
                ax.set_visible(False)
            fig.suptitle(f"{kernel}: {what} on {device_name}")
            fig.tight_layout()
            path = os.path.join(out_dir, f"{kernel}_{what}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


# --- stdout table ------------------------------------------------------------------------------

def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def table(rows: list[Row], baseline: str) -> str:
    """Per (kernel, mode, dtype, fixed dims): x down, providers across; three blocks: median time
    with speed-up over the baseline, fraction of the copy / matmul rate, peak memory."""
    lines = []
    for r in rows:
        if r.kernel in REFERENCE_KERNELS:
            lines.append(f"{r.kernel} ({r.dtype}, {r.x_name}={r.x}, {r.note.split('; ')[-1]}): "
                         f"{r.p50:.4g} {r.unit}")
    cells = defaultdict(dict)  # (kernel, group) -> (metric, x, provider) -> Row
    for r in rows:
        if r.kernel not in REFERENCE_KERNELS:
            cells[(r.kernel, _group_key(r))][(r.metric, r.x, r.provider)] = r
    for (kernel, group), m in sorted(cells.items()):
        provs = list(dict.fromkeys(p for (met, _, p) in m if met == "time"))
        xs = sorted({x for (met, x, _) in m if met == "time"})
        if not provs:
            continue
        x_name = next(iter(m.values())).x_name
        ws = [max(13, len(p) + 2) for p in provs]
        frac = "bandwidth_frac" if kernel == "cross_entropy" else "tflops_frac"
        blocks = [
            ("time", f"median ms (speed-up over {baseline})"),
            (frac, "% of " + ("copy bandwidth" if kernel == "cross_entropy" else "matmul rate")),
            ("peak_memory", "peak MiB beyond inputs"),
        ]
        lines += ["", f"== {kernel} {' '.join(group)}"]
        for metric, title in blocks:
            if not any(k[0] == metric for k in m):
                continue
            lines.append(f"  {title}")
            lines.append(f"  {x_name:>8}" + "".join(f"{p:>{w}}" for p, w in zip(provs, ws)))
            for x in xs:
                out = []
                for p in provs:
                    r = m.get((metric, x, p))
                    if r is None:
                        out.append("-")
                    elif metric == "time":
                        b = m.get(("time", x, baseline))
                        sp = f" {b.p50 / r.p50:.2f}x" if b else ""
                        out.append(f"{_ms(r.p50)}{sp}")
                    elif metric == frac:
                        out.append(f"{100 * r.p50:.1f}%")
                    else:
                        out.append(f"{r.p50:.1f}")
                lines.append(f"  {x:>8}" + "".join(f"{c:>{w}}" for c, w in zip(out, ws)))
    return "\n".join(lines)
