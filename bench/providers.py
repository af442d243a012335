"""Implementations under test: each a small builder that turns the shared inputs of a case into
a zero-argument callable returning the loss (mean reduction, default ignore_index).

A builder raises :class:`Skip` with a reason when its implementation is not installed or cannot
run on this device; the harness prints the reason and records it in ``skipped.csv``. Nothing is
ever replaced by a stand-in.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.cases import Case, Inputs

LossFn = Callable[[], torch.Tensor]


class Skip(Exception):
    """This provider cannot run this case; the message says why."""


@dataclass
class Built:
    fn: LossFn
    note: str = ""  # e.g. which backend "auto" resolved to


@dataclass(frozen=True)
class Provider:
    name: str
    doc: str
    build: Callable[[Case, Inputs, dict], Built]
    ops: tuple[str, ...] = ("cross_entropy", "linear_cross_entropy")
    mutates: tuple[str, ...] = ()  # ops where it writes over its input: it gets its own copy
    compiles: bool = False  # slow first call


def _import(name: str, what: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # not installed, or broken
        raise Skip(f"{what} is not importable ({type(exc).__name__}: {exc})") from None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _need_cuda(case: Case, what: str, opts: dict) -> None:
    """Peers are timed on CUDA only. ``opts["interpreter_ok"]`` (tests) lets a Triton peer run
    on CPU tensors under ``TRITON_INTERPRET=1`` to check how the bench calls it."""
    if case.device == "cuda":
        return
    if opts.get("interpreter_ok") and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise Skip(f"{what} runs on CUDA only; this run is on {case.device}")


def _softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit softcap, written as its Hugging Face model does."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


# --- triton_xent -------------------------------------------------------------------------------

def _triton_xent(backend: str):
    def build(case: Case, inp: Inputs, opts: dict) -> Built:
        tx = _import("triton_xent", "triton_xent")
        if backend == "auto" and case.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            raise Skip("TRITON_INTERPRET=1: backend='auto' would time the Triton interpreter, "
                       "which is a correctness tool, not a speed one")
        cap = case.cap
        if case.op == "cross_entropy":
            ce = tx.cross_entropy
            logits, target = inp["logits"], inp["target"]
            note = ""
            if hasattr(tx, "explain"):
                note = (f"backend={backend} -> "
                        f"{tx.explain(logits, target, backend=backend, softcap=cap)}")
            return Built(lambda: ce(logits, target, softcap=cap, backend=backend), note)
        lce = tx.linear_cross_entropy
        x, w, target = inp["x"], inp["w"], inp["target"]
        note = f"backend={backend}"
        if backend == "auto" and case.device != "cuda":
            note += " (no CUDA: the Triton kernel cannot run, so this is the torch backend)"
        return Built(lambda: lce(x, w, target, softcap=cap, backend=backend), note)

    return build


# --- PyTorch -----------------------------------------------------------------------------------

def _eager(upcast: bool):
    def build(case: Case, inp: Inputs, opts: dict) -> Built:
        if not upcast and case.dtype == "float32":
            raise Skip("the same as torch_eager_fp32 for float32 inputs (.float() is a no-op)")
        up = (lambda t: t.float()) if upcast else (lambda t: t)
        target, cap = inp["target"], case.cap
        if case.op == "cross_entropy":
            logits = inp["logits"]
            return Built(lambda: F.cross_entropy(up(_softcapped(logits, cap)), target))
        x, w = inp["x"], inp["w"]
        return Built(lambda: F.cross_entropy(up(_softcapped(F.linear(x, w), cap)), target))

    return build


def _ce_fp32(logits, target, cap: float | None):
    return F.cross_entropy(_softcapped(logits, cap).float(), target)


def _linear_ce_fp32(x, w, target, cap: float | None):
    return F.cross_entropy(_softcapped(F.linear(x, w), cap).float(), target)


_compiled: dict[tuple[str, str], Callable] = {}


def _compiled_fn(op: str, device: str):
    """One torch.compile wrapper per op and device for the process.

    CUDA: ``dynamic=False``, every shape compiled for itself, as a training job with fixed
    shapes gets it (dynamo's recompile limit is raised above the number of sweep points). CPU:
    ``dynamic=True``, one compilation for all shapes, because compiling every point would take
    most of the CPU sweep's time (5-15 s each on 2 cores).
    """
    key = (op, device)
    if key not in _compiled:
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(dcfg, name, None) is not None and getattr(dcfg, name) < 64:
                setattr(dcfg, name, 64)
        fn = _ce_fp32 if op == "cross_entropy" else _linear_ce_fp32
        _compiled[key] = torch.compile(fn, dynamic=device != "cuda")
    return _compiled[key]


def _torch_compile(case: Case, inp: Inputs, opts: dict) -> Built:
    f = _compiled_fn(case.op, case.device)
    cap = case.cap
    note = ("torch.compile(dynamic=False)" if case.device == "cuda" else
            "torch.compile(dynamic=True)") + " of the fp32 form"
    # Compilation happens on the first call; the harness turns a failure there into a skip.
    if case.op == "cross_entropy":
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: f(logits, target, cap), note)
    x, w, target = inp["x"], inp["w"], inp["target"]
    return Built(lambda: f(x, w, target, cap), note)


def _torch_native(case: Case, inp: Inputs, opts: dict) -> Built:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy with "
                   "LinearCrossEntropyOptions (torch >= 2.13)")
    if case.cap is not None:
        raise Skip("F.linear_cross_entropy has no softcap")
    chunk = opts.get("native_batch_chunk", 1024)
    if chunk == "auto":  # torch's own heuristic (aspect_ratio): tiny chunks when N is small
        options = torch.nn.LinearCrossEntropyOptions()
    else:
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=int(chunk),
                                                     chunking_method=None)
    x, w, target = inp["x"], inp["w"], inp["target"]
    note = f"LinearCrossEntropyOptions(batch_chunk_size={chunk!r})"
    return Built(lambda: F.linear_cross_entropy(x, w, target, options=options), note)


# --- peers (CUDA only; installed from .whl/ by bench/fetch_peers.sh + gpu_check.sh) ------------

def _liger(case: Case, inp: Inputs, opts: dict) -> Built:
    _need_cuda(case, "liger_kernel", opts)
    lt = _import("liger_kernel.transformers", "liger_kernel")
    target, cap = inp["target"], case.cap
    version = f"liger_kernel {_version('liger-kernel')}"
    if case.op == "cross_entropy":
        loss = lt.LigerCrossEntropyLoss(softcap=cap)
        logits = inp["logits"]
        return Built(lambda: loss(logits, target),
                     f"{version}; computes the gradient in the forward, over the logits")
    # defaults: accum_dtype=None accumulates dW in the weight's dtype
    loss = lt.LigerFusedLinearCrossEntropyLoss(softcap=cap)
    x, w = inp["x"], inp["w"]
    return Built(lambda: loss(w, x, target),  # Liger's order: (lin_weight, input, target)
                 f"{version}; defaults (dW accumulated in the weight's dtype)")


def _cce(case: Case, inp: Inputs, opts: dict) -> Built:
    _need_cuda(case, "cut_cross_entropy", opts)
    cce = _import("cut_cross_entropy", "cut_cross_entropy")
    x, w, target, cap = inp["x"], inp["w"], inp["target"], case.cap
    eps = torch.finfo(case.torch_dtype).eps / 32
    return Built(lambda: cce.linear_cross_entropy(x, w, target, softcap=cap),
                 f"cut_cross_entropy {_version('cut-cross-entropy')}; defaults (filter_eps='high': "
                 f"gradient blocks whose probabilities are all below {eps:.3g} are skipped)")


PROVIDERS: dict[str, Provider] = {p.name: p for p in [
    Provider("triton_xent", "triton_xent, backend='auto' (the Triton kernel on CUDA)",
             _triton_xent("auto")),
    Provider("triton_xent_torch", "triton_xent, backend='torch' (its pure-torch backend)",
             _triton_xent("torch")),
    Provider("torch_eager_fp32", "F.cross_entropy(logits.float(), target), as training code "
             "writes it", _eager(upcast=True)),
    Provider("torch_eager", "F.cross_entropy(logits, target) in the input dtype",
             _eager(upcast=False)),
    Provider("torch_compile", "torch.compile of the fp32 form", _torch_compile, compiles=True),
    Provider("torch_native_linear_ce", "F.linear_cross_entropy with LinearCrossEntropyOptions",
             _torch_native, ops=("linear_cross_entropy",)),
    Provider("liger", "liger_kernel LigerCrossEntropyLoss / LigerFusedLinearCrossEntropyLoss",
             _liger, mutates=("cross_entropy",)),
    Provider("cce", "cut_cross_entropy.linear_cross_entropy", _cce,
             ops=("linear_cross_entropy",)),
]}

OURS = "triton_xent"
BASELINE = "torch_eager_fp32"
# What `python -m bench` runs unless --providers says otherwise: ours and every peer
# (triton_xent_torch is a diagnostic, on request).
DEFAULT_PROVIDERS = [p for p in PROVIDERS if p != "triton_xent_torch"]
