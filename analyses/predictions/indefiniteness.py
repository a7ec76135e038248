"""Indefiniteness of normalised networks (catalog rows 16, 15, 2a, 3a, 4a), matrix-free.

README text: *A scale-invariant block S (a filter feeding BatchNorm, a Linear feeding LayerNorm, the
pre-LN residual stream) has Hθ_S = −g_S, so its own Hessian block is indefinite whenever g_S ≠ 0, with
λ_min ≤ −‖g_S‖²/(μ₊‖θ_S‖²), μ₊ ≤ λ_max the top Ritz value of H on span{θ_S, g_S}. At every checkpoint we
measure λ_min and λ_max of each such block by residual-aware Lanczos and g_SᵀHg_S by one HVP and check
the bound, next to the convex classifier head, which must violate it by exactly |bound|.*

The bound, derived. Let S be one generator of a verified scale family whose generator is a 0/1 projection
(ξ = P_Sθ, no Ψ), and P ⊇ S the family's parameters. Row 2a/3a/4a gives Hθ_S = −g_S, and the first-order
identity ⟨g_S, θ_S⟩ = 0. With the orthonormal pair e₁ = θ_S/‖θ_S‖, e₂ = g_S/‖g_S‖, the Rayleigh–Ritz
matrix of H on span{θ_S, g_S} is

    R = [[0, −b], [−b, ρ]],   b = ‖g_S‖/‖θ_S‖,   ρ = g_SᵀHg_S/‖g_S‖²   (one HVP),

because e₁ᵀHe₁ = −⟨θ_S, g_S⟩/‖θ_S‖² = 0 and e₂ᵀHe₁ = −‖g_S‖²/(‖g_S‖‖θ_S‖). Its eigenvalues are
μ± = (ρ ± √(ρ² + 4b²))/2 with μ₊μ₋ = det R = −b², so μ₋ = −b²/μ₊ < 0. Courant–Fischer (Cauchy
interlacing): λ_min ≤ μ₋ and μ₊ ≤ λ_max, hence

    λ_min ≤ μ₋ = −‖g_S‖²/(μ₊‖θ_S‖²) ≤ −‖g_S‖²/(λ_max‖θ_S‖²),

the Ritz form is always at least as sharp as the mean-zero-measure form of row 16 (spectral.py), and needs
no λ_max. Everything holds for the block Hessian H_PP (P_P H θ_S = −g_S since S ⊂ P), whose λ_min bounds
the full λ_min from above (interlacing again), so testing H_PP is the stronger, cheaper statement. Among the
family's generators we take S with the largest ‖g_k‖²/‖θ_k‖²: every combination Σc_kP_kθ has curvature 0
and ‖Hξ‖²/‖ξ‖² = Σc_k²‖g_k‖²/Σc_k²‖θ_k‖² ≤ max_k ‖g_k‖²/‖θ_k‖², so one generator gives the sharpest b.

The negative control: the classifier head U (the parameters of a verified softmax translation). Logits are
linear in U with the features fixed, and cross-entropy is convex in the logits, so H_UU is positive
semidefinite, and the translation directions are exact null vectors: λ_min(H_UU) = 0 exactly. Here
Hθ_U ≠ −g_U (the premise is broken: H_UUθ_U is the Gauss–Newton term of row 9b), and the same bound built
from (θ_U, g_U) must come out violated by λ_min − bound = |bound|. When |bound| is below the tolerance
(g_U ≈ 0, e.g. at a critical point) the control cannot discriminate: verdict inconclusive.

Tolerance of `λ̂_min − bound` (one-sided: the row holds when λ̂_min ≤ bound + tolerance):
* Lanczos: a Ritz value is ≥ λ_min in exact arithmetic; its error is the result's eigenvalue bound
  min(r, r²/gap) (≥ 16·eps·max|θ|) when converged and verified, else the true residual r (an unconverged
  value widens the tolerance rather than faking a violation);
* the bound's terms: ρ comes from one HVP, whose rounding is the I2 bound 4·γ_n(u)·(‖Hg_S‖/‖g_S‖ + ‖H‖)
  contracted with the unit e₂ (flat_directions.py), and |∂μ₋/∂ρ| ≤ 1; b² carries the forward + backward
  rounding 2·γ_n(u) of g twice (a square), and |∂μ₋/∂b²| = 1/√(ρ² + 4b²).

The whole Hessian (`hessian_indefiniteness`, one row pair per checkpoint). What the theory predicts there,
in our words: R8 says the *full* H is indefinite as soon as one scale-invariant block has g_S ≠ 0, and the
same Rayleigh–Ritz argument on span{θ_S, g_S} (both supported on S, so R is the same matrix) bounds the
full λ_min(H) ≤ λ_min(H_PP) ≤ min over the blocks of μ₋: that is a prediction with a verdict, tested by
a Lanczos run on the full operator (random start, so it is not built from θ_S). The theory does NOT predict
how much of the spectrum is negative: "at least one eigenvalue" (mass ≥ 1/dim) is below what random-probe
SLQ can resolve, and §6(f) lists the negative mass against ‖g_S‖ as what a study can add. So the SLQ
negative share is a measurement (predicted NULL, verdict NULL) stored next to ‖g_S‖ (the gradient norm on
the union of the scale-invariant blocks), for the across-checkpoint relation.

The negative mass and its error bound. ``probes`` Rademacher probes v (‖v‖² = dim), ``steps`` Lanczos steps
each (`analyses.curvature.slq`): Gauss nodes x₁ < … < x_m with weights w_i (cumulative C_j = Σ_{i≤j} w_i)
of the probe's spectral measure ν_v = Σ_i (u_iᵀv)²/dim δ_{λ_i}. The Chebyshev–Markov–Stieltjes inequalities
of Gauss quadrature bound ν_v's distribution function F_v(t) = ν_v((−∞, t)) at every t, with no smoothness:

    C_{k−1} ≤ F_v(t) ≤ C_{k+1}   for x_k < t ≤ x_{k+1}   (C_{−1} = C_0 = 0, C_{m+1} = 1).

* The statistic is the negative share N = tr(H₋)/tr|H| (H₋ = the negative part; 0 for a PSD H, 1/2 for a
  symmetric spectrum). Its numerator per probe is ∫λ₋ dν_v = ∫_{a}^{0} F_v(t) dt (layer cake; a ≤ λ_min),
  so integrating the bracket above gives an exact enclosure of it, and tr|H| = tr H + 2 tr H₋ with
  ∫λ dν_v = vᵀHv/dim exact in the quadrature (degree 1). The enclosure is about one node's weight times
  one node gap wide (it narrows with ``steps``); the large atom of zero eigenvalues (data rank, symmetries)
  widens its upper end by its weight × the distance from 0 of the last negative node (on the test's BN CNN,
  20 steps: tr(H₋)/dim in [0.021, 0.23] around 0.053, eigh 0.047; the share in [0.27, 0.46] around 0.38,
  eigh 0.36). a = λ̂_min − its Lanczos error (certified when that run converged and was verified).
  Rounding: every product is off by ≤ τ = 8·γ_n(u)·‖H‖ on a unit vector (twice the I2 bound
  4γ_n(u)(‖Hv‖ + ‖H‖)), so eigenvalues move by ≤ τ (Weyl) and the 1-Lipschitz λ₋ by ≤ τ: added to the bounds.
* The fraction of negative eigenvalues F(−τ) = #{λ < −τ}/dim is reported too (only eigenvalues below −τ
  are certainly negative: an exact null eigenvalue is computed anywhere in [−τ, τ]), with the same bracket
  at t = −τ. It is ill-conditioned on a Hessian with a null space: the atom at 0 sits on the node next to
  −τ, and the quadrature cannot say on which side of −τ its weight lies (its bracket is honestly wide,
  0.1–0.9 on the test's BN CNN where eigh says 0.22), which is why the share is the row's statistic.
* Monte Carlo: E ν_v = the normalised spectrum, Var vᵀf(H)v/dim = 2(‖f(H)‖_F² − Σ_i f(H)_ii²)/dim² for
  Rademacher probes; the probes' spread is ``statistic_std``. The row's ``tolerance`` is the quadrature +
  rounding half-width of the pooled enclosure, not the Monte Carlo error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eqlab.analyses.curvature.functional import loss_function, named_params, value_and_grad
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.slq import slq
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.identities import PASSES, rounding_model, unit_roundoff
from eqlab.analyses.transforms import Continuous
from eqlab.analyses.transforms.continuous import ScaleFamily, TranslationFamily

VERDICTS = ("holds", "violated", "inconclusive")
CONTROL_FAMILY = "softmax_translation"  # its parameters are the convex classifier head


def ritz_bound(b2: float, rho: float) -> tuple[float, float]:
    """(μ₋, μ₊) of [[0, −b], [−b, ρ]] without cancellation: the root with ρ's sign is formed by addition,
    the other from μ₊μ₋ = −b². b2 = 0 gives (min(ρ, 0), max(ρ, 0))."""
    if b2 == 0.0:
        return min(rho, 0.0), max(rho, 0.0)
    s = math.sqrt(rho * rho + 4.0 * b2)
    if rho >= 0:
        hi = 0.5 * (rho + s)
        return -b2 / hi, hi
    lo = 0.5 * (rho - s)
    return lo, -b2 / lo


def projection_generators(t) -> list[int] | None:
    """Indices of t's generators when t is a scale invariance whose every generator is a 0/1 projection
    P_k (ξ_k = P_kθ, Ψ = 0): the blocks S with Hθ_S = −g_S. None for any other family."""
    if not isinstance(t, ScaleFamily) or not t.expected or t.output_scale or t.loss_rate:
        return None
    for g in t.generators:
        if any(k != 1.0 for _, _, _, k in g):
            return None
    return list(range(t.n_generators))


@dataclass
class BlockIndefiniteness:
    """One block at one θ: the bottom/top of its Hessian block and the bound from its gradient."""
    transformation: str
    family: str
    control: bool
    params: list
    generator: int           # which generator is S (-1: the whole block, the control)
    theta_sq: float          # ‖θ_S‖²
    grad_sq: float           # ‖g_S‖²
    rho: float               # g_SᵀHg_S/‖g_S‖²
    lambda_min: float        # Lanczos smallest Ritz value of H_PP
    lambda_min_residual: float
    lambda_min_error: float  # what the tolerance takes for it (eigenvalue bound, or residual if unconverged)
    lambda_max: float
    lambda_max_error: float
    converged: bool
    bound: float             # μ₋ = −‖g_S‖²/(μ₊‖θ_S‖²), the Ritz form
    bound_lambda_max: float  # −‖g_S‖²/(λ_max‖θ_S‖²), the weaker row-16 form
    tolerance: float
    bound_rounding: float    # the bound's own share of the tolerance (the rest is the Lanczos error)
    hvps: int
    dtype: str
    tolerance_reason: str

    @property
    def residual(self) -> float:
        """λ̂_min − bound: ≤ 0 (up to tolerance) when the bound holds; |bound| expected for the control."""
        return self.lambda_min - self.bound

    @property
    def holds(self) -> bool:
        return self.residual <= self.tolerance

    @property
    def verdict(self) -> str:
        if self.control:
            return "inconclusive" if self.holds else "violated"
        return "holds" if self.holds else "violated"


def _block_extremes(op: HessianOperator, max_iter: int, tol: float, seed: int):
    res = lanczos(op.matvec, op.dim, k=1, which="both", tol=tol, max_iter=max(2, min(max_iter, op.dim)),
                  seed=seed, warn=False)
    lam = [float(x) for x in res.eigenvalues]  # top then bottom
    lmax, lmin = lam[0], lam[-1]
    ok = bool(res.converged[-1]) and res.verified
    err = float(res.errors[-1]) if ok else float(res.residuals[-1])
    err_max = float(res.errors[0]) if bool(res.converged[0]) and res.verified else float(res.residuals[0])
    return lmin, float(res.residuals[-1]), err, lmax, err_max, ok, res.n_matvec


def block_indefiniteness(model, loss, batch, t, control: bool, max_iter: int = 40, tol: float = 1e-3,
                         seed: int = 0, gamma_n: float | None = None, n: int | None = None) -> BlockIndefiniteness | None:
    """λ_min/λ_max of H_PP (P = t.params) by one Lanczos run from both ends, S = the generator with the
    largest ‖g_k‖²/‖θ_k‖² (the whole block for a control), ρ by one HVP, and the Ritz bound. None when no
    generator has θ_S ≠ 0."""
    op = HessianOperator(model, loss, batch, names=t.params, method="double_backward", dtype=torch.float64)
    theta = op.space.values(op.model).double()
    grad = op.gradient().double()
    if control:
        masks = [torch.ones_like(theta)]
    else:
        shapes = {nm: theta.new_zeros(op.space.shapes[nm]) for nm in op.space.names}
        masks = [op.space.flatten(t.field(shapes, torch.eye(t.n_generators, dtype=torch.float64)[k])).double()
                 for k in projection_generators(t)]
    best, best_ratio = None, -1.0
    for k, m in enumerate(masks):
        th2 = float((m * theta).pow(2).sum())
        if th2 == 0.0 or not bool(((m == 0) | (m == 1)).all()):
            continue  # no block there, or overlapping terms: not a projection, Hθ_S = −g_S is not implied
        ratio = float((m * grad).pow(2).sum()) / th2
        if ratio > best_ratio:
            best, best_ratio = k, ratio
    if best is None:
        return None
    m = masks[best]
    th2, gS = float((m * theta).pow(2).sum()), m * grad
    g2 = float(gS @ gS)
    lmin, rmin, err, lmax, err_max, ok, n_lanczos = _block_extremes(op, max_iter, tol, seed)
    lam_abs = max(abs(lmin), abs(lmax))
    if g2 > 0:
        hg = op.matvec(gS)
        rho, hg_norm = float(gS @ hg) / g2, float(hg.norm()) / math.sqrt(g2)
        hvps = n_lanczos + 1
    else:
        rho, hg_norm, hvps = 0.0, 0.0, n_lanczos
    b2 = g2 / th2
    bound, _ = ritz_bound(b2, rho)
    bound_lmax = -b2 / lmax if lmax > 0 else -math.inf
    if gamma_n is None or n is None:
        rd = rounding_model(model, loss, batch, seed)
        gamma_n, n = rd.gamma(), rd.n
    d_rho = PASSES[2] * gamma_n * (hg_norm + lam_abs)
    d_b2 = 2 * PASSES[1] * gamma_n * b2
    sens_b2 = 1.0 / math.sqrt(rho * rho + 4.0 * b2) if b2 > 0 else 0.0
    bound_rounding = d_rho + sens_b2 * d_b2
    tolerance = err + bound_rounding
    which = "the whole head block" if control else f"generator {best} of {len(masks)}"
    lz = (f"converged and verified: eigenvalue bound min(r, r^2/gap) = {err:.2e}" if ok else
          f"NOT converged in {n_lanczos} HVPs: tolerance widened by the true residual r = {err:.2e}")
    reason = (f"lambda_min of the block Hessian ({len(theta)} params) by Lanczos, {lz}; plus the bound's "
              f"rounding: 4 gamma_n(u) (||Hg_S||/||g_S|| + ||H||) = {d_rho:.1e} for rho (one HVP, "
              f"|d mu_-/d rho| <= 1) and 4 gamma_n(u) b^2/sqrt(rho^2+4b^2) = {sens_b2 * d_b2:.1e} for "
              f"b^2 = ||g_S||^2/||theta_S||^2 (n = {n}, u = {unit_roundoff(torch.float64):.1e}); S = {which}; "
              f"weaker lambda_max form of the bound: {bound_lmax:.4g}")
    if control:
        reason = (f"control: the classifier head is convex in its own parameters (H_UU PSD, lambda_min = 0 "
                  f"from the translation null vectors) and H theta_U != -g_U, so the bound must fail by |bound| "
                  f"= {abs(bound):.3g}" + ("" if abs(bound) > tolerance else
                                           " -- below the tolerance (g_U ~ 0): cannot discriminate") + "; " + reason)
    return BlockIndefiniteness(t.name, t.family, control, list(t.params), -1 if control else best, th2, g2, rho,
                               lmin, rmin, err, lmax, err_max, ok, bound, bound_lmax, tolerance, bound_rounding, hvps, "float64", reason)


def sharpest_ratio(t, theta: dict, grad: dict) -> float:
    """max_k ‖P_kg‖²/‖P_kθ‖² over t's projection generators (0 when every θ_k = 0): the b² of its row."""
    best = 0.0
    for k in projection_generators(t):
        D = t.field(theta, torch.eye(t.n_generators, dtype=torch.float64)[k])
        th2 = sum(float((D[n] * theta[n]).pow(2).sum()) for n in D)
        if th2 > 0:
            best = max(best, sum(float((D[n] * grad[n]).pow(2).sum()) for n in D) / th2)
    return best


