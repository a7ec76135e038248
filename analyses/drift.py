"""How the one-step drift of a conserved quantity scales with the learning rate across an lr sweep
(issue 11, finding 5: conservation under real optimizers). Plain numpy.

`analyses.conservation` gives the exact one-step change of Q for SGD, ΔQ = a²Q − aη[B(θ,u)+B(u,θ)] + η²Q(u)
with B(θ,g) + B(g,θ) = 0: with an exact symmetry and no weight decay (a = 1) the O(η) term vanishes and
‖ΔQ‖ ∝ η², so log‖ΔQ‖ against log η has slope 2. Adam's update u is not annihilated by B(θ, ·) and weight
decay makes a = 1 − ηλ: the O(η) term stays and the slope is 1. This module fits that slope.

**The fit.** Points (η_i, ‖ΔQ‖_i) come in *cells* (a checkpoint of one seed): within a cell the runs of
the sweep differ in η only at step 0 (same init, same minibatch, empty optimizer state) and by their
trajectories later, so each cell gets its own intercept (a fixed effect) and only the slope is shared:
log‖ΔQ‖ = p·log η + b_cell + ε. The slope's standard error is the larger of the pooled least-squares one
(n − cells − 1 degrees of freedom) and a bootstrap over cells (whole checkpoints resampled), so a
between-checkpoint scatter of the slope counts even where each cell is fitted exactly.

**The model-error margin.** "slope p" is the small-η limit; the next order of the expansion makes the
local slope s(η) = d log‖ΔQ‖/d log η = p + kη (Adam's η²Q(u) term; at later checkpoints the trajectories'
O(η·t) difference). A fit over a sweep averages s(η) over its learning rates, so it is off from p by at
most |k|·η_max. With three or more learning rates k is measured: the local slope of the two smallest
against that of the two largest, k = (s_hi − s_lo)/(η̄_hi − η̄_lo) at the pairs' geometric-mean η. With two
learning rates the margin cannot be measured and stays NaN.

**Rounding.** A point whose change is at or below its rounding level (the conservation stage's worst-case
bound) carries no drift (a translation's Q under SGD is conserved exactly: ΔQ is rounding noise) and is
left out; a kept point's log has an uncertainty δ = level / ‖ΔQ‖, which moves the slope by at most
Σ|x̃_i|δ_i / Σx̃_i² (x̃: log η minus its cell's mean).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

VERDICTS = ("holds", "violated", "inconclusive")
SGD_SLOPE, ADAM_SLOPE = 2.0, 1.0  # ΔQ = O(η²) with an exact symmetry under plain SGD; O(η) otherwise
# A 3-sigma band: a correct law is called violated by chance with probability ~0.3 % (Gaussian errors).
SIGMAS = 3.0
# Bootstrap resamples: the relative Monte-Carlo error of a standard deviation from B draws is
# 1/sqrt(2(B − 1)); B = 201 keeps it at 5 %, well inside the factor 3 of the band above.
BOOTSTRAP = 201


@dataclass
class DriftFit:
    slope: float                 # fitted p (NaN: fewer than two learning rates with a resolved drift)
    se: float                    # its standard error: max(pooled least squares, bootstrap over cells)
    se_ols: float
    se_boot: float
    margin: float                # model-error margin |k|·η_max (NaN with fewer than three learning rates)
    rounding: float              # the slope's worst-case shift from the points' rounding
    n_points: int                # points in the fit
    n_cells: int                 # cells (checkpoints) with two learning rates or more
    lrs: tuple[float, ...]       # the distinct learning rates in the fit
    excluded: int = 0            # points left out: change at or below its rounding level, or not finite
    local_slopes: tuple = ()     # (s_lo, s_hi) of the two smallest / two largest learning rates
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.slope)


def _within(x: np.ndarray, y: np.ndarray, cells: np.ndarray):
    """x, y minus their cell means, over the cells that hold two distinct x or more (the others fix no slope)."""
    keep = np.zeros(len(x), bool)
    xt, yt = np.zeros_like(x), np.zeros_like(y)
    used = 0
    for c in np.unique(cells):
        m = cells == c
        if len(np.unique(x[m])) < 2:
            continue
        keep |= m
        used += 1
        xt[m], yt[m] = x[m] - x[m].mean(), y[m] - y[m].mean()
    return xt[keep], yt[keep], keep, used


def _slope(x, y, cells) -> tuple[float, float, int, int, np.ndarray, np.ndarray]:
    """(slope, pooled least-squares SE, points, cells, x̃, keep) of the fixed-effects fit."""
    xt, yt, keep, used = _within(x, y, cells)
    sxx = float(xt @ xt)
    if used == 0 or sxx <= 0:
        return math.nan, math.nan, 0, 0, xt, keep
    p = float(xt @ yt) / sxx
    dof = len(xt) - used - 1  # one intercept per cell and the shared slope
    se = math.nan
    if dof > 0:
        r = yt - p * xt
        se = math.sqrt(float(r @ r) / dof / sxx)
    return p, se, len(xt), used, xt, keep


def fit_drift_slope(lrs, changes, cells=None, levels=None, seed: int = 0) -> DriftFit:
    """Slope of log‖ΔQ‖ on log η with its uncertainty and model-error margin (module docstring).

    lrs, changes: one entry per point; cells: a label per point (the checkpoint it was measured at;
    default: one cell); levels: each point's rounding level of ‖ΔQ‖ (default 0)."""
    lr = np.asarray(lrs, float)
    ch = np.asarray(changes, float)
    cl = np.asarray(cells if cells is not None else np.zeros(len(lr)), object).astype(str)
    lv = np.asarray(levels if levels is not None else np.zeros(len(lr)), float)
    lv = np.where(np.isfinite(lv), lv, 0.0)
    good = np.isfinite(lr) & (lr > 0) & np.isfinite(ch) & (ch > lv) & (ch > 0)
    excluded = int((~good).sum())
    lr, ch, cl, lv = lr[good], ch[good], cl[good], lv[good]
    x, y = np.log(lr), np.log(ch)
    p, se_ols, n, used, xt, keep = _slope(x, y, cl)
    distinct = tuple(sorted(set(lr[keep].tolist()))) if n else ()
    fit = DriftFit(p, math.nan, se_ols, math.nan, math.nan, math.nan, n, used, distinct, excluded)
    if not fit.ok:
        fit.notes.append("fewer than two learning rates with a change above rounding in any checkpoint")
        return fit
    # rounding: |δ(log ‖ΔQ‖)| ≤ level/‖ΔQ‖ per point (first order), moved into the slope by x̃/Σx̃²
    delta = lv[keep] / ch[keep]
    fit.rounding = float(np.abs(xt) @ delta) / float(xt @ xt)
    # bootstrap over cells (whole checkpoints), when there are three or more to resample
    names = np.unique(cl[keep])
    if len(names) >= 3:
        rng = np.random.default_rng(seed)
        xs, ys, cs = x[keep], y[keep], cl[keep]
        by = {c: np.flatnonzero(cs == c) for c in names}
        draws = []
        for _ in range(BOOTSTRAP):
            pick = rng.choice(names, size=len(names), replace=True)
            idx = np.concatenate([by[c] for c in pick])
            lab = np.concatenate([np.full(len(by[c]), f"{j}") for j, c in enumerate(pick)])  # a drawn twice: two cells
            b = _slope(xs[idx], ys[idx], lab)[0]
            if math.isfinite(b):
                draws.append(b)
        if len(draws) >= 2:
            fit.se_boot = float(np.std(draws, ddof=1))
    finite = [s for s in (se_ols, fit.se_boot) if math.isfinite(s)]
    fit.se = max(finite) if finite else math.nan
    # model-error margin from the change of the local slope over the sweep
    if len(distinct) >= 3:
        lo, hi = distinct[:2], distinct[-2:]
        s_lo = _slope(*_subset(x, y, cl, lr, lo))[0]
        s_hi = _slope(*_subset(x, y, cl, lr, hi))[0]
        if math.isfinite(s_lo) and math.isfinite(s_hi):
            e_lo, e_hi = math.sqrt(lo[0] * lo[1]), math.sqrt(hi[0] * hi[1])
            k = (s_hi - s_lo) / (e_hi - e_lo)
            fit.margin = abs(k) * distinct[-1]
            fit.local_slopes = (s_lo, s_hi)
        else:
            fit.notes.append("the local slopes at the ends of the sweep share no checkpoint: margin not measured")
    return fit


