"""Fine-tune a local `transformers` checkpoint folder (config + weights + tokenizer) as a sequence
classifier of stdlib docstrings (`eqlab.models.stdlib_text.labelled_docstrings`), offline.

`AutoModelForSequenceClassification` loads the folder's weights; the classification head is new (drawn
from the seed). Every dropout is switched off (config fields named ``*dropout*`` / ``*pdrop*``, and each
``nn.Dropout`` module, which some attention code reads its rate from) and attention is eager, so the loss
is a deterministic, twice-differentiable function of the parameters. ``layers`` keeps the first k layers
(0: all of them).

Data: ``classes`` topics, ``per_class`` docstrings each (balanced labels), each at least ``seq_len``
tokens long under the folder's own tokenizer and cut to exactly ``seq_len`` (special tokens included):
no padding, so inputs are one (n, seq_len) tensor of token ids and no attention mask is needed.
"""
from __future__ import annotations

import torch

from eqlab.models.arrow_data import arrow_table, columns
from eqlab.models.stdlib_text import TOPICS, labelled_docstrings, stdlib_root

TEST_FRACTION = 0.25


def _quiet_load(load):
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # "classifier weights newly initialized" is the point, not a warning
    logging.disable_progress_bar()
    try:
        return load()
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_classifier(path: str, classes: int, layers: int = 0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=classes)
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    if layers:
        config.num_hidden_layers = layers
    model = _quiet_load(lambda: AutoModelForSequenceClassification.from_pretrained(
        path, config=config, attn_implementation="eager", dtype=torch.float32))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def hf_text_cls(path="", layers=0, classes=4, seq_len=32, per_class=24):
    """``seq_len`` and ``per_class`` shape only the data (one option set per run)."""
    return load_classifier(path, classes, layers)


def tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def docstring_classes(tok, classes=4, seq_len=32, per_class=24, seed=0):
    """((ids, labels), (ids, labels)) under tokenizer ``tok``; each class's docstrings are drawn with the
    seed, a quarter of them (rounded) go to the test set, the training set is shuffled."""
    table = arrow_table(labelled_docstrings, topics=TOPICS[:classes], root=str(stdlib_root()))
    (labels,) = columns(table, ["label"])
    ids = tok(list(table["text"]), truncation=True, max_length=seq_len)["input_ids"]
    full = torch.tensor([len(i) == seq_len for i in ids])  # long enough to fill seq_len without padding
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
    X = torch.tensor([ids[i] if full[i] else [0] * seq_len for i in range(len(ids))])
    return (X[train], labels[train]), (X[test], labels[test])


def hf_text_cls_data(path="", classes=4, seq_len=32, per_class=24, seed=0, dtype=torch.float32):
    """The docstring task under the folder's tokenizer; ``dtype`` is unused (token ids are integers)."""
    return docstring_classes(tokenizer(path), classes, seq_len, per_class, seed)