def indefiniteness_findings(model, loss, batch, transformations, max_iter: int = 40, tol: float = 1e-3,
                            seed: int = 0, max_blocks: int | None = None) -> list[BlockIndefiniteness]:
    """One prediction per verified scale-invariant family (projection generators), one control per
    classifier head (a verified softmax translation); none of either when the model has no prediction.
    ``max_blocks``: at most this many predictions (a deep BN ResNet has dozens of families at ~25 HVPs
    each), the families with the largest b² = max_k ‖g_k‖²/‖θ_k‖², i.e. the most stringent bounds."""
    preds = [t for t in transformations if isinstance(t, Continuous) and projection_generators(t)]
    if not preds:
        return []
    if max_blocks is not None and len(preds) > max_blocks:
        theta = named_params(model)
        _, grad = value_and_grad(loss_function(model, loss, batch), theta)
        theta = {n: x.double() for n, x in theta.items()}
        grad = {n: x.double() for n, x in grad.items()}
        ranked = sorted(preds, key=lambda t: -sharpest_ratio(t, theta, grad))
        keep = {t.name for t in ranked[:max_blocks]}
        preds = [t for t in preds if t.name in keep]
    heads = [t for t in transformations if isinstance(t, TranslationFamily) and t.family == CONTROL_FAMILY]
    rd = rounding_model(model, loss, batch, seed)
    out = []
    for t, control in [(t, False) for t in preds] + [(t, True) for t in heads]:
        f = block_indefiniteness(model, loss, batch, t, control, max_iter, tol, seed, rd.gamma(), rd.n)
        if f is not None:
            out.append(f)
    return out


