"""Full analysis of the Llama-3.1-405B shape on meta vs FlopCounterMode's FLOP-only count, side by side.

    python benchmarks/analyze_meta.py [--rounds 5] [--tokens 2048]

Both run in this one process, alternating, on the same model built on the meta device; the medians and their
ratio are printed. Peak RSS is measured for each in a fresh child process (the parent's peak would mix both).
Target (issue 2): our full analysis (FLOPs + bytes + roofline + report) <= 1.5x FlopCounterMode, RSS < 2 GB.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402


def build():
    with torch.device("meta"):
        return Transformer(LlamaConfig.llama3_405b())


def ours(model, tokens):
    return shapeprof.analyze(model, shapeprof.InputShape((1, tokens), torch.long), dtype=torch.bfloat16)


def flop_counter(model, tokens):
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    return counter.get_total_flops()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def child(which: str, tokens: int) -> None:
    model = build()
    before = peak_rss_mb()
    (ours if which == "ours" else flop_counter)(model, tokens)
    print(f"{before:.0f} {peak_rss_mb():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--child", choices=["ours", "flop_counter"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens)

    torch.set_num_threads(os.cpu_count() or 1)
    model = build()
    ours(model, 16), flop_counter(model, 16)   # warm up imports and caches on a short input
    t_ours, t_fc = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        report = ours(model, args.tokens)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        counted = flop_counter(model, args.tokens)
        t_fc.append(time.perf_counter() - start)
    m_ours, m_fc = statistics.median(t_ours), statistics.median(t_fc)
    rss = {}
    for which in ("ours", "flop_counter"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True).stdout.split()
        rss[which] = (float(out[0]), float(out[1]))

    print(f"Llama-3.1-405B shape on meta, 1 x {args.tokens} tokens, bf16, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"  graph nodes {report.capture.graph_nodes:,} ({report.capture.reused_nodes:,} from twins), "
          f"nodes doing work {len(report.nodes):,}, capture {report.capture.method}")
    print(f"  FLOPs: shapeprof {report.total.flops:,}  FlopCounterMode {counted:,}  "
          f"(ratio {report.total.flops / counted:.4f}: causal attention counts its computed half)")
    print(f"  shapeprof.analyze (FLOPs+bytes+roofline+report): median {m_ours:.3f} s  "
          f"runs {' '.join(f'{t:.3f}' for t in t_ours)}")
    print(f"  FlopCounterMode (FLOPs only):                   median {m_fc:.3f} s  "
          f"runs {' '.join(f'{t:.3f}' for t in t_fc)}")
    print(f"  ratio analyze / FlopCounterMode: {m_ours / m_fc:.2f}x  (target <= 1.5x)")
    for which, (before, after) in rss.items():
        print(f"  peak RSS {which:>12}: {after:.0f} MB (model built: {before:.0f} MB)  (target < 2048 MB)")


if __name__ == "__main__":
    main()
