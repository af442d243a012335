"""The sweep: for every case, the same inputs for every provider; time, rate and peak memory."""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench import measure
from bench.cases import DTYPES, Case, Series, make_inputs
from bench.providers import PROVIDERS, Skip

MiB = 2 ** 20
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
# Providers whose first call on a shape compiles (torch.compile with dynamic=False on a GPU
# recompiles per shape: 15-40 s each). They run only while the time left covers the cases still
# to come at CASE_RESERVE_S each, so a budget spent on compilations never costs the other
# providers their cases.
COMPILING = {"torch_compile", "torch_native_linear_ce"}
CASE_RESERVE_S = 6.0


def wrap(loss_fn: Callable[[], torch.Tensor], mode: str) -> Callable[[], torch.Tensor]:
    """The timed callable: the forward (inputs require grad, as in training), or forward and
    backward of the scalar loss."""
    if mode == "fwd":
        return loss_fn

    def fwd_bwd():
        loss = loss_fn()
        loss.backward()
        return loss

    return fwd_bwd


@dataclass
class Row:
    kernel: str
    provider: str
    mode: str
    metric: str
    unit: str
    x_name: str
    x: int | str
    p50: float
    p20: float | None
    p80: float | None
    dtype: str
    N: int
    D: int
    V: int
    softcap: float = 0.0
    note: str = ""


@dataclass
class SweepResult:
    rows: list[Row] = field(default_factory=list)  # measured: time, peak_memory, reference rates
    skipped: list[dict] = field(default_factory=list)  # kernel, provider, case, reason
    complete: bool = True  # False when the time budget ran out or the sweep was interrupted

    def skip(self, case: Case | None, op: str, provider: str, reason: str, log) -> None:
        self.skipped.append({"kernel": op, "provider": provider,
                             "case": case.label() if case else "all", "reason": reason})
        log(f"skipped {provider} ({case.label() if case else op}): {reason}")

    def all_rows(self) -> list[Row]:
        """The measured rows and the rates derived from them (see :func:`derived_rows`)."""
        return self.rows + derived_rows(self.rows)


def _logits_fp32(case: Case, inp) -> torch.Tensor:
    logits = inp["logits"] if case.op == "cross_entropy" else F.linear(inp["x"], inp["w"])
    logits = logits.float()
    return logits if case.cap is None else torch.tanh(logits / case.cap) * case.cap


def _reference_loss(case: Case, inp) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(_logits_fp32(case, inp), inp["target"]))


def _loss_note(loss: torch.Tensor, ref: float, dtype: str) -> str:
    got = float(loss.detach().float())
    err = abs(got - ref) / max(abs(ref), 1e-12)
    if math.isfinite(got) and err <= LOSS_RTOL[dtype]:
        return ""
    return f"LOSS MISMATCH: {got:.6g} vs F.cross_entropy fp32 {ref:.6g} (rel {err:.2g})"


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _reference_rates(res: SweepResult, cases: list[Case], quick: bool, when: str) -> None:
    """Copy bandwidth, and a matmul per dtype used by linear cases, as rows of the CSV."""
    device = cases[0].device
    q, nbytes = measure.copy_bandwidth(device, quick)
    res.rows.append(Row("device_copy", "torch", "copy", "bandwidth", "GB/s", "bytes", nbytes,
                        nbytes / (q.p50 * 1e6), nbytes / (q.p80 * 1e6), nbytes / (q.p20 * 1e6),
                        "float32", 0, 0, 0, note=f"dst.copy_(src), bytes read + written; {when}"))
    for dt in sorted({c.dtype for c in cases if c.op == "linear_cross_entropy"}):
        q, flops, n = measure.gemm_rate(device, DTYPES[dt], quick)
        res.rows.append(Row("matmul", "torch", "fwd", "tflops", "TFLOP/s", "M=N=K", n,
                            flops / (q.p50 * 1e9), flops / (q.p80 * 1e9), flops / (q.p20 * 1e9),
                            dt, n, n, n, note=f"a @ b, square; {when}"))


def unique_cases(series: list[Series]) -> tuple[list[Case], dict[Case, list[Series]]]:
    """Every case once, in the order of the series (a case on two curves is measured once),
    and the series each case belongs to."""
    member: dict[Case, list[Series]] = {}
    for s in series:
        for c in s.cases:
            member.setdefault(c, []).append(s)
    return list(member), member


