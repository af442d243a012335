"""``triton_xent.integrations.trl_grpo.GRPOTrainer`` against TRL's own ``GRPOTrainer`` on a tiny
model: the same completions (same seed), the same loss, gradients and logged metrics within
fp32 rounding, per loss type, with the KL term and clipping active; TRL's own loss where the
configuration is not covered."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from hf_models import VOCAB, make_model, word_tokenizer  # noqa: E402

from triton_xent.integrations.trl_grpo import GRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


def _reward(completions, **kw):
    return [float(len(set(c.split()))) - 0.1 * len(c) for c in completions]


def _saved_model(tmp_path, name="llama"):
    """A tiny model loaded from a folder: TRL builds the reference model (beta > 0) from its
    path."""
    path = tmp_path / f"model-{name}"
    if not path.exists():
        make_model(name).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _trainer(cls, model, tmp_path, triton_xent_options=None, **cfg):
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (3 + k % 3,), generator=g))
               for k in range(8)]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=6, learning_rate=1e-2,
                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                          seed=0, dataloader_num_workers=0, disable_tqdm=True, temperature=0.7,
                          bf16=cfg.pop("bf16", False),
                          **cfg)
    torch.manual_seed(0)
    extra = {} if triton_xent_options is None else {"triton_xent_options": triton_xent_options}
    return cls(model=model, reward_funcs=_reward, args=args, processing_class=word_tokenizer(),
               train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), **extra)


def _loss_and_grads(trainer, inputs, compute):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute(trainer, trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                           if p.grad is not None}


def _both_losses(trainer, seed=2):
    """One batch, off-policy (old log-probs near -5, advantages of both signs), through our
    ``_compute_loss`` and TRL's: ``(ours, grads, theirs, grads)``."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    g = torch.Generator().manual_seed(seed)
    shape = inputs["completion_mask"].shape
    inputs["old_per_token_logps"] = -5.0 + 0.5 * torch.randn(shape, generator=g)
    inputs["advantages"] = torch.randn(shape[0], generator=g)
    return (*_loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss),
            *_loss_and_grads(trainer, inputs, trl.GRPOTrainer._compute_loss))


@pytest.mark.parametrize("loss_type,beta,entropy_coef,family", [
    ("dapo", 0.0, 0.0, "llama"), ("grpo", 0.04, 0.0, "llama"), ("bnpo", 0.0, 0.0, "llama"),
    ("dr_grpo", 0.04, 0.0, "llama"), ("cispo", 0.04, 0.0, "llama"), ("sapo", 0.0, 0.0, "llama"),
    ("luspo", 0.0, 0.0, "llama"), ("dapo", 0.04, 0.2, "llama"),
    # the head as TRL reads it: a soft-cap, a logit scale, a bias
    ("grpo", 0.04, 0.0, "gemma2-softcap"), ("dapo", 0.0, 0.0, "cohere"),
    ("bnpo", 0.0, 0.0, "phi-bias")])
def test_loss_gradients_and_metrics_match_trl(tmp_path, loss_type, beta, entropy_coef, family):
    trainer = _trainer(GRPOTrainer, _saved_model(tmp_path, family), tmp_path, loss_type=loss_type,
                       beta=beta, epsilon_high=1.05 if loss_type == "cispo" else 0.28,
                       gradient_accumulation_steps=2, steps_per_generation=2,
                       entropy_coef=entropy_coef)
    assert trainer.triton_xent_fallback is None
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # Old log-probs off the current ones: the clipping acts on both sides.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        noise = 0.5 * torch.randn(inputs["completion_mask"].shape, generator=g)
        lp = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1])[0]
    inputs["old_per_token_logps"] = lp + noise
    # Advantages of both signs on every sequence (a tiny model's rewards often tie: zero).
    inputs["advantages"] = torch.randn(noise.shape[0], generator=g)
    trainer.current_gradient_accumulation_steps = 2
    ours, g_ours = _loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss)
    assert trainer.triton_xent_policy_steps == 1
    theirs, g_trl = _loss_and_grads(trainer, inputs, trl.GRPOTrainer._compute_loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 10
    for name in g_trl:
        scale = float(g_trl[name].abs().max())  # fp32 rounding of the sums over tokens
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)
    metrics = trainer._metrics["train"]
    keys = {"cispo": ["cispo_clip_ratio"], "sapo": []}.get(loss_type, [
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
        "clip_ratio/low_min", "clip_ratio/high_max"]) + (["kl"] if beta else []) + ["entropy"]
    if entropy_coef:
        keys += ["policy_loss", "entropy_coef"]
    for key in keys:  # ours logged first, TRL's second
        assert len(metrics[key]) == 2, key
        assert abs(metrics[key][0] - metrics[key][1]) <= 1e-5 * max(1.0, abs(metrics[key][1])), key
    if loss_type == "cispo":
        assert metrics["cispo_clip_ratio"][1] > 0  # clipping was active
    elif loss_type != "sapo":
        assert metrics["clip_ratio/region_mean"][1] > 0
    # both logged the same keys (generation's metrics are logged once)
    twice = {k for k, v in metrics.items() if len(v) == 2}
    assert twice == set(keys), twice


