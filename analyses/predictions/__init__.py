"""Catalog predictions (theory.md §5) as functions returning `Prediction` records (measured, predicted,
relative residual), dense float64 ground truth; pure torch, one module per group:

* spectral      — rows 12, 13, 15, 16 (exact at every θ)
* congruence    — rows 2c, 6d/R11 (block sharpness along a symmetry orbit), 3a/3b (Linear→LN)
* critical      — rows 5c/17/R5-WD, 6c, 8, 9c, 11b (weight decay, critical points, interpolation)
"""
from eqlab.analyses.predictions._common import Dense, Prediction, dense_at, rel, to_critical_point

__all__ = ["Dense", "Prediction", "dense_at", "rel", "to_critical_point"]