def _subset(x, y, cells, lr, pair):
    m = np.isin(lr, pair)
    return x[m], y[m], cells[m]


@dataclass(frozen=True)
class DriftVerdict:
    verdict: str
    predicted: float
    residual: float    # |slope − predicted|
    tolerance: float   # max(3·SE, margin) + rounding
    reason: str


def drift_verdict(fit: DriftFit, predicted: float, alternative: float) -> DriftVerdict:
    """`holds` if |slope − predicted| ≤ max(3·SE, margin) + rounding, `violated` beyond it, `inconclusive`
    when that tolerance reaches half the distance to the competing order (``alternative``): the fit then
    cannot tell the two laws apart, so neither agreement nor disagreement means anything."""
    half = abs(predicted - alternative) / 2  # the midpoint between the two orders: beyond it a fit says nothing
    if not fit.ok:
        return DriftVerdict("inconclusive", predicted, math.nan, math.nan,
                            "; ".join(fit.notes) or "no slope")
    band = SIGMAS * fit.se if math.isfinite(fit.se) else math.nan
    res = abs(fit.slope - predicted)
    pieces = [f"slope {fit.slope:.4g} over lr {', '.join(f'{v:g}' for v in fit.lrs)} ({fit.n_points} points, "
              f"{fit.n_cells} checkpoints{f', {fit.excluded} at rounding level left out' if fit.excluded else ''})"]
    if not (math.isfinite(band) or math.isfinite(fit.margin)):
        return DriftVerdict("inconclusive", predicted, res, math.nan, pieces[0] + ": no degrees of freedom for an "
                            "uncertainty (two learning rates in one checkpoint fix the slope exactly) and no "
                            "margin (needs three learning rates)")
    tol = max(v for v in (band, fit.margin) if math.isfinite(v)) + fit.rounding
    pieces.append(f"tolerance = max(3·SE = {band:.2g} [SE: least squares {fit.se_ols:.2g}, bootstrap over "
                  f"checkpoints {fit.se_boot:.2g}], model-error margin |k|·η_max = {fit.margin:.2g}"
                  + (f" [local slopes {fit.local_slopes[0]:.4g} -> {fit.local_slopes[1]:.4g}]" if fit.local_slopes
                     else " [two learning rates: not measurable]")
                  + f") + rounding {fit.rounding:.2g} = {tol:.3g}")
    if not math.isfinite(fit.margin):
        pieces.append("the O(η) correction to the slope is not measured (three learning rates needed)")
    if tol >= half:
        return DriftVerdict("inconclusive", predicted, res, tol, "; ".join(pieces) + f"; tolerance >= {half:g}, half "
                            f"the distance from {predicted:g} to {alternative:g}: the fit cannot tell the two orders apart")
    verdict = "holds" if res <= tol else "violated"
    return DriftVerdict(verdict, predicted, res, tol, "; ".join(pieces) + f"; |slope − {predicted:g}| = {res:.2g} "
                        + ("<=" if verdict == "holds" else ">") + " tolerance")


def predicted_slope(optimizer: str, weight_decay: float) -> tuple[float, str]:
    """The slope the theory predicts for a sweep, and why."""
    if optimizer == "sgd" and weight_decay == 0:
        return SGD_SLOPE, "SGD with an exact symmetry: ΔQ = η²Q(u), the O(η) term cancels (B(θ,g) + B(g,θ) = 0)"
    if optimizer == "sgd":
        return ADAM_SLOPE, (f"SGD with weight decay {weight_decay:g}: a = 1 − ηλ leaves the O(η) term −2ηλQ")
    return ADAM_SLOPE, f"{optimizer}: the update is not annihilated by B(θ, ·), so ΔQ = O(η)"
