"""Mixtral-8x7B decode on meta across batches, A100 and H100, bf16: what a step reads and how long it takes.

    python benchmarks/moe_decode.py [--context 4096]

An MoE decode step reads the dense weights and only the experts its tokens pick: E (1 - (1 - k/E)^b) of them per
layer on average under balanced routing, so the weights read grow with the batch until every expert is read.
Each row is `shapeprof.analyze(model, Decode(batch, context))`, one capture per row (the step's bytes are not
affine in the batch). Predicted times are the datasheet roofline. Then the same step on H100 under a skewed
routing given as loads per expert (`routing=[...]`, as a measured one would come from `shapeprof.measure_routing`):
fewer distinct experts are read at mid batches, and the busiest expert's imbalance is reported.
"""
import argparse
import time

import torch
import transformers

import shapeprof

transformers.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    config = transformers.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    start = time.perf_counter()
    first = None
    print(f"Mixtral-8x7B, bf16, context {args.context:,}, balanced routing (8 experts, top-2)")
    print(f"{'spec':<16} {'batch':>5} {'experts/layer':>13} {'weights read':>13} {'KV read':>9} {'step':>9} "
          f"{'tokens/s':>9} {'bound':>7}")
    for spec in ("a100-80gb-sxm", "h100-sxm"):
        for batch in (1, 2, 4, 8, 16, 32, 64):
            r = shapeprof.analyze(model, shapeprof.Decode(batch=batch, context=args.context), spec=spec,
                                  dtype=torch.bfloat16)
            first = first or r
            memory = sum(n.predicted_seconds for n in r.nodes if n.bound == "memory")
            print(f"{spec:<16} {batch:>5} {r.moe.layers[0].expected_experts_read:>13.2f} "
                  f"{r.phase.weight_bytes / 1e9:>10.2f} GB {r.phase.kv_read_bytes / 1e9:>6.2f} GB "
                  f"{r.total.predicted_seconds * 1e3:>6.2f} ms {batch / r.total.predicted_seconds:>9.0f} "
                  f"{memory / r.total.predicted_seconds:>6.0%}m")
    info = first.moe
    skew = [4, 3, 2, 2, 1, 1, 1, 1]   # a skewed router: the busiest expert takes 2.13x the mean load
    print(f"H100, the same step under a given skewed routing, loads {skew}")
    for batch in (1, 2, 4, 8, 16, 32, 64):
        decode = shapeprof.Decode(batch=batch, context=args.context)
        balanced = shapeprof.analyze(model, decode, spec="h100-sxm", dtype=torch.bfloat16)
        skewed = shapeprof.analyze(model, decode, spec="h100-sxm", dtype=torch.bfloat16, routing=skew)
        layer = skewed.moe.layers[0]
        print(f"batch {batch:>3}: experts/layer {layer.expected_experts_read:.2f} (balanced "
              f"{balanced.moe.layers[0].expected_experts_read:.2f}), weights read {skewed.phase.weight_bytes / 1e9:.2f}"
              f" GB (balanced {balanced.phase.weight_bytes / 1e9:.2f}), step {skewed.total.predicted_seconds * 1e3:.2f}"
              f" ms (balanced {balanced.total.predicted_seconds * 1e3:.2f}); imbalance {layer.imbalance:.2f}")
    print(f"total parameters {info.total_params:,}, active per token {info.active_params:,}; every expert is "
          f"read from batch {info.all_experts_batch()} on; {time.perf_counter() - start:.1f} s for 28 analyses")


if __name__ == "__main__":
    main()
