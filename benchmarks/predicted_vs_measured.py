"""How close does the roofline come? Predicted vs measured time per op class, on the device this runs on.

    python benchmarks/predicted_vs_measured.py            # CUDA (bf16) when there is a GPU, else the CPU (fp32)

For each workload, `shapeprof.profile` runs the captured graph under torch.profiler (one range per node, median of
the measured steps) and joins the measured times to the predicted ones. Predictions are made twice: against the
device's datasheet spec (when shapeprof has a built-in one for it, e.g. `h200`) and against `shapeprof.calibrate()`
(this device's measured matmul peak and memory bandwidth). efficiency = predicted / measured: 1.0 is at the
roofline; a memory-bound op near 1.0 moves its bytes at full bandwidth.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402
from examples.mlp import MLP  # noqa: E402


def workloads(cuda: bool):
    """(name, model builder, input) on the device: sizes a GPU can show, or small ones a CPU runs in seconds."""
    if cuda:
        cfg = LlamaConfig(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                          ffn_dim_multiplier=None, max_seq_len=4096)
        return [
            ("llama 2048-dim x8 layers, prefill 1x2048", lambda: Transformer(cfg), torch.zeros(1, 2048, dtype=torch.long)),
            ("llama 2048-dim x8 layers, 64 seqs x 1 token", lambda: Transformer(cfg), torch.zeros(64, 1, dtype=torch.long)),
            ("MLP 4096->16384->4096, 8192 rows", lambda: MLP(4096, 16384, 4096, n_blocks=1), torch.randn(8192, 4096)),
        ]
    cfg = LlamaConfig.tiny(dim=256, n_heads=8, n_kv_heads=4, max_seq_len=512)
    return [
        ("llama 256-dim x2 layers, prefill 1x256", lambda: Transformer(cfg), torch.zeros(1, 256, dtype=torch.long)),
        ("MLP 512->2048->512, 512 rows", lambda: MLP(512, 2048, 512, n_blocks=1), torch.randn(512, 512)),
    ]


def op_class(n) -> str:
    if any(a.op in ("aten.mm", "aten.addmm", "aten.bmm", "aten.linear", "aten.matmul") for a in n.aten):
        return "matmul"
    if any("scaled_dot_product" in a.op for a in n.aten):
        return "attention"
    return "other (elementwise, norms, copies)"


def summarize(title: str, report) -> None:
    rows = defaultdict(lambda: [0.0, 0.0, 0])
    for n in report.nodes:
        if n.measured_seconds is None:
            continue
        row = rows[op_class(n)]
        row[0] += n.predicted_seconds
        row[1] += n.measured_seconds
        row[2] += 1
    t = report.total
    print(f"  {title}: predicted {t.predicted_seconds * 1e3:.3f} ms, measured {t.measured_seconds * 1e3:.3f} ms, "
          f"efficiency {t.efficiency:.2f}")
    for name, (predicted, measured, count) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"    {name:<36} {count:>4} nodes  predicted {predicted * 1e3:9.3f} ms  measured {measured * 1e3:9.3f} ms"
              f"  efficiency {predicted / measured if measured else float('nan'):.2f}")


def main() -> None:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.set_num_threads(os.cpu_count() or 1)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    calibrated = shapeprof.calibrate(device)
    specs = [("calibrated", calibrated)]
    try:
        specs.insert(0, ("datasheet", shapeprof.get_spec(name)))
    except shapeprof.SpecError:
        pass
    print(f"{name}, torch {torch.__version__}, {dtype}; calibrated: "
          + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in calibrated.peak_flops.items())
          + f", {calibrated.memory_bandwidth / 1e9:.0f} GB/s")
    for title, build, x in workloads(cuda):
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype).eval()
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        print(f"\n{title}")
        for label, spec in specs:
            result = shapeprof.profile(model, x, steps=5, warmup=2, machine_spec=spec)
            summarize(f"{label} spec {spec.name}", result.measured)


if __name__ == "__main__":
    main()
