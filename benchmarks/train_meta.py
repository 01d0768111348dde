"""A training step of the hand-written Llama-3-8B on meta, priced by shapeprof next to FlopCounterMode counting it.

    python benchmarks/train_meta.py [--rounds 5] [--layers 32]

Both in this one process, alternating within each round, medians and the median of each round's ratio printed
with every run:
- FlopCounterMode over forward + cross-entropy + backward of the meta model (FLOPs only);
- `shapeprof.backward.capture_backward` (forward and backward captured on a meta shadow, every op priced, each
  backward op tied to its module, saved activations counted): the issue's target is <= 1.0x FlopCounterMode;
- `shapeprof.training.train_step` (the same plus the optimizer's update captured and priced, memory, DDP/FSDP);
- `shapeprof.analyze(..., train=True)`: the forward's node-by-node report as analyze makes it, plus train_step.
The matmul FLOPs of both are printed: they must agree.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402
from shapeprof.backward import capture_backward  # noqa: E402
from shapeprof.training import train_step  # noqa: E402


def loss_fn(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    with torch.device("meta"):
        model = Transformer(LlamaConfig.llama3_8b(n_layers=args.layers)).to(torch.bfloat16)
    idx = torch.zeros(1, 2048, dtype=torch.long, device="meta")

    def flop_counter():
        with FlopCounterMode(display=False) as counter:
            loss_fn(model(idx), idx).backward()
        model.zero_grad(set_to_none=True)
        return counter.get_flop_counts()["Global"].get(torch.ops.aten.mm, 0)

    def ours():
        p = capture_backward(model, idx, loss_fn=loss_fn, targets=(idx,))
        return p.flops_by_op().get("aten.mm", 0)

    def step():
        return train_step(model, idx, loss_fn=loss_fn, targets=(idx,)).model_flops

    def analyze_train():
        return shapeprof.analyze(model, idx, train=shapeprof.Train(loss_fn=loss_fn, targets=(idx,))).total.flops

    ways = {"FlopCounterMode": flop_counter, "capture_backward": ours, "train_step": step,
            "analyze(train=)": analyze_train}
    times: dict[str, list[float]] = {k: [] for k in ways}
    answers = {}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            gc.collect()
            t = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - t)
    print(f"Llama-3-8B shape, {args.layers} layers, 1 x 2048 tokens, bf16 on meta, forward + backward")
    print(f"aten.mm FLOPs: FlopCounterMode {answers['FlopCounterMode']:,}, shapeprof {answers['capture_backward']:,}"
          f"; train_step model FLOPs {answers['train_step']:,}")
    base = statistics.median(times["FlopCounterMode"])
    for name, values in times.items():
        med = statistics.median(values)
        # each round's own ratio (the two ran seconds apart, under the same load), then their median: this
        # machine's load comes and goes, and a ratio of two medians taken over different rounds mixes loads
        ratio = statistics.median(v / f for v, f in zip(values, times["FlopCounterMode"]))
        print(f"{name:>16}: median {med:.2f} s ({med / base:.2f}x FlopCounterMode's median; per-round ratio "
              f"median {ratio:.2f}x); runs " + ", ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
