"""Findings 6: saddles at the fixed points of discrete symmetries (dead and duplicated hidden units), the
rows of one checkpoint (`findings` table; math in `analyses.predictions.discrete_saddles`).

README: At a dead hidden unit and at a unit duplicated into its neighbour (the fixed point of a verified
unit swap), the Hessian leaves the unit's subspace invariant and its eigenvalues there are those of a
small matrix of first-order quantities ([[0, Bᵀ], [B, 0]], B = Σ δ σ'(0) x̃ᵀ, for a dead unit), so both
are saddles, stable under L2 weight decay exactly above γ* = −λ_min. Measured by building both points
from a real unit group of each checkpoint and comparing the top and bottom Lanczos eigenvalues of the
Hessian restricted to that subspace (and the part of every product that leaves it) with that matrix,
and the same at the untouched trained units as the negative control.

Per unit group (a verified `permutation` of hidden units between linear maps) and construction
(``dead_unit`` on unit 0, ``duplicated_unit`` on the swapped pair), three rows, each with a control row
at the untouched trained units:

* ``discrete_subspace_invariance``: max over the Lanczos products of ‖(I − Q)Hv‖/‖Hv‖, predicted 0;
* ``discrete_saddle_spectrum``: the worst of the top-k and bottom-k Ritz values against the block's;
  ``eigenvalue`` = the bottom Ritz value (< 0: a saddle), ``predicted`` = the block's λ_min;
* ``discrete_saddle_wd_threshold``: the coupled-L2 level γ* = −λ_min(block) at which the point becomes
  stable, tested by the sign of λ_min(H_sub + γI) = λ_min(H_sub) + γ at γ = γ*(1 ± δ), δ = 2·tol/γ*
  (the tolerance of the bottom eigenvalue, so a miss beyond it flips a sign); ``eigenvalue`` =
  λ_min(H_sub + γ₊I) (must be > 0), ``statistic`` = the measured threshold −λ_min(H_sub).

Cost: per point one Lanczos run (≤ max_iter full-space HVPs, top and bottom together) plus one for κ;
four points per group (construction and control, twice). A block that is zero to rounding (ReLU, whose
σ'(0) = 0 in torch) gives `inconclusive` rows: the statement is true there but nothing is tested.
"""
from __future__ import annotations

from eqlab.analyses.predictions.discrete_saddles import (dtype_name, rounding_reason, saddle_points,
                                                          unit_groups)
from eqlab.pipeline.study import RunSpec

FINDING = "discrete_saddles"  # the registry name (study [findings] include); its rows carry three finding names
ROW_FINDINGS = ("discrete_subspace_invariance", "discrete_saddle_spectrum", "discrete_saddle_wd_threshold")
# (prefixed: the stage's own top_k and max_iter are the alignment's) groups: unit groups per checkpoint; units:
# dead units and duplicated pairs per group;
# top_k: Ritz values compared at each end; max_iter: HVPs per Lanczos run (the subspace is small)
SETTINGS = {"discrete_groups": 2, "discrete_units": 1, "discrete_top_k": 1, "discrete_max_iter": 30}


def _verdict(holds: bool, control: bool, degenerate: bool) -> str:
    if degenerate:
        return "inconclusive"
    if control:
        return "inconclusive" if holds else "violated"
    return "holds" if holds else "violated"


