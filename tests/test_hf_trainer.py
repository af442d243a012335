"""The patch under ``transformers.Trainer``, TRL's ``SFTTrainer`` and FSDP2, on the CPU.

A few optimizer steps of a tiny random Llama with gradient accumulation: the logged losses of
the patched model equal the unpatched model's; evaluation hands ``compute_metrics`` the logits
and ``predict`` returns them; ``model_init`` gets the patch through ``apply()`` or the Auto
class. TRL: ``triton_xent.integrations.trl.SFTTrainer`` trains like TRL's own, and a patched
model under TRL's trainer is not bypassed silently. FSDP2 (one gloo rank): the fused path under
``fully_shard`` equals the model, and ``lm_head`` sharded as its own unit is a clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import transformers  # noqa: E402
from hf_models import (  # noqa: E402
    LOSS_TOL,
    VOCAB,
    assert_grads_close,
    make_batch,
    make_config,
    make_model,
    run,
)

from triton_xent.integrations import transformers as tx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


def sequences(n=12, seed=0):
    """Token lists of varied lengths (padding in every batch) over the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 13, (n,), generator=g)
    return [torch.randint(3, VOCAB - 8, (int(k),), generator=g).tolist() for k in lengths]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(rows):
    """Right padding; labels -100 on the padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def trainer_args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw)


def train_losses(model=None, tmp_path=None, **kw):
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path), data_collator=collate,
                                   train_dataset=ListDataset(sequences()), **kw)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"), pytest.param(False, id="unfused")])
def test_trainer_with_gradient_accumulation_trains_like_the_model(fused, tmp_path):
    base = make_model("llama")
    losses_ref, _ = train_losses(copy.deepcopy(base), tmp_path / "ref")
    losses, trainer = train_losses(tx.patch(copy.deepcopy(base), fused=fused), tmp_path / "tx")
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-5, atol=0)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch


def test_trainer_model_init_gets_the_patch(tmp_path):
    _, cfg = make_config("llama")

    def model_init():
        torch.manual_seed(0)
        return tx.AutoTritonXentForCausalLM.from_config(cfg)

    losses_ref, _ = train_losses(make_model("llama"), tmp_path / "ref")
    losses, trainer = train_losses(tmp_path=tmp_path / "init", model_init=model_init)
    assert tx.options_of(trainer.model) is not None
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-5, atol=0)
    try:  # the same through apply(), with a plain from_config in model_init
        tx.apply("llama")
        _, trainer = train_losses(tmp_path=tmp_path / "apply", model_init=lambda: make_model("llama"))
        assert tx.options_of(trainer.model) is not None
    finally:
        tx.revert()


def test_trainer_evaluate_and_predict_get_the_logits(tmp_path):
    """compute_metrics gets the (N, T, V) logits; predict returns them; the eval loss is the
    model's. (Before: empty predictions and a crash in the metric code.)"""
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        logits = torch.as_tensor(prediction.predictions)
        labels = torch.as_tensor(prediction.label_ids)
        keep = labels[:, 1:] != -100
        hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[keep]
        return {"accuracy": hits.float().mean().item()}

    eval_rows = ListDataset(sequences(8, seed=1))
    results = []
    for model in (make_model("llama"), tx.patch(make_model("llama"))):
        trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path), data_collator=collate,
                                       eval_dataset=eval_rows, compute_metrics=compute_metrics)
        results.append((trainer.evaluate(), trainer.predict(eval_rows)))
    (metrics_ref, pred_ref), (metrics, pred) = results
    assert seen["shape"][0] == 8 and seen["shape"][-1] == VOCAB
    assert metrics["eval_accuracy"] == metrics_ref["eval_accuracy"]
    torch.testing.assert_close(metrics["eval_loss"], metrics_ref["eval_loss"], rtol=1e-5, atol=0)
    assert pred.predictions.shape == pred_ref.predictions.shape
    torch.testing.assert_close(torch.as_tensor(pred.predictions), torch.as_tensor(pred_ref.predictions))


def test_trainer_loss_only_evaluation_without_logits(tmp_path):
    eval_rows = ListDataset(sequences(8, seed=1))
    losses = []
    for model in (make_model("llama"), tx.patch(make_model("llama"), eval_logits=False)):
        trainer = transformers.Trainer(model=model, data_collator=collate, eval_dataset=eval_rows,
                                       args=trainer_args(tmp_path, prediction_loss_only=True))
        losses.append(trainer.evaluate()["eval_loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def _sft(trainer_cls, model, tmp_path, check=None, **kw):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>")
    texts = [" ".join(f"t{i}" for i in row) for row in sequences(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, max_length=32, seed=0,
                         dataloader_num_workers=0, disable_tqdm=True)
    torch.manual_seed(0)
    trainer = trainer_cls(model=model, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_dict({"text": texts}), **kw)
    if check is not None:
        check(trainer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def test_trl_sft_trainer_uses_the_patch(tmp_path):
    pytest.importorskip("trl")
    import trl

    from triton_xent.integrations.trl import SFTTrainer

    base = make_model("llama")
    losses_ref, _ = _sft(trl.SFTTrainer, copy.deepcopy(base), tmp_path / "trl")

    def check(trainer):  # TRL's head is gone again, the model patched
        assert tx.options_of(trainer.model) is not None
        assert "forward" not in vars(trainer.model)

    losses, _ = _sft(SFTTrainer, copy.deepcopy(base), tmp_path / "tx", check=check)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=0)
    smoothed, trainer = _sft(SFTTrainer, copy.deepcopy(base), tmp_path / "smooth",
                             triton_xent_options=dict(label_smoothing=0.3))
    assert tx.options_of(trainer.model).label_smoothing == 0.3
    assert abs(smoothed[0] - losses[0]) > 1e-2  # the option reaches the loss


def test_trl_fused_head_on_a_patched_model_is_not_silent(tmp_path):
    pytest.importorskip("trl")
    import trl

    with pytest.warns(UserWarning, match="triton_xent.integrations.trl.SFTTrainer"):
        _sft(trl.SFTTrainer, tx.patch(make_model("llama")), tmp_path / "warn")
    with pytest.raises(RuntimeError, match="z_loss"):
        _sft(trl.SFTTrainer, tx.patch(make_model("llama"), z_loss=1e-4), tmp_path / "raise")


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def gloo_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp2(gloo_group):
    from torch.distributed.fsdp import fully_shard

    ref = make_model("llama").train()
    out_ref, grads_ref = run(ref, **make_batch())
    model = tx.patch(copy.deepcopy(ref)).train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=gloo_group)
    fully_shard(model, mesh=gloo_group)  # lm_head in the root unit: unsharded during the forward
    out, grads = run(model, **make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close({n: g.full_tensor() for n, g in grads.items()}, grads_ref)

    # lm_head as its own unit: its weight is still a DTensor shard when the loss reads it
    # (gathered for the call; 2 ranks and the other layouts: tests/test_fsdp_layouts.py)
    own_unit = tx.patch(copy.deepcopy(ref)).train()
    fully_shard(own_unit.lm_head, mesh=gloo_group)
    fully_shard(own_unit, mesh=gloo_group)
    out, grads = run(own_unit, **make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close({n: g.full_tensor() for n, g in grads.items()}, grads_ref)
