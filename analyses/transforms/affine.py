"""Continuous families whose finite elements are affine (not linear) maps of θ.

* `BiasTransferFamily`: move a shift δ from one bias into the biases of the linear maps that read it,
  β → β + sδ, b_k → b_k + s·coef_k·W_k u_k(δ) (coef −1: the reader's output x·W_kᵀ + b_k is unchanged when its
  input moved by δ). A LayerNorm's bias into every linear map reading the norm; a value bias into the output
  projection (softmax rows sum to 1, so P(V + 1δᵀ) = PV + 1δᵀ). The generator ξ_δ(θ) = (δ, coef·W u(δ)) has a
  constant part and a part linear in the readers' weights (J_ξ ≠ 0: the second-order identity
  Hξ + J_ξᵀg = 0 has both terms); W does not move along the flow, so e^{sξ} = θ + sξ(θ) exactly.
  Identities (analyses.identities, Ψ = 0): first order ⟨g, ξ_δ⟩ = δ·(g_β + Σ_k coef_k u_kᵀ W_kᵀ g_{b_k}) = 0 for
  every δ, i.e. g_β = Σ_k W_kᵀ g_{b_k} (each source entry summed over the reader positions it reaches);
  second order H ξ_δ = −J_ξᵀg with (J_ξᵀg)_{W_k} = coef_k·g_{b_k} ⊗ u_k(δ) and zero elsewhere.
* `OffsetScaleFamily`: a diagonal scaling of θ + o instead of θ, θ → e^{sD}(θ + o) − o (Gemma's RMSNorm gain
  enters as (1 + w): scaling the effective gain 1 + w is w → a(1 + w) − 1). ξ(θ) = D ⊙ (θ + o); first order
  Σ_terms coef·(θ + o)·g = 0 per generator ((1 + w_c) g_{w_c} = Σ W[:, c]·g_{W[:, c]}), second order
  H ξ = −J_ξᵀg with J_ξ = D (the offset drops out of the Jacobian).

Neither is a `ScaleFamily` / `TranslationFamily` subclass on purpose: code that reads those classes' conserved
quantities (Q = θᵀDθ, ⟨v, θ⟩) or projection generators (ξ = P_kθ) must not take these for them.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from eqlab.analyses.transforms.base import ParamDict, _register
from eqlab.analyses.transforms.continuous import Continuous, ScaleFamily


def _in_vector(W: Tensor, w_in: int, groups, c: Tensor) -> Tensor:
    """u with u[j] = c_i for every position j of group i along the reader's input axis (0 elsewhere)."""
    u = torch.zeros(W.shape[w_in], dtype=W.dtype, device=W.device)
    for ci, pos in zip(c.to(W.dtype).unbind(0), groups):
        u = u.index_add(0, torch.as_tensor(pos, device=W.device), ci.expand(len(pos)))
    return u


def _apply_in(W: Tensor, w_in: int, u: Tensor) -> Tensor:
    """W u contracted over the input axis and summed over any kernel axes (a constant input shift meets every
    tap of an unpadded convolution): one entry per output feature. The other axis of a 2-d weight, axis 0 of a
    convolution's, indexes the outputs."""
    r = W.movedim(w_in, -1) @ u
    return r.reshape(r.shape[0], -1).sum(1)


def _outer_in(g_b: Tensor, W: Tensor, w_in: int, u: Tensor) -> Tensor:
    """g_b ⊗ 1_kernel ⊗ u laid out like W: the transpose of δW ↦ _apply_in(δW, w_in, u) applied to g_b."""
    moved = W.movedim(w_in, -1).shape                      # (out, *kernel, in)
    lead = [1] * (len(moved) - 2)
    return (g_b.reshape(-1, *lead, 1) * u.reshape(1, *lead, -1)).expand(moved).movedim(-1, w_in)


