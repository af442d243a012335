"""The benchmark harness on tiny CPU sweeps: the CSV's columns and contents (every curve
complete, rates consistent with the times, memory within physical bounds, losses checked),
providers measured or skipped with a reason (never both, never silently missing), the default
sweeps, the time budget, the PNGs, and bench/gpu_check.sh's dry run. torch_compile and
torch_native_linear_ce are left out to keep this fast: their first call imports torch._dynamo
(and compiles), several seconds on 2 cores. Only the PNG tests need matplotlib."""

import contextlib
import csv
import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, ROOT)

from bench import report  # noqa: E402
from bench.cases import Case, Series  # noqa: E402

PROVIDERS = ["triton_xent", "triton_xent_torch", "torch_eager_fp32", "torch_eager", "liger", "cce"]
NS, VS, D = (16, 48), (1000, 3000), 32


def _main(argv):
    """``python -m bench`` in this process (for runs that time nothing: triton, if it gets
    imported here, keeps the test session's TRITON_INTERPRET=1)."""
    from bench.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def _bench(argv):
    """``python -m bench`` in a fresh process without TRITON_INTERPRET, so that triton_xent's
    backend="auto" runs (its torch backend on CPU) and this session's triton stays in
    interpreter mode (triton fixes that when it is first imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def _read(out):
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    return rows, skipped


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``python -m bench`` on a 2 x 2 grid of N and V (curves against V and against N) for both
    ops; no plots (the PNG tests draw them from this CSV)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--quick", "--N", *map(str, NS), "--V", *map(str, VS), "--D",
            str(D), "--providers", *PROVIDERS, "--out", str(out), "--no-plots"]
    rc, stdout = _bench(argv)
    assert rc == 0, stdout
    rows, skipped = _read(out)
    return out, stdout, rows, skipped


def _mine(rows, **kw):
    return [r for r in rows if all(r[k] == str(v) for k, v in kw.items())]


def test_csv_columns(sweep):
    out, _, rows, _ = sweep
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header == report.CSV_COLUMNS
    assert rows and all(r["device"] and r["torch"] and r["time"] and r["commit"] for r in rows)
    # the reference rates of the same run, before and after the sweep
    assert len(_mine(rows, kernel="device_copy", metric="bandwidth")) == 2
    assert len(_mine(rows, kernel="matmul", metric="tflops", dtype="float32")) == 2


@pytest.mark.parametrize("kernel", ["cross_entropy", "linear_cross_entropy"])
def test_every_provider_measured_or_skipped(sweep, kernel):
    _, stdout, rows, skipped = sweep
    for prov in PROVIDERS:
        mine = _mine(rows, kernel=kernel, provider=prov)
        skips = [s for s in skipped if s["kernel"] == kernel and s["provider"] == prov]
        assert bool(mine) != bool(skips), (prov, kernel, len(mine), skips)
        if skips:
            assert all(s["reason"] for s in skips)
            assert prov in stdout and skips[0]["reason"] in stdout  # the reason is printed too
            continue
        metrics = {r["metric"] for r in mine}
        rate = "bandwidth" if kernel == "cross_entropy" else "tflops"
        assert metrics == {"time", "throughput", rate, f"{rate}_frac", "peak_memory"}, prov
        assert not [r for r in mine if "MISMATCH" in r["note"]]


@pytest.mark.parametrize("kernel", ["cross_entropy", "linear_cross_entropy"])
def test_curves_against_V_and_against_N(sweep, kernel):
    """Each grid point is on a curve against V (per N) and one against N (per V), with its x."""
    _, _, rows, _ = sweep
    for prov in ("triton_xent", "torch_eager_fp32"):
        t = _mine(rows, kernel=kernel, provider=prov, metric="time")
        for x_name, fixed_name, xs, fixed in (("V", "N", VS, NS), ("N", "V", NS, VS)):
            for f in fixed:
                curve = [r for r in t if r["x_name"] == x_name and r[fixed_name] == str(f)]
                assert sorted(int(r["x"]) for r in curve) == sorted(xs), (prov, x_name, f)
                assert all(r["x"] == r[x_name] for r in curve)
                assert all(r["D"] == str(D if kernel == "linear_cross_entropy" else 0)
                           for r in curve)


def test_rates_follow_from_the_times(sweep):
    """tokens/s, GB/s, TFLOP/s and the fractions are the time's figures, not independent ones."""
    _, _, rows, _ = sweep
    copy = max(float(r["p50"]) for r in _mine(rows, kernel="device_copy"))
    gemm = max(float(r["p50"]) for r in _mine(rows, kernel="matmul"))
    times = {(r["kernel"], r["provider"], r["x_name"], r["N"], r["V"]): r
             for r in rows if r["metric"] == "time" and r["kernel"] in report.SHORT}
    assert times
    for r in rows:
        key = (r["kernel"], r["provider"], r["x_name"], r["N"], r["V"])
        if r["metric"] in ("time", "peak_memory") or key not in times:
            continue
        t = times[key]
        p50, p20, p80 = (float(t[k]) for k in ("p50", "p20", "p80"))
        assert p20 <= p50 <= p80
        c = Case(r["kernel"], r["mode"], r["dtype"], int(r["N"]), int(r["V"]), int(r["D"]), "cpu")
        want = {"throughput": c.N / (p50 * 1e-3),
                "bandwidth": c.min_bytes() / (p50 * 1e6),
                "bandwidth_frac": c.min_bytes() / (p50 * 1e6) / copy,
                "tflops": c.flops() / (p50 * 1e9),
                "tflops_frac": c.flops() / (p50 * 1e9) / gemm}[r["metric"]]
        assert math.isclose(float(r["p50"]), want, rel_tol=1e-4), (r["metric"], key)
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])


