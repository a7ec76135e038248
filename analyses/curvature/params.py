"""A fixed, ordered coordinate system on (a subset of) a model's parameters.

Spectral methods need flat vectors; the rest of `analyses/` speaks in parameter dicts. `ParamSpace`
is the one place that converts between the two, so the order of coordinates is defined once and a
block (``conv1.``, ``h.0.attn``) is just a ParamSpace over fewer names.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import torch
from torch import Tensor


class ParamSpace:
    """Ordered parameter names with their shapes and offsets into a flat vector of length ``dim``.

    ``names=None`` takes every parameter with ``requires_grad`` in ``model.named_parameters()`` order.
    Explicit names may include frozen parameters (differentiating with respect to them is still
    well defined).
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str] | None = None):
        available = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in available.items() if p.requires_grad]
        names = list(names)
        missing = [n for n in names if n not in available]
        if missing:
            raise KeyError(f"unknown parameter names: {missing}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        if not names:
            raise ValueError("a ParamSpace needs at least one parameter")
        self.names: list[str] = names
        self.shapes: dict[str, torch.Size] = {n: available[n].shape for n in names}
        self.numels: dict[str, int] = {n: math.prod(self.shapes[n]) for n in names}
        self.offsets: dict[str, int] = {}
        offset = 0
        for n in names:
            self.offsets[n] = offset
            offset += self.numels[n]
        self.dim: int = offset

    @classmethod
    def matching(cls, model: torch.nn.Module, pattern: str) -> "ParamSpace":
        """The trainable parameters whose name matches the regex ``pattern`` (``re.search``)."""
        regex = re.compile(pattern)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n in trainable if regex.search(n)]
        if not names:
            shown = ", ".join(trainable[:20]) + (" ..." if len(trainable) > 20 else "")
            raise ValueError(f"pattern {pattern!r} matches no trainable parameter; names are: {shown}")
        return cls(model, names)

    def __len__(self) -> int:
        return self.dim

    def __repr__(self) -> str:
        return f"ParamSpace(dim={self.dim}, names={self.names})"

    def slice(self, name: str) -> slice:
        """Where ``name`` lives in the flat vector."""
        return slice(self.offsets[name], self.offsets[name] + self.numels[name])

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``params`` in this space's order into ``(..., dim)``.

        Leading batch dimensions (e.g. ``k`` columns from a vmap) are kept: each tensor has shape
        ``(*lead, *shape)``.
        """
        parts = []
        for n in self.names:
            t = params[n]
            lead = t.shape[: t.dim() - len(self.shapes[n])]
            if t.shape[len(lead):] != self.shapes[n]:
                raise ValueError(f"{n}: expected trailing shape {tuple(self.shapes[n])}, got {tuple(t.shape)}")
            parts.append(t.reshape(*lead, self.numels[n]))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split ``(..., dim)`` into ``{name: (..., *shape)}`` views, in this space's order."""
        if vec.shape[-1] != self.dim:
            raise ValueError(f"expected a vector of length {self.dim}, got shape {tuple(vec.shape)}")
        lead = vec.shape[:-1]
        parts = torch.split(vec, [self.numels[n] for n in self.names], dim=-1)  # one call, not one slice per name
        return {n: t.reshape(*lead, *self.shapes[n]) for n, t in zip(self.names, parts)}

    def values(self, model: torch.nn.Module) -> Tensor:
        """The model's current parameter values in this space, as one detached flat vector."""
        available = dict(model.named_parameters())
        return self.flatten({n: available[n].detach() for n in self.names})
