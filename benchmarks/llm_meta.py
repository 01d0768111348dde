"""HuggingFace LLMs on the meta device: prefill and decode-step analyses against FlopCounterMode, side by side.

    python benchmarks/llm_meta.py [--rounds 5] [--small]

Everything runs in this one process, alternating within each round; medians (and every run) are printed.
1. HF Llama-3.1-405B shape (transformers' LlamaForCausalLM, llama3 rope scaling, built on meta), 1 x 2048 tokens,
   `shapeprof.analyze(..., dtype=torch.bfloat16)`, against FlopCounterMode over the hand-written 405B
   (examples/llama.py on meta, the reference of benchmarks/analyze_meta.py). Target: ratio <= 0.5x.
2. A decode step of the same HF model: input ids (1, 1), a DynamicCache holding 4,096 tokens in every layer (meta
   tensors), passed as `cache=` (transformers 5's name for `past_key_values`). Measured, no target of its own.
3. A decode step of an HF Llama-3-70B shape (80 layers), cache 4,096: an `advise()` sweep runs many of these in
   < 10 s in all, so one should take well under 1 s.
The total FLOPs of each analysis are printed, so that a speed-up that changed the answer shows.
Before each timed call a full garbage collection runs, untimed, so that no call pays for the garbage of the one
before it. The CPU time of each (time.process_time) is printed beside the wall time: on a shared machine it is
the steadier of the two.
`--small` runs 4-layer versions of the same shapes (seconds): a smoke run, its figures mean nothing.
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

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

CACHE = 4096   # tokens already in the KV cache of a decode step


def hf_405b_config(layers: int = 126) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=layers, num_attention_heads=128,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})


def hf_70b_config(layers: int = 80) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)


def hf_model(cfg: transformers.LlamaConfig):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).eval()


def hand_written_405b(layers: int = 126):
    with torch.device("meta"):
        return Transformer(LlamaConfig.llama3_405b(n_layers=layers))


def filled_cache(cfg: transformers.LlamaConfig, length: int, batch: int = 1) -> transformers.DynamicCache:
    """A DynamicCache holding `length` tokens of (meta) keys and values in every layer."""
    cache = transformers.DynamicCache(config=cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k = torch.empty(batch, cfg.num_key_value_heads, length, head_dim, dtype=torch.bfloat16, device="meta")
        cache.update(k, torch.empty_like(k), layer)   # (B, kv_heads, length, head_dim)
    return cache


def prefill(model, tokens: int):
    return shapeprof.analyze(model, shapeprof.InputShape((1, tokens), torch.long), dtype=torch.bfloat16)


def decode_step(model, cache):
    return shapeprof.analyze(model, shapeprof.InputShape((1, 1), torch.long), dtype=torch.bfloat16, cache=cache)


def flop_counter(model, tokens: int) -> int:
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    return counter.get_total_flops()


def timed(fn, *args):
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, out


def runs(times: list[float], cpu: list[float]) -> str:
    return (f"median {statistics.median(times):7.3f} s (CPU {statistics.median(cpu):.3f} s)  "
            f"runs {' '.join(f'{t:.3f}' for t in times)}")


def describe(report) -> str:
    c = report.capture
    return (f"nodes {c.graph_nodes:,} ({c.reused_nodes:,} from twins), capture {c.method} "
            f"{c.seconds:.3f} s, FLOPs {report.total.flops:,}, bytes {report.total.bytes:,}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--small", action="store_true", help="4-layer models: a seconds-long smoke run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    layers = 4 if args.small else None
    cfg405 = hf_405b_config(layers or 126)
    cfg70 = hf_70b_config(layers or 80)
    start = time.perf_counter()
    hf405, hf70, hand405 = hf_model(cfg405), hf_model(cfg70), hand_written_405b(layers or 126)
    cache405, cache70 = filled_cache(cfg405, CACHE), filled_cache(cfg70, CACHE)
    built = time.perf_counter() - start
    # warm up imports and caches on short inputs
    prefill(hf405, 16), flop_counter(hand405, 16), decode_step(hf70, filled_cache(cfg70, 16))

    times: dict[str, list[float]] = {k: [] for k in ("prefill", "fc", "decode405", "decode70")}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    out: dict[str, object] = {}
    for _ in range(args.rounds):
        for key, fn, fargs in (("prefill", prefill, (hf405, args.tokens)), ("fc", flop_counter, (hand405, args.tokens)),
                               ("decode405", decode_step, (hf405, cache405)), ("decode70", decode_step,
                                                                               (hf70, cache70))):
            seconds, cpu_seconds, out[key] = timed(fn, *fargs)
            times[key].append(seconds)
            cpu[key].append(cpu_seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    print(f"HF Llama shapes on meta, bf16, {args.rounds} alternating rounds, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}"
          f"{'  [--small: 4 layers, figures mean nothing]' if args.small else ''}  (models built in {built:.1f} s)")
    print(f"  HF-405B prefill 1 x {args.tokens}, shapeprof.analyze:          {runs(times['prefill'], cpu['prefill'])}")
    print(f"      {describe(out['prefill'])}")
    print(f"  hand-written 405B 1 x {args.tokens}, FlopCounterMode:          {runs(times['fc'], cpu['fc'])}")
    print(f"      FLOPs {out['fc']:,} (shapeprof counts causal attention's computed half; the HF model "
          f"also differs in rope scaling)")
    print(f"  ratio HF-405B analyze / hand-written FlopCounterMode: {med['prefill'] / med['fc']:.2f}x "
          f"(CPU time {med_cpu['prefill'] / med_cpu['fc']:.2f}x)  (target <= 0.5x)")
    print(f"  HF-405B decode step, cache {CACHE}, shapeprof.analyze:     {runs(times['decode405'], cpu['decode405'])}")
    print(f"      {describe(out['decode405'])}")
    print(f"  HF-70B decode step, cache {CACHE}, shapeprof.analyze:      {runs(times['decode70'], cpu['decode70'])}  "
          f"(target well under 1 s)")
    print(f"      {describe(out['decode70'])}")


if __name__ == "__main__":
    main()