def test_peak_memory_within_physical_bounds(sweep):
    """Eager PyTorch's fwd_bwd materialises at least the fp32 N x V gradient of the logits (and
    at most a few N x V buffers): a memory figure outside that is a broken measurement."""
    _, _, rows, _ = sweep
    mem = _mine(rows, provider="torch_eager_fp32", metric="peak_memory", mode="fwd_bwd")
    assert len(mem) == 2 * 2 * len(NS) * len(VS)  # 2 ops x 2 curves x grid
    for r in mem:
        nv = int(r["N"]) * int(r["V"]) * 4 / 2 ** 20  # MiB
        assert 0.9 * nv <= float(r["p50"]) <= 8 * nv + 2, (r["kernel"], r["N"], r["V"], r["p50"])


def test_cpu_only_peers_are_skipped_not_faked(sweep):
    _, _, rows, skipped = sweep
    for peer in ("liger", "cce"):
        assert not _mine(rows, provider=peer)
        assert [s for s in skipped if s["provider"] == peer and
                ("CUDA only" in s["reason"] or "not applicable" in s["reason"])]
    # the float32 duplicate is skipped with its reason; the triton_xent providers do run on CPU
    assert [s for s in skipped if s["provider"] == "torch_eager" and "float32" in s["reason"]]
    assert _mine(rows, provider="triton_xent", metric="time")


def test_tables(sweep):
    _, stdout, rows, _ = sweep
    assert "against V at N=16" in stdout and "against N at V=3000" in stdout
    summary = stdout[stdout.index("== summary"):]
    t = {(r["kernel"], r["N"], r["V"], r["provider"]): float(r["p50"])
         for r in _mine(rows, metric="time", x_name="V")}
    line = next(ln for ln in summary.splitlines() if ln.startswith("CE fwd_bwd float32 N=48 V=3000"))
    ratio = t[("cross_entropy", "48", "3000", "torch_eager_fp32")] / t[
        ("cross_entropy", "48", "3000", "triton_xent")]
    cells = [float(c[:-1]) for c in line.split() if c.endswith("x")]  # one per other provider
    assert len(cells) == 2 and abs(cells[1] - ratio) <= 0.006, (line, ratio)
    assert "peak memory beyond inputs" in summary


