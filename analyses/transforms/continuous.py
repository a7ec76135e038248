"""Continuous families given by generators: diagonal scalings, translations, GL(k) per block."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from eqlab.analyses.transforms.base import Transformation, _idx, _register, _vec_along


# ----------------------------------------------------------------------------------------------- continuous
class Continuous(Transformation):
    kind = "continuous"
    output_scale: list[float] | None = None
    loss_rate: list[float] | None = None

    def xi(self, theta: Mapping[str, Tensor], c: Tensor) -> ParamDict:
        """ξ_c(θ) on ``self.params`` (built from differentiable ops, so a VJP gives J_ξᵀ·g)."""
        raise NotImplementedError

    def exp(self, theta: Mapping[str, Tensor], c: Tensor, s: float) -> ParamDict:
        """The finite group element T_s = exp(s ξ_c) applied to θ (only ``self.params`` change)."""
        raise NotImplementedError

    def tangent(self, v: Mapping[str, Tensor], c: Tensor, s: float) -> ParamDict:
        """Linear part of T_s applied to v (equals ``exp`` for linear actions, identity for translations)."""
        raise NotImplementedError

    def cotangent(self, v: Mapping[str, Tensor], c: Tensor, s: float) -> ParamDict:
        """T_s^{-T} v for the linear part."""
        raise NotImplementedError

    def random_coeffs(self, gen: torch.Generator, theta: Mapping[str, Tensor], dtype=torch.float64) -> Tensor:
        """A generic generator: standard normal coefficients (the classes rescale where size matters)."""
        return torch.randn(self.n_generators, generator=gen, dtype=dtype)

    def psi_weights(self, c: Tensor) -> tuple[float, float]:
        """(b, a) of the generator ξ_c: Ψ = b·E⟨∇_fℓ, f⟩ + a·L."""
        b = float(torch.dot(c.double().cpu(), torch.tensor(self.output_scale, dtype=torch.float64))) \
            if self.output_scale else 0.0
        a = float(torch.dot(c.double().cpu(), torch.tensor(self.loss_rate, dtype=torch.float64))) \
            if self.loss_rate else 0.0
        return b, a


def _check_len(name, values, n):
    if values is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} generators")


class DiagonalScale(Continuous):
    """ξ_k(θ) = D_k ⊙ θ for generators given as lists of terms whose first entry is the parameter name; a
    subclass says how its terms select positions (`field`). The finite element e^{sD}, its tangent and
    cotangent maps follow from D alone."""

    def __init__(self, name, family, generators, output_scale=None, loss_rate=None, expected=True):
        super().__init__(name, family, expected)
        self.generators = generators
        _check_len("output_scale", output_scale, len(self.generators))
        _check_len("loss_rate", loss_rate, len(self.generators))
        self.output_scale = None if output_scale is None else [float(x) for x in output_scale]
        self.loss_rate = None if loss_rate is None else [float(x) for x in loss_rate]

    @property
    def params(self):
        return list(dict.fromkeys(t[0] for g in self.generators for t in g))

    @property
    def n_generators(self):
        return len(self.generators)

    def _fields(self):
        return {"generators": self.generators, "output_scale": self.output_scale, "loss_rate": self.loss_rate}

    def field(self, theta, c: Tensor) -> ParamDict:
        raise NotImplementedError

    def xi(self, theta, c):
        D = self.field(theta, c)
        return {n: D[n] * theta[n] for n in D}

    def exp(self, theta, c, s):
        D = self.field(theta, c)
        return {n: torch.exp(s * D[n]) * theta[n] for n in D}

    tangent = exp

    def cotangent(self, v, c, s):
        return self.exp(v, c, -s)


@_register
class ScaleFamily(DiagonalScale):
    """Diagonal linear generators: generator k scales slice (param, dim, index) by ``coef`` for each of its
    terms, ξ_k(θ) = D_k ⊙ θ. BN scale, ReLU/LN-gain rescale, residual-stream scale, homogeneity."""

    def __init__(self, name, family, generators: Sequence[Sequence[Sequence]], output_scale=None,
                 loss_rate=None, expected=True):
        # each term: [param, dim (int or None), index (list or None), coef]
        super().__init__(name, family, [[[p, d, None if i is None else list(map(int, i)), float(k)]
                                         for p, d, i, k in g] for g in generators],
                         output_scale, loss_rate, expected)

    def field(self, theta, c: Tensor) -> ParamDict:
        """D(c) = Σ_k c_k D_k, accumulated per (param, axis) so its cost is O(#terms + #params)."""
        D = {n: torch.zeros_like(theta[n]) for n in self.params}
        for ck, g in zip(c.tolist(), self.generators):
            for p, d, i, k in g:
                t = D[p]
                if d is None:
                    t += ck * k
                else:
                    sel = _idx(i, t.shape[d], t.device)
                    vec = torch.zeros(t.shape[d], dtype=t.dtype, device=t.device)
                    vec[sel] += ck * k
                    t += _vec_along(t, d, vec)
        return D


@_register
class TranslationFamily(Continuous):
    """Constant generators (θ-independent): term [param, dim, index, mode].

    mode "broadcast": the shift is one number per position of the *other* axes, the same for every
    position ``index`` along ``dim`` (softmax translation: W[rows, j] += u_j). mode "free": every selected
    element has its own coefficient (attention key bias). Translations are exact at every step size."""

    def __init__(self, name, family, terms: Sequence[Sequence], shapes: Mapping[str, Sequence[int]],
                 expected=True):
        super().__init__(name, family, expected)
        self.terms = [[p, d, None if i is None else list(map(int, i)), m] for p, d, i, m in terms]
        self.shapes = {k: list(map(int, v)) for k, v in shapes.items()}  # needed to count generators

    @property
    def params(self):
        return list(dict.fromkeys(t[0] for t in self.terms))

    def _term_size(self, t):
        p, d, i, m = t
        shape = self.shapes[p]
        d = 0 if d is None else d
        n_sel = shape[d] if i is None else len(i)
        rest = math.prod(shape) // shape[d]
        return rest if m == "broadcast" else rest * n_sel

    @property
    def n_generators(self):
        return sum(self._term_size(t) for t in self.terms)

    def _fields(self):
        return {"terms": self.terms, "shapes": self.shapes}

    def vector(self, theta, c: Tensor) -> ParamDict:
        v = {n: torch.zeros_like(theta[n]) for n in self.params}
        c = c.to(dtype=next(iter(v.values())).dtype)
        start = 0
        for t in self.terms:
            p, d, i, m = t
            n = self._term_size(t)
            chunk, start = c[start:start + n], start + n
            x = v[p]
            d = 0 if d is None else d
            sel = _idx(i, x.shape[d], x.device)
            other = list(x.shape[:d]) + list(x.shape[d + 1:])
            if m == "broadcast":
                u = chunk.reshape(other).unsqueeze(d).expand(*x.shape[:d], len(sel), *x.shape[d + 1:])
            else:
                u = chunk.reshape(list(x.shape[:d]) + [len(sel)] + list(x.shape[d + 1:]))
            v[p] = x.index_add(d, sel, u)
        return v

    def xi(self, theta, c):
        return self.vector(theta, c)

    def exp(self, theta, c, s):
        v = self.vector(theta, c)
        return {n: theta[n] + s * v[n] for n in v}

    def tangent(self, v, c, s):
        return {n: v[n] for n in self.params}

    cotangent = tangent

    def random_coeffs(self, gen, theta, dtype=torch.float64):
        # Scale the shift to the size of the parameters it moves, so finite elements are O(1) moves.
        c = torch.randn(self.n_generators, generator=gen, dtype=dtype)
        v = self.vector(theta, c)
        vn = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v.values()))
        tn = math.sqrt(sum(float((theta[n].double() ** 2).sum()) for n in v))
        return c * (tn / vn if vn > 0 and tn > 0 else 1.0)