def cms_bracket(nodes, weights, t: float) -> tuple[float, float, float]:
    """(F_Q, lower, upper) at t of one probe's Gauss rule: F_Q = Σ_{x_i < t} w_i and the
    Chebyshev–Markov–Stieltjes bracket [C_{k−1}, C_{k+1}] of the probe's measure below t (module doc)."""
    k = int((nodes < t).sum())
    C = [0.0] + list(map(float, weights.cumsum()))
    return C[k], C[max(k - 1, 0)], min(C[min(k + 1, len(C) - 1)], 1.0)


def negative_part_bracket(nodes, weights, a: float) -> tuple[float, float, float]:
    """(Gauss value Σ w_i max(−x_i, 0), lower, upper) of ∫λ₋ dν for a measure supported on [a, ∞):
    ∫_a^0 of the CMS bracket of F (module doc), piecewise constant between nodes."""
    x = [float(v) for v in nodes]
    C = [0.0] + list(map(float, weights.cumsum()))
    m = len(x)
    gauss = float(sum(w * max(-xi, 0.0) for xi, w in zip(x, map(float, weights))))
    edges = [min(a, x[0])] + [xi for xi in x if xi < 0] + [0.0]
    lo = hi = 0.0
    for k in range(len(edges) - 1):  # on (edges[k], edges[k+1]] exactly k nodes lie below t
        width = edges[k + 1] - edges[k]
        lo += width * C[max(k - 1, 0)]
        hi += width * min(C[min(k + 1, m)], 1.0)
    return gauss, lo, hi


