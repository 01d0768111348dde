"""Train the MLP of examples/mlp.py for a few steps on random data: the smallest training loop.

    python examples/train_mlp.py --steps 5
    shapeprof trace examples/train_mlp.py -- --steps 5      # the same run, and where its time would go on a GPU

shapeprof reports the MLP once (called once per step) with its training step: forward, the backward of the
CrossEntropyLoss it is trained with, and this AdamW's update (foreach and fused unset: priced as foreach, what torch
picks on a GPU). The loss function itself is listed as a module without parameters.
"""
import argparse

import torch
import torch.nn as nn

try:
    from .mlp import MLP   # imported as examples.train_mlp
except ImportError:
    from mlp import MLP    # run as a script: its own directory is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = MLP(d_in=256, d_hidden=1024, d_out=10, n_blocks=2, activation="gelu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    # one fixed random batch: the loss must go down as the model memorises it
    x = torch.randn(args.batch, 256)        # (B, d_in)
    y = torch.randint(0, 10, (args.batch,))  # (B,)
    model.train()
    for step in range(args.steps):
        logits = model(x)                    # (B, 10)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    return model


if __name__ == "__main__":
    main()
