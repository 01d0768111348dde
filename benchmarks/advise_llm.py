"""`shapeprof.advise` on HuggingFace Llama-3 70B and Llama-3.1 405B shapes (on meta), A100 and H100: how long a full
advice takes, and what it says (the figures README.md quotes).

    python benchmarks/advise_llm.py                  # 70B and 405B, A100-80GB and H100, bf16, context 4096
    python benchmarks/advise_llm.py --small          # a 2-layer shape: a smoke run of seconds

Target (issue 13): a full advise() of HF Llama-3-70B on meta in under 10 s (median of --rounds).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapeprof  # noqa: E402
from shapeprof.text import fmt_bytes, fmt_seconds  # noqa: E402


def llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, rope_scaling=None):
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128256,
                                   max_position_embeddings=131072 if rope_scaling else 8192, rope_theta=500000.0,
                                   rope_scaling=rope_scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg)


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODELS = {
    "Llama-3-70B": lambda: llama(80, 8192, 28672, 64, 8),
    "Llama-3.1-70B": lambda: llama(80, 8192, 28672, 64, 8, LLAMA31_ROPE),
    "Llama-3.1-405B": lambda: llama(126, 16384, 53248, 128, 8, LLAMA31_ROPE),
}


def summary(name: str, adv) -> str:
    d, o, f, m, p = adv.decode, adv.online, adv.offline, adv.memory, adv.parallel
    lines = [f"{name} on {adv.spec.name}, {adv.dtype}, context {adv.context:,}:",
             f"  weights {fmt_bytes(m['weights'])}, KV {fmt_bytes(m['kv_per_token'])}/token, "
             f"{fmt_bytes(m['kv_per_sequence_full_context'])} per sequence at {m['full_context']:,}"]
    if p:
        lines.append(f"  tensor parallel x{p['degree']}: {fmt_bytes(p['weights_per_device'])} of weights each, "
                     f"all-reduce {fmt_seconds(p['decode_all_reduce_seconds_per_layer_batch_1'])} per layer per "
                     f"decode token, {fmt_seconds(p['prefill_all_reduce_seconds_per_layer'])} per prefill layer")
    lines.append(f"  prefill 1x{adv.prefill['tokens']:,}: {fmt_seconds(adv.prefill['seconds'])}; decode step at "
                 f"batch 1: {fmt_seconds(d['seconds'])} (one device), "
                 f"{fmt_seconds(adv.sweep[0]['seconds'])} with parallelism, {adv.sweep[0]['per_sequence']:.0f} "
                 f"tokens/s")
    lines.append(f"  whole step compute-bound from batch {adv.step_crossing or 'never'}; online: batch "
                 f"{o.get('batch')}, {o.get('tokens_per_second', 0):,.0f} tokens/s; offline: batch {f['batch']:,}, "
                 f"{f['tokens_per_second']:,.0f} tokens/s")
    big = [c for c in adv.crossings if c.batch][:3]
    lines.append("  matmuls compute-bound from: " + ", ".join(f"{c.group} {c.batch}" for c in big))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.small:
        models = {"Llama-2-layer": lambda: llama(2, 1024, 3584, 8, 2)}
        rounds = 1
    else:
        models, rounds = MODELS, args.rounds
    for name, build in models.items():
        model = build()
        for spec in ("a100-80gb-sxm", "h100-sxm"):
            times = []
            for _ in range(rounds if spec == "a100-80gb-sxm" else 1):
                start = time.perf_counter()
                adv = shapeprof.advise(model, spec=spec, dtype=torch.bfloat16)
                times.append(time.perf_counter() - start)
            print(summary(name, adv))
            print(f"  advise took {statistics.median(times):.2f} s (median of {len(times)})"
                  + (" (target < 10 s for Llama-3-70B)" if name == "Llama-3-70B" else ""))


if __name__ == "__main__":
    main()
