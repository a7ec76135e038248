"""Sharp symmetry directions under weight decay: the Rayleigh quotient 2γ at a stationary point.

With L_γ = L + γ/2‖θ‖² (H_γ = H + γI, g_γ = g + γθ) and a linear symmetry ξ = Aθ of L (L(e^{sA}θ) = L(θ)),
differentiating the invariance twice gives HAθ = −Aᵀg, so

    H_γAθ = −Aᵀg_γ + γ(A + Aᵀ)θ,   and for symmetric A:   ρ(Aθ) = ξᵀH_γξ/‖ξ‖² = 2γ − ⟨A²θ, g_γ⟩/‖ξ‖².

At a stationary point of L_γ (g_γ = 0 on the parameters A touches) the symmetry direction is an
eigenvector of H_γ with eigenvalue exactly 2γ: weight decay turns a flat direction into a sharp one of a
known curvature. What this module measures, per verified family with symmetric linear generators:

* the point: the checkpoint relaxed by L-BFGS over the family's own parameters P (the rest fixed) to a
  stationary point of L_γ on the batch. Only g_γ on P enters the remainder, so stationarity in P is what
  the statement needs; the relaxed point is reported with its ‖g_γ|_P‖. Families nearest the output go
  first: in a transformer's final-norm gain → head rescale the loss is smooth and nearly convex in P
  (cross-entropy of a linear map times a gain), and L-BFGS reaches ‖g_γ‖ ~ 1e-6 in about a second; with a
  ReLU between P's layers (a CNN's fc1 → fc2) it can stall where pre-activations sit at the kink, where
  g_γ is not defined — such a row says how far from stationary it stayed.
* the statistic: ρ(ξ_c) by one exact HVP, for ``probes`` random symmetric generators c (a ReLU unit
  group's ±1 rescale, attention Q/K GL(k) with a symmetric M, a norm gain against the next layer), against
  the identity's value there, 2γ − r with r = ⟨A²θ, g_γ⟩/‖ξ‖² computed from the gradient (never from H):
  2γ exactly at a stationary point, and the relaxation makes |r| small.
* the tolerance: rounding only, of the one HVP, 4·γ_n(u)·(‖Hξ‖/‖ξ‖ + κ), and of r, 4·γ_n(u)·(‖g‖ +
  γ‖θ_P‖)·‖A²θ‖/‖ξ‖² (the gradient's terms are of size γ‖θ_P‖ at a stationary point, whatever ‖g_γ‖ is).
  A point with |r| above 1% of 2γ is not stationary enough for the row to mean what it says:
  ``inconclusive``, with its ‖g_γ|_P‖ and r in the reason. So ``holds`` says two things: the symmetry is
  exact (a broken one adds ⟨ξ, ∇⟨g, Aθ⟩⟩/‖ξ‖², far above rounding) and the point is stationary (ρ is 2γ to
  within |r| ≤ 1% of it).
* the negative control: random directions on P with the generators' norms at the same point, against
  the generators' prediction, with their own HVP's rounding added to the tolerance: a generic
  direction's curvature is not 2γ (``violated``), unless
  the block is that flat everywhere (``inconclusive``: the check cannot tell them apart there).

Families left out, and why: translations and affine families (ξ not linear in θ: H_γξ = γξ, a different
statement), equivariances (Ψ ≠ 0), Lie subalgebras with an explicit basis (rotary Q/K: no symmetric
sampling law here), and families with a semidefinite generator (BatchNorm, LayerNorm and residual-stream
scale: A a projection, so ⟨Aθ, g_γ⟩ = γ‖Aθ‖² ≠ 0 at every θ and L_γ has no stationary point with θ_S ≠ 0;
their radial quotient is γ at every θ, catalog row 17), and families whose parameters hold the whole
support of such a generator (a ReLU rescale into a conv that feeds BatchNorm: relaxing it chases the
conv's norm to 0).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from eqlab.analyses.curvature.functional import dot, norm
from eqlab.analyses.identities import PASSES, unit_roundoff
from eqlab.analyses.predictions._common import to_critical_point
from eqlab.analyses.predictions.flat_directions import DirectionFinding, DirectionProbe, _f, _Point
from eqlab.analyses.transforms.continuous import GLFamily, ScaleFamily

STATIONARY_SHARE = 1e-2  # remainder / 2γ above which the relaxed point does not count as stationary


@dataclass
class StationaryFinding(DirectionFinding):
    """`DirectionFinding`'s rows (statistic, prediction, worst probe over the probes' ρ(ξ) + γ and their
    2γ − r) at a relaxed point, with how stationary that point is; its verdict needs stationarity."""
    gamma: float = 0.0
    grad_norm: float = 0.0  # ‖g_γ|_P‖ at the relaxed point
    remainder: float = 0.0  # max over probes of |⟨A²θ, g_γ⟩|/‖ξ‖²

    @property
    def stationary(self) -> bool:
        return self.remainder <= STATIONARY_SHARE * 2 * self.gamma

    @property
    def verdict(self) -> str:
        return super().verdict if self.stationary else "inconclusive"


def _invariance(t) -> bool:
    return not (t.output_scale and any(t.output_scale) or t.loss_rate and any(t.loss_rate))


def _semidefinite(t) -> bool:
    """A diagonal invariance with a one-signed generator (BatchNorm/LayerNorm/residual scale): A projection-like."""
    return isinstance(t, ScaleFamily) and _invariance(t) and any(
        all(k > 0 for *_, k in g) or all(k < 0 for *_, k in g) for g in t.generators)


def eligible(t, transformations=()) -> bool:
    """A family whose generators are symmetric, linear, indefinite invariances (see the module doc), and
    whose parameters hold no semidefinite family's whole support: relaxing over them (e.g. a ReLU rescale
    into a conv feeding BatchNorm) would chase that block's norm to 0, where no stationary point is."""
    if isinstance(t, ScaleFamily):
        if not _invariance(t) or _semidefinite(t):  # an equivariance (Ψ ≠ 0), or no stationary point
            return False
    elif type(t) is not GLFamily:
        return False
    return not any(_semidefinite(s) and set(s.params) <= set(t.params) for s in transformations)


