"""Train a tiny causal LM with a 32k vocabulary twice: PyTorch's loss vs triton_xent's fused loss.

    python examples/train_tiny_lm.py                 # CUDA if there is one, else the CPU
    python examples/train_tiny_lm.py --quick         # a few tiny steps (tests)

Both runs start from the same initialisation and see the same batches of a synthetic language
generated here: documents are random sequences of 64 fixed "phrases" of 8 tokens spread over the
whole vocabulary, so within a phrase the next token is determined and the loss falls from
ln(V) ~ 10.4 towards ~0.5 nats. The runs differ only in the loss:

* ``torch``: ``F.cross_entropy(lm_head(h), y)``, the (tokens, V) logits built and kept;
* ``triton_xent``: ``triton_xent.linear_cross_entropy(h, lm_head.weight, y)``, chunked, the
  logits never built whole.

The loss curves agree (the max difference is printed) and the peak memory is measured honestly,
each run in its own child process: on CUDA ``torch.cuda.max_memory_allocated`` above what was
allocated before the first step; on the CPU the process's peak resident set size
(``getrusage``'s ``ru_maxrss``) above its resident size before the first step. The curves are
written to a PNG (``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn.functional as F
from torch import nn

import triton_xent

MiB = 2**20
VARIANTS = ("torch", "triton_xent")


class TinyLM(nn.Module):
    """Token and position embeddings, a few pre-norm transformer blocks, an untied LM head."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq, hidden)
        block = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))


def make_corpus(vocab: int, n_tokens: int, seed: int, phrases: int = 64, phrase_len: int = 8):
    """A stream of random phrases; the phrases' tokens are distinct and spread over the vocab."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(vocab, generator=g)[: phrases * phrase_len].view(phrases, phrase_len)
    picks = torch.randint(0, phrases, (n_tokens // phrase_len + 1,), generator=g)
    return table[picks].reshape(-1)[:n_tokens]


def batches(corpus: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    """``steps`` batches of (batch, seq + 1) windows at random offsets: inputs and next tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, corpus.numel() - seq - 1, (steps, batch), generator=g)
    offsets = torch.arange(seq + 1)
    return [corpus[s[:, None] + offsets] for s in starts]


def progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=True)


class _Progress:
    """A minimal stand-in for tqdm: one line on stderr, rewritten in place."""

    def __init__(self, iterable, total, desc):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, ""

    def __iter__(self):
        for i, item in enumerate(self.iterable, 1):
            yield item
            bar = "#" * (20 * i // self.total)
            print(f"\r{self.desc} [{bar:<20}] {i}/{self.total} {self.postfix}", end="",
                  file=sys.stderr, flush=True)
        print(file=sys.stderr)

    def set_postfix_str(self, s):
        self.postfix = s


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def train(variant: str, args: argparse.Namespace) -> dict:
    """One training run (in a fresh child process): losses, seconds per step, peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.hidden, args.layers, args.heads, args.seq).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    corpus = make_corpus(args.vocab, 200_000, args.seed)
    data = [b.to(dev) for b in batches(corpus, args.steps, args.batch, args.seq, args.seed)]
    chunk_bytes = args.chunk_mib * MiB if args.chunk_mib else None

    def loss_fn(h, y):
        if variant == "torch":
            return F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())
        return triton_xent.linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, y.flatten(),
                                                chunk_bytes=chunk_bytes)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes()
    losses = []
    bar = progress(data, len(data), f"{variant:>11}")
    t0 = time.perf_counter()
    for batch in bar:
        x, y = batch[:, :-1], batch[:, 1:]
        loss = loss_fn(model.hidden_states(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak, what = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
    else:
        peak, what = _peak_rss_bytes(), "peak RSS of the child process (ru_maxrss)"
    seconds = (time.perf_counter() - t0) / len(data)
    return dict(losses=losses, base=base, peak=peak, what=what, seconds=seconds,
                backend=None if variant == "torch" else _backend_reason(dev))


def _backend_reason(dev) -> str:
    probe = torch.zeros(1, 2, device=dev)
    return str(triton_xent.explain(probe, torch.zeros(1, dtype=torch.long, device=dev)))


def plot(results: dict, args, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib).")
        return False
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    for name, style in zip(VARIANTS, ("-", "--")):
        ax.plot(range(1, args.steps + 1), results[name]["losses"], style, label=name)
    ax.axhline(math.log(args.vocab), color="gray", lw=0.5)
    ax.set(xlabel="step", ylabel="training loss (nats)",
           title=f"Tiny LM, V={args.vocab}, {args.batch}x{args.seq} tokens/step, {args.device}")
    ax.legend()
    growth = [(results[n]["peak"] - (results[n]["base"] or 0)) / MiB for n in VARIANTS]
    ax_mem.bar(VARIANTS, growth, color=["tab:blue", "tab:orange"])
    ax_mem.set(ylabel="MiB", title="peak memory above start")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                               "train_tiny_lm.png")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-mib", type=int, default=8,
                   help="logits chunk of linear_cross_entropy in MiB (library default 128, 0 "
                        "for it); small here so that chunking shows at this small size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=default_out, help="PNG of the loss curves")
    p.add_argument("--quick", action="store_true", help="a few tiny steps, for tests")
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.seq, args.batch, args.steps = 4096, 32, 1, 16, 4, 3

    tokens = args.batch * args.seq
    print(f"Tiny LM: V={args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{tokens} tokens/step, {args.steps} steps, device {args.device}")
    print(f"  (tokens, V) fp32 logits: {tokens * args.vocab * 4 / MiB:.0f} MiB; triton_xent "
          f"chunk: {args.chunk_mib or 128} MiB")
    results = {}
    for name in VARIANTS:  # each run in a fresh process: its own peak memory, same init and data
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            results[name] = pool.submit(train, name, args).result()

    ref, fused = results["torch"], results["triton_xent"]
    diff = max(abs(a - b) for a, b in zip(ref["losses"], fused["losses"]))
    print(f"\ntriton_xent backend: {fused['backend']}")
    print(f"loss: first {ref['losses'][0]:.4f}, last torch {ref['losses'][-1]:.4f} / "
          f"triton_xent {fused['losses'][-1]:.4f}; max |difference| over the curve {diff:.2e}")
    print(f"peak memory, {ref['what']}:")
    for name in VARIANTS:
        r = results[name]
        base = f" ({(r['peak'] - r['base']) / MiB:7.1f} MiB above the start)" if r["base"] else ""
        print(f"  {name:>11}: {r['peak'] / MiB:8.1f} MiB{base}   {r['seconds'] * 1e3:7.1f} ms/step")
    if plot(results, args, args.out):
        print(f"curves written to {args.out}")
    # fp32 training diverges slowly from rounding differences; a real bug differs at once.
    ok = diff < 1e-2 * max(1.0, abs(ref["losses"][0]))
    if not ok:
        print("MISMATCH: the loss curves differ.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
