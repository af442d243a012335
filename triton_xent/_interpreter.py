"""Triton's interpreter (``TRITON_INTERPRET``): whether it can run our kernels now, and a lock.

A leaf module (no imports from the package), so that every layer may use it.

Triton decides at decoration time: ``@triton.jit`` returns an interpreted function when
``TRITON_INTERPRET`` reads true *at that moment* (Triton accepts ``1``, ``true``, ``yes``, ``on``
or ``y``, in any case), and Triton's own ``triton.language`` helpers are decorated when
``triton`` is imported. So the interpreter runs our kernels only if the variable was set before
``import triton`` and before our kernel modules were imported; set later, a "kernel" call on a
CPU tensor fails. The variable is also the switch: unset (or false), CPU tensors go to the torch
backend even if the kernels were decorated for the interpreter.

The interpreter is not thread-safe: while it runs a kernel it swaps functions of
``triton.language`` process-wide, so two threads running interpreted kernels at once fail
("Did you forget to add @triton.jit ?"). :data:`LOCK` serialises our interpreted calls; Triton
kernels of other libraries running in other threads at the same time are not covered.
"""

from __future__ import annotations

import os
import sys
import threading
import types

LOCK = threading.RLock()
_TRUE = ("1", "true", "yes", "on", "y")
_triton_interpreted: list[bool | None] = []  # filled once triton is imported
_kernels_interpreted: dict[str, bool | None] = {}  # per kernel module, once imported


def requested() -> bool:
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


def gap() -> str | None:
    """None when the interpreter will run our kernels, else why not (Triton imports)."""
    if not requested():
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
