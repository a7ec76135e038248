"""Bring your own model: ``FILE.py:FUNC`` returning ``{"model", "batch", "loss"}``, or a local
`transformers` model folder (a config, with or without weights).

Loading is done the same way in the driver and in every Ray actor (the source is a small picklable
description, not the model), so sharded workers rebuild exactly the user's model and batch.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.losses import logits_of


class UserModelError(ValueError):
    """The user's FILE.py:FUNC or model folder cannot be used; the message says why."""


def _load_func(path: Path, func: str) -> dict:
    if not path.is_file():
        raise UserModelError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"eqlab_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so the user's module can be pickled by reference if needed
    spec.loader.exec_module(module)
    if not callable(getattr(module, func, None)):
        raise UserModelError(f"{path}: has no function {func!r}")
    out = getattr(module, func)()
    if not isinstance(out, dict) or not {"model", "batch", "loss"} <= set(out):
        raise UserModelError(f"{path}:{func}() must return a dict with keys 'model', 'batch', 'loss'")
    if not isinstance(out["model"], torch.nn.Module):
        raise UserModelError(f"{path}:{func}(): 'model' is not a torch.nn.Module")
    if not (isinstance(out["batch"], (tuple, list)) and len(out["batch"]) == 2):
        raise UserModelError(f"{path}:{func}(): 'batch' must be a tuple (inputs, targets)")
    if not callable(out["loss"]):
        raise UserModelError(f"{path}:{func}(): 'loss' must be a callable (outputs, targets) -> scalar")
    return out


def _mean_square_output(outputs, targets):
    """Loss for a headless encoder: half the mean squared final hidden state (written out so both
    double backward and forward-over-reverse work)."""
    h = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else logits_of(outputs)
    return 0.5 * h.pow(2).mean()


def _token_ce(outputs, targets):
    logits = logits_of(outputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parse_overrides(items: list[str] | None) -> tuple[tuple[str, object], ...]:
    """``["num_hidden_layers=1", "layer_norm_eps=0"]`` → typed (key, value) pairs for a config."""
    out = []
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserModelError(f"--config {item!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False}.get(text.lower(), text)
        out.append((key, value))
    return tuple(out)


def _load_transformers(folder: Path, overrides=(), batch_size: int = 4, seq_len: int = 16, seed: int = 0) -> dict:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for a folder it cannot read
        raise UserModelError(f"{folder}: not a transformers model folder ({type(e).__name__})") from None
    for key, value in overrides:  # e.g. num_hidden_layers=1 to study one layer of a large checkpoint
        if not hasattr(config, key):
            raise UserModelError(f"--config {key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    config._attn_implementation = "eager"  # SDPA on the CPU has no double backward / forward AD
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if has_weights:
        model = AutoModel.from_pretrained(folder, config=config, attn_implementation="eager")
    else:
        model = AutoModel.from_config(config, attn_implementation="eager")
    # Unused heads (e.g. BERT's pooler for a loss on the hidden states) have a zero derivative.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    return {"model": model.eval(), "batch": ({"input_ids": ids}, torch.zeros(batch_size)),
            "loss": _mean_square_output}


@dataclass(frozen=True)
class UserSource:
    """A picklable reference to the user's model: ``FILE.py:FUNC`` or a transformers folder."""

    ref: str
    shards: int = 1  # cut the batch into this many near-equal micro-batches (one or more per worker)
    overrides: tuple = ()  # (key, value) config fields for a transformers folder (see parse_overrides)

    def load(self) -> dict:
        if ":" in self.ref and self.ref.rsplit(":", 1)[0].endswith(".py"):
            if self.overrides:
                raise UserModelError("--config applies to a transformers model folder, not FILE.py:FUNC")
            path, func = self.ref.rsplit(":", 1)
            return _load_func(Path(path).resolve(), func)
        folder = Path(self.ref)
        if folder.is_dir():
            return _load_transformers(folder, self.overrides)
        raise UserModelError(f"{self.ref}: expected FILE.py:FUNC or a transformers model folder")

    def __call__(self, dtype):
        """(model, loss, micro-batches) in ``dtype``, the model in the mode the user left it in:
        the HessianShard source protocol."""
        from pipeline.spectra import microbatches

        d = self.load()
        model = d["model"].to(dtype)
        X, y = d["batch"]
        cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t
        X = {k: cast(v) for k, v in X.items()} if isinstance(X, dict) else cast(X)
        y = cast(y)
        size = -(-len(y) // self.shards)  # ceil: every shard gets a micro-batch
        return model, d["loss"], microbatches((X, y), size)
