"""``python -m bench --host``: the host time of one public call, and the code it runs.

On a GPU every case with a few thousand rows or fewer is bound by the host: at N=16 the kernels
need about 10 us, so the Python between the user's call and the launches decides the time. This
measures it on the CPU, where the kernels' launches are recorded instead of run (Triton's
interpreter is on, its ``InterpretedFunction.run`` replaced by a recorder: what is left is the
package's Python and the torch ops around the launches, not Triton's own launch overhead), next
to a tiny ``F.cross_entropy`` forward+backward of the same shape in the same process, both
printed. It also counts, with ``sys.setprofile``, the package files and the Python function
calls outside ``kernels/`` that one forward+backward runs.

The cases: ``cross_entropy`` (bf16, N=4, V=512, label smoothing 0.1) and ``linear_cross_entropy``
(fp32, N=8, D=16, V=512), each forward + ``loss.backward()``.
"""

from __future__ import annotations

import os
import sys
import time


def _cases():
    import torch
    import torch.nn.functional as F

    import triton_xent

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, generator=g, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 512, (4,), generator=g)
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(512, 16, generator=g, requires_grad=True)
    t8 = torch.randint(0, 512, (8,), generator=g)
    return {
        "cross_entropy": (lambda: triton_xent.cross_entropy(x, t, label_smoothing=0.1).backward(),
                          lambda: F.cross_entropy(x, t, label_smoothing=0.1).backward()),
        "linear_cross_entropy": (lambda: triton_xent.linear_cross_entropy(h, w, t8).backward(),
                                 lambda: F.cross_entropy(h @ w.T, t8).backward()),
    }


def count_calls(fn) -> tuple[list[str], int]:
    """The package files (kernels included) whose Python runs during ``fn()``, and the number of
    Python function calls in the package outside ``kernels/``."""
    import triton_xent

    root = os.path.dirname(triton_xent.__file__)
    files: set[str] = set()
    calls = 0

    def prof(frame, event, arg):
        nonlocal calls
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(root):
                files.add(os.path.relpath(name, root))
                calls += "/kernels/" not in name

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return sorted(files), calls


def _best(fn, rounds: int, n: int) -> float:
    """The fastest of ``rounds`` blocks of ``n`` calls, us per call."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    import torch
    from triton.runtime import interpreter

    torch.set_num_threads(1)
    cases = _cases()
    counted = {}
    for name, (ours, _) in cases.items():  # the kernels run here (interpreted): files include them
        ours()
        counted[name] = count_calls(ours)
    launches: list[str] = []
    interpreter.InterpretedFunction.run = (  # record the launch, run nothing
        lambda self, *args, **kwargs: launches.append(self.fn.__name__))
    rounds, n = (5, 100) if quick else (20, 300)
    print("host time of one forward+backward, kernel launches recorded instead of run "
          f"(CPU, 1 thread, best of {rounds} x {n}):")
    print("(F.cross_entropy: of the logits; for linear_cross_entropy of F.linear's logits)")
    print(f"{'case':<22} {'ours us':>9} {'F.cross_entropy us':>19} {'ratio':>6} {'launches':>9} "
          f"{'files':>6} {'calls':>6}")
    for name, (ours, theirs) in cases.items():
        for _ in range(50):  # warm up both, interleaved
            ours()
            theirs()
        a = b = float("inf")
        for _ in range(rounds):  # interleaved blocks: the machine's load hits both alike
            a = min(a, _best(ours, 1, n))
            b = min(b, _best(theirs, 1, n))
        launches.clear()
        ours()
        files, calls = counted[name]
        print(f"{name:<22} {a:>9.1f} {b:>19.1f} {a / b:>6.2f} {len(launches):>9} {len(files):>6} "
              f"{calls:>6}")
        print(f"  files: {', '.join(files)}")
    return 0


def run_in_interpreter(argv: list[str]) -> int:
    """This module in a process with the interpreter on (set before triton is imported)."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "bench.host", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
