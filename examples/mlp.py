"""Two multilayer perceptrons: one built from modules, one written with torch.nn.functional.

Both compute the same function: ``n_blocks`` blocks of Linear followed by an activation, then a
final Linear to ``d_out``. Linear followed by an activation is the pattern a fusing rewrite looks
for, so the two styles are here to be matched alike: ``MLP`` traces to ``call_module`` nodes,
``FunctionalMLP`` to ``call_function`` nodes on ``F.linear`` / ``F.relu``.

Run ``python examples/mlp.py`` to build one and print its output shape.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
FUNCTIONAL_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _layer_dims(d_in, d_hidden, d_out, n_blocks):
    """(in, out) of every Linear: the blocks, then the output layer."""
    dims = [d_in] + [d_hidden] * n_blocks + [d_out]
    return list(zip(dims[:-1], dims[1:]))


class MLP(nn.Module):
    """``n_blocks`` of ``nn.Sequential(nn.Linear, activation)``, then ``nn.Linear(d_hidden, d_out)``.

    >>> MLP(d_in=8, d_hidden=16, d_out=4)(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, d_in=768, d_hidden=3072, d_out=768, n_blocks=2, activation="relu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        *hidden, (d_last, _) = _layer_dims(d_in, d_hidden, d_out, n_blocks)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(i, o), act()) for i, o in hidden))
        self.out = nn.Linear(d_last, d_out)

    def forward(self, x):
        return self.out(self.blocks(x))


class FunctionalMLP(nn.Module):
    """The same function as ``MLP``, with its weights in ParameterLists and ``F.linear`` in forward.

    ``weights[i]`` / ``biases[i]`` are the i-th Linear's; the last pair is the output layer.
    They are initialised as ``nn.Linear`` initialises its own.

    >>> FunctionalMLP(d_in=8, d_hidden=16, d_out=4)(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, d_in=768, d_hidden=3072, d_out=768, n_blocks=2, activation="relu"):
        super().__init__()
        self.act = FUNCTIONAL_ACTIVATIONS[activation]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in _layer_dims(d_in, d_hidden, d_out, n_blocks):
            weight, bias = torch.empty(o, i), torch.empty(o)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
            nn.init.uniform_(bias, -1 / math.sqrt(i), 1 / math.sqrt(i))
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))

    def forward(self, x):
        n = len(self.weights)
        for i in range(n - 1):
            x = self.act(F.linear(x, self.weights[i], self.biases[i]))
        return F.linear(x, self.weights[n - 1], self.biases[n - 1])


if __name__ == "__main__":
    model = MLP().eval()
    x = torch.randn(64, 768)
    with torch.no_grad():
        y = model(x)
    print(f"MLP: {tuple(x.shape)} -> {tuple(y.shape)}")
