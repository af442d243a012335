"""``triton_xent.integrations.trl.install()``: TRL's trainers with triton_xent's fused LM head.

The head against TRL's own (``trl.trainer.utils.add_fused_lm_head``) on tiny models (a bias, a
soft-cap, logit scales, a router loss, shifted labels): every output and every parameter's
gradient under random upstream gradients on the log-probs and the entropy; TRL's
``GRPOTrainer`` and ``RLOOTrainer`` for two SGD steps with and without ``install()`` from the
same seed: the same logged loss, KL and entropy and the same weights; DPO, KTO and SFT the same
logs (and triton_xent's ``SFTTrainer`` TRL's metrics); triton_xent's head counted running;
``install``/``uninstall`` idempotent and reversible; the outputs it does not compute refused by
name. On 2 gloo ranks: FSDP2 with ``lm_head`` sharded alone (the gradient averaged, where TRL's
own head keeps each rank's slice) and transformers' tensor parallelism, against the model's own
loss.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from gloo import Parts, check_part, rank_env, run, spawn

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402
from hf_models import VOCAB, make_batch, make_model, word_tokenizer  # noqa: E402

from triton_xent.integrations import _trl_head  # noqa: E402
from triton_xent.integrations import trl as xtrl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")
TOL = dict(rtol=2e-5, atol=1e-6)  # fp32 against fp32: two kernels' roundings
ALL = ("log_probs", "entropy", "is_top1")


def _close(got, want, what, rel=2e-5, floor=1e-12):
    """Within ``rel`` of the tensor's largest entry (fp32 rounding of sums that cancel)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.double().abs().max().item() + floor, f"{what}: {err:.3g}"


@pytest.fixture(autouse=True)
def restored():
    yield
    xtrl.uninstall()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = _trl_head.linear_logprobs

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_trl_head, "linear_logprobs", counting)
    return calls


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, -1] = -100
    return ids, labels, g


@pytest.mark.parametrize("name,outputs,shift", [
    ("llama", ALL + ("mean_logits",), False),
    ("phi-bias", ALL + ("mean_logits",), True),
    ("gemma2-softcap", ALL, False),
    ("cohere", ALL, False),  # logit_scale multiplies
    ("granite", ALL + ("mean_logits",), False),  # logits_scaling divides
    ("mixtral", ALL, False),  # the router's load-balancing loss joins the loss
])
def test_head_equals_trls(name, outputs, shift, counted):
    base = make_model(name)
    ids, labels, g = _batch()
    up = torch.randn(2, 8 + shift, generator=g)
    up_ent = torch.randn(2, 8 + shift, generator=g)
    results = []
    for install in (trl_utils.add_fused_lm_head, _trl_head.add_fused_lm_head):
        model = copy.deepcopy(base)
        install(model, temperature=0.7, outputs=outputs)
        kw = dict(shift_labels=labels) if shift else dict(labels=labels)
        out = model(input_ids=ids, fused_lm_head=True, **kw)
        ((out.log_probs * up).sum() + (out.entropy * up_ent).sum() + out.loss).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    assert len(counted) == 1 and counted[0]["temperature"] == 0.7
    assert (got.aux_loss is None) == (ref.aux_loss is None)
    for field in ("loss", "log_probs", "entropy") + (("mean_logits",) if "mean_logits" in outputs
                                                     else ()):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), **TOL, msg=lambda m, f=field: f"{f}: {m}")
    assert torch.equal(got.is_top1, ref.is_top1) and torch.equal(got.label_mask, ref.label_mask)
    assert got.log_sum_sq_probs is None
    kept = got.label_mask
    assert (got.log_probs[~kept] == 0).all() and (got.entropy[~kept] == 0).all()
    for n, want in ref_grads.items():
        _close(grads[n], want, n)
    # without fused_lm_head the model's own forward runs (generation)
    plain = model(input_ids=ids)
    assert plain.logits.shape == (2, 9, VOCAB)


