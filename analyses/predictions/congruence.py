"""Block curvature along a symmetry orbit (rows 2c, 6d / R11) and the Linear→LayerNorm symmetries (3a, 3b).

Orbit congruence: a symmetry that multiplies block B by c_B (θ_B → c_Bθ_B) is a linear T with
L(Tθ) = L(θ), so (D1)/(D2) give g_B(Tθ) = g_B(θ)/c_B and H_BB(Tθ) = H_BB(θ)/c_B² exactly, at every θ.
Row 2c: a scale-invariant block (BN/LN-preceded weights) rescaled by λ, H_SS → λ^{-2}H_SS.
Row 6d: (W_Q, W_K) → (cW_Q, W_K/c), H_QQ → c^{-2}H_QQ and H_KK → c²H_KK: block sharpness is a coordinate
on the orbit (set by the conserved imbalance), not intrinsic. Compared on the dense block matrices, their
λ_max, and a Lanczos λ_max of the block operator (the HVP path a large model would use).
"""
from __future__ import annotations

import math

import torch

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.identities import check_all
from eqlab.analyses.predictions._common import Prediction, dense_at, rel, with_params
from eqlab.analyses.transforms import ScaleFamily, TranslationFamily


def _lanczos_max(model, loss, batch, names) -> float:
    op = HessianOperator(model, loss, batch, names=names, method="double_backward", dtype=torch.float64,
                         conv="native")  # a fixed, untimed path for exactness checks
    return float(lanczos(op.matvec, op.dim, k=1, which="LA", tol=1e-12).eigenvalues[0])


def block_congruence(model, loss, batch, scales: dict, blocks: dict) -> dict:
    """Rescale θ_n → scales[n]·θ_n; for each block (label → names sharing one factor c) compare, before and
    after: λ_max ratio (dense and Lanczos) vs 1/c², the whole block matrix c²H'_BB vs H_BB, and c·g'_B vs
    g_B. Also the loss change (0 for a symmetry). Returns {"loss": Prediction, label: [Predictions]}."""
    params = dict(model.named_parameters())
    moved = with_params(model, {n: c * params[n].detach() for n, c in scales.items()})
    out = {}
    for label, names in blocks.items():
        cs = {scales.get(n, 1.0) for n in names}
        if len(cs) != 1:
            raise ValueError(f"block {label} mixes factors {cs}")
        c = cs.pop()
        A, B = dense_at(model, loss, batch, names), dense_at(moved, loss, batch, names)
        # the operator's own loss: evaluated on an analysis copy (no BN running-stat side effects)
        out["loss"] = Prediction("R11", "loss change", B.loss, A.loss, abs(B.loss - A.loss) / max(abs(A.loss), 1e-300))
        ratio, pred = float(B.evals.max() / A.evals.max()), c ** -2
        lr = _lanczos_max(moved, loss, batch, names) / _lanczos_max(model, loss, batch, names)
        out[label] = [
            Prediction("R11", f"lambda_max ratio {label} (dense)", ratio, pred, abs(ratio - pred) / pred,
                       details={"c": c, "lambda_max": float(A.evals.max())}),
            Prediction("R11", f"lambda_max ratio {label} (Lanczos)", lr, pred, abs(lr - pred) / pred),
            Prediction("R11", f"c^2 H_BB(T theta) vs H_BB(theta), {label}", 0.0, 0.0, rel(c * c * B.H, A.H)),
            Prediction("R11", f"c g_B(T theta) vs g_B(theta), {label}", 0.0, 0.0, rel(c * B.grad, A.grad)),
        ]
    return out


# ------------------------------------------------------------------------------------------- rows 3a/3b
def linear_ln_families(linear: str, shapes: dict) -> tuple[ScaleFamily, TranslationFamily]:
    """For a Linear whose whole output is an LN's whole input: the joint scale of (W, b) (row 3a; exact only
    for eps = 0) and the shift W → W + 1uᵀ, b → b + c1 (row 3b; exact for any eps: LN subtracts the mean)."""
    w, b = f"{linear}.weight", f"{linear}.bias"
    scale = ScaleFamily(f"ln_scale[{linear}]", "ln_scale", [[[w, None, None, 1.0], [b, None, None, 1.0]]])
    shift = TranslationFamily(f"ln_translation[{linear}]", "ln_translation",
                              [[w, 0, None, "broadcast"], [b, 0, None, "broadcast"]],
                              {w: list(shapes[w]), b: list(shapes[b])})
    return scale, shift


def linear_ln_checks(model, loss, batch, linear: str, probes: int = 2) -> dict:
    """check_all (orders 0-2) of both families; one Prediction per family with the worst order residual."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = {}
    for t, row in zip(linear_ln_families(linear, shapes), ("3a", "3b")):
        checks = check_all(model, loss, batch, [t], probes=probes)
        worst = max(checks, key=lambda ch: ch.residual)
        out[row] = Prediction(row, f"{t.family}: worst identity residual (orders 0-2)", worst.residual, 0.0,
                              worst.residual, details={"order": worst.order,
                                                       **{f"order{ch.order}": ch.residual for ch in checks}})
    return out
