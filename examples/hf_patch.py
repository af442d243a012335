"""triton_xent in a Hugging Face model: ``patch(model)`` and the same loss and gradients.

    pip install -e ".[hf]"                  # from the checkout
    python examples/hf_patch.py             # CUDA if there is one, else the CPU
    python examples/hf_patch.py --quick     # tiny shapes (tests)

Builds a small randomly initialised ``LlamaForCausalLM`` (nothing is downloaded), computes the
training loss and every parameter's gradient with the model as it is, then with
``patch(model, fused=True)`` (in training, the LM head's input and weight go to
``triton_xent.linear_cross_entropy``: no logits) and ``patch(model, fused=False)`` (logits kept,
loss by ``triton_xent.cross_entropy``), on a padded batch, with and without
``num_items_in_batch``; then checks that evaluation (``model.eval()``, labels given) returns the
model's logits and loss. Exits with status 1 on a mismatch. With a real checkpoint::

    model = patch(AutoModelForCausalLM.from_pretrained(name))   # or apply("llama") before it
    # then train as usual, e.g. with transformers.Trainer (see examples/hf_trainer.py)
"""

from __future__ import annotations

import argparse
import copy

import torch

from triton_xent.integrations.transformers import patch, unpatch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.batch, args.seq = 1024, 32, 2, 16

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(args.device).train()  # fused while training
    dev = model.device

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    mask = torch.ones_like(ids)
    mask[0, : args.seq // 4] = 0  # left padding in the first sequence
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    n_items = (labels[:, 1:] != -100).sum()

    print(f"LlamaForCausalLM, random init: V={args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers; batch {args.batch}x{args.seq} on {dev}")
    ok = True
    for kwargs in ({}, {"num_items_in_batch": n_items}):
        ref_out, ref_grads = loss_and_grads(model, {**batch, **kwargs})
        label = "mean over tokens" if not kwargs else f"sum / num_items_in_batch={int(n_items)}"
        print(f"\n{label}:  model's own loss {ref_out.loss.item():.6f}")
        for fused in (True, False):
            patched = patch(copy.deepcopy(model), fused=fused)
            out, grads = loss_and_grads(patched, {**batch, **kwargs})
            d_loss = abs(out.loss.item() - ref_out.loss.item())
            d_grad = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                         for n, g in ref_grads.items())
            logits = "no logits" if out.logits is None else f"logits {tuple(out.logits.shape)}"
            print(f"  patch(fused={fused!s:5}): loss {out.loss.item():.6f}  |diff| {d_loss:.1e}"
                  f"  max rel grad diff {d_grad:.1e}  ({logits})")
            ok &= d_loss <= 1e-5 * max(1.0, abs(ref_out.loss.item())) and d_grad <= 1e-4

    # Evaluation (labels given) and calls without labels build the logits, as the model does.
    patched = patch(copy.deepcopy(model)).eval()
    model.eval()
    with torch.no_grad():
        out, ref_out = patched(**batch), model(**batch)
        same = torch.allclose(out.logits, ref_out.logits) and torch.allclose(out.loss, ref_out.loss)
        same &= torch.allclose(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    print(f"\nmodel.eval(): patched logits and loss equal the model's: {same}")
    ok &= same
    unpatch(patched)

    print("OK: same loss and gradients with and without the patch." if ok else "MISMATCH.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