def run_sweep(series: list[Series], providers: list[str], *, opts: dict, memory: bool = True,
              quick: bool = False, deadline: float | None = None, progress=None, log=print,
              on_case=None) -> SweepResult:
    """Measures every (case, provider) on the same inputs, cases in the order of ``series``.

    The copy and matmul rates are measured before and after the sweep; the fractions use the
    better of the two (a busy machine slows one of them down). Past ``deadline`` (a
    ``time.time()`` value) the remaining runs are recorded as skipped, not run; Ctrl-C (or
    ``timeout -s INT``) does the same and keeps what was measured. ``on_case(res)`` runs after
    every case (the CLI rewrites the CSV there, so a run cut short still leaves its rows).
    """
    res = SweepResult()
    cases, member = unique_cases(series)
    device = cases[0].device
    # GPU: do_bench's window holds at least this many calls. CPU: at least 3 calls, ~0.2 s.
    min_reps = (5 if quick else 10) if device == "cuda" else 3
    cpu_budget = 0.05 if quick else 0.2

    _reference_rates(res, cases, quick, "before the sweep")
    # Providers that never apply to an op are reported once, not per case.
    for op in sorted({c.op for c in cases}):
        for name in providers:
            if op not in PROVIDERS[name].ops:
                res.skip(None, op, name, f"not applicable to {op}", log)

    stop = ""
    budget_out = "the time budget (--time-budget) ran out before this run"

    def out_of_time() -> bool:
        return deadline is not None and time.time() > deadline

    for index, case in enumerate(cases):
        todo = [PROVIDERS[n] for n in providers if case.op in PROVIDERS[n].ops]
        reserve = (len(cases) - index - 1) * CASE_RESERVE_S
        if not stop and out_of_time():
            stop = budget_out
        if stop:
            for prov in todo:
                res.skip(case, case.op, prov.name, stop, lambda _m: None)
            continue
        n_rows, done = len(res.rows), []
        try:
            inputs = make_inputs(case)
            ref = _reference_loss(case, inputs)
            for prov in todo:
                done.append(prov.name)
                if out_of_time():  # checked per provider: a case can take minutes on a GPU
                    stop = budget_out
                    res.skip(case, case.op, prov.name, stop, lambda _m: None)
                    continue
                if (prov.name in COMPILING and deadline is not None
                        and time.time() > deadline - reserve):
                    res.skip(case, case.op, prov.name, "kept the time budget for the other "
                             f"providers' {len(cases) - index - 1} cases still to come (a "
                             "compilation per shape)", lambda _m: None)
                    continue
                if progress:
                    progress(f"{case.label()} {prov.name}")
                _run_one(res, case, prov, inputs, ref, member[case], opts, memory, min_reps,
                         cpu_budget, log)
                _cleanup(case.device)
            del inputs
        except KeyboardInterrupt:
            stop = "interrupted before this case finished"
            log(f"interrupted during {case.label()}: the remaining cases are recorded as skipped")
            timed = {r.provider for r in res.rows[n_rows:] if r.metric == "time"}
            for prov in todo:
                if prov.name not in done[:-1] and prov.name not in timed:
                    res.skip(case, case.op, prov.name, stop, lambda _m: None)
        _cleanup(case.device)
        if on_case:
            on_case(res)
    if stop:
        res.complete = False
        log(f"sweep stopped early: {stop}")
        if stop.startswith("interrupted"):
            return res
    _reference_rates(res, cases, quick, "after the sweep")
    return res


