"""Flat and sharp symmetry directions: the Hessian's Rayleigh quotient along a symmetry generator.

For a continuous family with generator ξ(θ) and Ψ = b·E⟨∇_fℓ, f⟩ + a·L (0 for an invariance), the
second-order identity (analyses/identities.py, I2) is Hξ + J_ξᵀg = ∇Ψ. Contracting with ξ gives the
prediction this module tests:

    ρ(ξ) = ξᵀHξ / ‖ξ‖²  =  (ξᵀ∇Ψ − ξᵀJ_ξᵀg) / ‖ξ‖².

* translation (J_ξ = 0, Ψ = 0): ρ = 0, an exactly flat direction;
* linear generator ξ = Aθ of an invariance: ρ = −⟨A²θ, g⟩/‖ξ‖²; a projection (BatchNorm scale, A² = A)
  gives −⟨g, ξ⟩ = 0 by the first-order identity, a ±1 diagonal (ReLU rescale, A² = 1 on P) gives
  −⟨g_P, θ_P⟩/‖ξ‖², which is 0 only at a stationary point;
* GL blocks (W_Q M, −W_K Mᵀ): −⟨g, (W_Q M², W_K Mᵀ²)⟩/‖ξ‖².

J_ξᵀg is one VJP through the generator's own ops and ∇Ψ one backward, so the prediction never sees H;
the measurement is one exact HVP. The negative control is a random direction v on the same parameters
with ‖v‖ = ‖ξ‖: its ρ(v) is a generic curvature O(‖H‖), not the prediction.

Tolerance (the rounding model of analyses/identities.py): ρ − prediction is the ξ-component of the I2
residual over ‖ξ‖², so it inherits I2's bound 4·γ_n(u)·(‖Hξ‖ + ‖J_ξᵀg‖ + ‖∇Ψ‖ + κ‖ξ‖)/‖ξ‖ (Cauchy-Schwarz
on the last inner product, κ = ‖Hu‖ for a random unit u standing for ‖|H||ξ|‖ when Hξ cancels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eqlab.analyses.curvature.functional import (dot, forward, loss_function, named_params, norm,
                                                 value_and_grad, value_grad_hvp)
from eqlab.analyses.identities import PASSES, output_tensor, unit_roundoff
from eqlab.analyses.identities import rounding_model  # n, u and coarser-dtype ops of the rounding model
from eqlab.analyses.predictions._common import FINDING_VERDICTS, finding_verdict
from eqlab.analyses.transforms import Continuous

VERDICTS = FINDING_VERDICTS


@dataclass
class DirectionProbe:
    """One direction: its measured Rayleigh quotient, the predicted one, and their rounding tolerance."""
    rayleigh: float       # vᵀHv/‖v‖², measured by one HVP
    predicted: float      # the identity's value for a generator (the same generator's, for a control)
    tolerance: float      # rounding bound on |rayleigh − predicted|, in curvature units
    curvature_scale: float  # κ: ‖Hu‖ for a random unit u (what a generic direction sees)
    coeffs: torch.Tensor | None = None  # the generator's coefficients c (None for a control)
    direction: dict | None = None       # v itself, only with keep_directions (for dense oracles in tests)


@dataclass
class DirectionFinding:
    transformation: str
    family: str
    control: bool          # True: random directions of the generators' norms (must not match)
    probes: list           # DirectionProbe per random generator ξ_c
    dtype: str
    n_hvp: int
    tolerance_reason: str

    @property
    def statistic(self) -> float:
        return _mean([p.rayleigh for p in self.probes])

    @property
    def statistic_std(self) -> float:
        """Standard deviation over the probes (0 for one probe): the spread of ρ over generators."""
        return _std([p.rayleigh for p in self.probes])

    @property
    def prediction(self) -> float:
        return _mean([p.predicted for p in self.probes])

    @property
    def worst(self) -> DirectionProbe:
        """The probe farthest from its prediction relative to its own tolerance."""
        return max(self.probes, key=lambda p: abs(p.rayleigh - p.predicted) / max(p.tolerance, 1e-300))

    @property
    def holds(self) -> bool:
        return all(abs(p.rayleigh - p.predicted) <= p.tolerance for p in self.probes)

    @property
    def verdict(self) -> str:
        """A generator: holds | violated. A control: violated (it is told apart from the generator, as it
        must be) | inconclusive (a random direction also matches, e.g. a block flat in every direction)."""
        return finding_verdict(self.holds, self.control)


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def _f(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _leaves(d, names=None):
    return {n: d[n].detach().requires_grad_(True) for n in (names or d)}


def _full(v, like):
    return {n: v[n] if n in v else torch.zeros_like(p) for n, p in like.items()}


class _Point:
    """θ, its loss, gradient, curvature scale κ and rounding chain at one batch (shared by all families)."""

    def __init__(self, model, loss, batch, seed):
        self.model, self.loss, self.batch = model, loss, batch
        self.theta = named_params(model)
        self.L = loss_function(model, loss, batch)
        _, self.grad = value_and_grad(self.L, self.theta)
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = next(iter(self.theta.values())).dtype
        # the identity checks' rounding model at this θ: γ_n(u), plus γ_{m+1}(u_low) per op the forward
        # computes in a coarser dtype inside the model (HF softmax / RMSNorm in float32)
        rd = rounding_model(model, loss, batch, seed)
        self.n, self.gamma = rd.n, rd.gamma()
        self.low = f" + {rd.n_low_ops} ops in {rd.low}" if rd.n_low_ops else ""
        u = self.randn(list(self.theta))
        un = _f(norm(u))
        _, _, hu = value_grad_hvp(self.L, self.theta, {n: x / un for n, x in u.items()})
        self.kappa = _f(norm(hu))
        self.n_hvp = 1

    def randn(self, names):
        return {n: torch.randn(self.theta[n].shape, generator=self.gen, dtype=torch.float64).to(self.theta[n])
                for n in names}

    def hvp(self, v):
        self.n_hvp += 1
        return value_grad_hvp(self.L, self.theta, _full(v, self.theta))[2]

    def grad_psi(self, b: float, a: float) -> dict:
        """∇Ψ, Ψ = b·E⟨∇_fℓ, f⟩ + a·L: one forward, a backward to f kept differentiable, and a backward."""
        ps = _leaves(self.theta)
        out = forward(self.model, ps, self.batch[0])
        f = output_tensor(out)
        value = self.loss(out, self.batch[1])
        (gf,) = torch.autograd.grad(value, f, create_graph=True)
        psi = b * (gf * f).sum() + a * value
        gp = torch.autograd.grad(psi, list(ps.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if x is None else x for (n, p), x in zip(self.theta.items(), gp)}

    def tolerance(self, *norms_over_v: float) -> float:
        """4·γ_n(u)·Σ(terms' norms)/‖v‖: the I2 bound contracted with v (see the module doc)."""
        return PASSES[2] * self.gamma * sum(norms_over_v)


def _generator_probe(pt: _Point, t: Continuous, c, keep: bool) -> tuple[DirectionProbe, float]:
    P = t.params
    leaves = _leaves(pt.theta, P)
    xi = t.xi(leaves, c)
    outs = [n for n in P if xi[n].requires_grad]
    jtg = {n: torch.zeros_like(pt.theta[n]) for n in P}
    if outs:  # J_ξᵀg by one VJP (a translation's ξ does not depend on θ: J = 0)
        got = torch.autograd.grad([xi[n] for n in outs], [leaves[n] for n in P],
                                  grad_outputs=[pt.grad[n] for n in outs], allow_unused=True)
        jtg.update({n: j for n, j in zip(P, got) if j is not None})
    xi = {n: x.detach() for n, x in xi.items()}
    b, a = t.psi_weights(c)
    gpsi = pt.grad_psi(b, a) if (b or a) else None
    xn2 = _f(dot(xi, xi))
    xn = math.sqrt(xn2)
    hxi = pt.hvp(xi)
    rayleigh = _f(dot(xi, {n: hxi[n] for n in P})) / xn2
    pred_num = -_f(dot(xi, jtg)) + (_f(dot(xi, {n: gpsi[n] for n in P})) if gpsi is not None else 0.0)
    gpsi_norm = _f(norm(gpsi)) if gpsi is not None else 0.0
    # the I2 terms' norms over ‖ξ‖ (Cauchy-Schwarz bounds each contracted term by norm·‖ξ‖, then /‖ξ‖²)
    tol = pt.tolerance(_f(norm(hxi)) / xn, _f(norm(jtg)) / xn, gpsi_norm / xn, pt.kappa)
    return DirectionProbe(rayleigh, pred_num / xn2, tol, pt.kappa, c, xi if keep else None), xn


def _control_probe(pt: _Point, P, like: DirectionProbe, xn: float, keep: bool) -> DirectionProbe:
    v = pt.randn(P)
    vn = _f(norm(v))
    v = {n: x * (xn / vn) for n, x in v.items()}  # same norm as the generator it stands in for
    hv = pt.hvp(v)
    rayleigh = _f(dot(v, {n: hv[n] for n in P})) / (xn * xn)
    # its own HVP's terms plus the prediction's bound (the same generator's number is compared)
    tol = pt.tolerance(_f(norm(hv)) / xn, pt.kappa) + like.tolerance
    return DirectionProbe(rayleigh, like.predicted, tol, pt.kappa, None, v if keep else None)


def flat_direction_findings(model, loss, batch, transformations, probes: int = 2,
                            seed: int = 0, keep_directions: bool = False) -> list[DirectionFinding]:
    """For each continuous family: ``probes`` random generators ξ_c (the family's own coefficient law),
    ρ(ξ_c) against the identity's prediction, and a control row of random directions of the same norms."""
    pt = _Point(model, loss, batch, seed)
    dtype = str(pt.dtype).replace("torch.", "")
    reason = (f"4 x gamma_n(u) x (||Hv|| + ||J^T g|| + ||grad Psi|| + kappa ||v||)/||v||: worst-case rounding of "
              f"forward + backward + double backward (n = {pt.n} = 2d + inputs + outputs, u = "
              f"{unit_roundoff(pt.dtype):.1e} ({dtype}){pt.low}), Cauchy-Schwarz on the contraction with v")
    out = []
    for t in transformations:
        if not isinstance(t, Continuous):
            continue
        start = pt.n_hvp
        gens, ctrls = [], []
        for _ in range(probes):
            c = t.random_coeffs(pt.gen, pt.theta)
            g, xn = _generator_probe(pt, t, c, keep_directions)
            gens.append(g)
            ctrls.append(_control_probe(pt, t.params, g, xn, keep_directions))
        hvps = (pt.n_hvp - start) // 2
        out.append(DirectionFinding(t.name, t.family, False, gens, dtype, hvps, reason))
        out.append(DirectionFinding(t.name, t.family, True, ctrls, dtype, hvps,
                                    reason + "; plus the generator's own bound (its prediction is compared)"))
    return out
