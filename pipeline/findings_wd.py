"""Finding 1 under weight decay: the Rayleigh quotient 2γ of a symmetry direction at a stationary point of
L + γ/2‖θ‖² (`analyses.predictions.wd_stationary`), the rows of one checkpoint (`findings` table).

γ is the run's weight decay when it has one, else ``wd_gamma``: the statement holds for every γ > 0, and
the checkpoint is only where the relaxation starts (an optimizer's own fixed point, e.g. AdamW's decoupled
decay, is not a stationary point of L_γ, so every row relaxes). Per checkpoint, at most ``wd_max_families``
families (those nearest the output first), each relaxed by at most 5 × ``wd_lbfgs_iter`` L-BFGS iterations
over its own parameters, then 2 HVPs per probe and one for the curvature scale.
Measured: ≈ 1.3 s per checkpoint on the modular-addition GPT-2, 2.5 s on the digits CNN, 19 s on the 1.15M
GPT-2 (one thread).

Columns: statistic = ρ(ξ) (mean over probes), predicted = the identity's 2γ − ⟨A²θ, g_γ⟩/‖ξ‖² (2γ at a
stationary point; mean over probes), residual = |ρ − predicted| at the worst probe, tolerance = its
rounding (see the reason text), scale = κ; a relaxed point whose remainder exceeds 1% of 2γ gives
``inconclusive`` (not stationary enough), with its ‖g_γ‖ and remainder in the reason.
"""
from __future__ import annotations

from eqlab.analyses.predictions.wd_stationary import wd_stationary_findings
from eqlab.pipeline.study import RunSpec

FINDING = "wd_stationary_rayleigh"
SETTINGS = {"wd_gamma": 0.01, "wd_max_families": 1, "wd_lbfgs_iter": 100}


def wd_stationary_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    gamma = float(spec.weight_decay) if spec.weight_decay > 0 else float(settings["wd_gamma"])
    rows = []
    for f in wd_stationary_findings(model, loss, batch, verified, gamma, probes=settings["probes"], seed=spec.seed,
                                    max_families=settings["wd_max_families"], lbfgs_iter=settings["wd_lbfgs_iter"]):
        w = f.worst
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "dtype": f.dtype, "probes": len(f.probes), "rank": None,
                     "statistic": f.statistic, "statistic_std": f.statistic_std, "predicted": f.prediction,
                     "residual": abs(w.rayleigh - w.predicted), "tolerance": w.tolerance,
                     "scale": w.curvature_scale, "verdict": f.verdict, "hvps": f.n_hvp,
                     "tolerance_reason": ("" if spec.weight_decay > 0 else f"the run has no weight decay: "
                                          f"gamma = wd_gamma = {gamma:g}; ") + f.tolerance_reason})
    return rows