def symmetric_coeffs(t, gen: torch.Generator, theta) -> torch.Tensor:
    """A random generator c whose A is symmetric: any diagonal one; GL blocks with M ← (M + Mᵀ)/2."""
    c = t.random_coeffs(gen, theta)
    if isinstance(t, GLFamily):
        c = torch.cat([((M + M.T) / 2).reshape(-1) for M in t._mats(c)])
    return c


def relaxed_copy(model, loss, batch, params, gamma: float, max_iter: int, tol: float):
    """A float64 copy of ``model`` moved by L-BFGS over ``params`` only to a stationary point of
    L + γ/2‖θ_P‖²; returns (copy, its ‖g_γ|_P‖)."""
    m = copy.deepcopy(model)
    keep = set(params)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        p.requires_grad_(n in keep)
    gn = to_critical_point(m, loss, batch, gamma=gamma, max_iter=max_iter, tol=tol)
    for n, p in m.named_parameters():
        p.requires_grad_(flags[n])
        p.grad = None
    return m, gn


def _probe(pt: _Point, t, c, gamma: float, P) -> tuple[DirectionProbe, float, float]:
    """(probe, ‖ξ‖, remainder) for the generator c at pt. The probe's prediction is the identity's value
    there, 2γ − ⟨A²θ, g_γ⟩/‖ξ‖² (2γ at a stationary point), and its tolerance is rounding only."""
    xi = {n: x.detach() for n, x in t.xi(pt.theta, c).items()}
    a2 = t.xi(xi, c)                                         # A²θ (the action is linear)
    xn2 = _f(dot(xi, xi))
    xn = math.sqrt(xn2)
    hxi = pt.hvp(xi)
    rayleigh = _f(dot(xi, {n: hxi[n] for n in P})) / xn2 + gamma
    g_gamma = {n: pt.grad[n] + gamma * pt.theta[n] for n in P}
    remainder = _f(dot(a2, g_gamma)) / xn2
    grad_terms = _f(norm({n: pt.grad[n] for n in P})) + gamma * _f(norm({n: pt.theta[n] for n in P}))
    rounding = PASSES[2] * pt.gamma * (_f(norm(hxi)) / xn + pt.kappa + grad_terms * _f(norm(a2)) / xn2)
    return DirectionProbe(rayleigh, 2 * gamma - remainder, rounding, pt.kappa, c), xn, abs(remainder)


