"""The fused LM head in every layout the training stacks build, on 2 gloo CPU ranks.

Each part trains a tiny Llama for 3 SGD steps twice under the same sharding, patched
(``fused=True``, ``chunk_size=8``) and unpatched, and compares the losses of every step, the
gradients of the last step and the weights after the last step (DTensors gathered with
``full_tensor()``). A dispatch mode records the shape of every op's output: the patched run
never makes a ``(tokens, V)`` tensor (nor one of this rank's vocabulary shard), the unpatched
one does (so the check can fail).

Layouts (FSDP2, ``fully_shard`` on every decoder layer and on the model, plus): the head in the
root unit; ``lm_head`` alone with ``reshard_after_forward`` True and False (its weight is still
this rank's shard when the loss reads it: gathered for the call, gradient averaged); the tail
``[norm, lm_head]``; accelerate 1.16's layout by hand (``embed_tokens`` alone, the tail with
``reshard_after_forward=False``); tied embeddings in ``[embed_tokens, lm_head]``; bf16 mixed
precision (``param_dtype=bf16, reduce_dtype=fp32``) with the head in the root unit and alone;
DDP; transformers' own FSDP2 (``from_pretrained(..., distributed_config=DistributedConfig(
fsdp_size=2))``: its plan, the tail ``[norm, lm_head]`` kept after the forward), also tied and
with its ``fsdp_mixed_precision``; transformers' tensor parallelism (``from_pretrained(...,
tp_plan="auto")``, the head sharded on the vocabulary, the same batch on both ranks);
DeepSpeed ZeRO-3 in test_deepspeed_zero3.py (which imports this harness).
``linear_cross_entropy`` on an FSDP2-sharded weight equals the by-hand gather with averaged
gradients (reduced in fp32 under bf16 mixed precision) and refuses ``process_group=``; on a
Shard(0) DTensor FSDP2 does not manage it is tensor parallelism. The never-gathered schedule
(``triton_xent.fsdp``) equals the gathered one on 2 and 4 ranks, its bytes counted.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from gloo import Parts, check_part, rank_env, run, spawn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
from hf_models import GRAD_TOL, VOCAB, make_batch, make_config  # noqa: E402

from triton_xent.integrations import transformers as tx  # noqa: E402

WORLD = 2
ROWS = 2 * 10  # tokens per rank: make_batch's default (batch 2, length 10)
PARTS = Parts()


class Shapes(TorchDispatchMode):
    """Records every op output that allocates a whole logits block: at least ``ROWS`` rows of
    the vocabulary or of a rank's shard of it (last dim ``VOCAB``, ``ceil(VOCAB/2)`` or
    ``VOCAB // 2``), in new memory (views of an input, such as ``weight.t()``, are not)."""

    def __init__(self):
        super().__init__()
        self.big = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {_storage(t) for t in _flat((args, kwargs))}
        for t in _flat(out):
            t = getattr(t, "_local_tensor", t)
            if t.dim() >= 2 and t.shape[-1] in (VOCAB, -(-VOCAB // WORLD), VOCAB // WORLD) and (
                    t.numel() >= ROWS * t.shape[-1]) and _storage(t) not in ins:
                self.big.append((str(func), tuple(t.shape)))
        return out


def _flat(tree):
    leaves = torch.utils._pytree.tree_leaves(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _storage(t):
    try:
        return getattr(t, "_local_tensor", t).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
        return None


def _llama(tied=False, seed=0):
    cls, cfg = make_config("llama")
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = cls(cfg)
    if tied:
        model.tie_weights()
    return model.train()


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _train(model, patched, layout, same_batch=False, steps=3, **patch_kw):
    """(losses, last step's gradients, weights after the steps, big outputs seen)."""
    rank = dist.get_rank()
    if patched:
        tx.patch(model, chunk_size=8, **patch_kw)
    model = layout(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, shapes = [], Shapes()
    for step in range(steps):
        batch = make_batch(seed=100 + 10 * step + (0 if same_batch else rank))
        opt.zero_grad(set_to_none=True)
        with shapes:
            out = model(**batch)
            out.loss.backward()
        losses.append(float(_whole(out.loss)))
        assert (out.logits is None) == patched
        grads = {n: _whole(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    weights = {n: _whole(p) for n, p in model.named_parameters()}
    return losses, grads, weights, shapes.big


def _close(got, want, rtol, atol, what):
    assert got.keys() == want.keys(), what
    for name, ref in want.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got[name].float(), ref.float(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m, name=name: f"{what} of {name}: {m}")


def _compare(build, layout, same_batch=False, loss_tol=1e-5, tol=None, **patch_kw):
    """Patched against unpatched under ``layout``; ``build()`` makes the model."""
    tol = tol or GRAD_TOL
    ref = _train(build(), False, layout, same_batch)
    got = _train(build(), True, layout, same_batch, **patch_kw)
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), rtol=loss_tol, atol=0)
    _close(got[1], ref[1], tol["rtol"], tol["atol"], "gradient")
    _close(got[2], ref[2], tol["rtol"], tol["atol"], "weight")
    assert ref[3], "the unpatched run builds logits: the allocation check can see them"
    assert not got[3], f"the fused run made (tokens, V) tensors: {got[3][:3]}"


def _fsdp(head="root", reshard=True, mp=None, embed=False):
    """A layout: every decoder layer a unit, then the head as asked, then the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {} if mp is None else {"mp_policy": MixedPrecisionPolicy(param_dtype=mp,
                                                                   reduce_dtype=torch.float32)}

    def layout(model):
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        if embed:
            fully_shard(model.model.embed_tokens, **kw)
        if head == "alone":
            fully_shard(model.lm_head, reshard_after_forward=reshard, **kw)
        elif head == "tail":
            fully_shard([model.model.norm, model.lm_head], reshard_after_forward=reshard, **kw)
        elif head == "tied":
            fully_shard([model.model.embed_tokens, model.lm_head], **kw)
        fully_shard(model, **kw)
        if head == "alone":  # the fused call must find the weight still sharded
            assert hasattr(model.lm_head.weight, "placements")
        return model

    return layout


@PARTS(WORLD)
def fsdp_head_in_the_root_unit():
    _compare(_llama, _fsdp("root"))


@PARTS(WORLD)
def fsdp_head_alone_resharded():
    _compare(_llama, _fsdp("alone", reshard=True))


@PARTS(WORLD)
def fsdp_head_alone_kept():
    _compare(_llama, _fsdp("alone", reshard=False))


@PARTS(WORLD)
def fsdp_head_alone_never_gathered():
    """patch(fsdp_schedule="sharded"): the group's hidden states travel instead of the head."""
    _compare(_llama, _fsdp("alone"), fsdp_schedule="sharded")


@PARTS(WORLD)
def fsdp_tail_norm_and_head():
    _compare(_llama, _fsdp("tail"))


@PARTS(WORLD)
def fsdp_accelerate_layout():
    """accelerate 1.16's fsdp2_prepare_model: layers, embed_tokens alone, the tail
    [norm, lm_head] with reshard_after_forward=False, the model."""
    _compare(_llama, _fsdp("tail", reshard=False, embed=True))


@PARTS(WORLD)
def fsdp_tied_embeddings():
    _compare(lambda: _llama(tied=True), _fsdp("tied"))


BF16 = dict(rtol=1.6e-2, atol=1e-3)  # 2 bf16 ulps: d(hidden) is rounded to bf16 in a different order


@PARTS(WORLD)
def fsdp_bf16_head_in_the_root_unit():
    _compare(_llama, _fsdp("root", mp=torch.bfloat16), loss_tol=1e-4, tol=BF16)


@PARTS(WORLD)
def fsdp_bf16_head_alone():
    _compare(_llama, _fsdp("alone", mp=torch.bfloat16), loss_tol=1e-4, tol=BF16)


@PARTS(WORLD)
def ddp():
    from torch.nn.parallel import DistributedDataParallel

    _compare(_llama, DistributedDataParallel)


def _load(tied=False, **kw):
    """A loader of the tiny Llama, saved once, through ``from_pretrained(path, **kw)``."""
    import warnings

    path = os.path.join(OUT_DIR[0], "tiny-llama" + "-tied" * tied)
    if path not in SAVED:  # every rank runs the parts in the same order: the same branch
        if dist.get_rank() == 0:
            _llama(tied=tied).save_pretrained(path)
        dist.barrier()
        SAVED.add(path)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.LlamaForCausalLM.from_pretrained(path, **kw)
        assert type(model.lm_head.weight).__name__ == "DTensor"
        return model.train()

    return load


@PARTS(WORLD)
def tensor_parallel_tp_plan_auto():
    """transformers' own tensor parallelism: lm_head is 'colwise_gather_output', its weight a
    Shard(0) DTensor; the fused call runs the vocabulary-parallel path."""
    _compare(_load(tp_plan="auto"), lambda m: m, same_batch=True)


def _native(tied=False, **config):
    """transformers' own FSDP2, ``from_pretrained(..., distributed_config=DistributedConfig(
    fsdp_size=2, **config))``: (loader, layout check). Llama's plan: embed_tokens and each layer
    alone, the tail [norm, lm_head] in one unit that keeps its weights after the forward; tied,
    transformers moves "keep_full_weight" to embed_tokens (grouped with the norm instead) and
    lm_head is no unit of its own."""
    from torch.distributed.fsdp import FSDPModule
    from transformers.distributed import DistributedConfig

    def layout(model):
        kept = model.model.embed_tokens if tied else model.lm_head
        units = [model, model.model.embed_tokens, *model.model.layers, model.model.norm, kept]
        assert all(isinstance(m, FSDPModule) for m in units)
        assert tied == (model.lm_head.weight is model.model.embed_tokens.weight)
        assert tied != isinstance(model.lm_head, FSDPModule)
        tail = kept._get_fsdp_state()
        assert model.model.norm._get_fsdp_state() is tail
        assert tail._fsdp_param_group.post_forward_mesh_info is None  # reshard_after_forward=False
        return model

    return _load(tied, distributed_config=DistributedConfig(fsdp_size=WORLD, **config)), layout


@PARTS(WORLD)
def fsdp_transformers_native_plan():
    _compare(*_native())


@PARTS(WORLD)
def fsdp_transformers_native_plan_tied():
    _compare(*_native(tied=True))


@PARTS(WORLD)
def fsdp_transformers_native_plan_bf16():
    """Its mixed precision (fsdp_mixed_precision=True: param_dtype bf16, reduce_dtype fp32)."""
    _compare(*_native(fsdp_mixed_precision=True), loss_tol=1e-4, tol=BF16)


@PARTS(WORLD)
def linear_cross_entropy_on_an_fsdp_sharded_weight():
    """Called directly: the FSDP2-managed DTensor is gathered, its gradient averaged over the
    ranks (FSDP2's reduction); by hand: the whole weight, each rank's gradient averaged."""
    from torch.distributed.fsdp import fully_shard

    from triton_xent import linear_cross_entropy
    from triton_xent._validation import CrossEntropyInputError

    rank = dist.get_rank()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False)
    whole = head.weight.detach().clone().requires_grad_(True)
    fully_shard(head)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(12, 16, generator=g, dtype=torch.float32)
    t = torch.randint(0, 37, (12,), generator=g)
    loss = linear_cross_entropy(x, head.weight, t)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(x.double() @ whole.double().t(), t)
    ref.backward()
    avg = whole.grad.clone()
    dist.all_reduce(avg)
    avg /= WORLD
    assert not hasattr(loss, "placements")  # this rank's loss, a plain tensor
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.weight.grad.full_tensor(), avg.float(), rtol=1e-5, atol=1e-7)
    with pytest.raises(CrossEntropyInputError, match="data-parallel"):
        linear_cross_entropy(x, head.weight, t, process_group=dist.group.WORLD)

    # Mixed precision: gathered in bf16 (param_dtype), the gradient reduced in fp32
    # (reduce_dtype): each rank's bf16 gradient, widened, then averaged. A bf16 reduction would
    # round the average to bf16 (a relative error near 4e-3).
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(1)
    head = torch.nn.Linear(16, 37, bias=False)
    whole = head.weight.detach().to(torch.bfloat16).requires_grad_(True)
    fully_shard(head, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                     reduce_dtype=torch.float32))
    xb = x.to(torch.bfloat16)
    linear_cross_entropy(xb, head.weight, t).backward()
    linear_cross_entropy(xb, whole, t).backward()
    avg = whole.grad.float()
    dist.all_reduce(avg)
    avg /= WORLD
    got = head.weight.grad.full_tensor()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, avg, rtol=1e-6, atol=1e-9)


