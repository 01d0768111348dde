"""Generate text with the nanoGPT-style model of examples/nanogpt.py: greedy decoding, byte-level tokens.

    python examples/generate_gpt.py --max-new-tokens 16
    shapeprof trace examples/generate_gpt.py                 # where each forward's time would go on a GPU

The weights are random, so the text is noise; the point is the work. `generate()` calls the model once per new
token, each time on the whole sequence so far (this model has no KV cache): shapeprof reports the GPT once, with
its call count, analysed on the inputs of its first call (the prompt).
"""
import argparse

import torch

try:
    from .nanogpt import GPT, GPTConfig   # imported as examples.generate_gpt
except ImportError:
    from nanogpt import GPT, GPTConfig    # run as a script: its own directory is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The roofline says")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    # vocab_size 256: a token is a byte of UTF-8, so no tokenizer is needed
    config = GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, vocab_size=256, block_size=128)
    model = GPT(config).eval()
    prompt = list(args.prompt.encode("utf-8"))[-config.block_size:]
    idx = torch.tensor([prompt], dtype=torch.long)                                  # (1, T)
    out = model.generate(idx, max_new_tokens=args.max_new_tokens, greedy=True)      # (1, T + new)
    text = bytes(out[0, len(prompt):].tolist()).decode("utf-8", errors="replace")
    print(f"GPT ({model.get_num_params():,} parameters), prompt {args.prompt!r} -> {text!r}")
    return out


if __name__ == "__main__":
    main()
