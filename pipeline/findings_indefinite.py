"""Findings 4: indefiniteness of normalised networks, the rows of one checkpoint (`findings` table).

For each verified scale-invariant family (BatchNorm scale, LayerNorm scale, pre-LN residual-stream
scale: a scale family whose generators are 0/1 projections), λ_min of the family's own Hessian block by
Lanczos against the bound −‖g_S‖²/(μ₊‖θ_S‖²) from its gradient (`analyses.predictions.indefiniteness`),
and one control row per classifier head (convex: λ_min = 0, must violate the bound by |bound|).
Cost per block: one Lanczos run from both ends (at most ``indefinite_max_iter`` HVPs) plus one HVP,
for at most ``indefinite_max_blocks`` families (the most stringent) and each head: ≈ 55-70 HVPs per
checkpoint on the default digits CNN (two BN blocks and the head, 0.6 s on one thread), 65 on a 1.15M
GPT-2 (gpt2_text, n_embd 288, LayerNorm eps 0). A transformer with LayerNorm eps > 0 has its residual
scale discovered as approximate, not verified, and so gets no rows from the verified list.

The whole Hessian, two more rows per checkpoint with a scale-invariant block (`hessian_indefiniteness`):

* ``indefinite_hessian_min`` (prediction): λ_min of the full H by Lanczos from both ends (random start, at
  most min(``indefinite_max_iter``, ``max_iter``) HVPs) against the sharpest block bound (R8 for the full
  H: λ_min(H) ≤ λ_min(H_PP) ≤ μ₋); symmetry = the family of that block, scale = λ_max(H). Its negative
  control is the convex head's block row above (the same bound on a PSD block).
* ``indefinite_negative_share`` (measurement, predicted and verdict NULL: the theory says the spectrum has
  negative mass, not how much): the SLQ estimate of tr(H₋)/tr|H| from ``probes`` Rademacher probes of
  min(``indefinite_slq_steps``, ``max_iter``) steps, statistic_std the probes' spread, tolerance the
  half-width of its quadrature enclosure (Chebyshev–Markov–Stieltjes, plus rounding), scale = ‖g_S‖ on the
  union of the scale-invariant blocks (the quantity to plot it against over checkpoints); the fraction of
  eigenvalues below −τ and tr(H₋)/dim with their brackets are in the reason text.
Extra cost: ≤ 40 + 2 × 20 HVPs of the full model per checkpoint (default settings); measured on the default
study's digits CNN (9,850 parameters, 64 examples) at step 0: 31 Lanczos + 40 SLQ products, 5.7 s on one
thread of a 2-core machine at load 7.6 (≈ 80 ms per product there; about what the block rows above cost).

Columns of the block rows: statistic = eigenvalue = the smallest Ritz value λ̂_min (eigen_residual its true residual),
predicted = the bound, residual = max(0, λ̂_min − bound) (the amount by which the bound fails; 0 with
slack), tolerance = Lanczos error + the bound's rounding, scale = the block's λ_max (its curvature scale).
"""
from __future__ import annotations

from eqlab.analyses.predictions.indefiniteness import hessian_indefiniteness, indefiniteness_findings
from eqlab.pipeline.study import RunSpec

FINDING = "indefiniteness"
HESSIAN_MIN, NEGATIVE_SHARE = "indefinite_hessian_min", "indefinite_negative_share"
ROW_FINDINGS = (FINDING, HESSIAN_MIN, NEGATIVE_SHARE)
# own keys (the stage's max_iter is the alignment's): per-block Lanczos budget, its residual rule, and
# how many scale-invariant families get a row (the most stringent ones, largest ||g_S||^2/||theta_S||^2)
SETTINGS = {"indefinite_max_iter": 40, "indefinite_tol": 1e-3, "indefinite_max_blocks": 4,
            "indefinite_slq_steps": 20}  # SLQ Lanczos steps per probe (probes: the stage's `probes`)


def _get(settings: dict, key: str):
    return settings.get(key, SETTINGS[key])


