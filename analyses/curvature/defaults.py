"""One table of curvature-engine defaults per dtype: `lanczos`, `slq`, the trace estimators, the
`eqlab spectrum` CLI and the study's `SpectraSpec` all read their defaults from here.

The dtype is the one the *products* H·v are computed in (a float32 model gives float32 HVPs even when
the Krylov basis is float64), because that is what limits the accuracy a residual can reach.

Tolerance (`tol`, relative to max|θ|): √eps of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
  * Enough: a Ritz pair with residual r has eigenvalue error ≤ r²/gap (module doc of `lanczos`), so
    r = √eps·‖H‖ gives an eigenvalue error ≈ eps·‖H‖²/gap: the dtype's own rounding of λ for gaps of
    order ‖H‖. Smaller residuals do not make the eigenvalues more accurate than the products are.
  * Reachable: an HVP computed in the dtype carries an error ≈ c·eps·‖H‖ (c grows like √(terms summed),
    measured c ≈ 0.5 on the test models: float32 residual floors 2–6e-8·max|θ|); √eps leaves a factor
    1/√eps (≈ 3000 in float32) above that floor, so c may be that large before the default stalls.
  * Not reachable: below `min_tol` = 4·eps the residual is under the rounding of the product itself;
    `lanczos` raises ValueError rather than spending max_iter products to report nothing converged.

Budgets (the same in every dtype: they are about the spectrum, not rounding):
  * ``max_iter`` 300 Lanczos products (a cap: runs stop when converged, 20–60 products on the test models).
  * SLQ 40 steps × 4 probes: a Gauss rule of 40 nodes per probe (exact for polynomials of degree 79), with
    4 probes as the smallest number whose spread gives a usable error estimate; 160 HVPs.
  * Trace 30 products (Hutch++: 10 sketch, 10 exact, 10 Hutchinson).
"""
from __future__ import annotations

from dataclasses import dataclass

# No torch at import: the CLI builds its parser (and these defaults) before deciding to load torch.
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


@dataclass(frozen=True)
class Defaults:
    dtype: str
    eps: float
    tol: float          # lanczos residual tolerance relative to max|θ| (√eps)
    min_tol: float      # below this no residual of a product in this dtype can be measured (4·eps)
    max_iter: int       # lanczos product cap
    slq_steps: int
    slq_probes: int
    trace_matvecs: int


def _row(name: str) -> Defaults:
    eps = EPS[name]
    return Defaults(dtype=name, eps=eps, tol=float(f"{eps ** 0.5:.2g}"),
                    min_tol=4 * eps, max_iter=300, slq_steps=40, slq_probes=4, trace_matvecs=30)


TABLE: dict[str, Defaults] = {name: _row(name) for name in ("float64", "float32")}


def as_dtype(dtype):
    """A torch dtype from a torch dtype or its name ("float32"); None if it is neither."""
    import torch
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        d = getattr(torch, dtype.replace("torch.", ""), None)
        return d if isinstance(d, torch.dtype) else None
    return None


def for_dtype(dtype) -> Defaults:
    """The row for ``dtype`` (a torch dtype or its name); lower precisions (float16, bfloat16) get a row
    built from their own eps by the same rules."""
    name = dtype if isinstance(dtype, str) and dtype in EPS else None
    if name is None:
        d = as_dtype(dtype)
        name = str(d).replace("torch.", "") if d is not None else None
    if name not in EPS:
        raise ValueError(f"not a floating dtype with a defaults row: {dtype!r}")
    return TABLE.get(name) or _row(name)


def product_dtype(matvec, fallback):
    """The dtype an operator computes its products in: ``matvec.__self__.dtype`` (a `HessianOperator`, a
    sharded pool) or ``.dtype`` of the callable itself when it has one, else ``fallback``."""
    for owner in (getattr(matvec, "__self__", None), matvec):
        d = as_dtype(getattr(owner, "dtype", None)) if owner is not None else None
        if d is not None and d.is_floating_point:
            return d
    import torch
    return as_dtype(fallback) or torch.float64
