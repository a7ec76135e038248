"""Gradient–Hessian alignment: how a symmetry ties the gradient to each computed eigenpair.

The second-order identity Hξ + J_ξᵀg = ∇Ψ (analyses/identities.py, I2) contracted with an eigenvector
u_i of H (Hu_i = λ_i u_i) gives, for every generator ξ of a continuous family,

    ⟨u_i, J_ξᵀg − ∇Ψ⟩ = −λ_i ⟨u_i, ξ⟩,

i.e. for a linear generator ξ = Aθ of an invariance ⟨u_i, Aᵀg⟩ = −λ_i⟨u_i, Aθ⟩: the gradient's component
along what the generator does to each sharp direction is fixed by the curvature there. The left side
needs only the gradient and a VJP of the generator, the right only the eigenpair and ξ, so no HVP is
spent here beyond the eigenpairs' own.

Computed eigenpairs (θ_i, y_i) are not exact: with the true residual r_i = ‖Hy_i − θ_i y_i‖,
⟨y_i, Hξ⟩ = θ_i⟨y_i, ξ⟩ + ⟨Hy_i − θ_i y_i, ξ⟩, so the two sides may differ by r_i‖ξ‖ (Cauchy-Schwarz) plus
rounding: 4·γ_n(u)·(‖J_ξᵀg‖ + ‖∇Ψ‖ + |θ_i|‖ξ‖) for the inner products of terms of those sizes.

The negative control replaces ξ by a random affine field ξ_r = D⊙θ + e on the same parameters
(J = D, no symmetry): the same two sides, with no identity tying them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqlab.analyses.curvature.functional import dot, norm
from eqlab.analyses.identities import unit_roundoff
from eqlab.analyses.predictions._common import finding_verdict
from eqlab.analyses.predictions.flat_directions import _f, _leaves, _mean, _Point, _std
from eqlab.analyses.transforms import Continuous


@dataclass
class AlignmentProbe:
    measured: float    # ⟨y, J_ξᵀg − ∇Ψ⟩ / ‖ξ‖
    predicted: float   # −θ⟨y, ξ⟩ / ‖ξ‖
    tolerance: float   # r‖ξ‖ + rounding, over ‖ξ‖


@dataclass
class AlignmentFinding:
    transformation: str
    family: str
    control: bool
    rank: int          # which eigenpair (0 = the largest)
    eigenvalue: float
    eigen_residual: float
    probes: list
    dtype: str
    tolerance_reason: str

    @property
    def statistic(self) -> float:
        return _mean([p.measured for p in self.probes])

    @property
    def statistic_std(self) -> float:
        return _std([p.measured for p in self.probes])

    @property
    def prediction(self) -> float:
        return _mean([p.predicted for p in self.probes])

    @property
    def worst(self) -> AlignmentProbe:
        return max(self.probes, key=lambda p: abs(p.measured - p.predicted) / max(p.tolerance, 1e-300))

    @property
    def holds(self) -> bool:
        return all(abs(p.measured - p.predicted) <= p.tolerance for p in self.probes)

    @property
    def verdict(self) -> str:
        return finding_verdict(self.holds, self.control)


def _sides(pt: _Point, y: dict, theta_i: float, r_i: float, xi: dict, jtg: dict, gpsi: dict | None):
    xn = _f(norm(xi))
    P = list(xi)
    lhs = _f(dot({n: y[n] for n in P}, jtg)) - (_f(dot(y, gpsi)) if gpsi is not None else 0.0)
    rhs = -theta_i * _f(dot({n: y[n] for n in P}, xi))
    # ‖y‖ = 1: each inner product is bounded by its other factor's norm (Cauchy-Schwarz)
    terms = _f(norm(jtg)) + (_f(norm(gpsi)) if gpsi is not None else 0.0) + abs(theta_i) * xn
    tol = r_i * xn + pt.tolerance(terms)
    return AlignmentProbe(lhs / xn, rhs / xn, tol / xn)


def _generator(pt: _Point, t: Continuous, c):
    P = t.params
    leaves = _leaves(pt.theta, P)
    xi = t.xi(leaves, c)
    outs = [n for n in P if xi[n].requires_grad]
    jtg = {n: torch.zeros_like(pt.theta[n]) for n in P}
    if outs:
        got = torch.autograd.grad([xi[n] for n in outs], [leaves[n] for n in P],
                                  grad_outputs=[pt.grad[n] for n in outs], allow_unused=True)
        jtg.update({n: j for n, j in zip(P, got) if j is not None})
    b, a = t.psi_weights(c)
    return {n: x.detach() for n, x in xi.items()}, jtg, (pt.grad_psi(b, a) if (b or a) else None)


def alignment_findings(model, loss, batch, transformations, eigenvalues, eigenvectors: list[dict],
                       residuals, probes: int = 2, seed: int = 0) -> list[AlignmentFinding]:
    """One finding per (continuous family, eigenpair) and one control per pair. ``eigenvectors``: unit
    vectors as {name: tensor} over the model's parameters; ``residuals``: their true ‖Hy − θy‖."""
    pt = _Point(model, loss, batch, seed)
    dtype = str(pt.dtype).replace("torch.", "")
    reason = (f"r_i ||xi|| (the eigenpair's true residual) + 4 x gamma_n(u) x (||J^T g|| + ||grad Psi|| + "
              f"|lambda_i| ||xi||), n = {pt.n}, u = {unit_roundoff(pt.dtype):.1e} ({dtype}){pt.low}; all over ||xi||")
    out = []
    for t in transformations:
        if not isinstance(t, Continuous):
            continue
        gens = []
        for _ in range(probes):
            xi, jtg, gpsi = _generator(pt, t, t.random_coeffs(pt.gen, pt.theta))
            D, e = pt.randn(t.params), pt.randn(t.params)  # the offset e keeps ξ_r ≠ 0 on zero weights
            ctrl = ({n: D[n] * pt.theta[n] + e[n] for n in t.params}, {n: D[n] * pt.grad[n] for n in t.params})
            gens.append((xi, jtg, gpsi, ctrl))
        for i, (lam, y, r) in enumerate(zip(eigenvalues, eigenvectors, residuals)):
            lam, r = float(lam), float(r)
            g_probes = [_sides(pt, y, lam, r, xi, jtg, gpsi) for xi, jtg, gpsi, _ in gens]
            c_probes = [_sides(pt, y, lam, r, cx, cj, None) for *_, (cx, cj) in gens]
            out.append(AlignmentFinding(t.name, t.family, False, i, lam, r, g_probes, dtype, reason))
            out.append(AlignmentFinding(t.name, t.family, True, i, lam, r, c_probes, dtype,
                                        reason + "; control: a random affine field D*theta + e, J = D"))
    return out
