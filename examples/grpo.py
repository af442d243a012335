"""GRPO with TRL: triton_xent's fused head and policy loss next to TRL's own trainer.

    pip install -e ".[trl]"                 # from the checkout
    python examples/grpo.py                   # CUDA if there is one, else the CPU
    python examples/grpo.py --quick           # tiny shapes (tests)

Builds a tiny random ``LlamaForCausalLM`` (the policy; TRL loads the reference model from the
same folder, ``beta > 0``), a word-level tokenizer, prompts and a reward in memory (nothing is
downloaded), then runs a few GRPO steps twice from the same seed: with ``trl.GRPOTrainer`` and
with ``triton_xent.integrations.trl.GRPOTrainer`` (every log-prob and entropy from triton_xent's
fused head, the policy loss from ``linear_policy_loss``: its gradient written in the forward,
no ``(tokens, V)`` logits). Prints both loss curves (the same completions are sampled: the
losses agree to fp32 rounding) and the peak memory of one policy-loss step (forward and backward)
of each; exits 1 if the curves differ. With a real model::

    from triton_xent.integrations.trl import GRPOTrainer
    trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=..., args=GRPOConfig(...),
                          train_dataset=ds)
"""

from __future__ import annotations

import argparse
import gc
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


def reward(completions, **kwargs):
    """Distinct words, minus a little per character: something a tiny policy can move."""
    return [float(len(set(c.split()))) - 0.02 * len(c) for c in completions]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_bytes(fn, device: str) -> int:
    """Peak memory of ``fn()`` beyond what is held before it: CUDA's allocator peak, or on a
    Linux CPU the resident set's high-water mark (reset through /proc/self/clear_refs)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return -1
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--completion", type=int, default=64, help="max completion length")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.completion, args.batch, args.steps = 1024, 32, 8, 8, 2

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    from triton_xent.integrations.trl import GRPOTrainer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(3, args.vocab, (4 + k % 4,),
                                                             generator=g))
               for k in range(4 * args.batch)]
    data = Dataset.from_dict({"prompt": prompts})
    tokenizer = tokenizer_for(args.vocab)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
            bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)).save_pretrained(tmp)
        for name, cls in (("TRL", TRLGRPOTrainer), ("triton_xent", GRPOTrainer)):
            config = GRPOConfig(
                output_dir=f"{tmp}/{name}", max_steps=args.steps,
                per_device_train_batch_size=args.batch, num_generations=4,
                max_completion_length=args.completion, beta=0.04, loss_type="dapo",
                temperature=0.7, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", seed=0, bf16=False, use_cpu=args.device == "cpu",
                dataloader_num_workers=0, disable_tqdm=True)
            torch.manual_seed(0)
            trainer = cls(model=AutoModelForCausalLM.from_pretrained(tmp), reward_funcs=reward,
                          args=config, processing_class=tokenizer, train_dataset=data)
            trainer.train()
            curve = [(h["loss"], h.get("kl"), h.get("entropy"))
                     for h in trainer.state.log_history if "loss" in h]
            # One policy-loss step (forward + backward) on a fresh batch, measured alone.
            model = trainer.model
            model.train()
            inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

            def step(trainer=trainer, model=model, inputs=inputs):
                trainer.compute_loss(model, inputs).backward()
                model.zero_grad(set_to_none=True)

            step()  # warm-up
            results[name] = (curve, peak_bytes(step, args.device))
            del trainer, model, inputs

    (trl_curve, trl_peak), (ours_curve, ours_peak) = results["TRL"], results["triton_xent"]
    print(f"\nGRPO (dapo, beta 0.04, T=0.7) of a random LlamaForCausalLM (V={args.vocab}, hidden "
          f"{args.hidden}) on {args.device}: {args.steps} steps of {args.batch} completions of "
          f"up to {args.completion} tokens")
    print("step  trl.GRPOTrainer loss   triton_xent loss    kl (TRL / ours)     entropy (TRL / ours)")
    for i, (a, b) in enumerate(zip(trl_curve, ours_curve), 1):
        print(f"{i:4d}  {a[0]:+18.8f}   {b[0]:+15.8f}    {a[1]:.6f} / {b[1]:.6f}   "
              f"{a[2]:.6f} / {b[2]:.6f}")
    worst = max((abs(a[0] - b[0]) / max(1.0, abs(a[0])) for a, b in zip(trl_curve, ours_curve)),
                default=float("inf"))
    print(f"\nmax relative difference of the loss over the curve: {worst:.1e}")
    if trl_peak >= 0 and ours_peak >= 0:
        print(f"peak memory of one policy-loss step (forward + backward): trl.GRPOTrainer "
              f"{trl_peak / 2**20:.1f} MiB, triton_xent {ours_peak / 2**20:.1f} MiB")
    ok = len(trl_curve) == len(ours_curve) == args.steps and worst <= 1e-4
    print("OK: triton_xent's GRPOTrainer trains like TRL's." if ok else "MISMATCH.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
