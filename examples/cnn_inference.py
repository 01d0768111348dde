"""Classify a random batch of 32x32 images with the SmallCNN of examples/cnn.py: inference, no gradients.

    python examples/cnn_inference.py --batch 16
    shapeprof trace examples/cnn_inference.py -- --batch 256   # where the time would go on a GPU at that batch
"""
import argparse

import torch

try:
    from .cnn import SmallCNN   # imported as examples.cnn_inference
except ImportError:
    from cnn import SmallCNN    # run as a script: its own directory is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = SmallCNN(num_classes=10).eval()
    with torch.inference_mode():
        for _ in range(args.batches):
            images = torch.randn(args.batch, 3, 32, 32)     # (B, 3, 32, 32)
            classes = model(images).argmax(dim=-1)          # (B,)
    print(f"SmallCNN: {args.batches} batches of {args.batch}; last predicted classes {classes.tolist()}")
    return classes


if __name__ == "__main__":
    main()