def test_install_uninstall_swap_every_trainer_module():
    import trl.trainer.grpo_trainer as grpo
    import trl.trainer.sft_trainer as sft

    trl_head = trl_utils.add_fused_lm_head
    for _ in range(2):
        xtrl.install()
        assert xtrl.is_installed()
        for module in (trl_utils, grpo, sft):
            assert module.add_fused_lm_head is _trl_head.add_fused_lm_head
    import trl.trainer.rloo_trainer as rloo  # imported after install(): reads utils's

    assert rloo.add_fused_lm_head is _trl_head.add_fused_lm_head
    for _ in range(2):
        xtrl.uninstall()
        assert not xtrl.is_installed()
        for module in (trl_utils, grpo, sft, rloo):
            assert module.add_fused_lm_head is trl_head


def test_unsupported_outputs_are_refused_by_name():
    with pytest.raises(ValueError, match="log_sum_sq_probs.*uninstall"):
        _trl_head.add_fused_lm_head(make_model("llama"), outputs=("log_probs", "log_sum_sq_probs"))
    with pytest.raises(ValueError, match="mean_logits \\(of a soft-capped head\\)"):
        _trl_head.add_fused_lm_head(make_model("gemma2-softcap"),
                                    outputs=("log_probs", "mean_logits"))
    model = make_model("llama")
    _trl_head.add_fused_lm_head(model)
    model.lm_head.weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks its partitioned parameters
    ids, labels, _ = _batch()
    with pytest.raises(ValueError, match="ZeRO-3"):
        model(input_ids=ids, labels=labels, fused_lm_head=True)


# ---------------------------------------------------------------------------------------------
# The trainers
# ---------------------------------------------------------------------------------------------


