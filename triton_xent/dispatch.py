"""Which backend runs a call, and why.

``backend="auto"`` (the default, or ``TRITON_XENT_BACKEND=auto``) picks the Triton kernel when
Triton can run for this input -- a CUDA/ROCm tensor, or any tensor while Triton's interpreter is
on (``TRITON_INTERPRET=1``, set before ``import triton``: how CI runs the kernels on the CPU;
see :mod:`triton_xent._interpreter`) -- and the kernel covers the arguments; otherwise the torch
backend, logging the reason once (never while torch.compile traces: Dynamo cannot trace a
logger call). ``backend="triton"`` that cannot run raises :class:`BackendUnavailableError` with
that reason; ``backend="torch"`` always works.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from . import _interpreter

logger = logging.getLogger("triton_xent")

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "TRITON_XENT_BACKEND"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_reasons: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for but the kernel cannot run this call."""


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs a call (``"triton"`` or ``"torch"``) and the reason, in words."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


_triton_status: list[str | None] = []  # filled once: [None] or [why triton cannot be imported]


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
    """Whether Triton's interpreter runs our kernels now (see :mod:`triton_xent._interpreter`)."""
    return triton_import_error() is None and _interpreter.gap() is None


def serialised(fn):
    """Runs ``fn`` under :data:`triton_xent._interpreter.LOCK` while the interpreter is on: it
    is not thread-safe. No lock otherwise, nor while torch.compile traces."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling() or not _interpreter.requested():
            return fn(*args, **kwargs)
        with _interpreter.LOCK:
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
        why = _interpreter.gap()
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


def choose_backend(logits: torch.Tensor, *, probs: bool, backend: str | None) -> BackendChoice:
    name = requested_backend(backend)
    if name == "torch":
        return BackendChoice("torch", "backend='torch' was requested")
    gap = kernel_gap(logits, probs=probs)
    if gap is None:
        where = "TRITON_INTERPRET=1" if logits.device.type != "cuda" else logits.device.type
        return BackendChoice("triton", f"the Triton kernel covers this call ({where})")
    if name == "triton":
        raise BackendUnavailableError(
            f"backend='triton' cannot run this call: {gap}. Use backend='auto' to fall back to "
            "the torch backend."
        )
    if gap not in _logged_reasons and not torch.compiler.is_compiling():
        _logged_reasons.add(gap)
        logger.info("triton_xent: using the torch backend: %s", gap)
    return BackendChoice("torch", gap)
