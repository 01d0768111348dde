"""Serve many prompts at once with the nanoGPT-style model of examples/nanogpt.py: shapeprof.optimize gives it a KV
cache, shapeprof.generate_batch runs the requests together on paged KV memory under a budget.

    python examples/serve_gpt.py --requests 8
    shapeprof trace examples/serve_gpt.py        # the model's report, and generate_batch's steps in TensorBoard

The weights are random and the prompts random bytes: the point is how the requests share the memory.
"""
import argparse

import torch

import shapeprof

try:
    from .nanogpt import GPT, GPTConfig   # imported as examples.serve_gpt
except ImportError:
    from nanogpt import GPT, GPTConfig    # run as a script: its own directory is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kv-budget", default="256KiB", help="KV memory for all requests (default 256KiB)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128)
    model = GPT(config).eval().requires_grad_(False)
    prompts = [torch.randint(0, 256, (int(n),)) for n in torch.randint(4, 48, (args.requests,))]
    fast = shapeprof.optimize(model, prompts[0][None])
    outs = shapeprof.generate_batch(fast, prompts, max_new_tokens=args.max_new_tokens, kv_budget=args.kv_budget)
    s = outs.stats
    print(f"{len(outs)} requests, {s.new_tokens} tokens: peak {s.peak_concurrent} at once, KV waste {s.waste:.1%}, "
          f"{s.preemptions} preemptions, {s.tokens_per_second:.0f} tokens/s")
    return outs


if __name__ == "__main__":
    main()
