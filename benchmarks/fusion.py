"""Linear + activation fusion: original vs `shapeprof.optimize`d MLP blocks, timed side by side in one run.

An MLP block is ``Linear(d, 4d) -> activation -> Linear(4d, d)`` (examples/mlp.py's MLP with one block);
optimize fuses the first Linear with the activation. For d = 768 and 1024, at batch 1, 64 and 512, this prints
the per-call medians of the original and the optimized block and their ratio (original / optimized: above 1 is
faster). fp32 on the CPU with every core; bf16 on CUDA as well when a GPU is present.

Two paths, with optimize's safe default (pack_weights="frozen") in both: with frozen weights
(``model.requires_grad_(False)``, as inference deployments load them) the CPU kernels use oneDNN-packed copies
of the weights; with trainable weights (requires_grad=True, the default of a freshly built model) nothing is
packed, since an optimizer step could change a weight behind PyTorch's back, and only the activation epilogue
is fused. Each table says which.

Timing: each (original, optimized) pair is measured in interleaved repeats, the order alternating (ABBA) so that
drift and noise from other processes hit both alike; each repeat runs enough calls for ~50 ms; the medians over
repeats are reported. Run on an otherwise idle machine: the ratio is only as good as the quiet.

    python benchmarks/fusion.py                    # relu and gelu, CPU fp32 (+ CUDA bf16 if available)
    python benchmarks/fusion.py --activation relu --repeats 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # examples/ from a source checkout

from examples.mlp import MLP  # noqa: E402
from shapeprof.optimize import optimize  # noqa: E402

WIDTHS = (768, 1024)
BATCHES = (1, 64, 512)


def time_pair(original, fast, x, repeats: int, sync) -> tuple[float, float]:
    """Per-call medians (seconds) of original(x) and fast(x), interleaved ABBA."""
    for _ in range(3):
        original(x)
        fast(x)
    sync()
    start = time.perf_counter()
    original(x)
    sync()
    one = time.perf_counter() - start
    calls = max(1, min(2000, int(0.05 / max(one, 1e-7))))
    samples: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        order = ((0, original), (1, fast)) if r % 2 == 0 else ((1, fast), (0, original))
        for which, model in order:
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            sync()
            samples[which].append((time.perf_counter() - start) / calls)
    return statistics.median(samples[0]), statistics.median(samples[1])


def run(device: str, dtype: torch.dtype, activations, repeats: int, frozen: bool) -> list[tuple]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for activation in activations:
        for d in WIDTHS:
            torch.manual_seed(0)
            model = MLP(d_in=d, d_hidden=4 * d, d_out=d, n_blocks=1,
                        activation="gelu" if activation == "gelu_tanh" else activation).eval()
            if activation == "gelu_tanh":
                model.blocks[0][1] = torch.nn.GELU(approximate="tanh")
            model = model.to(device=device, dtype=dtype).requires_grad_(not frozen)
            for batch in BATCHES:
                x = torch.randn(batch, d, device=device, dtype=dtype)
                fast = optimize(model, x)
                report = fast.shapeprof_report
                fused = ", ".join(m.what.split(" -> ")[1].split(" [")[0] for m in report.applied)
                outcome = report.outcomes[0] if report.outcomes else None
                if fused:
                    pass
                elif outcome is not None and outcome.status == "rejected":
                    fused = f"rejected by verification: {outcome.verification.summary()}"
                elif report.skipped:
                    fused = f"not fused: {report.skipped[0].reason}"
                else:
                    fused = f"not fused: {report.refused or (outcome.status if outcome else 'no rewrite ran')}"
                with torch.no_grad():
                    old, new = time_pair(model, fast, x, repeats, sync)
                rows.append((activation, f"{d}->{4 * d}->{d}", batch, old, new, old / new, fused))
    return rows


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    header = f"{'act':<9} {'block':<16} {'batch':>5} {'original ms':>12} {'optimized ms':>13} {'ratio':>6}  fused as"
    print(header)
    print("-" * len(header))
    for act, block, batch, old, new, ratio, fused in rows:
        print(f"{act:<9} {block:<16} {batch:>5} {old * 1e3:>12.4f} {new * 1e3:>13.4f} {ratio:>6.2f}  {fused}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activation", action="append", choices=["relu", "gelu", "gelu_tanh", "silu"],
                        help="activation(s) to benchmark, repeatable (default: relu and gelu on the CPU; relu and "
                             "gelu_tanh on CUDA, whose cuBLASLt epilogue has only the tanh GELU)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per pair (default 15)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA bf16 table even if a GPU is present")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU fp32 table (GPU runs)")
    parser.add_argument("--weights", choices=["frozen", "trainable", "both"], default="both",
                        help="frozen (requires_grad=False: packed on the CPU), trainable (not packed), or both")
    args = parser.parse_args(argv)
    activations = args.activation or ["relu", "gelu"]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    print("ratio = original / optimized, per-call medians of interleaved repeats (>1: the fused model is faster)")
    states = {"frozen": [True], "trainable": [False], "both": [True, False]}[args.weights]
    for frozen in states:
        path = ("frozen weights: oneDNN-packed (the safe default packs these)" if frozen else
                "trainable weights: not packed, activation epilogue only (the safe default)")
        if not args.no_cpu:
            print_table(f"CPU, fp32, {path}", run("cpu", torch.float32, activations, args.repeats, frozen))
        if torch.cuda.is_available() and not args.no_cuda:
            # cuBLASLt's GELU epilogue is the tanh approximation: an exact GELU stays unfused there
            cuda_acts = args.activation or ["relu", "gelu_tanh", "gelu"]
            print_table(f"CUDA ({torch.cuda.get_device_name()}), bf16, {path}",
                        run("cuda", torch.bfloat16, cuda_acts, args.repeats, frozen))


if __name__ == "__main__":
    main()
