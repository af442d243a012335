"""One GRPO policy step on the CPU: peak memory and time of the head + loss, ours against TRL's.

    MALLOC_MMAP_THRESHOLD_=131072 python -m bench.rl_step            # the README's table
    MALLOC_MMAP_THRESHOLD_=131072 python -m bench.rl_step --no-entropy --only ours

The step: ``dapo``, ``beta=0.04``, T=0.7, 8 completions x 256 tokens (200 kept), D=256,
V=65536, fp32 (the shape of issue 21), forward and backward of the head and the loss:

* ``linear_policy_loss`` (the default chunk, and ``chunk_size=512``), torch backend;
* TRL's fused head (``trl.kernels.ChunkedLogProbFunction``, log-probs and entropy as its
  ``GRPOTrainer`` asks) followed by TRL's GRPO math (the same formulas);
* full logits (``log_softmax``, gather, entropy) followed by the same math.

Peak memory is the resident set beyond the inputs (:func:`bench.measure.cpu_peak_bytes`); set
``MALLOC_MMAP_THRESHOLD_`` as above so that freed buffers leave the resident set at once (glibc's
moving threshold otherwise makes the same run read differently). Times: median of 3 after a
warm-up. CPU only: no GPU figure comes from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.measure import cpu_peak_bytes

B, T, KEPT, D, V, TEMP, BETA, EPS_LOW, EPS_HIGH = 8, 256, 200, 256, 65536, 0.7, 0.04, 0.2, 0.28


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    target = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[:, KEPT:] = 0
    old = -10 + torch.randn(B, T, generator=g) * 0.1
    ref = old + 0.05 * torch.randn(B, T, generator=g)
    return h, W, target, adv, mask, old, ref


def grpo_math(lp, adv, mask, old, ref):
    """TRL's ``dapo`` token loss with the KL term (``GRPOTrainer._compute_loss``)."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = per_token + BETA * kl
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def cases(entropy: bool, only: str | None):
    from triton_xent import linear_policy_loss

    h, W, target, adv, mask, old, ref = problem()

    def ours(chunk):
        def step():
            loss, _ = linear_policy_loss(h, W, target, adv, mask=mask, old_logprobs=old,
                                         ref_logprobs=ref, beta=BETA, epsilon_low=EPS_LOW,
                                         epsilon_high=EPS_HIGH, temperature=TEMP,
                                         chunk_size=chunk, backend="torch",
                                         return_entropy=entropy)
            loss.backward()
            return loss
        return step

    def trl_head():
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        lp, *_ = ChunkedLogProbFunction.apply(h.reshape(-1, D), W, None, target.reshape(-1), TEMP,
                                              _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        loss = grpo_math(lp.view(B, T), adv, mask, old, ref)
        loss.backward()
        return loss

    def full_logits():
        logp = torch.log_softmax((h @ W.T) / TEMP, -1)
        lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if entropy:
            with torch.no_grad():
                -(logp.exp() * logp).sum(-1)
        loss = grpo_math(lp, adv, mask, old, ref)
        loss.backward()
        return loss

    all_cases = [("ours", "linear_policy_loss, default chunk", ours(None)),
                 ("ours", "linear_policy_loss, chunk_size=512", ours(512)),
                 ("trl", "TRL ChunkedLogProbFunction + GRPO math", trl_head),
                 ("full", "full logits + GRPO math", full_logits)]
    return [(name, fn) for kind, name, fn in all_cases if only in (None, kind)], [h, W]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-entropy", action="store_true", help="log-probs only")
    p.add_argument("--only", choices=("ours", "trl", "full"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, leaves = cases(not args.no_entropy, args.only)
    print(f"GRPO policy step, {B} x {T} tokens ({KEPT} kept), D={D}, V={V}, fp32, CPU, "
          f"{args.threads} thread(s), entropy {'off' if args.no_entropy else 'on'}")
    for name, fn in runs:
        for t in leaves:
            t.grad = None
        loss = float(fn().detach())  # warm-up
        times = []
        for _ in range(3):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = cpu_peak_bytes(fn, leaves)
        print(f"  {name:42s} loss {loss:+.7f}  peak {peak / 2**20:7.1f} MiB  "
              f"time {statistics.median(times) * 1e3:6.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
