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

Columns: statistic = eigenvalue = the smallest Ritz value λ̂_min (eigen_residual its true residual),
predicted = the bound, residual = max(0, λ̂_min − bound) (the amount by which the bound fails; 0 with
slack), tolerance = Lanczos error + the bound's rounding, scale = the block's λ_max (its curvature scale).
"""
from __future__ import annotations

from eqlab.analyses.predictions.indefiniteness import indefiniteness_findings
from eqlab.pipeline.study import RunSpec

FINDING = "indefiniteness"
# own keys (the stage's max_iter is the alignment's): per-block Lanczos budget, its residual rule, and
# how many scale-invariant families get a row (the most stringent ones, largest ||g_S||^2/||theta_S||^2)
SETTINGS = {"indefinite_max_iter": 40, "indefinite_tol": 1e-3, "indefinite_max_blocks": 4}


def indefinite_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    rows = []
    for f in indefiniteness_findings(model, loss, batch, verified,
                                     max_iter=settings.get("indefinite_max_iter", SETTINGS["indefinite_max_iter"]),
                                     tol=settings.get("indefinite_tol", SETTINGS["indefinite_tol"]),
                                     seed=spec.seed,
                                     max_blocks=settings.get("indefinite_max_blocks",
                                                             SETTINGS["indefinite_max_blocks"])):
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "dtype": f.dtype, "probes": 1, "rank": None,
                     "eigenvalue": f.lambda_min, "eigen_residual": f.lambda_min_residual,
                     "statistic": f.lambda_min, "statistic_std": 0.0, "predicted": f.bound,
                     "residual": max(0.0, f.residual), "tolerance": f.tolerance, "scale": f.lambda_max,
                     "verdict": f.verdict, "tolerance_reason": f.tolerance_reason, "hvps": f.hvps})
    return rows
