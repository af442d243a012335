"""Where a call runs: which backend, whether Triton (or its interpreter) can run, and the routes.

``backend="auto"`` (the default, or ``TRITON_XENT_BACKEND=auto``) picks the Triton kernel when
Triton can run for this input -- a CUDA/ROCm tensor, or any tensor while Triton's interpreter is
on (``TRITON_INTERPRET=1``, set before ``import triton``: how CI runs the kernels on the CPU) --
and the kernel covers the arguments; otherwise the torch backend, logging the reason once (never
while torch.compile traces: Dynamo cannot trace a logger call). ``backend="triton"`` that cannot
run raises :class:`BackendUnavailableError` with that reason; ``backend="torch"`` always works.

A leaf module (no imports from the package), so every layer may use it.

Triton's interpreter. Triton decides at decoration time: ``@triton.jit`` returns an interpreted
function when ``TRITON_INTERPRET`` reads true *at that moment* (Triton accepts ``1``, ``true``,
``yes``, ``on`` or ``y``, in any case), and Triton's own ``triton.language`` helpers are decorated
when ``triton`` is imported. So the interpreter runs our kernels only if the variable was set
before ``import triton`` and before our kernel modules were imported; set later, a "kernel" call on
a CPU tensor fails. The variable is also the switch: unset (or false), CPU tensors go to the torch
backend even if the kernels were decorated for the interpreter.

The interpreter is not thread-safe: while it runs a kernel it swaps functions of
``triton.language`` process-wide, so two threads running interpreted kernels at once fail
("Did you forget to add @triton.jit ?"). :data:`LOCK` serialises our interpreted calls; Triton
kernels of other libraries running in other threads at the same time are not covered.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import types
from dataclasses import dataclass

import torch

logger = logging.getLogger("triton_xent")

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "TRITON_XENT_BACKEND"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_reasons: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for but the kernel cannot run this call."""

# ---------------------------------------------------------------------------------------------
# Triton's interpreter