def test_loss_mismatch_is_flagged():
    """A provider whose loss is wrong is measured but marked, in the note and the log."""
    from bench import harness
    from bench.providers import PROVIDERS as P
    from bench.providers import Built, Provider

    def wrong(case, inp, opts):
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: F.cross_entropy(logits, target) * 1.01)

    case = Case("cross_entropy", "fwd", "float32", 8, 100, 0, "cpu")
    logged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(P, "wrong", Provider("wrong", "1 % off", wrong, ops=("cross_entropy",)))
        res = harness.run_sweep([Series("V", (case,))], ["torch_eager_fp32", "wrong"], opts={},
                                memory=False, quick=True, log=logged.append)
    notes = {r.provider: r.note for r in res.rows if r.metric == "time"}
    assert "LOSS MISMATCH" in notes["wrong"] and "LOSS MISMATCH" not in notes["torch_eager_fp32"]
    assert any("LOSS MISMATCH" in m for m in logged)


def test_interrupt_keeps_what_was_measured():
    """Ctrl-C (timeout -s INT) mid-sweep: earlier cases stay, the rest is reported skipped."""
    from bench import harness
    from bench.providers import PROVIDERS as P
    from bench.providers import Built, Provider

    def stop_at_V200(case, inp, opts):
        if case.V == 200:
            raise KeyboardInterrupt
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: F.cross_entropy(logits, target))

    cases = tuple(Case("cross_entropy", "fwd", "float32", 8, v, 0, "cpu") for v in (100, 200, 300))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(P, "stops", Provider("stops", "", stop_at_V200, ops=("cross_entropy",)))
        res = harness.run_sweep([Series("V", cases)], ["stops"], opts={}, memory=False,
                                quick=True, log=lambda _m: None)
    assert not res.complete
    assert [r.V for r in res.rows if r.metric == "time"] == [100]
    assert sorted(s["case"].split("V=")[1] for s in res.skipped) == ["200", "300"]


