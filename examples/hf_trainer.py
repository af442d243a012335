"""transformers' ``Trainer`` with triton_xent's loss, next to the unpatched model.

    pip install -e ".[hf]"                  # from the checkout
    python examples/hf_trainer.py             # CUDA if there is one, else the CPU
    python examples/hf_trainer.py --quick     # tiny shapes (tests)

Builds a small randomly initialised ``LlamaForCausalLM`` from a config (nothing is downloaded)
and a synthetic dataset it can learn (arithmetic sequences of tokens), then trains it twice
with the same seed, gradient accumulation and padding: once as transformers computes the loss,
once after ``apply("llama")``, which patches the class before the model is built (as it would
before ``from_pretrained`` or in ``model_init``). Training is fused (no logits); evaluation
still hands ``compute_metrics`` the logits. Prints both loss curves side by side and exits with
status 1 if they differ beyond fp32 rounding. With a real checkpoint::

    from triton_xent.integrations.transformers import apply
    apply("llama")                                    # or: model = patch(model)
    model = AutoModelForCausalLM.from_pretrained(name)
    Trainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=8), ...).train()
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from triton_xent.integrations.transformers import apply, revert


class Sequences(torch.utils.data.Dataset):
    """Arithmetic sequences ``(a + i * d) mod (V - 1) + 1`` of varied length: learnable."""

    def __init__(self, n, vocab, max_len, seed):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            a, d = torch.randint(0, vocab - 1, (2,), generator=g).tolist()
            length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=g))
            self.rows.append([(a + i * (d % 7 + 1)) % (vocab - 1) + 1 for i in range(length)])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(rows):
    """Right padding with token 0; labels -100 on the padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def accuracy(prediction):
    """compute_metrics: next-token accuracy from the logits the evaluation returns."""
    logits = torch.as_tensor(prediction.predictions)
    labels = torch.as_tensor(prediction.label_ids)
    keep = labels[:, 1:] != -100
    return {"accuracy": (logits[:, :-1].argmax(-1) == labels[:, 1:])[keep].float().mean().item()}


def train(args, patched: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    if patched:
        apply("llama")  # every LlamaForCausalLM built from here on is patched
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                per_device_eval_batch_size=args.batch, gradient_accumulation_steps=2,
                learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                save_strategy="no", seed=0, use_cpu=args.device == "cpu",
                dataloader_num_workers=0, disable_tqdm=True)
            trainer = Trainer(model=model, args=targs, data_collator=collate,
                              train_dataset=Sequences(4 * args.batch * args.steps, args.vocab,
                                                      args.seq, seed=0),
                              eval_dataset=Sequences(2 * args.batch, args.vocab, args.seq, seed=1),
                              compute_metrics=accuracy)
            trainer.train()
            metrics = trainer.evaluate()
    finally:
        if patched:
            revert("llama")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.batch, args.seq, args.steps = 512, 32, 4, 16, 6

    print(f"LlamaForCausalLM, random init: V={args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers; Trainer: {args.steps} steps of 2 x {args.batch} sequences "
          f"(gradient accumulation 2) on {args.device}")
    ref, ref_eval = train(args, patched=False)
    tx, tx_eval = train(args, patched=True)
    print("\nstep  transformers   triton_xent (apply('llama'), fused)")
    for step, (a, b) in enumerate(zip(ref, tx), 1):
        print(f"{step:4d}  {a:12.6f}   {b:12.6f}")
    worst = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(ref, tx))
    print(f"\nmax relative difference over the curve: {worst:.1e}")
    print(f"evaluation (logits for compute_metrics): loss {ref_eval['eval_loss']:.6f} / "
          f"{tx_eval['eval_loss']:.6f}, accuracy {ref_eval['eval_accuracy']:.4f} / "
          f"{tx_eval['eval_accuracy']:.4f}")
    ok = len(ref) == len(tx) == args.steps and worst <= 1e-4 and (
        abs(ref_eval["eval_loss"] - tx_eval["eval_loss"]) <= 1e-4 * max(1.0, ref_eval["eval_loss"]))
    print("OK: the Trainer trains the patched model like the model." if ok else "MISMATCH.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
