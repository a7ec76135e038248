"""Data as Hugging Face `datasets` (Arrow) tables built from local generators, cached, never downloaded.

Every family's data passes through here: a generator of plain-Python rows becomes an Arrow table in the
datasets cache (``EQLAB_DATA_CACHE`` if set, else datasets' own default; tests point it at a tmp folder),
and columns come back as torch tensors. The generator's keyword arguments are part of the cache
fingerprint, so a different corpus or size is a different table, and an unchanged one is read back.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach a hub


def cache_dir() -> str | None:
    return os.environ.get("EQLAB_DATA_CACHE") or None


def arrow_table(generator, **gen_kwargs):
    """``datasets.Dataset`` of the rows ``generator(**gen_kwargs)`` yields (one process, in order)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_generator(generator, gen_kwargs=gen_kwargs, cache_dir=cache_dir())


def columns(table, names):
    """The named columns as torch tensors (integers as int64; floats would come back as float32, so rows carry integers)."""
    rows = table.with_format("torch", columns=list(names))[:]  # one batch: stacked tensors
    return [rows[n] for n in names]
