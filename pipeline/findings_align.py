"""Findings 2: gradient–Hessian alignment rows at one checkpoint (`analyses.predictions.gradient_alignment`).

The top eigenpairs are computed here, in float64 on the findings batch (the spectra stage keeps only
eigenvalues, and on its own batch and dtype), by Lanczos on the exact HVP operator; each pair's true
residual enters the tolerance, so an unconverged pair widens it instead of faking a violation.
"""
from __future__ import annotations

import torch

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.predictions.gradient_alignment import alignment_findings
from eqlab.analyses.transforms import Continuous
from eqlab.pipeline.study import RunSpec

FINDING = "gradient_hessian_alignment"


def top_eigenpairs(model, loss, batch, k: int, max_iter: int, seed: int):
    """(eigenvalues, unit eigenvectors as parameter dicts, true residuals, HVPs) of the top k, float64."""
    op = HessianOperator(model, loss, batch, method="double_backward", dtype=torch.float64)
    res = lanczos(op.matvec, op.dim, k=min(k, op.dim), which="LA", max_iter=max_iter, seed=seed, warn=False)
    Y = res.eigenvectors if res.eigenvectors.shape[0] == op.dim else res.eigenvectors.T
    vecs = [op.space.unflatten(Y[:, i].to(torch.float64)) for i in range(Y.shape[1])]
    return [float(x) for x in res.eigenvalues], vecs, res.residuals, res.n_matvec


def alignment_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    if not any(isinstance(t, Continuous) for t in verified):
        return []  # nothing to align: spend no Lanczos products
    lams, vecs, residuals, hvps = top_eigenpairs(model, loss, batch, settings["top_k"], settings["max_iter"],
                                                 spec.seed)
    rows = []
    for f in alignment_findings(model, loss, batch, verified, lams, vecs, residuals, probes=settings["probes"],
                                seed=spec.seed):
        w = f.worst
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "rank": f.rank, "eigenvalue": f.eigenvalue,
                     "eigen_residual": f.eigen_residual, "dtype": f.dtype, "probes": len(f.probes),
                     "statistic": f.statistic, "statistic_std": f.statistic_std, "predicted": f.prediction,
                     "residual": abs(w.measured - w.predicted), "tolerance": w.tolerance,
                     "scale": abs(f.eigenvalue), "verdict": f.verdict, "tolerance_reason": f.tolerance_reason,
                     "hvps": hvps})
    return rows
