"""Timers, peak memory, and the copy / matmul rates that the kernels are compared to.

GPU: ``triton.testing.do_bench`` (median and 20-80 % band, gradients dropped between calls, L2
flushed by do_bench) and ``torch.cuda.max_memory_allocated`` in this process.
CPU: a wall-clock timer (median and 20/80 percentiles of several calls after a warm-up) and
the growth of the resident set during one call (:func:`cpu_peak_bytes`).
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

MiB = 2 ** 20


@dataclass
class Quantiles:
    p50: float
    p20: float
    p80: float
    n: int  # samples behind the figures (do_bench: repetitions it ran, estimated)


def drop_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def time_ms(fn: Callable, leaves, device: str, *, min_reps: int = 5, cpu_budget_s: float = 1.0,
            cpu_max_reps: int = 30) -> Quantiles:
    """Median and 20/80 percentiles of ``fn``'s run time in ms; ``fn`` has been called once."""
    if device == "cuda":
        return _gpu_time(fn, leaves, min_reps)
    # The first calls after the warm-up can still be slow (fresh pages, thread pools): a few
    # more untimed calls, up to 3 or a tenth of the budget.
    t_warm = time.perf_counter() + 0.1 * cpu_budget_s
    for _ in range(3):
        drop_grads(leaves)
        fn()
        if time.perf_counter() > t_warm:
            break
    times = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(times) < cpu_max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        drop_grads(leaves)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    drop_grads(leaves)
    return _quantiles(times)


def _quantiles(times: list[float]) -> Quantiles:
    if len(times) == 1:
        return Quantiles(times[0], times[0], times[0], 1)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1]=p20, q[7]=p80
    return Quantiles(statistics.median(times), q[1], q[7], len(times))


def _gpu_time(fn, leaves, min_reps: int) -> Quantiles:
    from triton.testing import do_bench

    # Size do_bench's window from one call so that slow cases still get min_reps samples.
    drop_grads(leaves)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    rep = min(max(100.0, 1.2 * est * min_reps), 10_000.0)
    p50, p20, p80 = do_bench(fn, warmup=25, rep=rep, grad_to_none=list(leaves),
                             quantiles=[0.5, 0.2, 0.8])
    drop_grads(leaves)
    return Quantiles(p50, p20, p80, max(1, int(rep / est)))


# --- rates of the same run ---------------------------------------------------------------------

def copy_bandwidth(device: str, quick: bool = False) -> tuple[Quantiles, int]:
    """Device-to-device copy of a buffer far larger than the caches; GB/s counts bytes read +
    written. Returns the time quantiles and the bytes moved per copy."""
    n = 2 ** 28 if device == "cuda" else 2 ** 26 // (16 if quick else 1)  # float32 elements
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    q = time_ms(fn, [], device, min_reps=5 if quick else 10, cpu_budget_s=0.1 if quick else 0.5)
    return q, 2 * n * 4


def gemm_rate(device: str, dtype: torch.dtype, quick: bool = False) -> tuple[Quantiles, int, int]:
    """A large square matmul in ``dtype``; returns time quantiles, FLOPs per call and its size."""
    n = 8192 if device == "cuda" else 1024
    if quick:
        n //= 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    fn = lambda: a @ b  # noqa: E731
    fn()
    q = time_ms(fn, [], device, min_reps=5, cpu_budget_s=0.1 if quick else 0.5)
    return q, 2 * n ** 3, n


# --- peak memory -------------------------------------------------------------------------------

def gpu_peak_bytes(fn, leaves) -> int:
    """Peak of ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated
    before it (the inputs, and anything else already live)."""
    drop_grads(leaves)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    drop_grads(leaves)
    return peak


CPU_MEMORY_METHOD = (
    "in process, after the timed calls: drop grads, gc, malloc_trim, reset VmHWM (write 5 to "
    "/proc/self/clear_refs), read VmRSS, one call, report VmHWM - VmRSS"
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak-RSS mark to the current RSS
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak-RSS mark ({exc}); CPU memory needs Linux "
                           ">= 4.0 with a writable /proc/self/clear_refs") from None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_bytes(fn, leaves) -> int:
    """Peak resident memory of one call of ``fn`` beyond what is resident before it.

    ``fn`` has run before (warm-up, compilation). Freed memory is handed back to the OS first
    (``malloc_trim``) so that the call's allocations show as new resident pages; the peak-RSS
    mark is then reset to the current RSS and read after the call. Everything the call touches
    counts: its outputs, the gradient, saved tensors, temporaries, thread-local buffers.
    """
    drop_grads(leaves)
    gc.collect()
    _malloc_trim()
    _reset_hwm()
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM") - base
    drop_grads(leaves)
    return max(peak, 0) * 1024
