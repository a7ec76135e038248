"""The Hessian restricted to the symmetric or antisymmetric subspace of a discrete transformation.

For an orthogonal involution T that is a signed permutation of coordinates (neuron/head swaps, sign
flips, mirrors of slices), the ±1 eigenspaces have explicit orthonormal bases: a coordinate i fixed by
T with sign s spans the s-space; a swapped pair (i, j) with T e_i = s e_j gives (e_i ± s e_j)/√2. With
E (dim × r) such a basis, the restricted operator is c ↦ Eᵀ H E c on R^r: exact, with no spurious
zero eigenvalues from the complement (which P H P on the full space would have). At a fixed point of
T, H commutes with T and spec(H) is the union of the two restricted spectra (theory R10).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from eqlab.analyses.curvature.params import ParamSpace


def signed_permutation(space: ParamSpace, transform) -> tuple[Tensor, Tensor]:
    """(π, s) with (T v)[i] = s[i] · v[π[i]] on the flat coordinates of ``space``, read off by applying
    ``transform`` (a `Permutation` or `SignFlip` from analyses.transforms) to coordinate labels."""
    labels = torch.arange(1, space.dim + 1, dtype=torch.float64)  # 1-based so a sign flip is visible
    d = space.unflatten(labels)
    moved = transform.apply({n: d[n] for n in transform.params if n in d})
    out = space.flatten({**d, **moved})
    perm, sign = out.abs().round().long() - 1, torch.sign(out)
    if not torch.equal(torch.sort(perm).values, torch.arange(space.dim)):
        raise ValueError(f"{transform.name} is not a signed permutation of the coordinates")
    if not (torch.equal(perm[perm], torch.arange(space.dim)) and torch.equal(sign * sign[perm], torch.ones(space.dim))):
        raise ValueError(f"{transform.name} is not an involution (T² ≠ I)")
    return perm, sign


class EigenspaceOperator:
    """Eᵀ H E for the ``+1`` (symmetric) or ``-1`` (antisymmetric) eigenspace of T."""

    def __init__(self, operator, transform, which: str = "antisymmetric"):
        if which not in ("symmetric", "antisymmetric"):
            raise ValueError("which must be 'symmetric' or 'antisymmetric'")
        self.operator = operator
        perm, sign = signed_permutation(operator.space, transform)
        want = 1.0 if which == "symmetric" else -1.0
        idx = torch.arange(operator.dim)
        fixed = idx[(perm == idx) & (sign == want)]
        pairs = idx[perm > idx]  # each swapped pair once, as (i, π(i))
        # Column c of E: e_i for fixed coordinates; (e_i + want·s_i·e_π(i))/√2 for pairs, since T e_π(i) = s_i e_i.
        self.fixed, self.pi, self.pj = fixed, pairs, perm[pairs]
        self.pair_sign = want * sign[pairs]
        self.dim = len(fixed) + len(pairs)
        if self.dim == 0:
            raise ValueError(f"the {which} subspace of {transform.name} is empty")

    def embed(self, c: Tensor) -> Tensor:
        """E c: a vector of the subspace in full parameter coordinates."""
        v = torch.zeros(self.operator.dim, dtype=c.dtype, device=c.device)
        nf = len(self.fixed)
        v[self.fixed] = c[:nf]
        v[self.pi] = c[nf:] / math.sqrt(2)
        v[self.pj] = self.pair_sign.to(c.dtype) * c[nf:] / math.sqrt(2)
        return v

    def restrict(self, v: Tensor) -> Tensor:
        """Eᵀ v."""
        return torch.cat([v[self.fixed], (v[self.pi] + self.pair_sign.to(v.dtype) * v[self.pj]) / math.sqrt(2)])

    def matvec(self, c: Tensor) -> Tensor:
        return self.restrict(self.operator.matvec(self.embed(c)))
