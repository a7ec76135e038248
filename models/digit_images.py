"""Real images for the image families: scikit-learn's bundled 8x8 handwritten digits (1797 scans,
UCI "optdigits", about 180 per class; no download), through a `datasets` Arrow table.

The larger photos sklearn ships (``sklearn/datasets/images/{china,flower}.jpg``) need Pillow to decode,
which this environment does not have, so the image families use the digits, optionally resampled
(bilinear) to ``image_size`` x ``image_size`` so that strided CNN stages and ViT patches have room.
``digit_set`` keeps the classes "0-4" or "5-9" (labels stay the digits, the head keeps 10 outputs) so a
run can pretrain on one half and fine-tune on the other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eqlab.models.arrow_data import arrow_table, columns

TEST_FRACTION = 0.25
DIGIT_SETS = {"all": range(10), "0-4": range(5), "5-9": range(5, 10)}


def _digit_rows():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for pixels, label in zip(digits.data.astype(int).tolist(), digits.target.tolist()):  # pixels 0..16
        yield {"pixels": pixels, "label": label}


def digit_images(image_size=8, digit_set="all", seed=0, dtype=torch.float32):
    """((images (n, 1, s, s) in [0, 1], labels), (…)) split once with a seeded permutation."""
    pixels, labels = columns(arrow_table(_digit_rows), ["pixels", "label"])
    keep = torch.isin(labels, torch.tensor(list(DIGIT_SETS[digit_set])))
    X = pixels[keep].to(dtype).reshape(-1, 1, 8, 8) / 16.0
    y = labels[keep]
    if image_size != 8:
        X = F.interpolate(X, size=(image_size, image_size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return (X[train], y[train]), (X[test], y[test])