def indefinite_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    max_iter, tol = _get(settings, "indefinite_max_iter"), _get(settings, "indefinite_tol")
    blocks = indefiniteness_findings(model, loss, batch, verified, max_iter=max_iter, tol=tol, seed=spec.seed,
                                     max_blocks=_get(settings, "indefinite_max_blocks"))
    rows = []
    for f in blocks:
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "dtype": f.dtype, "probes": 1, "rank": None,
                     "eigenvalue": f.lambda_min, "eigen_residual": f.lambda_min_residual,
                     "statistic": f.lambda_min, "statistic_std": 0.0, "predicted": f.bound,
                     "residual": max(0.0, f.residual), "tolerance": f.tolerance, "scale": f.lambda_max,
                     "verdict": f.verdict, "tolerance_reason": f.tolerance_reason, "hvps": f.hvps})
    if not any(not f.control for f in blocks):
        return rows  # no scale-invariant block: no prediction for the full H either
    cap = settings.get("max_iter")  # the stage's Lanczos budget bounds these runs too
    h = hessian_indefiniteness(model, loss, batch, verified, blocks, probes=int(settings.get("probes", 2)),
                               steps=min(_get(settings, "indefinite_slq_steps"), cap or 10**9),
                               max_iter=min(max_iter, cap or 10**9), tol=tol, seed=spec.seed)
    family = next(f.family for f in blocks if f.transformation == h.bound_block)
    lz = (f"converged and verified: eigenvalue bound {h.lambda_min_error:.2e}" if h.converged else
          f"NOT converged in {h.lanczos_hvps} HVPs: tolerance widened by the true residual {h.lambda_min_error:.2e}")
    rows.append({"finding": HESSIAN_MIN, "transformation": "hessian", "symmetry": family, "control": False,
                 "dtype": h.dtype, "probes": 1, "rank": None, "eigenvalue": h.lambda_min,
                 "eigen_residual": h.lambda_min_residual, "statistic": h.lambda_min, "statistic_std": 0.0,
                 "predicted": h.bound, "residual": max(0.0, h.residual), "tolerance": h.tolerance,
                 "scale": h.lambda_max, "verdict": h.verdict, "hvps": h.lanczos_hvps,
                 "tolerance_reason": (f"lambda_min of the full Hessian ({h.dim} params) by Lanczos from a random start, "
                                      f"{lz}; bound = the sharpest block's Ritz value mu_- ({h.bound_block}) with its "
                                      f"rounding {h.bound_rounding:.1e}; lambda_min(H) <= lambda_min(H_PP) <= mu_- "
                                      f"(interlacing); control: the convex head's block row")})
    share, s_lo, s_hi = h.share
    neg, n_lo, n_hi = h.negative_part
    frac, f_lo, f_hi = h.fraction
    rows.append({"finding": NEGATIVE_SHARE, "transformation": "hessian", "symmetry": family, "control": False,
                 "dtype": h.dtype, "probes": h.probes, "rank": None, "eigenvalue": h.lambda_min,
                 "eigen_residual": h.lambda_min_residual, "statistic": share, "statistic_std": h.share_std,
                 "predicted": None, "residual": None, "tolerance": max(share - s_lo, s_hi - share),
                 "scale": h.grad_s_norm, "verdict": None, "hvps": h.slq_hvps,
                 "tolerance_reason": (f"measurement, no prediction (the theory says H has negative mass when "
                                      f"g_S != 0, not how much): SLQ share tr(H-)/tr|H| over {h.probes} Rademacher "
                                      f"probes x {h.steps} Lanczos steps, enclosure [{s_lo:.4g}, {s_hi:.4g}] from the "
                                      f"Chebyshev-Markov-Stieltjes bracket of each probe's Gauss rule plus rounding "
                                      f"tau = 8 gamma_n ||H|| = {h.tau:.1e}; statistic_std = the probes' spread "
                                      f"(Monte Carlo); tr(H-)/dim = {neg:.4g} in [{n_lo:.4g}, {n_hi:.4g}]; fraction "
                                      f"below -tau = {frac:.4g} in [{f_lo:.4g}, {f_hi:.4g}] (wide where the null "
                                      f"space's atom at 0 sits next to -tau); scale = ||g_S|| = {h.grad_s_norm:.4g} "
                                      f"on the scale-invariant blocks (||theta_S|| = {h.theta_s_norm:.4g}); "
                                      f"smallest Gauss node {h.smallest_node:.4g}")})
    return rows
