"""Implementations under test: each a small builder that turns the shared inputs of a case into
a zero-argument callable returning the loss (mean reduction, default ignore_index).

A builder raises :class:`Skip` with a reason when its implementation is not installed or cannot
run on this device; the harness prints the reason and records it in ``skipped.csv``. Nothing is
ever replaced by a stand-in.
"""

from __future__ import annotations

import importlib
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
    mutates_input: bool = False  # gets its own clone of the inputs
    compiles: bool = False  # slow first call
    preload: tuple[str, ...] = ()  # heavy modules its first call imports (for memory children)


def _import(name: str, what: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # not installed, or broken
        raise Skip(f"{what} is not importable ({type(exc).__name__}: {exc})") from None


def _need_cuda(case: Case, what: str) -> None:
    if case.device != "cuda":
        raise Skip(f"{what} runs on CUDA only; this run is on {case.device}")


# --- triton_xent -------------------------------------------------------------------------------

def _triton_xent(backend: str):
    def build(case: Case, inp: Inputs, opts: dict) -> Built:
        tx = _import("triton_xent", "triton_xent")
        if backend == "auto" and case.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            raise Skip("TRITON_INTERPRET=1: backend='auto' would time the Triton interpreter, "
                       "which is a correctness tool, not a speed one")
        if case.op == "cross_entropy":
            ce = tx.cross_entropy
            logits, target = inp["logits"], inp["target"]
            note = ""
            if hasattr(tx, "explain"):
                note = f"backend={backend} -> {tx.explain(logits, target, backend=backend)}"
            return Built(lambda: ce(logits, target, backend=backend), note)
        lce = getattr(tx, "linear_cross_entropy", None)
        if lce is None:
            raise Skip("triton_xent.linear_cross_entropy does not exist in this checkout yet")
        x, w, target = inp["x"], inp["w"], inp["target"]
        note = f"backend={backend}"
        if backend == "auto" and case.device != "cuda":
            note += " (no CUDA: the Triton kernel cannot run, so this is the torch backend)"
        return Built(lambda: lce(x, w, target, backend=backend), note)

    return build


# --- PyTorch -----------------------------------------------------------------------------------

def _eager(upcast: bool):
    def build(case: Case, inp: Inputs, opts: dict) -> Built:
        up = (lambda t: t.float()) if upcast else (lambda t: t)
        target = inp["target"]
        if case.op == "cross_entropy":
            logits = inp["logits"]
            return Built(lambda: F.cross_entropy(up(logits), target))
        x, w = inp["x"], inp["w"]
        return Built(lambda: F.cross_entropy(up(F.linear(x, w)), target))

    return build


def _ce_fp32(logits, target):
    return F.cross_entropy(logits.float(), target)


def _linear_ce_fp32(x, w, target):
    return F.cross_entropy(F.linear(x, w).float(), target)


_compiled: dict[str, Callable] = {}


def _compiled_fn(op: str):
    """One torch.compile wrapper per op for the process: shapes recompile (static), so raise
    dynamo's recompile limit above the number of sweep points."""
    if op not in _compiled:
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(dcfg, name, None) is not None and getattr(dcfg, name) < 64:
                setattr(dcfg, name, 64)
        fn = _ce_fp32 if op == "cross_entropy" else _linear_ce_fp32
        _compiled[op] = torch.compile(fn, dynamic=False)
    return _compiled[op]


def _torch_compile(case: Case, inp: Inputs, opts: dict) -> Built:
    f = _compiled_fn(case.op)
    # Compilation happens on the first call; the harness turns a failure there into a skip.
    if case.op == "cross_entropy":
        logits, target = inp["logits"], inp["target"]
        return Built(lambda: f(logits, target), "torch.compile(dynamic=False) of the fp32 form")
    x, w, target = inp["x"], inp["w"], inp["target"]
    return Built(lambda: f(x, w, target), "torch.compile(dynamic=False) of the fp32 form")


def _torch_native(case: Case, inp: Inputs, opts: dict) -> Built:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy with "
                   "LinearCrossEntropyOptions (chunked path)")
    chunk = opts.get("native_batch_chunk", 1024)
    if chunk == "auto":  # torch's own heuristic (aspect_ratio): tiny chunks when N is small
        options = torch.nn.LinearCrossEntropyOptions()
    else:
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=int(chunk),
                                                     chunking_method=None)
    x, w, target = inp["x"], inp["w"], inp["target"]
    note = f"LinearCrossEntropyOptions(batch_chunk_size={chunk!r})"
    return Built(lambda: F.linear_cross_entropy(x, w, target, options=options), note)


# --- peers (CUDA only) -------------------------------------------------------------------------

def _liger(case: Case, inp: Inputs, opts: dict) -> Built:
    _need_cuda(case, "liger_kernel")
    lt = _import("liger_kernel.transformers", "liger_kernel")
    target = inp["target"]
    if case.op == "cross_entropy":
        loss = lt.LigerCrossEntropyLoss()
        logits = inp["logits"]
        return Built(lambda: loss(logits, target), "writes the gradient over the logits")
    loss = lt.LigerFusedLinearCrossEntropyLoss()
    x, w = inp["x"], inp["w"]
    return Built(lambda: loss(w, x, target))  # Liger's order: (lin_weight, input, target)


def _cce(case: Case, inp: Inputs, opts: dict) -> Built:
    _need_cuda(case, "cut_cross_entropy")
    cce = _import("cut_cross_entropy", "cut_cross_entropy")
    x, w, target = inp["x"], inp["w"], inp["target"]
    return Built(lambda: cce.linear_cross_entropy(x, w, target))


PROVIDERS: dict[str, Provider] = {p.name: p for p in [
    Provider("triton_xent", "triton_xent, backend='auto' (the Triton kernel on CUDA)",
             _triton_xent("auto")),
    Provider("triton_xent_torch", "triton_xent, backend='torch' (its pure-torch backend)",
             _triton_xent("torch")),
    Provider("torch_eager_fp32", "F.cross_entropy(logits.float(), target), as training code "
             "writes it", _eager(upcast=True)),
    Provider("torch_eager", "F.cross_entropy(logits, target) in the input dtype",
             _eager(upcast=False)),
    Provider("torch_compile", "torch.compile of the fp32 form", _torch_compile, compiles=True,
             preload=("torch._dynamo", "torch._inductor.compile_fx")),
    Provider("torch_native_linear_ce", "F.linear_cross_entropy with LinearCrossEntropyOptions",
             _torch_native, ops=("linear_cross_entropy",), preload=("torch._dynamo",)),
    Provider("liger", "liger_kernel LigerCrossEntropyLoss / LigerFusedLinearCrossEntropyLoss",
             _liger, mutates_input=True),
    Provider("cce", "cut_cross_entropy.linear_cross_entropy", _cce,
             ops=("linear_cross_entropy",)),
]}

BASELINE = "torch_eager_fp32"