def scale_invariant_union(space, theta_dict: dict, transformations) -> torch.Tensor | None:
    """0/1 mask of the union of every projection generator of the verified scale families (None: none)."""
    mask = None
    for t in transformations:
        if not isinstance(t, Continuous) or not projection_generators(t):
            continue
        D = t.field({n: theta_dict[n] for n in t.params}, torch.ones(t.n_generators, dtype=torch.float64))
        full = {n: torch.zeros_like(theta_dict[n]) for n in space.names}
        full.update({n: (x != 0).to(theta_dict[n].dtype) for n, x in D.items()})
        m = space.flatten(full).double()
        mask = m if mask is None else torch.maximum(mask, m)
    return mask


@dataclass
class ProbeMass:
    """One SLQ probe: ∫λ₋ dν_v with its enclosure, ∫λ dν_v (exact), and the fraction below −τ bracketed."""
    neg: float
    neg_lower: float
    neg_upper: float
    mean: float
    frac: float
    frac_lower: float
    frac_upper: float

    def share(self, neg: float) -> float:
        den = self.mean + 2 * neg
        return neg / den if den > 0 else 0.0


@dataclass
class HessianIndefiniteness:
    """The whole Hessian at one θ: its bottom Lanczos eigenvalue against the blocks' sharpest bound, and
    its SLQ negative share next to ‖g_S‖ of the scale-invariant blocks."""
    dim: int
    lambda_min: float
    lambda_min_residual: float
    lambda_min_error: float
    lambda_max: float
    converged: bool
    bound: float | None           # min over the blocks' μ₋ (None: no scale-invariant block had a row)
    bound_block: str | None
    bound_rounding: float
    lanczos_hvps: int
    tau: float                    # rounding of one unit product: eigenvalues below −τ count as negative
    steps: int
    probe_masses: list            # ProbeMass per probe
    smallest_node: float          # min over probes of x₁ (≥ λ_min: a Ritz value)
    slq_hvps: int
    grad_s_norm: float            # ‖g_S‖ on the union of the scale-invariant blocks
    theta_s_norm: float
    dtype: str = "float64"

    @property
    def probes(self) -> int:
        return len(self.probe_masses)

    def _pooled(self, attr: str) -> float:
        return sum(getattr(p, attr) for p in self.probe_masses) / self.probes

    @property
    def negative_part(self) -> tuple[float, float, float]:
        """tr(H₋)/dim: (estimate, lower, upper), rounding τ included in the ends."""
        return self._pooled("neg"), max(self._pooled("neg_lower") - self.tau, 0.0), self._pooled("neg_upper") + self.tau

    @property
    def share(self) -> tuple[float, float, float]:
        """N = tr(H₋)/tr|H|: (estimate, lower, upper); x/(tr H/dim + 2x) is monotone in x = tr(H₋)/dim at
        fixed tr H (exact in the quadrature), so the ends are N at the ends of tr(H₋)'s enclosure."""
        mean = self._pooled("mean")
        n, lo, hi = self.negative_part

        def N(x):
            den = mean + 2 * x
            return x / den if den > 0 else 0.0
        return N(n), min(N(lo), N(hi)), max(N(lo), N(hi))

    @property
    def share_std(self) -> float:
        """Spread of the per-probe shares (sample std; 0 for one probe): the Monte Carlo error's scale."""
        v = [p.share(p.neg) for p in self.probe_masses]
        if len(v) < 2:
            return 0.0
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    @property
    def fraction(self) -> tuple[float, float, float]:
        """F(−τ) = #{λ < −τ}/dim: (estimate, lower, upper)."""
        return self._pooled("frac"), self._pooled("frac_lower"), self._pooled("frac_upper")

    @property
    def residual(self) -> float | None:
        return None if self.bound is None else self.lambda_min - self.bound

    @property
    def tolerance(self) -> float:
        return self.lambda_min_error + self.bound_rounding

    @property
    def verdict(self) -> str | None:
        if self.bound is None:
            return None
        return "holds" if self.residual <= self.tolerance else "violated"


