"""Tensor-parallel training with DTensor: the LM head sharded on the vocabulary, triton_xent's loss.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py      # CPU (gloo) or GPUs (NCCL)
    python examples/tensor_parallel.py --quick                   # starts 2 CPU ranks itself

A tiny causal LM (embeddings, a transformer block, an untied LM head over an odd vocabulary, so
the shards are uneven) is trained for a few steps twice from the same initialisation on the same
batches:

* tensor parallel: ``parallelize_module`` shards the LM head with ``ColwiseParallel(output_layouts=
  Shard(-1), use_local_output=False)``, so the logits are a DTensor sharded on the vocabulary
  (each rank holds ``(B, T, V_r)``) and ``triton_xent.cross_entropy`` takes them as they come
  (torchtitan's recipe with ``loss_parallel()`` replaced): no rank ever holds the full logits.
  The step (model and loss) runs under ``torch.compile`` unless ``--no-compile``;
* single process: the same model, unsharded, with PyTorch's ``F.cross_entropy``, eagerly.

Every rank trains both (the body of the model is replicated, the data the same on every rank);
rank 0 prints the two losses side by side. They agree to fp32 rounding (the sharded loss sums in
another order); the script exits with an error if they do not.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import triton_xent


class TinyLM(nn.Module):
    """Token and position embeddings, one pre-norm transformer block, an untied LM head."""

    def __init__(self, vocab: int, hidden: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq, hidden)
        self.block = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.lm_head(self.norm(self.block(x, src_mask=mask, is_causal=True)))


def make_batches(vocab: int, steps: int, batch: int, seq: int, seed: int = 0):
    """A synthetic language of 32 fixed 8-token phrases spread over the vocabulary (the next token
    inside a phrase is determined, so the loss falls), cut into (batch, seq + 1) windows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(vocab, generator=g)[: 32 * 8].view(32, 8)
    corpus = table[torch.randint(0, 32, (4096,), generator=g)].reshape(-1)
    starts = torch.randint(0, corpus.numel() - seq - 1, (steps, batch), generator=g)
    return [corpus[s[:, None] + torch.arange(seq + 1)] for s in starts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few tiny steps (tests)")
    p.add_argument("--no-compile", action="store_true", help="run the tensor-parallel step eagerly")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    if "RANK" not in os.environ:  # not under torchrun: start 2 ranks of this script
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", "--nproc-per-node", "2", __file__, *sys.argv[1:]])
        return

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    world = int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = "cuda" if use_cuda else "cpu"
    mesh = init_device_mesh(device, (world,), mesh_dim_names=("tp",))  # also the process group
    rank = dist.get_rank()

    vocab, hidden, heads, seq, batch = (1001, 64, 4, 32, 8) if args.quick else (8009, 256, 4, 128, 16)
    steps = args.steps or (4 if args.quick else 30)
    torch.manual_seed(0)  # the same initialisation on every rank and for both runs
    single = TinyLM(vocab, hidden, heads, seq).to(device)
    model = copy.deepcopy(single)
    parallelize_module(model, mesh, {
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    })

    def tp_step(ids, labels):
        logits = model(ids)  # a DTensor (B, T, V), Shard(-1): this rank holds (B, T, V_r)
        return triton_xent.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))

    step = tp_step if args.no_compile else torch.compile(tp_step, fullgraph=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, foreach=False) for m in (model, single)]
    sizes = [None] * world
    dist.all_gather_object(sizes, model.lm_head.weight.to_local().shape[0])
    if rank == 0:
        print(f"{world} ranks on {device}; the vocabulary of {vocab} sharded {sizes}; the "
              f"tensor-parallel step {'eager' if args.no_compile else 'under torch.compile'}",
              flush=True)
        print(f"{'step':>4}  {'tensor parallel':>16}  {'single process':>16}  rel. diff")
    worst = 0.0
    for i, window in enumerate(make_batches(vocab, steps, batch, seq)):
        ids, labels = window[:, :-1].to(device), window[:, 1:].to(device)
        loss = step(ids, labels)  # a Replicate() DTensor: every rank holds the loss
        ref = F.cross_entropy(single(ids).flatten(0, 1), labels.flatten(0, 1))
        for opt, value in zip(opts, (loss, ref)):
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        a, b = loss.full_tensor().item(), ref.item()
        worst = max(worst, abs(a - b) / abs(b))
        if rank == 0:
            print(f"{i:>4}  {a:>16.7f}  {b:>16.7f}  {abs(a - b) / abs(b):.1e}", flush=True)
    dist.destroy_process_group()
    if worst > 2e-5:  # fp32 rounding, compounded over a few optimizer steps
        raise SystemExit(f"rank {rank}: the losses differ by {worst:.1e} (relative): more than "
                         "fp32 rounding")
    if rank == 0:
        print(f"OK: the tensor-parallel loss matches the single-process one (max rel. diff "
              f"{worst:.1e}).")


if __name__ == "__main__":
    main()