def test_time_budget_is_checked_before_every_run():
    """A run that ends past the deadline is kept; the next provider of the same case is not
    started (a GPU case with a compilation can take minutes)."""
    import time

    from bench import harness
    from bench.providers import PROVIDERS as P
    from bench.providers import Built, Provider

    def slow(case, inp, opts):
        time.sleep(0.6)
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: F.cross_entropy(logits, target))

    case = Case("cross_entropy", "fwd", "float32", 8, 100, 0, "cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(P, "slow", Provider("slow", "", slow, ops=("cross_entropy",)))
        res = harness.run_sweep([Series("V", (case,))], ["slow", "torch_eager_fp32"], opts={},
                                memory=False, quick=True, deadline=time.time() + 0.3,
                                log=lambda _m: None)
    assert [r.provider for r in res.rows if r.metric == "time"] == ["slow"]
    assert [(s["provider"], "time budget" in s["reason"]) for s in res.skipped] == [
        ("torch_eager_fp32", True)]
    assert not res.complete


def test_time_budget_stops_cleanly(tmp_path):
    rc, stdout = _main(["--device", "cpu", "--quick", "--op", "cross_entropy", "--N", "8",
                        "--V", "100", "200", "--providers", "torch_eager_fp32", "--out",
                        str(tmp_path), "--no-plots", "--time-budget", "0"])
    assert rc == 3 and "CUT SHORT" in stdout
    rows, skipped = _read(tmp_path)
    assert not [r for r in rows if r["kernel"] == "cross_entropy"]
    assert len(skipped) == 2 and all("time budget" in s["reason"] for s in skipped)


def _cases(argv):
    rc, stdout = _main(["--list-cases", *argv])
    assert rc == 0
    return stdout.splitlines()


def test_gpu_default_sweep_covers_the_reference_shapes():
    cases = _cases(["--device", "cuda"])
    for mode in ("fwd", "fwd_bwd"):
        for V in (32000, 50257, 128256, 152064, 262144):
            assert f"cross_entropy {mode} bfloat16 N=8192 V={V}" in cases
        for N in (16, 256, 1024, 8192):
            assert f"cross_entropy {mode} bfloat16 N={N} V=128256" in cases
    heads = ["N=8192 D=4096 V=128256", "N=8192 D=4096 V=262144", "N=8192 D=2304 V=256000 softcap=30"]
    for h in heads:
        assert f"linear_cross_entropy fwd_bwd bfloat16 {h}" in cases
    # the decisive grid (issue 19) first within each mode: N = 16, 256, 8192 x V = 32000,
    # 128256, 262144, then the fused head at D=4096 V=128256
    grid = [f"cross_entropy fwd_bwd bfloat16 N={N} V={V}" for V in (32000, 128256, 262144)
            for N in (16, 256, 8192)] + [f"linear_cross_entropy fwd_bwd bfloat16 {heads[0]}"]
    assert cases[:len(grid)] == grid
    # fwd_bwd first: a run cut short by its budget has the main mode
    modes = [c.split()[1] for c in cases]
    assert modes == sorted(modes, key=["fwd_bwd", "fwd"].index)
    quick = _cases(["--device", "cuda", "--quick"])
    assert set(quick) < set(cases) and f"linear_cross_entropy fwd_bwd bfloat16 {heads[2]}" in quick


def test_cpu_default_sweep_has_four_points_per_curve():
    from bench.cli import _parser, build_series

    series = build_series(_parser().parse_args([]), "cpu")
    assert {(s.cases[0].op, s.x_name) for s in series} == {
        (op, x) for op in ("cross_entropy", "linear_cross_entropy") for x in ("V", "N")}
    assert all(len(s.cases) >= 4 and len({s.x(c) for c in s.cases}) == len(s.cases)
               for s in series)


def test_pngs(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    out = sweep[0]
    rows = report.read_csv(str(out / "results.csv"))
    assert len(rows) == len(sweep[2])
    paths = report.plot_all(rows, str(tmp_path), "test CPU", "torch_eager_fp32")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["cross_entropy_fwd_bwd_float32.png", "linear_cross_entropy_fwd_bwd_float32.png"]
    for p in paths:
        h, w = mpimg.imread(p).shape[:2]
        assert w > 2 * 300 and h > 4 * 200  # two columns (against V, N), four rows of panels
    t = report.plot_traffic([("CE fwd+bwd bf16", 6.0, 4.0), ("CE fwd bf16", 2.0, 2.0)],
                            str(tmp_path / "traffic.png"))
    assert os.path.getsize(t) > 5000


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh end to end on the CPU (no tests, a tiny grid): what comes back in $OUT
    is at most 8 plain files, the tables are printed, the exit code is 0."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--no-tests", "--",
                        "--op", "cross_entropy", "--N", "16", "--V", "256", "512",
                        "--providers", "torch_eager_fp32", "liger", "--no-memory"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) <= 8 and all(os.path.isfile(tmp_path / "out" / f) for f in files)
    assert {"gpu_check.log", "results.csv", "skipped.csv", "bench_results.tar.gz"} <= set(files)
    assert "== summary" in p.stdout and "sweep: complete" in p.stdout
    # the GPU tests are collected (an import error in a GPU-only test fails here), the model's
    # expected times and the cases a GPU run would measure are printed with an estimate
    n = int(p.stdout.split("GPU tests: ", 1)[1].split()[0])
    assert n >= 20 and "COLLECTION FAILED" not in p.stdout, p.stdout[-3000:]
    assert "| N=8192 V=262144 fwd+bwd |" in p.stdout and "estimate on an H100" in p.stdout
    assert "MODEL vs MEASURED" in p.stdout and "| fwd_bwd float32 N=16 V=256 |" in p.stdout
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["V"] for r in rows if r["kernel"] == "cross_entropy"} == {"256", "512"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_liger_provider_calls_its_api(op, monkeypatch):
    """Where liger_kernel is importable (bench/fetch_peers.sh), the bench's call of it gives
    PyTorch's loss and gradients under the Triton interpreter (arguments in its order), and the
    softcap reaches its module (Liger's softcap kernels do not run in the interpreter: they
    call ``.to`` on a Python float). Skipped where Liger is not installed (CI)."""
    lt = pytest.importorskip("liger_kernel.transformers")
    from bench.cases import make_inputs
    from bench.harness import wrap
    from bench.providers import PROVIDERS as P

    case = Case(op, "fwd_bwd", "float32", 6, 300, 0 if op == "cross_entropy" else 16, "cpu")
    inp, ref = make_inputs(case).clone(), make_inputs(case)
    loss = wrap(P["liger"].build(case, inp, {"interpreter_ok": True}).fn, "fwd_bwd")()
    logits = ref["logits"] if op == "cross_entropy" else F.linear(ref["x"], ref["w"])
    want = F.cross_entropy(logits.double(), ref["target"])
    want.backward()
    assert math.isclose(float(loss), float(want), rel_tol=1e-5)
    for k in ("logits",) if op == "cross_entropy" else ("x", "w"):
        torch.testing.assert_close(inp[k].grad, ref[k].grad, rtol=1e-4, atol=1e-6)

    name = "LigerCrossEntropyLoss" if op == "cross_entropy" else "LigerFusedLinearCrossEntropyLoss"
    made = []
    cls = getattr(lt, name)
    monkeypatch.setattr(lt, name, lambda **kw: made.append(kw) or cls(**kw))
    capped = Case(op, "fwd_bwd", "float32", 6, 300, case.D, "cpu", 30.0)
    P["liger"].build(capped, make_inputs(capped), {"interpreter_ok": True})
    assert made == [{"softcap": 30.0}]


def _compile_report(*argv, timeout=900):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA backend in this triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_compile_report_two_sweeps_and_split_path():
    """Every launch of a two-sweep (fused, V=128256) and a split-path (N=16, V=262144) call,
    fwd+bwd, forward only, "none" and in place, compiled for sm_90 with the installed triton:
    no spill, and no persistent grid beyond one wave of what the registers allow."""
    p = _compile_report("--case", "8192,128256,plain", "--case", "16,262144,plain")
    assert p.returncode == 0 and "No spill" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| N=")]
    kernels = {ln.split("|")[2].strip() for ln in rows}
    assert {"ce_fused_kernel", "ce_partials_kernel", "ce_finish_kernel", "scale_kernel",
            "ce_finalize_kernel"} <= kernels, kernels
    assert all("evict_" in ln for ln in rows if "finish_kernel" in ln and "fwd+bwd" in ln)


def test_compile_report_single_block():
    """The one-read path (the row in registers): the widest row it takes without options (16384
    columns, 16 warps) and with every option (8192 columns, 16 warps), and V=32000, which the
    plan sends to two sweeps of one 32768-column block (32 values per thread at 32 warps, where
    a thread has 64 registers, spilled): no spill."""
    p = _compile_report("--case", "8192,16000,plain", "--case", "8192,8000,all",
                        "--case", "8192,32000,plain")
    assert p.returncode == 0 and "No spill" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
    assert "| N=8192 V=8000 bf16 all fwd+bwd | ce_fused_kernel | 16 | 8192 |" in p.stdout


@pytest.mark.slow
def test_compile_report_full():
    """The whole report (every shape and option set of bench/results/compile/): no spill, no
    persistent grid beyond one wave."""
    p = _compile_report(timeout=3000)
    assert "| N=8192 V=262144 bf16 all fwd+bwd |" in p.stdout, p.stderr[-3000:]
    assert p.returncode == 0 and "No spill" in p.stdout, p.stdout[-4000:]


def test_compiling_providers_leave_time_for_the_rest():
    """A provider that compiles per shape (torch.compile) is skipped, with the reason, once the
    time left only covers the other providers' remaining cases; those still run."""
    import time

    from bench import harness
    from bench.providers import PROVIDERS as P
    from bench.providers import Built, Provider

    def compiling(case, inp, opts):
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: F.cross_entropy(logits, target))

    cases = tuple(Case("cross_entropy", "fwd", "float32", 8, v, 0, "cpu") for v in (100, 200))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(P, "torch_compile", Provider("torch_compile", "", compiling,
                                                ops=("cross_entropy",)))
        mp.setattr(harness, "CASE_RESERVE_S", 1000.0)
        res = harness.run_sweep([Series("V", cases)], ["torch_compile", "torch_eager_fp32"],
                                opts={}, memory=False, quick=True, deadline=time.time() + 600,
                                log=lambda _m: None)
    timed = [(r.provider, r.V) for r in res.rows if r.metric == "time"]
    # the first case leaves one case to come (1000 s reserved > 600 s left): skipped; the last
    # case reserves nothing: measured
    assert timed == [("torch_eager_fp32", 100), ("torch_compile", 200), ("torch_eager_fp32", 200)]
    assert [(s["provider"], "still to come" in s["reason"]) for s in res.skipped] == [
        ("torch_compile", True)]
