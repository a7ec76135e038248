"""A small CNN with BatchNorm and ReLU for scikit-learn's bundled 8x8 digits (no download).

Symmetries it carries (found by `analyses.discover`, not declared here): each conv filter feeding a
BatchNorm channel is scale invariant (up to a violation of about bn_eps / Var(pre-activation);
torch forbids eps = 0 in training mode, so exact-symmetry studies set bn_eps = 1e-20), each BN channel and each hidden
fc unit can be rescaled across its ReLU, and the softmax head is translation invariant.
"""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, channels=(8, 16), hidden=32, classes=10, bn_eps=1e-5, activation="relu"):
        super().__init__()
        c1, c2 = channels
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, eps=bn_eps)
        self.act1 = act()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, eps=bn_eps)
        self.act2 = act()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.act3 = act()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.act2(self.bn2(self.conv2(x))))
        return self.fc2(self.act3(self.fc1(self.flatten(x))))


def digits_data(seed: int = 0, test_fraction: float = 0.25, dtype=torch.float32):
    """The 1797 real 8x8 digits, scaled to [0, 1], split once with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return (X[train], y[train]), (X[test], y[test])
