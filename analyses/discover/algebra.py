"""What an op's algebra allows, decided before any number is compared, and the causes that break a candidate.

A transformation is a symmetry of the *model*, not of one batch: a ReLU6 rescale leaves the loss unchanged
on a batch whose pre-activations never reach 6, and is still not a symmetry. So the properties that make a
rescale or a sign flip exact are read off the op and its arguments:

* positively 1-homogeneous, σ(αx) = ασ(x) for α > 0: relu, leaky_relu (any slope), a clamp / hardtanh
  whose finite bounds are all 0 (a bound b ≠ 0 moves to αb) — relu6 / hardtanh(0, 6) / clamp(max=6) are not;
* odd, σ(−x) = −σ(x): tanh, softsign, sin, a hardtanh / clamp with bounds (−c, c).

A `Cause` is a caveat string that also says *how* it breaks the candidate: ``soft`` causes (a norm's eps,
a logit softcap) leave a measurable but small violation whose predicted size is ``size`` (relative, from the
traced tensors), so the candidate is *approximate*; hard causes (the algebra above) make it *broken*
whatever the batch shows.
"""
from __future__ import annotations

import math

import torch

HOMOGENEOUS_ALWAYS = {"relu", "relu_", "leaky_relu"}
ODD_ALWAYS = {"tanh", "softsign", "sin"}
_BOUNDED = {"hardtanh": ((1, "min_val", -1.0), (2, "max_val", 1.0)),
            "clamp": ((1, "min", None), (2, "max", None)),
            "clamp_min": ((1, "min", None), None), "clamp_max": (None, (1, "max", None))}


class Cause(str):
    """A caveat (its text) that is also a reason: kind ("eps", "softcap", "algebra"), soft or hard, and for a
    soft one the predicted relative size of the violation (None when unknown)."""

    def __new__(cls, text: str, kind: str, soft: bool, size: float | None = None, m: int = 1):
        obj = super().__new__(cls, text)
        obj.kind, obj.soft, obj.size, obj.m = kind, soft, size, m   # m: entries the size is computed over
        return obj

    def matters(self, u: float) -> bool:
        """A hard cause always does; a soft one when its predicted size is unknown or above the rounding
        level γ_{m+1}(u) of the op it perturbs (eps = 1e-20 on Var ~ 1e-3 is below float64 rounding)."""
        return not self.soft or self.size is None or self.size > rounding_level(u, self.m)


def _bounds(op):
    """(low, high) of a clamp-like op (None: unbounded on that side), or None when op is not one."""
    if op.name == "relu6":
        return 0.0, 6.0
    spec = _BOUNDED.get(op.name)
    if spec is None:
        return None
    out = []
    for s in spec:
        if s is None:
            out.append(None)
            continue
        v = op.arg(s[0], s[1], s[2])
        out.append(None if v is None or (torch.is_tensor(v) and v.numel() != 1) else float(v))
    return tuple(out)


def activation_algebra(op) -> tuple[bool, bool, str]:
    """(positively homogeneous, odd, why not homogeneous — "" when it is) of an elementwise activation op."""
    name = op.name
    if name in HOMOGENEOUS_ALWAYS:
        return True, False, ""
    if name == "relu6":
        return False, False, "relu6 = min(max(x, 0), 6) has the finite bound 6: not positively homogeneous " \
                             "(σ(αx) ≠ ασ(x) wherever αx > 6)"
    b = _bounds(op)
    if b is not None:
        lo, hi = b
        finite = [v for v in (lo, hi) if v is not None and math.isfinite(v)]
        odd = lo is not None and hi is not None and lo == -hi
        if all(v == 0.0 for v in finite):
            return True, odd and not finite, ""
        bound = ", ".join(f"{v:g}" for v in finite)
        return False, odd, (f"{name} has the finite bound(s) {bound}: not positively homogeneous "
                            "(σ(αx) ≠ ασ(x) wherever αx passes a bound)")
    return False, name in ODD_ALWAYS, f"activation {name} is not positively homogeneous (σ(αx) ≠ ασ(x))"


def local_region(op) -> str:
    """Where a bounded activation's traced input lies relative to its bounds (why a batch may not see it)."""
    b = _bounds(op)
    if b is None:
        return ""
    x = op.leaves[op.tensor_positions()[0]]
    lo, hi = float(x.min()), float(x.max())
    return f"traced pre-activations lie in [{lo:.3g}, {hi:.3g}], bounds {b[0]}, {b[1]}"


def algebra_cause(op) -> Cause | None:
    """A hard cause when the activation op is not positively homogeneous, else None."""
    homogeneous, _, why = activation_algebra(op)
    if homogeneous:
        return None
    region = local_region(op)
    return Cause(why + (f" ({region})" if region else ""), "algebra", soft=False)


def _norm_length(op) -> int:
    x = op.leaves[op.tensor_positions()[0]]
    return int(x.numel() // x.shape[1]) if op.name == "batch_norm" else int(x.shape[-1])


def eps_effect(op) -> float | None:
    """Predicted relative violation of a normalisation's scale invariance by its eps, from the input the op
    was traced on: max over the normalised groups of eps / (Var + eps) (rms_norm: mean(x²) for Var), the
    factor by which eps shifts the normaliser's derivative in the scale. None when it cannot be read."""
    try:
        if op.name == "batch_norm":
            x, eps = op.arg(0, "input"), float(op.arg(7, "eps", 1e-5))
            dims = [d for d in range(x.dim()) if d != 1]
            var = x.double().var(dim=dims, unbiased=False)
        elif op.name == "layer_norm":
            x, eps = op.arg(0, "input"), float(op.arg(4, "eps", 1e-5))
            var = x.double().var(dim=-1, unbiased=False)
        elif op.name == "rms_norm":
            x, eps = op.arg(0, "input"), op.arg(3, "eps", None)
            eps = 0.0 if eps is None else float(eps)
            var = x.double().pow(2).mean(-1)
        else:
            return None
    except (TypeError, ValueError, RuntimeError):
        return None
    if eps == 0.0:
        return 0.0
    return float((eps / (var + eps)).max())


def eps_cause(op, text: str) -> Cause:
    size = eps_effect(op)
    suffix = f" (predicted ~{size:.1e} from the traced input)" if size else ""
    return Cause(text + suffix, "eps", soft=True, size=size, m=_norm_length(op))


def rounding_level(u: float, m: int) -> float:
    """γ_{m+1}(u): the relative rounding of one normalisation over m entries (Higham §3.1), the level below
    which a predicted eps effect cannot be told from rounding."""
    nu = (m + 1) * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf
