"""Vocabulary-parallel cross-entropy: each rank holds a slice of the LM head's vocabulary.

Run on a CPU machine (gloo) or on GPUs (NCCL, one per rank)::

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Every rank builds the same hidden states, labels and full LM head from one seed, keeps its
contiguous shard of the vocabulary (uneven sizes when V is not divisible by the world size), and
computes the loss twice: from its shard of the logits, and from its shard of the LM head (logits
are then never materialised beyond one chunk). Each rank prints the sharded loss next to the
unsharded one, and the error of its gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import triton_xent


def main() -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    group = dist.group.WORLD

    # The same problem on every rank: N tokens, hidden size D, an odd vocabulary V.
    N, D, V = 48, 64, 1001
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(device)
    head = (torch.randn(V, D, generator=g) / D**0.5).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::7] = -100  # padding
    opts = dict(label_smoothing=0.1, z_loss=1e-4)

    # This rank's contiguous shard of the vocabulary, in rank order.
    sizes = [V // world + (r < V % world) for r in range(world)]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    # Unsharded, on one process.
    x_full = hidden.clone().requires_grad_()
    w_full = head.clone().requires_grad_()
    logits_full = x_full @ w_full.T
    logits_full.retain_grad()
    ref = triton_xent.cross_entropy(logits_full, labels, **opts)
    ref.backward()

    # 1) Logits sharded along the vocabulary: (N, V_r).
    logits_shard = (hidden @ head[lo:hi].T).requires_grad_()
    loss = triton_xent.cross_entropy(logits_shard, labels, process_group=group, **opts)
    loss.backward()
    ref_logits_grad = logits_full.grad[:, lo:hi]

    # 2) The LM head sharded along the vocabulary: (V_r, D); d(hidden) is summed over the ranks.
    x = hidden.clone().requires_grad_()
    w_shard = head[lo:hi].clone().requires_grad_()
    loss_lin = triton_xent.linear_cross_entropy(x, w_shard, labels, process_group=group, **opts)
    loss_lin.backward()

    err = lambda a, b: float((a - b).abs().max())
    for r in range(world):  # one line per rank, in order
        if r == rank:
            print(
                f"rank {rank}/{world} classes [{lo}, {hi}) on {device}: "
                f"unsharded {ref.item():.6f} | sharded logits {loss.item():.6f} "
                f"(grad err {err(logits_shard.grad, ref_logits_grad):.1e}) | "
                f"sharded head {loss_lin.item():.6f} (d hidden err {err(x.grad, x_full.grad):.1e}, "
                f"d head err {err(w_shard.grad, w_full.grad[lo:hi]):.1e})",
                flush=True,
            )
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
