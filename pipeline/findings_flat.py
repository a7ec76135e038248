"""Findings 1: flat and sharp symmetry directions, the rows of one checkpoint (`findings` table).

For each verified continuous family, the Hessian's Rayleigh quotient along random generators against
the second-order identity's prediction (`analyses.predictions.flat_directions`), plus a control row of
random directions of the same norms. 2 HVPs per probe per family, plus one for the curvature scale.
"""
from __future__ import annotations

from eqlab.analyses.predictions.flat_directions import flat_direction_findings
from eqlab.pipeline.study import RunSpec

FINDING = "flat_symmetry_direction"


def flat_direction_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    rows = []
    for f in flat_direction_findings(model, loss, batch, verified, probes=settings["probes"], seed=spec.seed):
        w = f.worst
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "dtype": f.dtype, "probes": len(f.probes),
                     "statistic": f.statistic, "statistic_std": f.statistic_std, "predicted": f.prediction,
                     "residual": abs(w.rayleigh - w.predicted), "tolerance": w.tolerance,
                     "scale": w.curvature_scale, "verdict": f.verdict, "tolerance_reason": f.tolerance_reason,
                     "hvps": f.n_hvp})
    return rows
