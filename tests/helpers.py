"""Shared test helpers: the float64 oracle comparison and per-dtype tolerances."""

from __future__ import annotations

import torch

from triton_xent.reference import cross_entropy_reference

# Relative tolerances, against the float64 reference of the same (dtype-rounded) inputs:
# the loss, and the gradient measured as max|err| / max|ref|. A bf16 result carries 8 bits.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    both_nan = torch.isnan(out) & torch.isnan(ref)
    if bool((torch.isnan(out) ^ torch.isnan(ref)).any()):
        return float("inf")
    diff = (out - ref).masked_fill(both_nan, 0).abs().max() if out.numel() else torch.tensor(0.0)
    scale = ref.masked_fill(both_nan, 0).abs().max() if ref.numel() else torch.tensor(0.0)
    return float(diff / scale.clamp_min(1e-30)) if float(diff) > 0 else 0.0


def compare(fn, input: torch.Tensor, target: torch.Tensor, *args, grad=True, **kwargs):
    """Runs ``fn`` (triton_xent.cross_entropy with its backend bound) and the float64 reference
    on the same inputs, with a random upstream gradient, and asserts both agree."""
    dtype = input.dtype
    x = input.detach().clone().requires_grad_(grad)
    ref_in = input.detach().double().requires_grad_(grad)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    w = kwargs.get("weight")
    ref_kwargs = dict(kwargs)
    if w is not None:
        ref_kwargs["weight"] = w.double()
    tgt64 = target.double() if target.is_floating_point() else target.long()

    out = fn(x, target, *args, **kwargs)
    ref = cross_entropy_reference(ref_in, tgt64, *args64, **ref_kwargs)
    assert out.dtype == dtype, f"loss dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"loss shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    tol_loss, tol_grad = TOL[dtype]
    e = rel_err(out, ref)
    assert e <= tol_loss, f"loss rel err {e:.3g} > {tol_loss} (out={out}, ref={ref})"
    if grad:
        g = torch.randn_like(ref) if ref.dim() else torch.randn((), dtype=torch.float64) + 2
        out.backward(g.to(out.dtype))
        ref.backward(g)
        assert x.grad is not None and x.grad.shape == x.shape
        e = rel_err(x.grad, ref_in.grad)
        assert e <= tol_grad, f"grad rel err {e:.3g} > {tol_grad}"
    return out, ref