def _control(pt: _Point, P, like: DirectionProbe, xn: float, gamma: float) -> DirectionProbe:
    v = pt.randn(P)
    vn = _f(norm(v))
    v = {n: x * (xn / vn) for n, x in v.items()}
    hv = pt.hvp(v)
    rayleigh = _f(dot(v, {n: hv[n] for n in P})) / (xn * xn) + gamma
    tol = like.tolerance + PASSES[2] * pt.gamma * (_f(norm(hv)) / xn + pt.kappa)
    return DirectionProbe(rayleigh, like.predicted, tol, pt.kappa)


def wd_stationary_findings(model, loss, batch, transformations, gamma: float, probes: int = 2, seed: int = 0,
                           max_families: int = 1, lbfgs_iter: int = 100, relax: bool = True) -> list[StationaryFinding]:
    """A prediction row and a control row per eligible family (at most ``max_families``, nearest the output
    first). ``relax=False`` measures at θ itself: there the quotient misses 2γ by the remainder, and the
    rows say ``inconclusive`` unless θ is already stationary."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0 (got {gamma}): the statement is about weight decay")
    dtype = next(model.parameters()).dtype
    tol = 1e-6 * 2 * gamma  # L-BFGS's ‖g_γ|_P‖ target: a remainder ~1e-6 of the prediction for ‖A²θ‖ ≈ ‖ξ‖
    out = []
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    # the families nearest the output first: there the loss is nearly convex in P (cross-entropy of the
    # head's linear map, times a norm gain), so L-BFGS reaches a stationary point in a few hundred
    # evaluations; deeper in a network L-BFGS needs far more, and at ReLU kinks it stalls (module doc)
    chosen = sorted((t for t in transformations if eligible(t, transformations)),
                    key=lambda t: (-max(order.get(n, -1) for n in t.params), t.name))
    for t in chosen[:max_families]:
        relaxed, gn = (relaxed_copy(model, loss, batch, t.params, gamma, lbfgs_iter, tol) if relax
                       else (model, None))
        pt = _Point(relaxed, loss, batch, seed)
        P = t.params
        if gn is None:
            gn = _f(norm({n: pt.grad[n] + gamma * pt.theta[n] for n in P}))
        gens, ctrls, rem = [], [], 0.0
        for _ in range(probes):
            c = symmetric_coeffs(t, pt.gen, pt.theta)
            g, xn, r = _probe(pt, t, c, gamma, P)
            gens.append(g)
            rem = max(rem, r)
            ctrls.append(_control(pt, P, g, xn, gamma))
        name = str(dtype).replace("torch.", "")
        how = "L-BFGS" if relax else "no relaxation"
        size = sum(pt.theta[n].numel() for n in P)
        reason = (f"predicted 2 gamma - r, r = <A^2 theta, g_gamma>/||xi||^2 from the gradient (|r| <= "
                  f"{rem:.2e} at the relaxed point: {rem / (2 * gamma):.1e} of 2 gamma; ||g_gamma|P|| = {gn:.2e} "
                  f"after {how} over the family's {size} parameters, gamma = {gamma:g}); tolerance 4 x gamma_n(u) x "
                  f"(||H xi||/||xi|| + kappa + gradient terms): rounding of one HVP and of r (n = {pt.n}, u = "
                  f"{unit_roundoff(pt.dtype):.1e} ({name}){pt.low})"
                  + ("" if rem <= STATIONARY_SHARE * 2 * gamma else
                     f"; NOT stationary: remainder above {STATIONARY_SHARE:g} x 2 gamma, so inconclusive"))
        hvps = pt.n_hvp
        out.append(StationaryFinding(t.name, t.family, False, gens, name, hvps, reason, gamma, gn, rem))
        out.append(StationaryFinding(t.name, t.family, True, ctrls, name, hvps,
                                     reason + "; control: random directions on the same parameters, same norms, "
                                     "plus their own HVP's rounding", gamma, gn, rem))
    return out
