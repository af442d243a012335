"""Peak memory and time of one training step of a Hugging Face causal LM, patched or not.

    python examples/hf_memory.py              # Llama-shaped, V=128256, 4 x 512 tokens, fp32
    python examples/hf_memory.py --quick      # tiny shapes (tests)

One forward + backward of a small randomly initialised ``LlamaForCausalLM`` with a 128256-token
vocabulary (Llama 3's), three ways, each in its own process: the model as transformers computes
its loss, ``patch(model, fused=False)`` (logits kept, loss by ``triton_xent.cross_entropy``) and
``patch(model)`` (fused: the logits are never built). Memory is the peak beyond what the model,
its inputs and one warm-up step leave resident: on the CPU the peak resident set size (VmHWM
after resetting it, minus VmRSS), on CUDA ``torch.cuda.max_memory_allocated``. Time is the
median of ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

MODES = ("model", "unfused", "fused")


def child(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from triton_xent.integrations.transformers import patch

    torch.manual_seed(0)
    dev = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dev).train()
    if args.mode != "model":
        patch(model, fused=args.mode == "fused")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item()

    loss = step()  # warm-up: gradients allocated, kernels chosen
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=False)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:  # Linux only
                f.write("5")  # reset the peak-RSS mark to the current RSS
            base = _status_kib("VmRSS") * 1024
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                else _status_kib("VmHWM") * 1024) - base
    return {"loss": loss, "peak_mib": peak / 2**20, "ms": 1e3 * statistics.median(times)}


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.batch, args.seq, args.repeats = 4096, 32, 2, 64, 1
    if args.mode:
        print(json.dumps(child(args)))
        return 0

    tokens = args.batch * args.seq
    print(f"LlamaForCausalLM, random init: V={args.vocab}, hidden {args.hidden}, {args.layers} "
          f"layers, fp32; {args.batch} x {args.seq} tokens on {args.device}; logits "
          f"{tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"{'':28s} {'loss':>10s} {'peak MiB':>10s} {'ms/step':>10s}")
    results = {}
    labels = {"model": "transformers (as is)", "unfused": "patch(model, fused=False)",
              "fused": "patch(model)  (fused)"}
    for mode in MODES:
        argv = [a for a in sys.argv[1:] if a != "--quick"] + ["--mode", mode]
        if args.quick:
            argv += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--batch",
                     str(args.batch), "--seq", str(args.seq), "--repeats", "1"]
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return 1
        results[mode] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{labels[mode]:28s} {r['loss']:10.6f} {r['peak_mib']:10.0f} {r['ms']:10.0f}")
    same = all(abs(r["loss"] - results["model"]["loss"]) <= 1e-4 for r in results.values())
    print("OK: the same loss three ways." if same else "MISMATCH.")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
