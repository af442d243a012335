"""Does the bf16 weight-gradient default drift a long RL run? A small GRPO-style run on the CPU.

``linear_cross_entropy`` accumulates a bf16 head's gradient in bf16 by default: each row chunk's
``dW`` GEMM adds its fp32 product into the bf16 ``dW`` and rounds once per chunk
(``accum_dtype=torch.float32`` keeps an fp32 accumulator and rounds once at the end). This
script trains a linear policy head (bf16 compute copy of fp32 master weights, Adam) on fixed
random hidden states (bf16 values) for a few hundred GRPO steps and follows the mean entropy of the policy:

- each step, ``G`` tokens are sampled at temperature ``T`` for each of ``P`` contexts from the
  current head (Gumbel-max on float64 logits with the same Gumbel noise in every run, so that
  runs whose heads agree draw the same tokens and the differences measured are the gradients');
- the reward of a token is a fixed random number per token id; advantages are normalised per
  group (the ``G`` samples of a context);
- loss = ``-(advantage * logp).mean()`` with ``logp = -linear_cross_entropy(h, W, tokens,
  reduction="none", temperature=T, chunk_size=C, loss_dtype=torch.float32)``: ``P G / C``
  chunks, so ``dW`` is rounded that many times per step, as at scale.

Runs from the same seed: ``bf16-dW`` (the default), ``fp32-dW`` (``accum_dtype=torch.float32``),
``fp32-dW-4x`` (the same with 4x larger chunks: it differs from ``fp32-dW`` only in the order of
fp32 additions, the control that shows how far any tiny perturbation carries a run),
``eager-bf16`` (PyTorch's ``F.cross_entropy(F.linear(h, W) / T)`` in bf16: the logits rounded to
bf16) and ``float64`` (the same steps in float64 with autograd, no rounding anywhere). The
entropy is computed from the full logits of the bf16 head in float64.

    python -m bench.rl_drift                 # about a minute on one CPU core
    python -m bench.rl_drift --steps 600 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import triton_xent

RUNS = ("bf16-dW", "fp32-dW", "fp32-dW-4x", "eager-bf16", "float64")


def _problem(seed: int, P: int, D: int, V: int):
    g = torch.Generator().manual_seed(seed)
    # hidden states a bf16 model could hand over: every run sees the same values
    h = torch.randn(P, D, generator=g, dtype=torch.float64).to(torch.bfloat16).double()
    w0 = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D ** 0.5)
    reward = torch.randn(V, generator=g, dtype=torch.float64)
    return h, w0, reward


def _entropy(h: torch.Tensor, w: torch.Tensor, T: float) -> float:
    logp = torch.log_softmax((h @ w.t()) / T, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def _loss(run: str, h, w, tokens, adv, T: float, chunk: int):
    if run == "float64":
        logp = -F.cross_entropy((h @ w.t()) / T, tokens, reduction="none")
    elif run == "eager-bf16":
        logp = -F.cross_entropy(F.linear(h, w) / T, tokens, reduction="none")
    else:
        accum = torch.float32 if run.startswith("fp32-dW") else None
        chunk = 4 * chunk if run == "fp32-dW-4x" else chunk
        logp = -triton_xent.linear_cross_entropy(h, w, tokens, reduction="none", temperature=T,
                                                 chunk_size=chunk, accum_dtype=accum,
                                                 loss_dtype=torch.float32)  # fp32 log-probs
    return -(adv * logp.double()).mean()


def _rounding_error(rows, w, tokens, adv, h, T: float, chunk: int, got: torch.Tensor):
    """At this step's head and samples: the per-chunk rounding error ``e`` of the default's
    ``dW`` (``got``) against ``accum_dtype=torch.float32`` on the same inputs, as
    ``(|e| / |dW|, cos(e, dH/dW))``: a rounding that pushed the entropy one way would show as a
    correlation of one sign across the steps."""
    w32 = w.detach().clone().requires_grad_(True)
    _loss("fp32-dW", rows, w32, tokens, adv, T, chunk).backward()
    e = (got.double() - w32.grad.double()).flatten()
    w64 = w.detach().double().requires_grad_(True)
    logp = torch.log_softmax((h @ w64.t()) / T, dim=-1)
    (g_h,) = torch.autograd.grad(-(logp.exp() * logp).sum(-1).mean(), w64)
    g_h = g_h.flatten()
    rel = float(e.norm() / w32.grad.double().norm())
    cos = float(e @ g_h / (e.norm() * g_h.norm()).clamp_min(1e-300))
    return rel, cos


def train(run: str, seed: int, *, steps: int, P: int, G: int, D: int, V: int, T: float,
          chunk: int, lr: float, every: int, errors: list | None = None) -> list[float]:
    """The entropy trajectory (every ``every`` steps and after the last) of one run; the
    ``bf16-dW`` run appends its rounding errors (:func:`_rounding_error`) to ``errors``."""
    h, w0, reward = _problem(seed, P, D, V)
    dtype = torch.float64 if run == "float64" else torch.bfloat16
    master = w0.clone() if run == "float64" else w0.float()
    master.requires_grad_(True)
    opt = torch.optim.Adam([master], lr=lr)
    rows = h.repeat_interleave(G, 0).to(dtype)  # P groups of G rows
    noise = torch.Generator().manual_seed(seed + 1)
    trajectory = []
    for step in range(steps + 1):
        w = master.detach().to(dtype)
        if step % every == 0 or step == steps:
            trajectory.append(_entropy(h, w.double(), T))
        if step == steps:
            break
        with torch.no_grad():  # sample from the current head
            logits = (h @ w.double().t()).repeat_interleave(G, 0) / T
            u = torch.rand(logits.shape, generator=noise, dtype=torch.float64).clamp_min(1e-300)
            tokens = (logits - torch.log(-torch.log(u))).argmax(-1)
            r = reward[tokens].view(P, G)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        w = w.requires_grad_(True)
        _loss(run, rows, w, tokens, adv, T, chunk).backward()
        if errors is not None and run == "bf16-dW":
            errors.append(_rounding_error(rows, w, tokens, adv, h, T, chunk, w.grad))
        opt.zero_grad(set_to_none=True)
        master.grad = w.grad.to(master.dtype)
        opt.step()
    return trajectory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--P", type=int, default=32, help="contexts (groups) per step")
    ap.add_argument("--G", type=int, default=8, help="samples per context")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--V", type=int, default=512)
    ap.add_argument("--T", type=float, default=0.7, help="sampling temperature")
    ap.add_argument("--chunk", type=int, default=32, help="rows per chunk (P G / chunk chunks)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = dict(steps=a.steps, P=a.P, G=a.G, D=a.D, V=a.V, T=a.T, chunk=a.chunk, lr=a.lr,
              every=a.every)
    n = a.P * a.G
    print(f"GRPO-style: {a.steps} steps, {a.P} groups x {a.G} samples = {n} rows, D={a.D}, "
          f"V={a.V}, T={a.T}, {-(-n // a.chunk)} chunks of {a.chunk} rows, Adam lr={a.lr}, "
          f"fp32 master weights (the float64 run: float64), seeds {a.seeds}")
    t0 = time.perf_counter()
    errors: list[tuple[float, float]] = []
    traj = {(run, s): train(run, s, errors=errors, **kw) for s in a.seeds for run in RUNS}
    steps = [min(i * a.every, a.steps) for i in range(len(traj[RUNS[0], a.seeds[0]]))]
    for s in a.seeds:
        print(f"\nseed {s}: mean entropy (nats) of the policy at T={a.T}")
        print(f"| step | {' | '.join(RUNS)} | bf16-dW - fp32-dW |")
        print("|---:|" + "---:|" * (len(RUNS) + 1))
        for i, st in enumerate(steps):
            vals = [traj[r, s][i] for r in RUNS]
            print(f"| {st} | " + " | ".join(f"{v:.4f}" for v in vals)
                  + f" | {vals[0] - vals[1]:+.2e} |")
    print("\nentropy differences over the trajectory (nats; max |.| over the recorded steps, "
          "and at the last step), every seed:")
    print("| pair | max abs | rms of last | mean of last | its standard error | last (per seed) |")
    print("|---|---:|---:|---:|---:|---|")
    for x, y in (("bf16-dW", "fp32-dW"), ("fp32-dW-4x", "fp32-dW"), ("bf16-dW", "float64"),
                 ("fp32-dW", "float64"), ("eager-bf16", "float64")):
        diffs = [[p - q for p, q in zip(traj[x, s], traj[y, s])] for s in a.seeds]
        mx = max(abs(d) for ds in diffs for d in ds)
        last = torch.tensor([ds[-1] for ds in diffs], dtype=torch.float64)
        sem = float(last.std() / len(last) ** 0.5) if len(last) > 1 else float("nan")
        print(f"| {x} - {y} | {mx:.2e} | {float(last.square().mean().sqrt()):.2e} | "
              f"{float(last.mean()):+.2e} | {sem:.1e} | "
              f"{', '.join(f'{v:+.1e}' for v in last.tolist())} |")
    rel, cos = (torch.tensor(c, dtype=torch.float64) for c in zip(*errors))
    print(f"\nthe default's per-chunk rounding of dW, every step of the bf16-dW runs "
          f"({len(errors)} steps), against accum_dtype=torch.float32 on the same inputs:\n"
          f"  |error| / |dW|: mean {float(rel.mean()):.2e}, max {float(rel.max()):.2e}\n"
          f"  cos(error, d(entropy)/dW): mean {float(cos.mean()):+.2e} "
          f"(standard error {float(cos.std() / len(cos) ** 0.5):.1e}), "
          f"mean |cos| {float(cos.abs().mean()):.2e}")
    print(f"\n({time.perf_counter() - t0:.0f} s on the CPU, {a.threads} thread(s))")


if __name__ == "__main__":
    main()
