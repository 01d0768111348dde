"""A HuggingFace Llama-3-8B shape built from its config on the meta device (no weights, nothing downloaded), called
once: what `shapeprof advise` and `shapeprof trace --phase decode` are pointed at.

    shapeprof advise --spec h100-sxm examples/hf_llama.py
    shapeprof trace --phase decode --batch 8 --context 4096 examples/hf_llama.py
    python examples/hf_llama.py --layers 80 --hidden 8192 --intermediate 28672 --heads 64   # a 70B shape
"""
import argparse
import warnings

import torch
import transformers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args(argv)
    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 16, dtype=torch.long, device="meta"))
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters on meta, "
          f"logits {tuple(out.logits.shape)}")


if __name__ == "__main__":
    main()