def test_training_steps_match_trl(tmp_path, monkeypatch):
    """Two training steps of TRL's trainer, of ``trl_grpo.GRPOTrainer`` (the fused loss, TRL's
    head for TRL's own log-probs) and of ``integrations.trl.GRPOTrainer`` (the fused loss, and
    triton_xent's head for the old and reference log-probs, installed for its construction
    only): the same logged values."""
    from triton_xent.integrations import _trl_head
    from triton_xent.integrations import trl as xtrl

    head_calls = []
    real = _trl_head._head
    monkeypatch.setattr(_trl_head, "_head", lambda *a, **k: head_calls.append(1) or real(*a, **k))
    histories, calls = [], []
    for cls in (trl.GRPOTrainer, GRPOTrainer, xtrl.GRPOTrainer):
        trainer = _trainer(cls, _saved_model(tmp_path), tmp_path / cls.__qualname__,
                           max_steps=2, beta=0.04, loss_type="dapo")
        trainer.train()
        histories.append([h for h in trainer.state.log_history if "loss" in h])
        calls.append(len(head_calls))
        if cls is not trl.GRPOTrainer:
            assert trainer.triton_xent_policy_steps == 2 and trainer.triton_xent_fallback is None
    assert calls[0] == calls[1] == 0 < calls[2]  # only the last ran our head
    assert not xtrl.is_installed()  # TRL's head again for trainers built afterwards
    for got_history in histories[1:]:
        assert len(got_history) == len(histories[0]) == 2
        for ref, got in zip(histories[0], got_history):
            for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "reward"):
                assert abs(got[key] - ref[key]) <= 1e-4 * max(1.0, abs(ref[key])), (key, got, ref)


def test_uncovered_configurations_run_trls_loss(tmp_path):
    trainer = _trainer(GRPOTrainer, make_model("llama"), tmp_path, loss_type="vespo")
    assert "vespo" in trainer.triton_xent_fallback
    trainer = _trainer(GRPOTrainer, make_model("llama"), tmp_path,
                       importance_sampling_level="sequence")
    assert "sequence" in trainer.triton_xent_fallback


def test_peft_model_matches_trl(tmp_path):
    """A LoRA policy (TRL's reference is the model with the adapter disabled)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_saved_model(tmp_path), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = _trainer(GRPOTrainer, model, tmp_path, loss_type="grpo", beta=0.04,
                       epsilon_high=0.28)
    ours, g_ours, theirs, g_trl = _both_losses(trainer)
    assert trainer.triton_xent_policy_steps == 1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert g_ours.keys() == g_trl.keys() and any("lora_B" in k for k in g_trl)
    for name in g_trl:
        scale = float(g_trl[name].abs().max())
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


def test_bf16_autocast_matches_trl(tmp_path):
    """TRL's default bf16 autocast: both heads run bf16 GEMMs with fp32 math per token (the
    losses agree to fp32 rounding); the gradients within bf16 rounding (TRL keeps an fp32 dW;
    ours, asked for an fp32 accumulator over several chunks, is rounded to bf16 once)."""
    trainer = _trainer(GRPOTrainer, _saved_model(tmp_path), tmp_path, loss_type="dapo",
                       beta=0.04, epsilon_high=0.28, bf16=True,
                       triton_xent_options={"accum_dtype": torch.float32, "chunk_size": 8})
    assert trainer.accelerator.mixed_precision == "bf16"
    ours, g_ours, theirs, g_trl = _both_losses(trainer)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for name in g_trl:
        err = (g_ours[name] - g_trl[name]).abs().max() / g_trl[name].abs().max()
        assert err < 3e-2, (name, err)


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        _trainer(GRPOTrainer, make_model("llama"), tmp_path, triton_xent_options={"beta": 0.1})


def test_eval_loss_without_grad_matches_trl(tmp_path):
    """TRL's prediction_step computes the loss under no_grad in eval mode: the fused loss runs
    forward only (no gradient buffers) and equals TRL's."""
    trainer = _trainer(GRPOTrainer, _saved_model(tmp_path), tmp_path, loss_type="dapo",
                       beta=0.04)
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs["advantages"] = torch.randn(inputs["advantages"].shape,
                                       generator=torch.Generator().manual_seed(3))
    trainer.model.eval()
    with torch.no_grad():
        ours = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        theirs = trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    assert trainer.triton_xent_policy_steps == 1 and not ours.requires_grad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    metrics = trainer._metrics["eval"]
    assert len(metrics["entropy"]) == 2
    assert abs(metrics["entropy"][0] - metrics["entropy"][1]) < 1e-5

