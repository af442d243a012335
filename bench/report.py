"""Outputs of a sweep: the CSV (one row per kernel, provider, mode, metric and x), skipped.csv,
one PNG per (op, mode, dtype) with throughput, fraction of the copy / matmul rate, speed-up and
peak memory against V and against N, the bytes-per-logit chart, and two stdout tables.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import asdict

from bench.harness import Row, SweepResult

CSV_COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x", "p50", "p20", "p80",
               "dtype", "N", "D", "V", "softcap", "device", "torch", "triton", "commit", "time",
               "note"]
REFERENCE_KERNELS = ("device_copy", "matmul")
SHORT = {"cross_entropy": "CE", "linear_cross_entropy": "LCE"}


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


def read_csv(path: str) -> list[Row]:
    """The rows of a ``results.csv`` (e.g. to plot or tabulate a finished run again)."""
    ints, floats = ("N", "D", "V"), ("p50", "p20", "p80", "softcap")
    out = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            kw = {k: d[k] for k in Row.__dataclass_fields__ if k in d}
            for k in ints:
                kw[k] = int(kw[k])
            for k in floats:
                kw[k] = float(kw[k]) if kw.get(k) not in (None, "") else None
            kw["softcap"] = kw["softcap"] or 0.0
            kw["x"] = int(kw["x"]) if kw["x"].lstrip("-").isdigit() else kw["x"]
            out.append(Row(**kw))
    return out


def write_skipped(path: str, res: SweepResult) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kernel", "provider", "case", "reason"])
        w.writeheader()
        w.writerows(res.skipped)


# --- grouping ----------------------------------------------------------------------------------

def _fixed(r: Row) -> str:
    """The sizes a curve holds fixed: all but its x (none for a curve over named shapes)."""
    if r.x_name == "shape":
        return ""
    dims = [("N", r.N), ("V", r.V)] + ([("D", r.D)] if r.kernel == "linear_cross_entropy" else [])
    words = [f"{k}={v}" for k, v in dims if k != r.x_name]
    return " ".join(words + ([f"softcap={r.softcap:g}"] if r.softcap else []))


def _curve(r: Row) -> tuple[str, str]:
    return (r.x_name, _fixed(r))


def _case_key(r: Row) -> tuple:
    return (r.kernel, r.mode, r.dtype, r.N, r.D, r.V, r.softcap)


def _case_name(key: tuple) -> str:
    kernel, mode, dtype, N, D, V, cap = key
    d = f" D={D}" if kernel == "linear_cross_entropy" else ""
    c = f" cap={cap:g}" if cap else ""
    return f"{SHORT.get(kernel, kernel)} {mode} {dtype} N={N}{d} V={V}{c}"


def _order(provider: str) -> int:
    from bench.providers import PROVIDERS

    names = list(PROVIDERS)
    return names.index(provider) if provider in names else len(names)


def _color(provider: str) -> str:
    return f"C{_order(provider) % 10}"  # the same colour for a provider in every figure


def _points(rows: list[Row], metric: str) -> dict[str, list[Row]]:
    """{provider: rows of the metric} in x order (numbers sorted; named shapes as measured)."""
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.metric == metric:
            out[r.provider].append(r)
    for pts in out.values():
        if pts and not isinstance(pts[0].x, str):
            pts.sort(key=lambda r: r.x)
    return out


def _speedup_rows(rows: list[Row], baseline: str) -> list[Row]:
    base = {(_case_key(r), r.x_name): r.p50 for r in rows
            if r.metric == "time" and r.provider == baseline}
    out = []
    for r in rows:
        b = base.get((_case_key(r), r.x_name))
        if r.metric == "time" and b:
            out.append(Row(**{**asdict(r), "metric": "speedup", "unit": "x", "p50": b / r.p50,
                              "p20": b / r.p80, "p80": b / r.p20}))
    return out


# --- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, series: dict[str, list[Row]], logy: bool) -> None:
    """One curve per provider (a 20-80 % band where there is one); grouped bars when x names
    shapes rather than sizes."""
    provs = sorted(series, key=_order)
    xs = list(dict.fromkeys(r.x for p in provs for r in series[p]))
    if xs and isinstance(xs[0], str):  # categorical: grouped bars
        width = 0.8 / max(len(provs), 1)
        for i, prov in enumerate(provs):
            pos = {r.x: r for r in series[prov]}
            idx = [k for k, x in enumerate(xs) if x in pos]
            vals = [pos[xs[k]].p50 for k in idx]
            ax.bar([k - 0.4 + (i + 0.5) * width for k in idx], vals, width, label=prov,
                   color=_color(prov))
        ax.set_xticks(range(len(xs)), [x.replace(" ", "\n") for x in xs], fontsize=7)
    else:
        xs = sorted(xs)
        for prov in provs:
            pts = series[prov]
            k = _order(prov)  # markers and dashes differ so that equal curves stay visible
            ax.plot([r.x for r in pts], [r.p50 for r in pts], marker="os^vDP*X"[k % 8],
                    ms=8 - 0.5 * (k % 8), ls=("-", "--", ":", "-.")[k % 4], label=prov,
                    color=_color(prov))
            if len(pts) > 1 and all(r.p20 is not None for r in pts):
                ax.fill_between([r.x for r in pts], [r.p20 for r in pts], [r.p80 for r in pts],
                                alpha=0.15, color=_color(prov))
        if xs and xs[-1] > 4 * xs[0]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs], rotation=30, fontsize=8)
        ax.minorticks_off()
    if logy and any(r.p50 > 0 for pts in series.values() for r in pts):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def plot_all(rows: list[Row], out_dir: str, device_name: str, baseline: str) -> list[str]:
    """One figure per (op, mode, dtype): columns are the curves (against V, against N, over
    named shapes), rows are throughput, fraction of the copy (CE) or matmul (LCE) rate of the
    same run, speed-up over ``baseline`` and peak memory. Returns the paths written."""
    plt = _pyplot()
    copy = max((r.p50 for r in rows if r.kernel == "device_copy"), default=None)
    rows = rows + _speedup_rows(rows, baseline)
    figs: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.kernel not in REFERENCE_KERNELS:
            figs[(r.kernel, r.mode, r.dtype)].append(r)
    written = []
    for (kernel, mode, dtype), mine in sorted(figs.items()):
        curves = sorted({_curve(r) for r in mine},
                        key=lambda c: (("V", "N", "D", "shape").index(c[0]), c[1]))
        frac = "bandwidth_frac" if kernel == "cross_entropy" else "tflops_frac"
        frac_label = ("% of copy bandwidth" + (f" ({copy:.0f} GB/s)" if copy else "")
                      if kernel == "cross_entropy" else "% of matmul rate")
        panels = [("throughput", "tokens/s (median)", True), (frac, frac_label, False),
                  ("speedup", f"speed-up over {baseline}", False),
                  ("peak_memory", "peak memory beyond inputs (MiB)", False)]
        panels = [p for p in panels if any(r.metric == p[0] for r in mine)]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), len(curves), squeeze=False,
                                 figsize=(5.6 * len(curves), 3.3 * len(panels)))
        for j, curve in enumerate(curves):
            on_curve = [r for r in mine if _curve(r) == curve]
            for i, (metric, ylabel, logy) in enumerate(panels):
                ax = axes[i][j]
                series = _points(on_curve, metric)
                if metric.endswith("_frac"):  # plotted in percent
                    series = {p: [Row(**{**asdict(r), "p50": 100 * r.p50,
                                         "p20": 100 * r.p20, "p80": 100 * r.p80}) for r in pts]
                              for p, pts in series.items()}
                _draw(ax, series, logy)
                if metric == "speedup":
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                if i == 0:
                    where = f" at {curve[1]}" if curve[1] else ""
                    ax.set_title(("over shapes" if curve[0] == "shape" else f"against {curve[0]}")
                                 + where, fontsize=10)
                if i == len(panels) - 1:
                    ax.set_xlabel("" if curve[0] == "shape" else curve[0])
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=9)
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        labels = sorted(handles, key=_order)
        fig.legend([handles[k] for k in labels], labels, loc="upper center", ncol=len(labels),
                   fontsize=8, bbox_to_anchor=(0.5, 0.985))
        fig.suptitle(f"{kernel} {mode} {dtype} on {device_name}", y=0.998, fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.955))
        path = os.path.join(out_dir, f"{kernel}_{mode}_{dtype}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def plot_traffic(rows: list[tuple[str, float, float]], path: str,
                 title: str = "bytes moved per logit (counted, no cache reuse)") -> str:
    """A bar per case of its counted bytes per logit, with its floor marked.

    Args:
        rows: ``(case name, bytes per logit, floor in bytes per logit)`` for each case.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(rows) + 1.3))
    ys = range(len(rows))
    vals = [r[1] for r in rows]
    ax.barh(ys, vals, color=["C3" if v > f * 1.0125 else "C2" for _, v, f in rows], height=0.6)
    for y, (_, v, f) in zip(ys, rows):
        ax.plot([f, f], [y - 0.4, y + 0.4], color="black", lw=2)
        ax.text(v, y, f" {v:.2f} (floor {f:g})", va="center", fontsize=8)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3 * max([*vals, *(r[2] for r in rows), 1e-9]))
    ax.set_xlabel("bytes per logit (black: floor)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --- stdout tables -----------------------------------------------------------------------------

def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _reference_lines(rows: list[Row]) -> list[str]:
    return [f"{r.kernel} ({r.dtype}, {r.x_name}={r.x}, {r.note.split('; ')[-1]}): "
            f"{r.p50:.4g} {r.unit}" for r in rows if r.kernel in REFERENCE_KERNELS]


def table(rows: list[Row], baseline: str) -> str:
    """Per curve (op, mode, dtype, fixed sizes): x down, providers across; blocks of tokens/s,
    median time with speed-up over the baseline, fraction of the copy / matmul rate, and peak
    memory."""
    lines = _reference_lines(rows)
    cells: dict[tuple, dict] = defaultdict(dict)  # curve -> (metric, x, provider) -> Row
    for r in rows:
        if r.kernel not in REFERENCE_KERNELS:
            cells[(r.kernel, r.mode, r.dtype, *_curve(r))][(r.metric, r.x, r.provider)] = r
    for (kernel, mode, dtype, x_name, fixed), m in cells.items():
        provs = sorted({p for (met, _, p) in m if met == "time"}, key=_order)
        xs = list(dict.fromkeys(x for (met, x, _) in m if met == "time"))
        if not provs:
            continue
        if not isinstance(xs[0], str):
            xs.sort()
        ws = [max(13, len(p) + 2) for p in provs]
        xw = max(8, *(len(str(x)) for x in xs))
        frac = "bandwidth_frac" if kernel == "cross_entropy" else "tflops_frac"
        blocks = [
            ("throughput", "tokens/s"),
            ("time", f"median ms (speed-up over {baseline})"),
            (frac, "% of " + ("copy bandwidth" if kernel == "cross_entropy" else "matmul rate")),
            ("peak_memory", "peak MiB beyond inputs"),
        ]
        where = f" at {fixed}" if fixed else ""
        lines += ["", f"== {kernel} {mode} {dtype}: against {x_name}{where}"]
        for metric, title in blocks:
            if not any(k[0] == metric for k in m):
                continue
            lines.append(f"  {title}")
            lines.append(f"  {x_name:>{xw}}" + "".join(f"{p:>{w}}" for p, w in zip(provs, ws)))
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
                    elif metric == "throughput":
                        out.append(_si(r.p50))
                    else:
                        out.append(f"{r.p50:.1f}")
                lines.append(f"  {str(x):>{xw}}" + "".join(f"{c:>{w}}" for c, w in zip(out, ws)))
    return "\n".join(lines)


def summary(rows: list[Row], ours: str) -> str:
    """The short table, as ratios that compare across machines: per case, ``ours``' median time
    and its fraction of the copy (CE) or matmul (LCE) rate of the same run, then each other
    provider's time over ours (above 1: ours is faster), then peak memory."""
    by_case: dict[tuple, dict[tuple, Row]] = defaultdict(dict)
    for r in rows:
        if r.kernel not in REFERENCE_KERNELS:
            by_case[_case_key(r)].setdefault((r.metric, r.provider), r)  # once per case
    if not by_case:
        return "summary: nothing was measured"
    peers = sorted({p for m in by_case.values() for (met, p) in m if met == "time"} - {ours},
                   key=_order)
    names = {k: _case_name(k) for k in by_case}
    cw = max(len(n) for n in names.values()) + 2
    ws = [max(9, len(p) + 2) for p in peers]
    head = f"{'case':<{cw}}{'ours ms':>9}{'of peak':>9}{'tok/s':>8}"
    lines = [f"== summary: ours = {ours}; 'of peak' = % of the copy bandwidth (CE) or matmul "
             "rate (LCE) measured in this run; each provider's column = its median time / ours "
             "(above 1: ours is faster)",
             head + "".join(f"{p:>{w}}" for p, w in zip(peers, ws))]
    for key, m in by_case.items():
        t = m.get(("time", ours))
        frac = m.get(("bandwidth_frac" if key[0] == "cross_entropy" else "tflops_frac", ours))
        tok = m.get(("throughput", ours))
        cells = [_ms(t.p50) if t else "-", f"{100 * frac.p50:.1f}%" if frac else "-",
                 _si(tok.p50) if tok else "-"]
        line = f"{names[key]:<{cw}}{cells[0]:>9}{cells[1]:>9}{cells[2]:>8}"
        for p, w in zip(peers, ws):
            o = m.get(("time", p))
            line += f"{(f'{o.p50 / t.p50:.2f}x' if (o and t) else '-'):>{w}}"
        lines.append(line)
    mem_provs = sorted({p for m in by_case.values() for (met, p) in m if met == "peak_memory"},
                       key=_order)
    if mem_provs:
        ws = [max(9, len(p) + 2) for p in mem_provs]
        lines += ["== peak memory beyond inputs, MiB",
                  f"{'case':<{cw}}" + "".join(f"{p:>{w}}" for p, w in zip(mem_provs, ws))]
        for key, m in by_case.items():
            vals = [m.get(("peak_memory", p)) for p in mem_provs]
            lines.append(f"{names[key]:<{cw}}" + "".join(
                f"{(f'{v.p50:.0f}' if v and v.p50 >= 10 else f'{v.p50:.2f}' if v else '-'):>{w}}"
                for v, w in zip(vals, ws)))
    return "\n".join(lines)
