"""Three-way verdicts for discovered transformations: exact, approximate, broken.

* exact: every identity holds within its rounding level (analyses.identities: tol = p_order·γ_n(u)·R) on
  the batch *and* on the batch with its floating inputs scaled ×3, and nothing in the op algebra breaks it
  (a symmetry of the model, not of one batch);
* approximate: a soft cause is on the path — a norm eps, a softcap — whose predicted size (from the traced
  tensors) is above the rounding level of the op it perturbs; the measured residual gives its size;
* broken: the algebra forbids it (a bounded or non-homogeneous activation: then it is broken even where the
  batch does not show it, and the reason says the numbers agree only locally), or it is violated for a
  reason named in its caveats (a shared parameter) or for none we know.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqlab.analyses.discover.algebra import Cause

EXACT, APPROXIMATE, BROKEN = "exact", "approximate", "broken"
INPUT_SCALE = 3.0  # the second batch: floating inputs ×3 (pre-activations reach bounds the batch may miss)


@dataclass
class Verdict:
    verdict: str
    cause: str          # "" | "eps" | "softcap" | "algebra" | "caveat" | "unidentified" | "inputs_x3" | "random"
    reason: str


def _worst(checks):
    return max(checks, key=lambda c: c.residual / c.tolerance if c.tolerance > 0 else float("inf"))


def classify(checks, caveats, u: float, random_loss: list[str]) -> Verdict:
    """The verdict of one candidate from its identity checks (one per order) on the batch."""
    holds = all(c.holds for c in checks)
    worst = max(c.residual for c in checks)
    w = _worst(checks)
    measured = f"measured residual {worst:.2e}, rounding level {w.tolerance:.1e} at order {w.order}"
    if random_loss and not holds:
        return Verdict(BROKEN, "random", "; ".join(random_loss) + f" ({measured})")
    causes = [c for c in caveats if isinstance(c, Cause) and c.matters(u)]
    hard = [c for c in causes if not c.soft]
    soft = [c for c in causes if c.soft]
    if hard:
        local = "; numerically unchanged on this batch only (local), not a symmetry of the model" if holds else ""
        return Verdict(BROKEN, hard[0].kind, "; ".join(hard) + local + f" ({measured})")
    if soft:
        under = "; within this check's rounding level, but nonzero in exact arithmetic" if holds else ""
        return Verdict(APPROXIMATE, soft[0].kind, "; ".join(soft) + under + f" ({measured})")
    if holds:
        return Verdict(EXACT, "", "")
    if caveats:
        return Verdict(BROKEN, "caveat", "; ".join(caveats) + f" ({measured})")
    return Verdict(BROKEN, "unidentified", f"violated for an unidentified reason ({measured})")


def scaled_inputs(batch, factor: float = INPUT_SCALE):
    """The batch with every floating input tensor ×factor, or None when no input is floating (token ids)."""
    inputs, targets = batch
    if torch.is_tensor(inputs):
        return (inputs * factor, targets) if inputs.is_floating_point() else None
    if isinstance(inputs, dict):
        if not any(torch.is_tensor(v) and v.is_floating_point() and k != "attention_mask" for k, v in inputs.items()):
            return None
        return {k: v * factor if torch.is_tensor(v) and v.is_floating_point() and k != "attention_mask" else v
                for k, v in inputs.items()}, targets
    return None


def finite_checks(model, loss, batch, transformations, seed: int = 0):
    """Order-0 checks only (the loss, or the outputs of an equivariance, at one finite group element per
    transformation), with the identities stage's own rounding level: what "changes the loss by more than
    rounding" means, at one forward per transformation (no HVP). Returns {name: IdentityCheck}.

    Uses the identity stage's context and order-0 check (analyses.identities: ``_Context``,
    ``_finite_residual``, ``_check``) so that the rounding model is the same one, not a copy."""
    from eqlab.analyses import identities as idt
    from eqlab.analyses.transforms import Continuous, GroupElement

    ctx = idt._Context(model, loss, batch, seed)
    out = {}
    for t in transformations:
        T = GroupElement(t, t.random_coeffs(ctx.gen, ctx.theta), 0.5) if isinstance(t, Continuous) else t
        out[t.name] = idt._check(t, 0, [idt._finite_residual(ctx, T)], 0, ctx)
    return out
