"""Causal language models on real prose: the stdlib's docstrings (`eqlab.models.stdlib_text.prose_bytes`)
as UTF-8 bytes, a 256-token vocabulary that needs no tokenizer file.

`byte_lm_data` cuts ``n_train`` + ``n_test`` windows of ``seq_len + 1`` bytes: training windows start in
the first 90% of the corpus, test windows in the last 10% (no window crosses the boundary), start
positions drawn from the seed. Inputs are bytes 0..seq_len-1, targets bytes 1..seq_len, both
(n, seq_len), so a batch is cut along its first dimension like any other; the loss is the mean
next-byte cross-entropy over all positions (every example has the same number of positions, so it is
also the mean over examples of their own means).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eqlab.models.arrow_data import arrow_table, columns
from eqlab.models.losses import logits_of
from eqlab.models.stdlib_text import prose_bytes, stdlib_root

VOCAB = 256
TRAIN_FRACTION = 0.9


def next_token_cross_entropy(outputs, targets) -> torch.Tensor:
    logits = logits_of(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _windows(seq_len, n_train, n_test, seed, root):
    corpus = torch.frombuffer(bytearray(prose_bytes(root)), dtype=torch.uint8).long()
    cut, w = int(TRAIN_FRACTION * len(corpus)), seq_len + 1
    g = torch.Generator().manual_seed(seed)
    for split, lo, hi, n in (("train", 0, cut - w, n_train), ("test", cut, len(corpus) - w, n_test)):
        for start in torch.randint(lo, hi + 1, (n,), generator=g).tolist():
            yield {"split": split, "window": corpus[start:start + w].tolist()}


def byte_lm_data(seq_len=32, n_train=64, n_test=32, seed=0, dtype=torch.float32):
    """((inputs, targets), (inputs, targets)) of byte windows; ``dtype`` is unused (bytes are integers)."""
    table = arrow_table(_windows, seq_len=seq_len, n_train=n_train, n_test=n_test, seed=seed,
                        root=str(stdlib_root()))  # the corpus's folder keys the cached table
    (windows,) = columns(table, ["window"])
    train = torch.tensor([s == "train" for s in table["split"]])
    return ((windows[train, :-1], windows[train, 1:]), (windows[~train, :-1], windows[~train, 1:]))
