"""Discrete transformations applied exactly: permutations, sign flips, linear maps, group elements."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from eqlab.analyses.transforms.base import Transformation, _idx, _register, _vec_along
from eqlab.analyses.transforms.continuous import Continuous


# ----------------------------------------------------------------------------------------------- discrete
class Discrete(Transformation):
    kind = "discrete"
    output_scale: float | None = None  # f(Tθ) = a·f(θ) (model-level equivariance); None: invariance
    loss_scale: float = 1.0            # L(Tθ) = a·L(θ) (loss-level equivariance)

    def apply(self, theta: Mapping[str, Tensor]) -> ParamDict:
        raise NotImplementedError

    def tangent(self, v):
        """Linear part T_lin·v."""
        raise NotImplementedError

    def cotangent(self, v):
        """T_lin^{-T}·v."""
        raise NotImplementedError


class _SliceTerms(Discrete):
    """A discrete map given by ``terms`` whose first entry names the parameter each term acts on."""

    @property
    def params(self):
        return list(dict.fromkeys(t[0] for t in self.terms))

    def _fields(self):
        return {"terms": self.terms}


@_register
class Permutation(_SliceTerms):
    """Terms [param, dim, perm]: the param's axis ``dim`` is re-indexed by ``perm`` (a full permutation).
    Orthogonal, so T^{-T} = T."""

    def __init__(self, name, family, terms, expected=True):
        super().__init__(name, family, expected)
        self.terms = [[p, int(d), list(map(int, perm))] for p, d, perm in terms]

    def apply(self, theta):
        out = {n: theta[n] for n in self.params}
        for p, d, perm in self.terms:
            out[p] = out[p].index_select(d, torch.as_tensor(perm, device=out[p].device))
        return out

    tangent = cotangent = apply


@_register
class SignFlip(_SliceTerms):
    """Terms [param, dim, index]: negate those slices (neuron sign flip for odd activations; mirrors)."""

    def __init__(self, name, family, terms, expected=True):
        super().__init__(name, family, expected)
        self.terms = [[p, d, None if i is None else list(map(int, i))] for p, d, i in terms]

    def apply(self, theta):
        out = {n: theta[n] for n in self.params}
        for p, d, i in self.terms:
            x = out[p]
            if d is None:
                out[p] = -x
            else:
                sign = torch.ones(x.shape[d], dtype=x.dtype, device=x.device)
                sign[_idx(i, x.shape[d], x.device)] = -1
                out[p] = x * _vec_along(x, d, sign)
        return out

    tangent = cotangent = apply


@_register
class LinearMap(Discrete):
    """Any invertible matrix T acting on the concatenation of the flattened named params (small only)."""

    def __init__(self, name, family, param_names, matrix, output_scale=None, loss_scale=1.0, expected=True):
        super().__init__(name, family, expected)
        self.param_names = list(param_names)
        self.matrix = [list(map(float, r)) for r in (matrix.tolist() if torch.is_tensor(matrix) else matrix)]
        self.output_scale, self.loss_scale = output_scale, float(loss_scale)

    @property
    def params(self):
        return self.param_names

    def _fields(self):
        return {"param_names": self.param_names, "matrix": self.matrix, "output_scale": self.output_scale,
                "loss_scale": self.loss_scale}

    def _map(self, v, T):
        flat = torch.cat([v[n].reshape(-1) for n in self.params])
        y = T.to(flat.dtype) @ flat
        out, start = {}, 0
        for n in self.params:
            out[n] = y[start:start + v[n].numel()].reshape(v[n].shape)
            start += v[n].numel()
        return out

    def apply(self, theta):
        return self._map(theta, torch.tensor(self.matrix, dtype=torch.float64))

    tangent = apply

    def cotangent(self, v):
        return self._map(v, torch.linalg.inv(torch.tensor(self.matrix, dtype=torch.float64)).T)


@_register
class GroupElement(Discrete):
    """The finite element T = exp(s·ξ_c) of a continuous family, applied exactly (orbit congruence, R11;
    loss invariance at finite group elements). Equivariant families give f(Tθ) = e^{s b} f(θ)."""

    def __init__(self, family_transform: Continuous | Mapping, coeffs, s: float, name=None, expected=None):
        ft = family_transform if isinstance(family_transform, Continuous) else Transformation.from_json(
            family_transform)
        super().__init__(name or f"{ft.name}@s={s:g}", ft.family, ft.expected if expected is None else expected)
        self.of, self.s = ft, float(s)
        self.coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
        b, a = ft.psi_weights(self.coeffs)
        self.output_scale = math.exp(self.s * b) if ft.output_scale else None
        self.loss_scale = math.exp(self.s * a) if ft.loss_rate else 1.0

    @property
    def params(self):
        return self.of.params

    def _fields(self):
        return {"family_transform": self.of.to_json(), "coeffs": self.coeffs.tolist(), "s": self.s}

    @classmethod
    def _from_fields(cls, d):
        d.pop("family")
        return cls(**d)

    def apply(self, theta):
        return self.of.exp(theta, self.coeffs, self.s)

    def tangent(self, v):
        return self.of.tangent(v, self.coeffs, self.s)

    def cotangent(self, v):
        return self.of.cotangent(v, self.coeffs, self.s)