@PARTS(WORLD)
def a_dtensor_weight_fsdp_does_not_manage_is_tensor_parallel():
    """A Shard(0) DTensor that FSDP2 does not manage is a vocabulary split: every rank must pass
    the same rows, and validate=True catches ranks that do not (data-parallel rows)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from triton_xent import linear_cross_entropy

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    whole = torch.randn(37, 16, dtype=torch.float64)
    w = distribute_tensor(whole, mesh, [Shard(0)])
    x = torch.randn(12, 16, dtype=torch.float64)
    t = torch.randint(0, 37, (12,))
    loss = linear_cross_entropy(x, w, t, validate=True)
    ref = torch.nn.functional.cross_entropy(x @ whole.t(), t)
    torch.testing.assert_close(loss.full_tensor(), ref)
    own = x + dist.get_rank()  # each rank its own rows
    with pytest.raises(Exception, match="input differs across the ranks"):
        linear_cross_entropy(own, w, t, validate=True)


class Comms(TorchDispatchMode):
    """Bytes each rank sends in the collectives it runs (ring algorithms: an all-gather of ``B``
    output bytes sends ``(R-1)/R B``, an all-reduce ``2 (R-1)/R B``, a reduce-scatter of ``B``
    input bytes ``(R-1)/R B``)."""

    def __init__(self, world):
        super().__init__()
        self.world, self.sent, self.ops = world, 0.0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, frac = func.__name__, (self.world - 1) / self.world
        size = sum(t.numel() * t.element_size() for t in _flat(args)[:1])
        if "allgather" in name or "all_gather" in name:
            b = frac * size * self.world if "_allgather_base" in name or "into_tensor" in name else 0
            if "_allgather_base" in name:  # (output, input): the output is the gathered one
                b = frac * size
            self.sent += b
        elif "allreduce" in name or "all_reduce" in name:
            self.sent += 2 * frac * size
        elif "reduce_scatter" in name:
            self.sent += frac * size
        else:
            return out
        self.ops.append(name)
        return out


def never_gathered_schedule():
    """triton_xent.fsdp.schedule("sharded") equals the gathered schedule (loss, d(hidden), the head's
    gradient), with uneven rows per rank; the bytes sent are counted and match
    bytes_per_rank; "auto" picks the cheaper one."""
    from torch.distributed.fsdp import fully_shard

    from triton_xent import linear_cross_entropy
    from triton_xent.fsdp import bytes_per_rank
    from triton_xent.fsdp import schedule as fsdp_schedule

    rank, world = dist.get_rank(), dist.get_world_size()
    V, D = 251, 16
    rows = [6 + 3 * r for r in range(world)]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows[rank], D, generator=g)
    t = torch.randint(0, V, (rows[rank],), generator=g)
    t[0] = -100
    got = {}
    for schedule in ("gathered", "sharded", "auto"):
        torch.manual_seed(0)
        head = torch.nn.Linear(D, V, bias=False)
        fully_shard(head)
        xs = x.clone().requires_grad_(True)
        comms = Comms(world)
        with fsdp_schedule(schedule), comms:
            loss = linear_cross_entropy(xs, head.weight, t, label_smoothing=0.1, z_loss=1e-3,
                                        chunk_size=8)
            loss.backward()
        got[schedule] = (loss.detach(), xs.grad, head.weight.grad.full_tensor(), comms.sent)
    ref = got["gathered"]
    for schedule in ("sharded", "auto"):
        for a, b in zip(got[schedule][:3], ref[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cost = bytes_per_rank(world, max(rows), D, V, 4, 4, 4)
    assert abs(ref[3] - cost["gathered"]) <= 0.01 * cost["gathered"], (ref[3], cost)
    # the pipeline's per-row statistics and the row counts come on top of the formula's terms
    assert cost["sharded"] <= got["sharded"][3] <= 1.5 * cost["sharded"], (got["sharded"][3], cost)
    assert got["sharded"][3] < ref[3] and got["auto"][3] <= got["sharded"][3] * 1.01


PARTS(WORLD)(never_gathered_schedule)


FOUR = Parts()
FOUR(4)(never_gathered_schedule)


def _four_entry(rank, world, init_method, out_dir):
    run(rank, world, init_method, out_dir, FOUR, lambda fn, n: fn() or "ok", timeout_s=120)


@pytest.mark.slow
def test_never_gathered_schedule_on_4_ranks():
    check_part(spawn(_four_entry, 4), FOUR, "never_gathered_schedule")


OUT_DIR = [""]
SAVED: set[str] = set()


def _entry(rank, world, init_method, out_dir):
    rank_env(rank, world, os.environ.get("TRITON_XENT_BACKEND", "torch"))
    OUT_DIR[0] = out_dir
    run(rank, world, init_method, out_dir, PARTS, lambda fn, n: fn() or "ok", timeout_s=120)


@pytest.fixture(scope="module")
def results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return spawn(_entry, WORLD)


@pytest.mark.parametrize("part", list(PARTS.parts))
def test_layout(results, part):
    check_part(results, PARTS, part)


def test_head_problems_name_the_cause():
    """What keeps a head unfused is named: a tensor-parallel style other than
    'colwise_gather_output' is not "a LoRA adapter"."""
    from torch.distributed.tensor import Replicate, Shard
    from transformers.distributed.tensor_parallel import ColwiseParallel

    from triton_xent.integrations._hf_patching import head_problem

    head = torch.nn.Linear(4, 6)
    assert head_problem(head) is None
    gather = copy.deepcopy(head)
    ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()).install_forward(gather, None)
    assert head_problem(gather) is None
    sharded = copy.deepcopy(head)
    ColwiseParallel(output_layouts=Shard(-1)).install_forward(sharded, None)
    assert "tensor parallelism runs it as ColwiseParallel" in head_problem(sharded)
    replaced = copy.deepcopy(head)
    replaced.forward = lambda x: x
    assert "forward is replaced" in head_problem(replaced)
    quantized = torch.nn.Linear(4, 6).to(torch.float16)
    quantized.weight = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.int8), requires_grad=False)
    assert "quantized" in head_problem(quantized)


def test_fsdp_schedule_option_is_checked():
    from hf_models import make_model

    with pytest.raises(ValueError, match="fsdp_schedule"):
        tx.patch(make_model("llama"), fsdp_schedule="never")
    assert tx.options_of(tx.patch(make_model("llama"), fsdp_schedule="auto")).fsdp_schedule == "auto"