@_register
class GLFamily(Continuous):
    """GL(k) per block. A block is a list of terms [param, dim, index (length k), mode]; along axis ``dim``
    the k selected positions form a row vector x and mode "M" maps x ↦ x·M, mode "-MT" maps x ↦ -x·Mᵀ
    (finite: x·G and x·G^{-T} with G = e^{sM}), so pairs ("M", "-MT") preserve the contraction x·yᵀ.
    Attention Q/K (q·k per head) and V/O (value features into the output projection), deep linear nets.
    Each block contributes k² generators (the entries of its M)."""

    def __init__(self, name, family, blocks: Sequence[Sequence[Sequence]], expected=True):
        super().__init__(name, family, expected)
        self.blocks = [[[p, int(d), list(map(int, i)), m] for p, d, i, m in b] for b in blocks]
        for b in self.blocks:
            ks = {len(t[2]) for t in b}
            if len(ks) != 1:
                raise ValueError(f"block terms have different sizes {ks}")

    @property
    def params(self):
        return list(dict.fromkeys(t[0] for b in self.blocks for t in b))

    def _k(self, b):
        return len(b[0][2])

    @property
    def n_generators(self):
        return sum(self._k(b) ** 2 for b in self.blocks)

    def _fields(self):
        return {"blocks": self.blocks}

    def _mats(self, c):
        out, start = [], 0
        for b in self.blocks:
            k = self._k(b)
            out.append(c[start:start + k * k].reshape(k, k))
            start += k * k
        return out

    def _act(self, theta, mats_for_mode, additive: bool):
        """Apply per-block matrices along the block axes. additive: ξ (zeros elsewhere); else a map."""
        out = {n: torch.zeros_like(theta[n]) if additive else theta[n] for n in self.params}
        for b, mats in zip(self.blocks, mats_for_mode):
            for p, d, i, m in b:
                x = theta[p]
                sel = torch.as_tensor(i, device=x.device)
                xs = x.index_select(d, sel).movedim(d, -1)
                y = (xs @ mats[m].to(x.dtype)).movedim(-1, d)
                if additive:
                    out[p] = out[p].index_add(d, sel, y)
                else:
                    out[p] = out[p].index_copy(d, sel, y)
        return out

    def xi(self, theta, c):
        mats = [{"M": M, "-MT": -M.T} for M in self._mats(c)]
        return self._act(theta, mats, additive=True)

    def _group(self, c, s, inverse_transpose=False):
        mats = []
        for M in self._mats(c):
            G = torch.linalg.matrix_exp(s * M.double())
            Git = torch.linalg.inv(G).T
            mats.append({"M": Git, "-MT": G} if inverse_transpose else {"M": G, "-MT": Git})
        return mats

    def exp(self, theta, c, s):
        return self._act(theta, self._group(c, s), additive=False)

    tangent = exp

    def cotangent(self, v, c, s):
        return self._act(v, self._group(c, s, inverse_transpose=True), additive=False)

    def random_coeffs(self, gen, theta, dtype=torch.float64):
        # entries ~ N(0, 1/k): e^{sM} stays well conditioned for s = O(1)
        c = torch.randn(self.n_generators, generator=gen, dtype=dtype)
        scale = torch.cat([torch.full((self._k(b) ** 2,), 1 / math.sqrt(self._k(b)), dtype=dtype)
                           for b in self.blocks])
        return c * scale