def slq_negative_mass(op: HessianOperator, probes: int, steps: int, seed: int, a: float,
                      tau: float) -> tuple[list[ProbeMass], float, int]:
    """Per Rademacher probe of `slq` on ``op``: ∫λ₋ dν_v enclosed on [a, 0] (a ≤ λ_min), ∫λ dν_v and the
    fraction below −τ bracketed; also the smallest Gauss node and the products used."""
    res = slq(op.matvec, op.dim, steps=min(steps, op.dim), probes=probes, seed=seed, dtype=torch.float64)
    per, smallest = [], math.inf
    for alphas, (nodes, weights) in zip(res.alphas, res.quadrature()):
        neg, nlo, nhi = negative_part_bracket(nodes, weights, a)
        frac, flo, fhi = cms_bracket(nodes, weights, -tau)
        per.append(ProbeMass(neg, nlo, nhi, float(alphas[0]), frac, flo, fhi))
        smallest = min(smallest, float(nodes[0]))
    return per, smallest, res.n_matvec


def hessian_indefiniteness(model, loss, batch, transformations, blocks: list[BlockIndefiniteness],
                           probes: int = 2, steps: int = 20, max_iter: int = 40, tol: float = 1e-3, seed: int = 0,
                           gamma_n: float | None = None) -> HessianIndefiniteness:
    """One Lanczos run from both ends of the full H (≤ ``max_iter`` products) and ``probes`` × ``steps``
    SLQ products; ``blocks`` are this θ's block rows (their bounds: the sharpest is the prediction)."""
    op = HessianOperator(model, loss, batch, names=None, method="double_backward", dtype=torch.float64)
    lmin, rmin, err, lmax, _, ok, n_lanczos = _block_extremes(op, max_iter, tol, seed)
    if gamma_n is None:
        gamma_n = rounding_model(model, loss, batch, seed).gamma()
    tau = 2 * PASSES[2] * gamma_n * max(abs(lmin), abs(lmax))
    steps = min(steps, op.dim)
    per, smallest, n_slq = slq_negative_mass(op, probes, steps, seed, lmin - err - tau, tau)
    theta = op.space.values(op.model).double()
    grad = op.gradient().double()
    mask = scale_invariant_union(op.space, op.space.unflatten(theta), transformations)
    gs = float((mask * grad).norm()) if mask is not None else 0.0
    ts = float((mask * theta).norm()) if mask is not None else 0.0
    preds = [b for b in blocks if not b.control]
    best = min(preds, key=lambda b: b.bound) if preds else None
    return HessianIndefiniteness(
        op.dim, lmin, rmin, err, lmax, ok, None if best is None else best.bound,
        None if best is None else best.transformation, 0.0 if best is None else best.bound_rounding, n_lanczos,
        tau, steps, per, smallest, n_slq, gs, ts)