def _rows_of(p, dtype: str, reason: str) -> list[dict]:
    s, inv, ctrl = p.spectrum, p.spectrum.invariant, p.control
    base = {"transformation": p.transformation, "symmetry": p.group.family, "control": ctrl, "dtype": dtype,
            "hvps": p.n_hvp}
    zero = "; the predicted block is 0 to rounding (sigma'(0) = 0, e.g. ReLU in torch): nothing is tested" \
        if p.degenerate else ""
    notes = "".join(f"; {n}" for n in p.notes)
    rows = []
    # (1) invariance of the subspace under H, over every Lanczos product
    if not inv.ratios:  # every product was 0 to rounding: the subspace is in H's null space, nothing tested
        rows.append({**base, "finding": ROW_FINDINGS[0], "probes": 0, "statistic": 0.0, "statistic_std": 0.0,
                     "predicted": 0.0, "residual": 0.0, "tolerance": 0.0, "scale": 0.0, "verdict": "inconclusive",
                     "tolerance_reason": f"all {inv.products} products H E c were 0 to rounding (4 x {reason} x "
                                         f"kappa, kappa = {s.kappa:.3g}): no direction to test{zero}{notes}"})
    else:
        w = inv.worst
        rows.append({**base, "finding": ROW_FINDINGS[0], "probes": len(inv.ratios), "statistic": max(inv.ratios),
                     "statistic_std": _std(inv.ratios), "predicted": 0.0, "residual": inv.ratios[w],
                     "tolerance": inv.tolerances[w], "scale": 1.0,
                     "verdict": _verdict(inv.holds, ctrl, p.degenerate),
                     "tolerance_reason": f"4 x {reason} x (||Hv|| + kappa ||v||)/||Hv||, kappa = ||H E u|| = "
                                         f"{s.kappa:.3g} (I2's bound on the product){zero}{notes}"})
    # (2) the extreme eigenvalues on the subspace against the first-order block
    w, b = s.worst, s.bottom
    lanczos_note = "" if s.converged else "; Lanczos not converged in max_iter: the true residual is used"
    rows.append({**base, "finding": ROW_FINDINGS[1], "probes": 2 * s.k, "rank": w, "eigenvalue": s.measured[b],
                 "eigen_residual": s.residuals[b], "statistic": s.measured[b], "statistic_std": s.errors[b],
                 "predicted": s.predicted[b], "residual": s.misses[w], "tolerance": s.tolerances[w],
                 "scale": s.scale, "verdict": _verdict(s.holds, ctrl, p.degenerate),
                 "tolerance_reason": f"Lanczos bound min(r, r^2/gap) + 4 x {reason} x (kappa + |lambda|) (Weyl) "
                                     f"+ ||dK||_F = {p.block.rounding:.2e} (the first-order block's sums in "
                                     f"absolute value); top {s.k} and bottom {s.k} of {s.dim}; rank = the worst "
                                     f"pair (0.. top, {s.k}.. bottom){lanczos_note}{zero}{notes}"})
    # (3) the weight-decay level at which the point becomes stable
    gstar, lam, tol = 0.0 - s.predicted[b], s.measured[b], s.tolerances[b]  # 0.0 - x: no −0
    delta = 2 * tol / gstar if gstar > 0 else float("inf")
    if delta < 1:
        lo, hi = lam + gstar * (1 - delta), lam + gstar * (1 + delta)
        ok = lo < 0 < hi
        detail = (f"lambda_min(H_sub + gamma I) = {lo:.3e} at gamma = gamma*(1 - delta), {hi:.3e} at "
                  f"gamma*(1 + delta), delta = 2 tol/gamma* = {delta:.2e}")
        degenerate = p.degenerate
    else:
        gstar, hi, ok = max(gstar, 0.0), lam + max(gstar, 0.0), False
        detail = (f"gamma* = {gstar:.3e} is not above twice the tolerance {tol:.2e}: the block has no "
                  f"resolvable negative eigenvalue, so no threshold to test")
        degenerate = True
    rows.append({**base, "finding": ROW_FINDINGS[2], "probes": 1, "rank": b, "eigenvalue": hi,
                 "eigen_residual": s.residuals[b], "statistic": 0.0 - lam, "statistic_std": s.errors[b],
                 "predicted": gstar, "residual": abs(lam + gstar), "tolerance": tol, "scale": max(gstar, 0.0),
                 "verdict": _verdict(ok, ctrl, degenerate),
                 "tolerance_reason": f"{detail}; tol as discrete_saddle_spectrum's bottom eigenvalue{zero}{notes}"})
    return rows


def _std(xs) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def discrete_saddle_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    get = lambda key: settings.get(key, SETTINGS[key])  # noqa: E731
    groups, _ = unit_groups(model, verified)
    if not groups:
        return []  # no unit group between linear maps (spend no products)
    dtype, reason = dtype_name(model), rounding_reason(model, loss, batch)
    rows = []
    for g in groups[: get("discrete_groups")]:
        try:
            points = saddle_points(model, loss, batch, g, units=get("discrete_units"), top_k=get("discrete_top_k"),
                                   max_iter=get("discrete_max_iter"), seed=spec.seed)
        except ValueError:  # the group's modules are called more than once, or tokens do not line up: no rows
            continue
        for p in points:
            rows += _rows_of(p, dtype, reason)
    return rows
