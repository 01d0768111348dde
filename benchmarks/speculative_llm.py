"""`shapeprof.speculative` for Llama-3.1-70B with a Llama-3.2-1B draft (examples/llama.py shapes on meta), H100, bf16:
how long it takes, and what it says (the figures README.md and RESULTS.md quote).

    python benchmarks/speculative_llm.py             # 70B / 1B, H100 SXM, bf16, context 4096, batches 1 8 32 64
    python benchmarks/speculative_llm.py --small     # two small Llama shapes: a smoke run of seconds

Each batch analyses the target's decode step, the draft's and the target's verification of g = 1 .. 8 drafted
tokens (Decode(tokens=g + 1)): 4 x 10 analyses, each model's graph captured once.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="two small Llama shapes instead of 70B / 1B")
    ap.add_argument("--spec", default="h100-sxm")
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    configs = ((LlamaConfig.tiny(dim=256, n_layers=4, max_seq_len=8192), LlamaConfig.tiny(max_seq_len=8192))
               if args.small else (LlamaConfig.llama31_70b(), LlamaConfig.llama32_1b()))
    started = time.perf_counter()
    with torch.device("meta"):
        target, draft = (Transformer(c) for c in configs)
    built = time.perf_counter() - started
    sd = shapeprof.speculative(target, draft, spec=args.spec, dtype=torch.bfloat16, context=args.context)
    print(sd)
    a, g = 0.8, 4
    print(f"speculative(): {sd.seconds:.1f} s for {sd.analyses} analyses (models built on meta in {built:.1f} s), "
          f"torch {torch.__version__}")
    for b in sd.batches:
        t = sd.step_times(b, g)
        be = sd.break_even(g, b)
        print(f"batch {b:>3}: target {t['target'] * 1e3:.3f} ms, draft {t['draft'] * 1e3:.3f} ms, verify(g={g}) "
              f"{t['verify'] * 1e3:.3f} ms ({sd.verify_ratio(b, g):.3f} target steps); speedup at a={a}, g={g}: "
              f"{sd.speedup(a, g, b):.3f}; break-even a at g={g}: " + (f"{be:.4f}" if be is not None else "never") +
              "; best g per a: " + ", ".join(f"{r['acceptance']}: {r['draft_tokens']} ({r['speedup']:.2f}x)"
                                              for r in sd.best(b)))


if __name__ == "__main__":
    main()
