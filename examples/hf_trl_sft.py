"""TRL supervised fine-tuning with triton_xent's loss, next to TRL's own.

    pip install -e ".[trl]"                 # from the checkout
    python examples/hf_trl_sft.py             # CUDA if there is one, else the CPU
    python examples/hf_trl_sft.py --quick     # tiny shapes (tests)

TRL's ``SFTTrainer`` puts its own fused LM head on the model and computes the loss from it, so
a model patched by ``triton_xent.integrations.transformers`` would not be used (the patch warns,
or refuses when its options would be dropped). ``triton_xent.integrations.trl.SFTTrainer`` takes
the same arguments and leaves the loss to the patched model; ``triton_xent_options`` holds
``patch``'s keywords (``z_loss``, ``label_smoothing``, ...). This script builds a tiny random
``LlamaForCausalLM``, a word-level tokenizer and a text dataset in memory (nothing is
downloaded), trains with TRL's trainer and with triton_xent's from the same start, and prints
both loss curves; exits 1 if they differ beyond rounding. With a real model::

    from triton_xent.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTConfig(...), train_dataset=ds,
                         triton_xent_options={"z_loss": 1e-4})
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch


def tokenizer_for(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def texts(n: int, vocab: int, max_len: int, seed: int = 0):
    """Arithmetic word sequences of varied length (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, d = torch.randint(0, vocab - 3, (2,), generator=g).tolist()
        length = int(torch.randint(max_len // 2, max_len, (1,), generator=g))
        rows.append(" ".join(f"w{(a + i * (d % 7 + 1)) % (vocab - 3) + 3}" for i in range(length)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.batch, args.seq, args.steps = 512, 32, 4, 16, 4

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    from triton_xent.integrations.trl import SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
        bos_token_id=None, eos_token_id=1))
    tokenizer = tokenizer_for(args.vocab)
    data = Dataset.from_dict({"text": texts(4 * args.batch * args.steps, args.vocab, args.seq)})

    curves = {}
    for name, trainer_cls in (("TRL", TRLSFTTrainer), ("triton_xent", SFTTrainer)):
        with tempfile.TemporaryDirectory() as out:
            config = SFTConfig(
                output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="constant",
                logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=False,
                max_length=args.seq, use_cpu=args.device == "cpu", dataloader_num_workers=0,
                disable_tqdm=True)
            torch.manual_seed(0)
            trainer = trainer_cls(model=copy.deepcopy(model), args=config, train_dataset=data,
                                  processing_class=tokenizer)
            trainer.train()
        curves[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    print(f"\nSFT of a random LlamaForCausalLM (V={args.vocab}, hidden {args.hidden}) on "
          f"{args.device}: {args.steps} steps of 2 x {args.batch} sequences")
    print("step  trl.SFTTrainer   triton_xent.integrations.trl.SFTTrainer")
    for step, (a, b) in enumerate(zip(curves["TRL"], curves["triton_xent"]), 1):
        print(f"{step:4d}  {a:14.6f}   {b:14.6f}")
    worst = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(curves["TRL"], curves["triton_xent"]))
    print(f"\nmax relative difference over the curve: {worst:.1e}")
    ok = len(curves["TRL"]) == len(curves["triton_xent"]) == args.steps and worst <= 1e-4
    print("OK: triton_xent's SFTTrainer trains like TRL's." if ok else "MISMATCH.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
