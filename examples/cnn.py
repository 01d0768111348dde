"""A small CNN for 3x32x32 images (CIFAR-10 sized): three conv-batchnorm-relu stages.

About 94k parameters; inference on a batch of a few images takes milliseconds on a CPU.
Run ``python examples/cnn.py`` to build one and print its output shape.
"""

import torch
import torch.nn as nn


def conv_bn_relu(c_in, c_out):
    # No conv bias: the batchnorm right after it has its own shift.
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallCNN(nn.Module):
    """conv-bn-relu-maxpool x2, conv-bn-relu, adaptive avgpool, linear.

    >>> SmallCNN(num_classes=10).eval()(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 32),  # (B, 32, 32, 32)
            nn.MaxPool2d(2),  # (B, 32, 16, 16)
            *conv_bn_relu(32, 64),  # (B, 64, 16, 16)
            nn.MaxPool2d(2),  # (B, 64, 8, 8)
            *conv_bn_relu(64, 128),  # (B, 128, 8, 8)
            nn.AdaptiveAvgPool2d(1),  # (B, 128, 1, 1)
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.features(x)  # (B, 128, 1, 1)
        x = torch.flatten(x, 1)  # (B, 128)
        return self.classifier(x)  # (B, num_classes)


if __name__ == "__main__":
    model = SmallCNN().eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    print(f"SmallCNN: {tuple(x.shape)} -> {tuple(y.shape)}")