def _reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _train(trainer_cls, config_cls, path, tmp_path, **extra):
    """Two SGD steps (lr 1: the update is the gradient), fp32 (no autocast), the same seed."""
    args = config_cls(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, beta=0.1,
        temperature=0.7, bf16=False, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0, disable_tqdm=True, **extra)
    prompts = [" ".join(f"t{i}" for i in range(3 + k, 8 + k)) for k in range(4)]
    trainer = trainer_cls(model=path, reward_funcs=_reward, args=args, processing_class=word_tokenizer(),
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the update, and the fp32 rounding of the weights it was added to (an ulp, twice)
    steps = {n: (p.detach() - before[n], 2.0**-22 * before[n].abs().max().item())
             for n, p in trainer.model.named_parameters()}
    return logs, steps, trainer


@pytest.mark.parametrize("trainer", ["GRPO", "RLOO"])
def test_rl_trainer_equals_trls(trainer, tmp_path, counted):
    trainer_cls, config_cls = getattr(trl, f"{trainer}Trainer"), getattr(trl, f"{trainer}Config")
    make_model("llama").save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model")
    logs_ref, steps_ref, t_ref = _train(trainer_cls, config_cls, path, tmp_path / "trl")
    assert not counted and t_ref.model.forward.__func__.__code__.co_name == "_fused_forward"
    xtrl.install()
    logs, steps, t = _train(trainer_cls, config_cls, path, tmp_path / "tx")
    assert t.model.forward.__func__.__code__.co_name == "_triton_xent_fused_forward"
    assert t.ref_model.forward.__func__.__code__.co_name == "_triton_xent_fused_forward"
    assert len(counted) >= 4  # policy and reference log-probs, two steps
    assert any(c["return_entropy"] for c in counted)
    assert len(logs) == len(logs_ref) == 2
    for got, want in zip(logs, logs_ref):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert logs_ref[1]["kl"] != 0  # the second step's policy has moved
    for n, (want, ulp) in steps_ref.items():  # the two steps' updates: the gradients, summed
        _close(steps[n][0], want, n, rel=1e-5, floor=ulp)


PROMPTS = ["t3 t4 t5", "t6 t7", "t8 t9 t10", "t11"]
PREFERENCE = {
    "DPO": dict(prompt=PROMPTS, chosen=[" t12 t13", " t14", " t15 t16 t17", " t18"],
                rejected=[" t20", " t21 t22", " t23", " t24 t25"]),
    "KTO": dict(prompt=PROMPTS, completion=[" t12 t13", " t14", " t15 t16 t17", " t18"],
                label=[True, False, True, False]),
}


@pytest.mark.parametrize("trainer", ["DPO", "KTO"])
def test_preference_trainer_equals_trls(trainer, tmp_path, counted):
    """DPO and KTO ask the head for mean_logits too (their logits/* metrics): computed exactly."""
    make_model("llama").save_pretrained(tmp_path / "model")
    data = datasets.Dataset.from_dict(PREFERENCE[trainer])

    def train(out):
        args = getattr(trl, f"{trainer}Config")(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1.0,
            optim="sgd", max_grad_norm=0.0, bf16=False, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
            model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
        trainer_ = getattr(trl, f"{trainer}Trainer")(
            model=str(tmp_path / "model"), args=args, processing_class=word_tokenizer(),
            train_dataset=data)
        trainer_.train()
        return [h for h in trainer_.state.log_history if "loss" in h], trainer_

    ref, _ = train(tmp_path / "trl")
    xtrl.install()
    logs, trained = train(tmp_path / "tx")
    assert _trl_head.is_head(trained.model.forward) and counted
    for got, want in zip(logs, ref, strict=True):
        assert got.keys() == want.keys()
        for key in ("loss", "grad_norm", "entropy", "logits/chosen", "logits/rejected",
                    "logps/chosen", "logps/rejected", "rewards/margins"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key: f"{k}: {m}")
    if trainer == "KTO":
        assert ref[1]["kl"] != 0
        torch.testing.assert_close(logs[1]["kl"], ref[1]["kl"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning: TRL's metrics
# ---------------------------------------------------------------------------------------------


def _sft(trainer_cls, tmp_path, max_steps=2, model=None, **kw):
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{i}" for i in torch.randint(3, VOCAB, (int(n),), generator=g).tolist())
             for n in torch.randint(5, 13, (12,), generator=g)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=3,
                         gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, max_length=32, seed=0,
                         bf16=False, dataloader_num_workers=0, disable_tqdm=True)
    torch.manual_seed(0)
    trainer = trainer_cls(model=model or make_model("llama"), args=args, processing_class=word_tokenizer(),
                          train_dataset=datasets.Dataset.from_dict({"text": texts}), **kw)
    if max_steps:
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer


SFT_KEYS = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm")


def test_sft_trainers_log_trls_metrics(tmp_path, counted):
    """triton_xent's SFTTrainer (the patched model's loss) and TRL's SFTTrainer on triton_xent's
    head (install()) log what TRL's own SFTTrainer logs: loss, entropy, token accuracy and the
    token count, within fp32 rounding."""
    from triton_xent.integrations.trl import SFTTrainer

    ref, _ = _sft(trl.SFTTrainer, tmp_path / "trl")
    ours, trainer = _sft(SFTTrainer, tmp_path / "tx")
    assert "forward" not in vars(trainer.model)  # the patched model's loss, no head
    xtrl.install()
    from triton_xent.integrations import transformers as tx

    patched = tx.patch(make_model("llama"), z_loss=1e-4)  # its options: no head, no refusal
    _, trainer = _sft(SFTTrainer, tmp_path / "tx-installed", max_steps=0, model=patched)
    assert "forward" not in vars(trainer.model) and tx.options_of(trainer.model).z_loss == 1e-4
    on_head, trainer = _sft(trl.SFTTrainer, tmp_path / "head")
    assert _trl_head.is_head(trainer.model.forward) and counted
    for logs in (ours, on_head):
        assert len(logs) == len(ref) == 2
        for got, want in zip(logs, ref):
            for key in SFT_KEYS:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=key: f"{k}: {m}")
    assert 0 < ref[0]["mean_token_accuracy"] < 1 and ref[1]["num_tokens"] > ref[0]["num_tokens"]


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks: FSDP2 with lm_head sharded alone, its gradient averaged (TRL's own is not);
# transformers' tensor parallelism, the head sharded on the vocabulary
# ---------------------------------------------------------------------------------------------

WORLD = 2
PARTS = Parts()


OUT_DIR = [""]


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _fsdp(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)  # alone: its weight is this rank's shard when the head reads it
    return fully_shard(model)


def _tensor_parallel():
    """transformers' tp_plan="auto": lm_head's weight a Shard(0) DTensor (colwise)."""
    import warnings

    path = os.path.join(OUT_DIR[0], "tiny-llama")
    if dist.get_rank() == 0:
        make_model("llama").save_pretrained(path)
    dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(path, tp_plan="auto")
    assert type(model.lm_head.weight).__name__ == "DTensor"
    return model


def _dist_run(head, build, same_batch=False, steps=2):
    """(losses, last gradients, weights) of ``steps`` SGD steps with the model's own loss (head
    None) or a fused head added before sharding, as TRL does; each rank its own batch unless
    ``same_batch`` (tensor parallelism)."""
    rank = dist.get_rank()
    model = build(head)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, means = [], []
    for step in range(steps):
        batch = make_batch(seed=100 + 10 * step + (0 if same_batch else rank))
        opt.zero_grad(set_to_none=True)
        out = model(**batch) if head is None else model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            labels=batch["labels"], fused_lm_head=True)
        out.loss.backward()
        losses.append(float(_whole(out.loss)))
        means.append(getattr(out, "mean_logits", None))
        grads = {n: _whole(p.grad) for n, p in model.named_parameters()}
        opt.step()
    return losses, grads, {n: _whole(p) for n, p in model.named_parameters()}, means


def _dist_compare(build, same_batch=False):
    ref = _dist_run(None, build, same_batch)
    got = _dist_run(_trl_head.add_fused_lm_head, build, same_batch)
    if got[3][0] is not None:
        assert got[3][0].abs().max() > 0
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), rtol=1e-5, atol=0)
    for i in (1, 2):
        for n, want in ref[i].items():
            _close(got[i][n], want, n, rel=1e-5)
    return ref, got


