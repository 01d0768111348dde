"""Train the GPT of examples/nanogpt.py for a few steps on random tokens: nanoGPT's training loop, small.

    python examples/train_gpt.py --steps 2
    shapeprof trace examples/train_gpt.py -- --steps 2      # the same run, and its training step on a GPU

As nanoGPT's train.py does, the model is given the targets and returns ``(logits, loss)``, and AdamW updates it
(its implementation chosen explicitly: ``foreach=True``, ``fused=False``). shapeprof sees ``loss.backward()`` and
``optimizer.step()`` and reports the step phase by phase: forward, backward, and this AdamW's update.
"""
import argparse

import torch

try:
    from .nanogpt import GPT, GPTConfig   # imported as examples.train_gpt
except ImportError:
    from nanogpt import GPT, GPTConfig    # run as a script: its own directory is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig.tiny(block_size=args.block_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True, fused=False)
    # one fixed random batch: the loss must go down as the model memorises it
    data = torch.randint(0, config.vocab_size, (args.batch, args.block_size + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()   # (B, T) each: y is x shifted by one token
    model.train()
    for step in range(args.steps):
        logits, loss = model(x, y)            # logits (B, T, vocab_size), loss a scalar
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    return model


if __name__ == "__main__":
    main()