@_register
class BiasTransferFamily(Continuous):
    """source = [param, index]: the shifted bias entries (one generator per entry). readers: terms
    [bias, weight, w_in, groups, coef], ``groups[i]`` the positions along the reader weight's input axis
    ``w_in`` that carry source entry index[i]; the reader bias moves by coef·W u(δ) (coef −1 compensates;
    +1 is a wrong-sign control, and leaving a reader out is a missed-reader control)."""

    def __init__(self, name, family, source: Sequence, readers: Sequence[Sequence], expected=True):
        super().__init__(name, family, expected)
        self.source = [source[0], list(map(int, source[1]))]
        self.readers = [[b, w, int(d), [list(map(int, g)) for g in groups], float(k)]
                        for b, w, d, groups, k in readers]
        for b, w, d, groups, k in self.readers:
            if len(groups) != len(self.source[1]):
                raise ValueError(f"reader {w}: {len(groups)} groups for {len(self.source[1])} source entries")

    @property
    def params(self):
        return list(dict.fromkeys([self.source[0]] + [x for r in self.readers for x in r[:2]]))

    @property
    def n_generators(self):
        return len(self.source[1])

    def _fields(self):
        return {"source": self.source, "readers": self.readers}

    def xi(self, theta, c) -> ParamDict:
        out = {n: torch.zeros_like(theta[n]) for n in self.params}
        src, idx = self.source
        out[src] = out[src].index_add(0, torch.as_tensor(idx, device=theta[src].device),
                                      c.to(theta[src].dtype).to(theta[src].device))
        for b, w, d, groups, k in self.readers:
            W = theta[w]
            out[b] = out[b] + k * _apply_in(W, d, _in_vector(W, d, groups, c))
        return out

    def exp(self, theta, c, s):
        # the weights are not moved by the flow, so ξ is constant along it: e^{sξ}θ = θ + s ξ(θ)
        v = self.xi(theta, c)
        return {n: theta[n] + s * v[n] for n in self.params}

    def tangent(self, v, c, s):
        """Linear part of T_s: δb_k = s·coef·(δW_k) u (the source shift is constant)."""
        out = {n: v[n] for n in self.params}
        for b, w, d, groups, k in self.readers:
            u = _in_vector(v[w], d, groups, c)
            out[b] = out[b] + s * k * _apply_in(v[w], d, u)
        return out

    def cotangent(self, v, c, s):
        """T_lin^{-T}: with T_lin = [[I, 0], [sK, I]] on (W, b), K W = coef·W u, it is [[I, −sKᵀ], [0, I]]:
        g_W ← g_W − s·coef·g_b ⊗ u, g_b unchanged."""
        out = {n: v[n] for n in self.params}
        for b, w, d, groups, k in self.readers:
            u = _in_vector(v[w], d, groups, c)
            out[w] = out[w] - s * k * _outer_in(v[b], v[w], d, u)
        return out

    def random_coeffs(self, gen, theta, dtype=torch.float64):
        # δ of the size of the biases it moves (per entry), so a finite element is an O(1) relative move
        c = torch.randn(self.n_generators, generator=gen, dtype=dtype)
        moved = [self.source[0]] + [r[0] for r in self.readers]
        v = self.xi({n: theta[n].detach() for n in self.params}, c)
        vn = math.sqrt(sum(float((v[n].double() ** 2).sum()) for n in moved))
        tn = math.sqrt(sum(float((theta[n].double() ** 2).sum()) for n in moved))
        return c * (tn / vn if vn > 0 and tn > 0 else 1.0)


@_register
class OffsetScaleFamily(Continuous):
    """Generators as in `ScaleFamily` ([param, dim, index, coef] terms), acting on θ + o: ξ_k(θ) =
    D_k ⊙ (θ + o), finite element θ → e^{sD}(θ + o) − o; ``offsets`` maps a param to o (absent: 0)."""

    def __init__(self, name, family, generators, offsets: Mapping[str, float], expected=True):
        super().__init__(name, family, expected)
        self._scale = ScaleFamily(name, family, generators)
        self.generators = self._scale.generators
        self.offsets = {str(k): float(v) for k, v in offsets.items()}

    @property
    def params(self):
        return self._scale.params

    @property
    def n_generators(self):
        return self._scale.n_generators

    def _fields(self):
        return {"generators": self.generators, "offsets": self.offsets}

    def _shifted(self, theta):
        return {n: theta[n] + self.offsets.get(n, 0.0) for n in self.params}

    def xi(self, theta, c):
        D = self._scale.field(theta, c)
        return {n: D[n] * x for n, x in self._shifted(theta).items()}

    def exp(self, theta, c, s):
        D = self._scale.field(theta, c)
        return {n: torch.exp(s * D[n]) * x - self.offsets.get(n, 0.0) for n, x in self._shifted(theta).items()}

    def tangent(self, v, c, s):
        return self._scale.exp(v, c, s)        # the linear part e^{sD}

    def cotangent(self, v, c, s):
        return self._scale.exp(v, c, -s)