def _llama_then(layout):
    def build(head):
        model = make_model("llama").train()
        if head is not None:
            head(model, outputs=("log_probs", "mean_logits"))
        return layout(model)

    return build


@PARTS(WORLD)
def fsdp_head_alone():
    build = _llama_then(_fsdp)
    ref, got = _dist_compare(build)
    # TRL's own head: full_tensor() keeps each rank's slice of the gradient, unaveraged
    trl_run = _dist_run(trl_utils.add_fused_lm_head, build)
    err = (trl_run[1]["lm_head.weight"] - ref[1]["lm_head.weight"]).abs().max()
    assert err > 0.1 * ref[1]["lm_head.weight"].abs().max()
    # mean_logits over a head sharded 129 + 128 rows: the same values as TRL's (first step)
    torch.testing.assert_close(got[3][0], trl_run[3][0], rtol=1e-5, atol=1e-6)


@PARTS(WORLD)
def tensor_parallel_head():
    """The same batch on both ranks; the head stays sharded on the vocabulary."""
    def build(head):
        model = _tensor_parallel().train()
        if head is not None:
            head(model, outputs=("log_probs",))
        return model

    _dist_compare(build, same_batch=True)


def _entry(rank, world, init_method, out_dir):
    rank_env(rank, world, "torch")
    OUT_DIR[0] = out_dir
    run(rank, world, init_method, out_dir, PARTS, lambda fn, n: fn() or "ok", timeout_s=120)


@pytest.fixture(scope="module")
def dist_results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return spawn(_entry, WORLD)


@pytest.mark.parametrize("part", list(PARTS.parts))
def test_distributed_head(dist_results, part):
    check_part(dist_results, PARTS, part)


def test_a_patched_model_gets_the_head_quietly_or_refuses_dropped_options():
    import warnings

    from triton_xent.integrations import transformers as tx

    ids, labels, _ = _batch()
    model = tx.patch(make_model("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TRL's head on a patched model warns; this one is ours
        _trl_head.add_fused_lm_head(model, outputs=ALL)
    assert _trl_head.is_head(model.forward)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=labels).loss, **TOL)
    with pytest.raises(ValueError, match="z_loss.*SFTTrainer"):
        _trl_head.add_fused_lm_head(tx.patch(make_model("llama"), z_loss=1e-4))