@_register
class SubGLFamily(Continuous):
    """GL(k) per block restricted to a Lie subalgebra with an explicit basis (not a GLFamily: its conserved
    quantities are the basis projections, not the full k×k matrices). Blocks as in GLFamily; ``basis`` is a
    list of pairs (M_j, N_j), each a sparse list of [mode, row, col, value] entries with mode "M" or "N":
    terms "M" map x ↦ x·e^{sM}, terms "-MT" map x ↦ x·e^{sN}, M = Σ c_j M_j, N = Σ c_j N_j (the same basis
    in every block). A pair leaves x_M·A·x_Nᵀ invariant iff M A + A Nᵀ = 0; N = −Mᵀ is plain GL. Rotary
    attention: Q/K restricted to the commutant of the rotations (2 generators per frequency pair)."""

    def __init__(self, name, family, blocks, basis, expected=True):
        super().__init__(name, family, expected)
        self.blocks = [[[p, int(d), list(map(int, i)), m] for p, d, i, m in b] for b in blocks]
        self.basis = [[[m, int(r), int(c), float(v)] for m, r, c, v in e] for e in basis]
        self.k = len(self.blocks[0][0][2])

    @property
    def params(self):
        return list(dict.fromkeys(t[0] for b in self.blocks for t in b))

    @property
    def n_generators(self):
        return len(self.basis) * len(self.blocks)

    def _fields(self):
        return {"blocks": self.blocks, "basis": self.basis}

    def _pairs(self, c):
        """(M, N) per block from the coefficient vector."""
        out, nb = [], len(self.basis)
        for b in range(len(self.blocks)):
            M = torch.zeros(self.k, self.k, dtype=torch.float64)
            N = torch.zeros(self.k, self.k, dtype=torch.float64)
            for cj, e in zip(c[b * nb:(b + 1) * nb].double().tolist(), self.basis):
                for m, r, col, v in e:
                    (M if m == "M" else N)[r, col] += cj * v
            out.append((M, N))
        return out

    _act = GLFamily._act

    def xi(self, theta, c):
        return self._act(theta, [{"M": M, "-MT": N} for M, N in self._pairs(c)], additive=True)

    def _group(self, c, s, cot=False):
        mats = []
        for M, N in self._pairs(c):
            G, H = torch.linalg.matrix_exp(s * M), torch.linalg.matrix_exp(s * N)
            mats.append({"M": torch.linalg.inv(G).T, "-MT": torch.linalg.inv(H).T} if cot else {"M": G, "-MT": H})
        return mats

    def exp(self, theta, c, s):
        return self._act(theta, self._group(c, s), additive=False)

    tangent = exp

    def cotangent(self, v, c, s):
        return self._act(v, self._group(c, s, cot=True), additive=False)

    def random_coeffs(self, gen, theta, dtype=torch.float64):
        return torch.randn(self.n_generators, generator=gen, dtype=dtype) / math.sqrt(self.k)