LOCK = threading.RLock()
_TRUE = ("1", "true", "yes", "on", "y")
_triton_interpreted: list[bool | None] = []  # filled once triton is imported
_kernels_interpreted: dict[str, bool | None] = {}  # per kernel module, once imported


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (``1``/``true``/``yes``/``on``/``y``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _interpreted(module) -> bool | None:
    """True if the module's ``@triton.jit`` functions are interpreted, False if compiled, None
    if it has none."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for value in list(vars(module).values()):
        if isinstance(value, InterpretedFunction):
            return True
        if isinstance(value, JITFunction):
            return False
    return None


@torch.compiler.assume_constant_result
def interpreter_gap() -> str | None:
    """None when the interpreter will run our kernels, else why not (Triton imports)."""
    if not interpret_requested():
        return "TRITON_INTERPRET is not set"
    if not _triton_interpreted:
        import triton.language.standard as tl_standard

        _triton_interpreted.append(_interpreted(tl_standard))
    if _triton_interpreted[0] is False:
        return (
            "TRITON_INTERPRET is set, but triton was imported before it was set: Triton reads it "
            "when it is imported; set it at the start of the process, before `import triton`"
        )
    package = sys.modules.get("triton_xent.kernels")
    for module in list(vars(package).values()) if package is not None else ():
        if isinstance(module, types.ModuleType) and module.__name__.startswith(package.__name__):
            state = _kernels_interpreted.get(module.__name__)
            if state is None:  # fixed once the module is imported
                state = _interpreted(module)
                if state is not None:
                    _kernels_interpreted[module.__name__] = state
            if state is False:
                return (
                    "TRITON_INTERPRET is set, but triton_xent's kernels were imported before it "
                    "was set (a call ran a kernel first): set it at the start of the process"
                )
    return None


# ---------------------------------------------------------------------------------------------
# Backend choice


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs a call (``"triton"`` or ``"torch"``) and the reason, in words."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


_triton_status: list[str | None] = []  # filled once: [None] or [why triton cannot be imported]


@torch.compiler.assume_constant_result
def triton_import_error() -> str | None:
    """None when Triton imports, else why not. Imported here lazily, once."""
    if not _triton_status:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_status.append(None)
        except Exception as exc:  # ImportError, or a broken install raising anything
            _triton_status.append(f"triton cannot be imported ({type(exc).__name__}: {exc})")
    return _triton_status[0]


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter runs our kernels now."""
    return triton_import_error() is None and interpreter_gap() is None


def serialised(fn):
    """Runs ``fn`` under :data:`LOCK` while the interpreter is on: it is not thread-safe. No
    lock otherwise, nor while torch.compile traces."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if (torch.compiler.is_compiling()
                or os.environ.get("TRITON_INTERPRET", "").strip().lower() not in _TRUE):
            return fn(*args, **kwargs)
        with LOCK:
            return fn(*args, **kwargs)

    return wrapper


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto") or "auto"
    name = name.strip().lower()
    if name not in BACKENDS:
        src = "backend" if backend is not None else ENV_BACKEND
        raise ValueError(f"{src}={name!r} is not a backend: use 'auto', 'triton' or 'torch'.")
    return name


def kernel_gap(logits: torch.Tensor, *, probs: bool) -> str | None:
    """Why the Triton kernel cannot run this call, or None when it can."""
    err = triton_import_error()
    if err is not None:
        return err
    if logits.device.type != "cuda":
        why = interpreter_gap()
        if why is not None:
            return (
                f"input is on {logits.device.type}; the Triton kernel needs a CUDA/ROCm tensor "
                f"(or Triton's interpreter, TRITON_INTERPRET=1, to run it slowly on the CPU: {why})"
            )
    if logits.dtype not in _KERNEL_DTYPES:
        return (
            f"{logits.dtype} input: the kernel reads fp32/fp16/bf16 and computes in fp32; the "
            "torch backend keeps float64 exact"
        )
    if probs:
        return "class-probability targets run on the torch backend"
    return None


# Eager choices by what decides them (the arguments, the two environment variables): a call costs
# one lookup. Not used while torch.compile traces (a guard on a growing dict would recompile).
_choices: dict[tuple, BackendChoice] = {}


def choose_backend(logits: torch.Tensor, *, probs: bool, backend: str | None) -> BackendChoice:
    """The backend of a call (see the module docstring); raises for an unknown name and for
    ``backend="triton"`` that cannot run."""
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:
        env = os.environ
        key = (backend, env.get(ENV_BACKEND), env.get("TRITON_INTERPRET"), logits.device.type,
               logits.dtype, probs)
        choice = _choices.get(key)
        if choice is not None:
            return choice
    name = requested_backend(backend)
    if name == "torch":
        choice = BackendChoice("torch", "backend='torch' was requested")
    elif (gap := kernel_gap(logits, probs=probs)) is None:
        where = "TRITON_INTERPRET=1" if logits.device.type != "cuda" else logits.device.type
        choice = BackendChoice("triton", f"the Triton kernel covers this call ({where})")
    elif name == "triton":
        raise BackendUnavailableError(
            f"backend='triton' cannot run this call: {gap}. Use backend='auto' to fall back to "
            "the torch backend."
        )
    else:
        choice = BackendChoice("torch", gap)
        if gap not in _logged_reasons and not compiling:
            _logged_reasons.add(gap)
            logger.info("triton_xent: using the torch backend: %s", gap)
    if key is not None:
        _choices[key] = choice
    return choice


# ---------------------------------------------------------------------------------------------
# Routes: DTensor arguments, a process group of several ranks


def dtensor_given(*args) -> bool:
    """True when an argument is a DTensor. Free when ``torch.distributed.tensor`` was never
    imported (then nothing can be a DTensor), so plain calls do not pay for importing it."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is not None:
        for a in args:
            if isinstance(a, mod.DTensor):
                return True
    return False


def group_size(group) -> int:
    """The number of ranks of a process group (1 for None)."""
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)
