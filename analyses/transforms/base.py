"""Base class, JSON registry and slice helpers shared by the continuous and discrete transformations."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

ParamDict = dict[str, Tensor]
_REGISTRY: dict[str, type] = {}


def _register(cls):
    _REGISTRY[cls.__name__] = cls
    return cls


def _idx(index, size, device) -> Tensor:
    return torch.arange(size, device=device) if index is None else torch.as_tensor(index, device=device)


def _vec_along(param: Tensor, dim: int, vec: Tensor) -> Tensor:
    """``vec`` (length param.shape[dim]) shaped to broadcast along axis ``dim`` of ``param``."""
    shape = [1] * param.dim()
    shape[dim] = -1
    return vec.reshape(shape)


class Transformation:
    """Base: ``name``, ``kind``, ``family``, ``params``, ``n_generators``; ``expected`` is False for a
    negative control (a declared transformation that is known not to be a symmetry)."""

    kind = "abstract"

    def __init__(self, name: str, family: str, expected: bool = True):
        self.name, self.family, self.expected = name, family, bool(expected)

    @property
    def params(self) -> list[str]:
        raise NotImplementedError

    n_generators = 1

    def _fields(self) -> dict:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "name": self.name, "family": self.family,
                "expected": self.expected, **self._fields()}

    @staticmethod
    def from_json(d: Mapping) -> "Transformation":
        d = dict(d)
        cls = _REGISTRY[d.pop("type")]
        return cls._from_fields(d)

    @classmethod
    def _from_fields(cls, d):
        return cls(**d)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, n_generators={self.n_generators})"


