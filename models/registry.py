"""Model families by name: how to build the network, its loss, and its data."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from models import losses
from models.digits_cnn import DigitsCNN, digits_data
from models.modadd_gpt2 import modadd_data, modadd_gpt2


@dataclass
class Task:
    """A model with its loss and its fixed train/test batches: everything a study needs of a family."""

    family: str
    model: torch.nn.Module
    loss: Callable  # (outputs, targets) -> scalar mean loss
    train: tuple    # (inputs, targets)
    test: tuple


@dataclass(frozen=True)
class Family:
    build_model: Callable
    build_data: Callable
    loss: Callable
    data_options: tuple[str, ...]  # options shared with the data builder (e.g. the modulus p)


FAMILIES: dict[str, Family] = {
    "digits_cnn": Family(DigitsCNN, digits_data, losses.cross_entropy, ()),
    "modadd_gpt2": Family(modadd_gpt2, modadd_data, losses.last_token_cross_entropy, ("p",)),
}


def model_options(family: str) -> set[str]:
    """The keyword options a family's model builder accepts (used to validate study files)."""
    return set(inspect.signature(FAMILIES[family].build_model).parameters)


def build_task(family: str, options: dict | None = None, seed: int = 0, dtype=torch.float32) -> Task:
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    fam, options = FAMILIES[family], dict(options or {})
    torch.manual_seed(seed)
    model = fam.build_model(**options).to(dtype)
    data_kw = {k: options[k] for k in fam.data_options if k in options}
    train, test = fam.build_data(seed=seed, dtype=dtype, **data_kw)
    return Task(family, model, fam.loss, train, test)
