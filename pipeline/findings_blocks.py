"""Finding 3: curvature anisotropy across blocks and along symmetry orbits, the rows of one checkpoint.

README text. *Prediction:* moving along a rescaling orbit by c (a ReLU unit group's w_in → c·w_in, w_out →
w_out/c; a head's W_Q → cW_Q, W_K → W_K/c; a BatchNorm-scaled filter → c·w) multiplies each affected block's
Hessian, and so its top eigenvalue, by exactly c^{−2} or c² (log–log slope 1 of the sharpness ratio against
the norm ratio along the orbit), while across the heads or unit groups of a layer the same slope is the
empirical question of whether the conserved imbalance explains block heterogeneity. *Measured:* per block,
Lanczos on the block operator P_B H P_Bᵀ (one HVP per product) gives λ_max at every checkpoint; the moved
point's Rayleigh quotient along the transported top eigenvector gives the ratio (rounding-only tolerance, a
one-sided move as the control), and a least-squares slope with a 95% t-interval across groups tests the
imbalance.

Registered as one finding, ``block_anisotropy`` (``FINDING``), whose rows carry three ``finding`` names
(``ROW_FINDINGS``; `analyses.predictions.block_anisotropy`):

* ``block_sharpness``: one row per block (``transformation`` = the block, e.g.
  ``qk_gl[transformer.h.0.attn.c_attn][head 1]:K``), ``statistic`` = ``eigenvalue`` = its λ_max,
  ``eigen_residual`` the true Lanczos residual, ``scale`` = ‖θ_B‖². A measurement, not a prediction:
  ``predicted``, ``residual``, ``tolerance`` and ``verdict`` are NULL (the blocks × checkpoints heatmap).
* ``block_orbit_congruence``: per moved block and move (``transformation`` = ``<block> @ <move>``), ρ'/ρ
  against c^{−2e}; ``eigenvalue`` = λ_max before, ``scale`` = |1 − predicted| (what a "no change" answer
  would miss by). Controls: the one-sided move.
* ``block_sharpness_imbalance``: the slope along the c = 2 orbit (exact, 1 or −1; control: one-sided move)
  per group, and across the groups/heads of a family (empirical; control: shuffled pairing), ``probes`` =
  points in the fit, ``statistic_std`` its standard error, ``tolerance`` the 95% half-width.

Cost per checkpoint: Σ over blocks of one Lanczos (≈ 6–12 products at tol 1e-2 with its verification block)
plus one product for ρ, plus ≈ 1 + 1 + 2 products per moved block (c = 2, balanced, control). Measured at
step 0 of the default study's models (64 examples, 3 unit groups, 1 moved group per family): 287 products
(5.4 s on 2 busy cores) on the digits CNN (24 blocks over 5 families) and 136 (0.7 s) on the 1-layer GPT-2
(14 blocks: ReLU MLP groups, Q/K and V/O per head). ``block_families`` and ``unit_groups`` narrow it.
"""
from __future__ import annotations

import math

from eqlab.analyses.predictions.block_anisotropy import block_findings
from eqlab.pipeline.study import RunSpec

# the name the findings stage registers (and a study's [findings] include picks); the rows carry three
FINDING = "block_anisotropy"
ROW_FINDINGS = ("block_sharpness", "block_orbit_congruence", "block_sharpness_imbalance")
SHARPNESS, CONGRUENCE, IMBALANCE = ROW_FINDINGS
# families moved by default: the catalog rows of this finding (5a ReLU, 6d Q/K, 7a V/O, 2c BN scale, 3a/4a
# LN and RMSNorm scale blocks: the pre-norm residual stream, per-head QK-norm); LN-gain and GLU rescales
# (5e) are eligible too but left out of the default for cost (add them to block_families)
FAMILIES = ("relu_rescale", "qk_gl", "vo_gl", "bn_scale", "ln_scale", "ln_residual_scale", "rms_residual_scale",
            "qk_norm_head_scale")
SETTINGS = {"unit_groups": 3, "block_tol": 1e-2, "block_max_iter": 20, "after_iter": 2, "move_groups": 1,
            "block_families": FAMILIES}


def _get(settings: dict, key: str):
    return settings.get(key, SETTINGS[key])


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def block_rows(spec: RunSpec, model, loss, batch, verified, settings: dict) -> list[dict]:
    fams = _get(settings, "block_families")
    r = block_findings(model, loss, batch, verified, unit_groups=_get(settings, "unit_groups"),
                       tol=_get(settings, "block_tol"), max_iter=_get(settings, "block_max_iter"),
                       after_iter=_get(settings, "after_iter"), move_groups=_get(settings, "move_groups"),
                       families=None if fams is None else tuple(fams), seed=spec.seed)
    rows = []
    for s in r.sharpness:
        rows.append({"finding": SHARPNESS, "transformation": s.block, "symmetry": s.family, "control": False,
                     "dtype": r.dtype, "probes": 1, "rank": 0, "eigenvalue": s.lam, "eigen_residual": s.residual,
                     "statistic": s.lam, "statistic_std": None, "predicted": None, "residual": None,
                     "tolerance": None, "scale": s.norm2, "verdict": None, "hvps": s.hvps,
                     "tolerance_reason": (f"measurement, no prediction: the block's top Hessian eigenvalue by "
                                          f"Lanczos on its block operator ({'certified' if s.converged else 'NOT converged'}"
                                          f", {s.hvps} products); scale = ||theta_B||^2")})
    for c in r.congruence:
        rows.append({"finding": CONGRUENCE, "transformation": f"{c.block} @ {c.move}", "symmetry": c.family,
                     "control": c.control, "dtype": r.dtype, "probes": 1, "rank": 0, "eigenvalue": c.lam,
                     "eigen_residual": c.lam_residual, "statistic": c.statistic, "statistic_std": 0.0,
                     "predicted": c.predicted, "residual": c.residual, "tolerance": c.tolerance,
                     "scale": abs(1.0 - c.predicted), "verdict": c.verdict, "tolerance_reason": c.reason,
                     "hvps": c.hvps})
    for s in r.slopes:
        rows.append({"finding": IMBALANCE, "transformation": s.name, "symmetry": s.family, "control": s.control,
                     "dtype": r.dtype, "probes": s.n, "rank": None, "eigenvalue": None, "eigen_residual": None,
                     "statistic": _finite(s.statistic), "statistic_std": _finite(s.std), "predicted": s.predicted,
                     "residual": _finite(s.residual), "tolerance": _finite(s.tolerance), "scale": abs(s.predicted),
                     "verdict": s.verdict, "tolerance_reason": s.reason, "hvps": 0})
    return rows
