"""A VGG-style plain CNN without normalisation on the real digits (`eqlab.models.digit_images`).

Stages of ``convs`` 3x3 conv + activation, each stage ending in a 2x2 max-pool, then one hidden fully
connected layer and a 10-way linear head. With ReLU every hidden channel and unit can be rescaled
(max-pool commutes with a positive scale) and the head is softmax-translation invariant; "gelu" or
"tanh" break the rescale (a negative control).
"""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class VGGImages(nn.Module):
    def __init__(self, channels=(8, 16), convs=1, hidden=32, image_size=8, activation="relu", digit_set="all"):
        """``digit_set`` shapes only the data (one option set per run)."""
        super().__init__()
        act, layers, c_in = ACTIVATIONS[activation], [], 1
        for c in channels:
            for _ in range(convs):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), act()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        side = image_size // 2 ** len(channels)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, hidden), act(),
                                        nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))
