"""Paged KV memory against contiguous reservation, one run, side by side: `shapeprof.generate_batch` on 64 requests
whose prompt and output lengths are drawn from a seeded long-tailed (log-normal) distribution, with the same KV
budget both ways.

    python benchmarks/paged_cache.py                 # a 6-layer, 384-wide nanoGPT (block 1024), fp32 CPU
    python benchmarks/paged_cache.py --small         # tiny shapes, 16 requests: a smoke test of seconds

- contiguous: each sequence is admitted only with room for the model's 1,024 positions reserved
  (``reserve="contiguous"``), as a cache without paging does;
- paged: blocks of ``--block-size`` tokens taken as tokens come, preempting (and later recomputing) the newest
  sequence when they run out.

Both run the same batched ragged kernels; every request's tokens are checked equal between the two (greedy).
Printed: KV waste (reserved slots holding no token, averaged over the steps), peak concurrent sequences,
preemptions, generated tokens/s, and the ratios against the targets (waste < 4% at block 16, >= 3x peak concurrent,
>= 2x throughput). Then the per-step decode overhead at equal batch: the paged ragged step against the contiguous
cached step (`fast.decode` on a batch of equal-length sequences), medians over the steps (target < 10%).
Results go into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # examples/ from a source checkout

import shapeprof  # noqa: E402
from shapeprof.batching import generate_batch  # noqa: E402
from examples.nanogpt import GPT, GPTConfig  # noqa: E402


def lengths(n: int, median: float, sigma: float, low: int, high: int, gen: torch.Generator) -> list[int]:
    draws = torch.empty(n).log_normal_(mean=float(torch.tensor(median).log()), std=sigma, generator=gen)
    return [int(min(high, max(low, round(x)))) for x in draws.tolist()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=8,
                        help="the KV budget, in sequences at the model's full context (default 8)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and 16 requests: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the equal-batch step timing (default 5)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)

    torch.manual_seed(args.seed)
    if args.small:
        config = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128)
        args.requests, median_prompt, median_out = 16, 12, 12
    else:
        config = GPTConfig(n_layer=6, n_head=6, n_embd=384, vocab_size=50304, block_size=1024)
        median_prompt, median_out = 96, 96
    model = GPT(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    prompt_lens = lengths(args.requests, median_prompt, 0.8, 4, config.block_size // 2, gen)
    out_lens = [min(o, config.block_size - p) for o, p in
                zip(lengths(args.requests, median_out, 0.8, 4, config.block_size, gen), prompt_lens)]
    prompts = [torch.randint(0, config.vocab_size, (p,), generator=gen) for p in prompt_lens]
    fast = shapeprof.optimize(model, prompts[0][None, :8])
    decoder = type(fast).__dict__["_shapeprof_decoder"]
    per_token = decoder.bytes_per_position
    budget = args.sequences * config.block_size * per_token

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; nanoGPT {config.n_layer} layers x "
          f"{config.n_embd}, vocab {config.vocab_size}, {config.block_size} positions, fp32, frozen weights")
    print(f"{args.requests} requests: prompts median {statistics.median(prompt_lens):.0f} (max {max(prompt_lens)}), "
          f"outputs median {statistics.median(out_lens):.0f} (max {max(out_lens)}) tokens, log-normal sigma 0.8, "
          f"seed {args.seed}; {sum(out_lens):,} tokens to generate")
    print(f"KV budget: {budget:,} bytes = {args.sequences} sequences at full context ({per_token:,} bytes per token); "
          f"block size {args.block_size}")

    results = {}
    for mode in ("contiguous", "paged"):
        start = time.perf_counter()
        outs = generate_batch(fast, prompts, max_new_tokens=out_lens, kv_budget=budget, block_size=args.block_size,
                              reserve=mode)
        wall = time.perf_counter() - start
        results[mode] = (outs, wall)
    (c, c_wall), (p, p_wall) = results["contiguous"], results["paged"]
    assert all(torch.equal(a, b) for a, b in zip(c, p)), "paged and contiguous tokens differ"
    print("identical tokens: yes (every request, paged vs contiguous)")
    header = f"{'':<12} {'waste':>7} {'peak seqs':>10} {'preempted':>10} {'steps':>6} {'tokens/s':>9} {'wall s':>8}"
    print(header + "\n" + "-" * len(header))
    for name, (o, wall) in results.items():
        s = o.stats
        print(f"{name:<12} {s.waste:>7.1%} {s.peak_concurrent:>10} {s.preemptions:>10} {len(s.steps):>6} "
              f"{s.new_tokens / wall:>9.1f} {wall:>8.2f}")
    concurrency = p.stats.peak_concurrent / c.stats.peak_concurrent
    throughput = (p.stats.new_tokens / p_wall) / (c.stats.new_tokens / c_wall)
    print(f"paged waste {p.stats.waste:.1%} (target < 4% at block 16; contiguous {c.stats.waste:.1%})")
    print(f"peak concurrent: {concurrency:.2f}x (target >= 3x)")
    print(f"throughput: {throughput:.2f}x (target >= 2x)")
    # what paging could give if a batched step cost the same at any batch: fewer steps, no more. The paged run
    # cannot take fewer steps than its longest request has tokens to make
    c_step, p_step = c_wall / len(c.stats.steps), p_wall / len(p.stats.steps)
    # under load, as a server runs (vLLM's figure): the steps taken while requests still wait, decode calls only
    def saturated(stats) -> float | None:
        busy = [s for s in stats.steps if s["waiting"]]
        return sum(s["running"] for s in busy) / sum(s["seconds"] for s in busy) if busy else None
    loaded = saturated(c.stats), saturated(p.stats)
    if None in loaded:
        print("decode tokens/s while requests wait: no step of the paged run had requests waiting")
    else:
        print(f"decode tokens/s while requests wait: contiguous {loaded[0]:.1f}, paged {loaded[1]:.1f}: "
              f"{loaded[1] / loaded[0]:.2f}x")
    print(f"decode steps: contiguous {len(c.stats.steps)}, paged {len(p.stats.steps)} (never fewer than the longest "
          f"request's {max(out_lens)} tokens): {len(c.stats.steps) / len(p.stats.steps):.2f}x, the most paging gives "
          f"if a step cost the same at any batch; mean step: contiguous {c_step * 1e3:.1f} ms at up to "
          f"{c.stats.peak_concurrent} sequences, paged {p_step * 1e3:.1f} ms at up to {p.stats.peak_concurrent}")

    # per-step decode overhead at equal batch: the paged ragged step vs the contiguous cached step, interleaved
    batch = c.stats.peak_concurrent
    same = torch.randint(0, config.vocab_size, (batch, 64), generator=gen)
    steps, paged_steps, contiguous_steps = 32, [], []
    for _ in range(args.rounds):
        ragged = generate_batch(fast, list(same), max_new_tokens=steps, kv_budget=budget, block_size=args.block_size)
        paged_steps.append(statistics.median(s["seconds"] for s in ragged.stats.steps))
        times = []
        with torch.no_grad():
            (logits, _), state = fast.prefill(same)
            token = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps - 1):
                began = time.perf_counter()
                (logits, _), state = fast.decode(token, state)
                times.append(time.perf_counter() - began)
                token = logits[:, -1].argmax(-1, keepdim=True)
        contiguous_steps.append(statistics.median(times))
    paged_step, contiguous_step = statistics.median(paged_steps), statistics.median(contiguous_steps)
    print(f"decode step at batch {batch} ({args.rounds} interleaved rounds of {steps} steps, medians): paged "
          f"{paged_step * 1e3:.2f} ms, contiguous cache {contiguous_step * 1e3:.2f} ms: overhead "
          f"{paged_step / contiguous_step - 1:+.1%} (target < 10%); per round "
          + ", ".join(f"{p / q - 1:+.0%}" for p, q in zip(paged_steps, contiguous_steps)))

if __name__ == "__main__":
    main()
