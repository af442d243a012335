"""triton_xent in two minutes: a drop-in for ``F.cross_entropy``, and the fused LM-head loss.

    python examples/quickstart.py            # CUDA if there is one, else the CPU
    python examples/quickstart.py --quick    # tiny shapes (seconds)

Prints the loss and gradient differences against PyTorch and which backend ran, and why
(``triton_xent.explain``): the Triton kernel on a CUDA/ROCm tensor, the pure-torch backend on the
CPU (or the Triton interpreter with ``TRITON_INTERPRET=1``). Exits with status 1 on a mismatch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import triton_xent

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="rows of logits (N)")
    parser.add_argument("--vocab", type=int, default=50257, help="classes (V)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the LM-head demo")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.hidden = 64, 4099, 32
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    torch.manual_seed(0)
    ok = True

    # 1. Drop-in: same arguments as F.cross_entropy, same loss, same gradient.
    logits = torch.randn(args.tokens, args.vocab, device=dev, dtype=dtype, requires_grad=True)
    target = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    target[::7] = -100  # ignored positions (padding, prompt tokens)
    kwargs = dict(ignore_index=-100, label_smoothing=0.1)

    ref = F.cross_entropy(logits.float(), target, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    loss = triton_xent.cross_entropy(logits, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)

    print(f"cross_entropy on ({args.tokens}, {args.vocab}) {args.dtype} logits, device {dev}:")
    print(f"  backend   {triton_xent.explain(logits, target, **kwargs)}")
    print(f"  loss      torch {ref.item():.6f}   triton_xent {loss.item():.6f}")
    d_loss, d_grad = rel_diff(loss, ref), rel_diff(grad, ref_grad)
    print(f"  rel diff  loss {d_loss:.2e}   grad {d_grad:.2e}")
    ok &= d_loss <= TOL[dtype] and d_grad <= TOL[dtype]

    # 2. Fused LM head: the loss of hidden @ W.T without ever building the (N, V) logits.
    hidden = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    lm_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=dev, dtype=dtype)
    ref = F.cross_entropy(lm_head(hidden).float(), target)
    ref_grads = torch.autograd.grad(ref, (hidden, lm_head.weight))
    loss = triton_xent.linear_cross_entropy(hidden, lm_head.weight, target)
    grads = torch.autograd.grad(loss, (hidden, lm_head.weight))

    print(f"linear_cross_entropy, hidden ({args.tokens}, {args.hidden}) x weight "
          f"({args.vocab}, {args.hidden}):")
    print(f"  loss      torch {ref.item():.6f}   triton_xent {loss.item():.6f}")
    diffs = [rel_diff(loss, ref)] + [rel_diff(g, r) for g, r in zip(grads, ref_grads)]
    print(f"  rel diff  loss {diffs[0]:.2e}   d hidden {diffs[1]:.2e}   d weight {diffs[2]:.2e}")
    ok &= max(diffs) <= TOL[dtype]

    print("OK: triton_xent matches PyTorch." if ok else "MISMATCH beyond tolerance.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
