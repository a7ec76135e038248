"""A plain MLP for identity tests: optionally bias-free (then a depth-L ReLU net is L-homogeneous)."""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, widths=(8, 16, 16, 4), activation="relu", bias=True):
        super().__init__()
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def toy_batch(widths=(8, 16, 16, 4), n=32, seed=0, dtype=torch.float64, classes=True):
    """Random inputs with class labels (classes=True) or regression targets."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, widths[0], generator=g, dtype=dtype)
    y = torch.randint(0, widths[-1], (n,), generator=g) if classes else torch.randn(n, widths[-1], generator=g,
                                                                                       dtype=dtype)
    return X, y
