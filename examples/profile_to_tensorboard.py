"""Profile the nanoGPT-style model and open the result in TensorBoard: measured here, predicted on a GPU.

    python examples/profile_to_tensorboard.py --logdir runs/profile_example
    tensorboard --logdir runs/profile_example

Two ways in, both shown:

1. ``shapeprof.profile`` (one call): runs the model's captured graph under torch.profiler with one range per graph
   node, and writes the measured run (the real trace, every node and ATen op carrying its FLOPs, bytes, intensity,
   bound and predicted time) next to the predicted run on the chosen GPU. Where ``profile`` is not available this
   script analyses the model and writes the predicted run only (`shapeprof.export_tensorboard`).
2. ``shapeprof.tensorboard_trace_handler``: a drop-in for torch's handler in your own profiler loop,
   for a plain eager run; it adds our costs to the ATen ops and writes the model's predicted run beside the trace.

TensorBoard then shows: PYTORCH_PROFILER (both runs: Overview with the predicted GPU summary, Operator, Kernel and
Trace views), TEXT (the report as tables), IMAGES (the roofline), GRAPHS (the graph, "Color by: Device" = bound)
and SCALARS (totals).
"""
import argparse
from pathlib import Path

import torch

import shapeprof
from shapeprof.output.tensorboard import export_tensorboard, tensorboard_trace_handler

try:
    from .nanogpt import GPT, GPTConfig   # imported as examples.profile_to_tensorboard
except ImportError:
    from nanogpt import GPT, GPTConfig    # run as a script: its own directory is on sys.path


def profile_and_export(model, idx, logdir: Path, spec: str, steps: int) -> dict:
    """Way 1: measured + predicted runs through shapeprof.profile (or predicted only, without it)."""
    profile = getattr(shapeprof, "profile", None)
    if profile is None:
        try:
            from shapeprof.profiling import profile
        except ImportError:
            profile = None
    if profile is not None:
        result = profile(model, idx, logdir=logdir, spec=spec, steps=steps)
        print(result.measured)
        return result.runs
    report = shapeprof.analyze(model, idx, spec=spec)
    print(report)
    return export_tensorboard(logdir, report)


def eager_with_handler(model, idx, logdir: Path, spec: str, steps: int) -> Path:
    """Way 2: your own profiler loop over the eager model, with shapeprof's trace handler."""
    run = logdir / "eager"
    handler = tensorboard_trace_handler(run, model, spec=spec)
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True, with_flops=True,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps), on_trace_ready=handler) as prof:
        for _ in range(steps + 1):
            model(idx)
            prof.step()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs/profile_example"))
    parser.add_argument("--spec", default="a100-80gb-sxm", help="the GPU to predict for (see `shapeprof specs`)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=256, block_size=args.seq)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq))             # (B, T)

    runs = profile_and_export(model, idx, args.logdir, args.spec, args.steps)
    eager = eager_with_handler(model, idx, args.logdir, args.spec, args.steps)
    for name, folder in runs.items():
        print(f"run {name}: {folder}")
    print(f"run {eager.name} (eager trace with costs) and its predicted run: {eager}")
    print(f"now: tensorboard --logdir {args.logdir}")
    return runs


if __name__ == "__main__":
    main()