def _run_one(res, case, prov, inputs, ref, series, opts, memory, min_reps, cpu_budget,
             log) -> None:
    inp = inputs
    try:
        built = prov.build(case, inp, opts)  # builders only check and bind: cheap
    except Skip as exc:
        res.skip(case, case.op, prov.name, str(exc), log)
        return
    if case.op in prov.mutates:  # it writes over its input: give it a copy of the shared inputs
        inp = inputs.clone()
        built = prov.build(case, inp, opts)
    fn = wrap(built.fn, case.mode)
    notes = [built.note] if built.note else []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = fn()  # warm-up (and compilation)
        measure.drop_grads(inp.leaves)
    except Exception as exc:  # compile failure, OOM, unsupported dtype...
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        res.skip(case, case.op, prov.name, f"failed on first call: {type(exc).__name__}: {msg}",
                 log)
        measure.drop_grads(inp.leaves)
        return
    for w in caught:
        notes.append(f"warning: {str(w.message).splitlines()[0][:160]}")
    mismatch = _loss_note(loss, ref, case.dtype)
    if mismatch:
        notes.append(mismatch)
        log(f"WARNING {prov.name} {case.label()}: {mismatch}")
    del loss

    def emit(**kw) -> None:  # one row per curve the case is on
        for s in series:
            res.rows.append(Row(kernel=case.op, provider=prov.name, mode=case.mode,
                                x_name=s.x_name, x=s.x(case), dtype=case.dtype, N=case.N,
                                D=case.D, V=case.V, softcap=case.softcap, **kw))

    q = measure.time_ms(fn, inp.leaves, case.device, min_reps=min_reps, cpu_budget_s=cpu_budget)
    notes.append(f"n={q.n}")
    emit(metric="time", unit="ms", p50=q.p50, p20=q.p20, p80=q.p80, note="; ".join(notes))
    if not memory:
        return
    try:
        if case.device == "cuda":
            peak = measure.gpu_peak_bytes(fn, inp.leaves)
            mnote = "torch.cuda.max_memory_allocated during one call minus memory_allocated before"
        else:
            peak = measure.cpu_peak_bytes(fn, inp.leaves)
            mnote = measure.CPU_MEMORY_METHOD
    except Exception as exc:
        log(f"memory of {prov.name} ({case.label()}) not measured: {type(exc).__name__}: {exc}")
        return
    emit(metric="peak_memory", unit="MiB", p50=peak / MiB, p20=None, p80=None,
         note=f"beyond inputs; {mnote}")


def derived_rows(rows: list[Row]) -> list[Row]:
    """From each time row: tokens/s (N over the time), and bandwidth (cross_entropy) or TFLOP/s
    (linear_cross_entropy) with its fraction of the best copy / matmul rate of this run. A
    rate's p20 is the amount over the time's p80."""
    copy = max((r.p50 for r in rows if r.kernel == "device_copy"), default=None)
    gemm: dict[str, float] = {}
    for r in rows:
        if r.kernel == "matmul":
            gemm[r.dtype] = max(gemm.get(r.dtype, 0.0), r.p50)
    derived = []
    for r in rows:
        if r.metric != "time":
            continue
        case = Case(r.kernel, r.mode, r.dtype, r.N, r.V, r.D, "", r.softcap)
        base = {k: getattr(r, k) for k in ("kernel", "provider", "mode", "x_name", "x", "dtype",
                                             "N", "D", "V", "softcap")}
        tok = [r.N / (t * 1e-3) for t in (r.p50, r.p80, r.p20)]
        derived.append(Row(metric="throughput", unit="tokens/s", p50=tok[0], p20=tok[1],
                           p80=tok[2], note="N rows over the median time", **base))
        if r.kernel == "cross_entropy":
            amount, scale, unit, metric = case.min_bytes(), 1e6, "GB/s", "bandwidth"
            ref, ref_unit, ref_name = copy, "of copy", "copy"
            note = "minimal bytes: logits read once (+ gradient written once)"
        else:
            amount, scale, unit, metric = case.flops(), 1e9, "TFLOP/s", "tflops"
            ref, ref_unit, ref_name = gemm.get(r.dtype), "of matmul", "matmul"
            note = "2*N*D*V per GEMM; 1 GEMM fwd, 3 fwd_bwd"
        v = [amount / (t * scale) for t in (r.p50, r.p80, r.p20)]
        derived.append(Row(metric=metric, unit=unit, p50=v[0], p20=v[1], p80=v[2], note=note,
                           **base))
        if ref:
            derived.append(Row(metric=f"{metric}_frac", unit=ref_unit, p50=v[0] / ref,
                               p20=v[1] / ref, p80=v[2] / ref,
                               note=f"best {ref_name} of this run: {ref:.4g} {unit}", **base))
    return derived
