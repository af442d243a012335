"""The benchmark harness end to end on a tiny CPU sweep: CSV columns, every provider measured or
reported skipped (never both, never silently missing), memory rows from the child processes,
and the PNGs. torch_compile and torch_native_linear_ce are left out to keep this under 20 s:
their first call imports torch._dynamo (and compiles), several seconds on 2 cores."""

import contextlib
import csv
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, ROOT)

PROVIDERS = ["triton_xent", "triton_xent_torch", "torch_eager_fp32", "torch_eager", "liger", "cce"]

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs ``python -m bench`` in this process (saves a second torch import); the memory
    children still run in fresh processes."""
    from bench.cli import main

    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--quick", "--N", "64", "--V", "1000", "--D", "32",
            "--providers", *PROVIDERS, "--out", str(out)]
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # time the torch backend, not the interpreter
        with contextlib.redirect_stdout(buf):
            assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    return out, buf.getvalue(), rows, skipped


def test_csv_columns(sweep):
    from bench.report import CSV_COLUMNS

    out, _, rows, _ = sweep
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header == CSV_COLUMNS
    for col in ("kernel", "provider", "mode", "metric", "unit", "x_name", "x", "p50", "p20", "p80",
                "dtype", "N", "D", "V", "device", "torch", "triton", "commit", "time"):
        assert col in header
    assert rows and all(r["device"] and r["torch"] and r["time"] and r["commit"] for r in rows)
    # the reference rates of the same run are in the CSV
    assert {"device_copy", "matmul"} <= {r["kernel"] for r in rows}


@pytest.mark.parametrize("kernel", ["cross_entropy", "linear_cross_entropy"])
def test_every_provider_measured_or_skipped(sweep, kernel):
    _, stdout, rows, skipped = sweep
    for prov in PROVIDERS:
        mine = [r for r in rows if r["kernel"] == kernel and r["provider"] == prov]
        skips = [s for s in skipped if s["kernel"] == kernel and s["provider"] == prov]
        assert bool(mine) != bool(skips), (prov, kernel, len(mine), skips)
        if skips:
            assert all(s["reason"] for s in skips)
            assert prov in stdout  # the reason is printed too
            continue
        metrics = {r["metric"] for r in mine}
        rate = "bandwidth" if kernel == "cross_entropy" else "tflops"
        assert {"time", rate, f"{rate}_frac", "peak_memory"} <= metrics, (prov, metrics)
        for r in mine:
            assert float(r["p50"]) > 0 or r["metric"] == "peak_memory"
            if r["metric"] == "time":
                assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
            if r["metric"] == "peak_memory":
                assert float(r["p50"]) >= 0


def test_cpu_only_peers_are_skipped_not_faked(sweep):
    _, _, rows, skipped = sweep
    for peer in ("liger", "cce"):
        assert not [r for r in rows if r["provider"] == peer]
        assert [s for s in skipped if s["provider"] == peer]
    # the triton_xent providers do run on the CPU (torch backend)
    assert [r for r in rows if r["provider"] == "triton_xent" and r["metric"] == "time"]


def test_pngs_written(sweep):
    out = sweep[0]
    for kernel in ("cross_entropy", "linear_cross_entropy"):
        for what in ("time", "memory", "speedup"):
            p = out / f"{kernel}_{what}.png"
            assert p.exists() and p.stat().st_size > 1000, p
