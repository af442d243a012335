"""DeepSpeed ZeRO-3 with the fused head, on 2 gloo CPU ranks (the harness and the checks of
test_fsdp_layouts.py): every parameter partitioned and released after use, the patched model
against the unpatched one (losses of 3 SGD steps, weights after them) and no ``(tokens, V)``
tensor allocated. DeepSpeed is in the dev extras (a pure-Python install), so CI runs it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from gloo import Parts, check_part, init, rank_env, spawn

pytest.importorskip("transformers")
from hf_models import GRAD_TOL, make_batch  # noqa: E402
from test_fsdp_layouts import WORLD, Shapes, _close, _llama  # noqa: E402

from triton_xent.integrations import transformers as tx  # noqa: E402

ZERO = Parts()


@ZERO(WORLD)
def deepspeed_zero3_every_parameter_released():
    """DeepSpeed ZeRO-3 with nothing persistent (every parameter partitioned and released after
    use): the head's weight is empty outside the forward; DeepSpeed gathers it when the fused
    loss reads it inside the model's forward, and keeps it for the backward."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_max_live_parameters": 0,
                                 "stage3_prefetch_bucket_size": 0}}
    runs = []
    for patched in (False, True):
        model = _llama()
        if patched:
            tx.patch(model, chunk_size=8)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=cfg)
        assert model.lm_head.weight.numel() == 0  # partitioned
        losses, shapes = [], Shapes()
        for step in range(3):
            with shapes:
                out = engine(**make_batch(seed=100 + 10 * step + dist.get_rank()))
                engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss))
        assert (out.logits is None) == patched and bool(shapes.big) != patched, shapes.big[:3]
        runs.append((losses, {n: safe_get_full_fp32_param(p).clone()
                              for n, p in engine.module.named_parameters()}))
    (ref_losses, ref_weights), (losses, weights) = runs
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    _close(weights, ref_weights, GRAD_TOL["rtol"], GRAD_TOL["atol"], "weight")


def _zero_entry(rank, world, init_method, out_dir):
    import deepspeed

    init(rank, world, init_method, timeout_s=120)
    rank_env(rank, world, os.environ.get("TRITON_XENT_BACKEND", "torch"))
    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks (C++, over a minute on a
    # fresh install) that only its inference all-reduce uses: gloo runs the collectives here.
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if compatible is not None:
        compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    ZERO.run(rank, out_dir, lambda fn, nranks: fn() or "ok")
    dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_zero3():
    pytest.importorskip("deepspeed")
    results = spawn(_zero_entry, WORLD)
    check_part(results, ZERO, "deepspeed_zero3_every_parameter_released")
