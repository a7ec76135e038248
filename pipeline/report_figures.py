"""The figures of `eqlab report`: one function per figure, plain data in, a matplotlib Figure out.

Drawn on matplotlib's Agg canvas (no pyplot, no GUI backend, no global figure state). Each function
takes rows already read from the tables (lists of dicts) and returns a Figure, or None when there is
nothing to draw; saving is `save_png`. Nothing here reads files, and torch is loaded only by
`densities`, which reuses the SLQ quadrature of the curvature engine (`analyses/curvature/slq.py`).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eqlab.analyses.drift import fit_drift_slope

DPI = 100
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def text(s) -> str:
    """A table value as matplotlib text: literal `$` (not mathtext) and shown even when it starts with `_`
    (legend labels starting with an underscore are otherwise dropped)."""
    s = str(s).replace("\\", "\\\\").replace("$", r"\$")
    return "\u200a" + s if s.startswith("_") else s


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:[eE]-?\d+)?)")


def natural_key(s: str):
    """Sort key reading the numbers in a name as numbers: cnn-lr0.01 < cnn-lr0.03 < cnn-lr0.1, h.2 < h.10."""
    return [float(p) if i % 2 else p for i, p in enumerate(_NUMBER.split(str(s)))]


def save_png(fig: Figure, path: Path) -> tuple[int, int]:
    """Write ``fig`` as a PNG through the Agg canvas; returns its (width, height) in pixels."""
    canvas = FigureCanvasAgg(fig)
    for ax in fig.axes:  # a log axis with nothing positive and finite on it (all NaN, all zero) draws linear
        for scale, set_scale, lim in ((ax.get_xscale(), ax.set_xscale, ax.dataLim.intervalx),
                                      (ax.get_yscale(), ax.set_yscale, ax.dataLim.intervaly)):
            if scale == "log" and not (np.isfinite(lim).all() and lim[1] > 0):
                set_scale("linear")
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    w, h = canvas.get_width_height()
    return int(w), int(h)


def _grid(n: int, ncols: int = 3, w: float = 4.6, h: float = 3.4, **kw):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _step_axis(ax) -> None:
    ax.set_xscale("symlog", linthresh=1)  # log-spaced checkpoints, step 0 included
    ax.set_xlabel("step")


def _positive(vals, floor: float) -> np.ndarray:
    a = np.asarray(vals, dtype=float)
    return np.where(np.isfinite(a) & (a > floor), a, floor)


def zero_floor(values) -> float | None:
    """Where exact zeros go on a log axis: a decade below the smallest positive value (None: no zeros)."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[np.isfinite(a)]
    if not a.size or a.min() > 0:
        return None
    pos = a[a > 0]
    return 10.0 ** (math.floor(math.log10(pos.min())) - 1) if pos.size else 1e-20


def _clip(vals, floor: float | None) -> np.ndarray:
    """Values for a log axis: zeros (and negatives) at ``floor``; NaN stays NaN (not drawn)."""
    a = np.asarray([np.nan if v is None else v for v in vals], dtype=float)
    return np.where(a > 0, a, floor if floor is not None else np.nan)


def _mark_floor(ax, floor: float | None, axis: str = "y") -> None:
    if floor is None:
        return
    if axis == "y":
        ax.axhline(floor, color="0.6", lw=0.8, ls=":")
        ax.text(0.01, 0.01, "on the dotted line: exactly 0", transform=ax.transAxes, fontsize=7, color="0.4")
    else:
        ax.axvline(floor, color="0.6", lw=0.8, ls=":")


def color(i: int, n: int) -> str:
    """A distinct colour for item i of n (tab10, or tab20 beyond ten items; cycles past twenty)."""
    if n <= 10:
        return COLORS[i % 10]
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    return to_hex(colormaps["tab20"](i % 20))


def _by(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]].append(r)
    return dict(sorted(out.items(), key=lambda kv: [natural_key(x) for x in (kv[0] if len(keys) > 1 else (kv[0],))]))


# ---------------------------------------------------------------- training

def training(metrics: list[dict], checkpoints: list[dict]) -> Figure | None:
    """Minibatch training loss per step (metrics) and full-split losses/accuracies at checkpoints."""
    if not metrics and not checkpoints:
        return None
    panels = (1 if metrics else 0) + (2 if checkpoints else 0)
    fig, axes = _grid(panels, ncols=3)
    i = 0
    if metrics:
        ax = axes[i]
        i += 1
        for c, (run, rows) in enumerate(_by(metrics, "run_id").items()):
            rows.sort(key=lambda r: r["train_step"])
            ax.plot([r["train_step"] for r in rows], _positive([r["loss"] for r in rows], 1e-12), lw=1,
                    color=COLORS[c % 10], label=text(run))
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("minibatch loss")
        ax.set_title("training loss (metrics)")
        ax.legend(fontsize=8)
    if checkpoints:
        runs = _by(checkpoints, "run_id")
        ax_l, ax_a = axes[i], axes[i + 1]
        for c, (run, rows) in enumerate(runs.items()):
            rows.sort(key=lambda r: r["step"])
            steps = [r["step"] for r in rows]
            col = COLORS[c % 10]
            ax_l.plot(steps, _positive([r["train_loss"] for r in rows], 1e-12), "o-", color=col, ms=4,
                      label=text(f"{run} train"))
            ax_l.plot(steps, _positive([r["test_loss"] for r in rows], 1e-12), "s--", color=col, ms=4, mfc="none",
                      label=text(f"{run} test"))
            ax_a.plot(steps, [r["train_acc"] for r in rows], "o-", color=col, ms=4, label=text(f"{run} train"))
            ax_a.plot(steps, [r["test_acc"] for r in rows], "s--", color=col, ms=4, mfc="none",
                      label=text(f"{run} test"))
        for ax in (ax_l, ax_a):
            _step_axis(ax)
            ax.legend(fontsize=7)
        ax_l.set_yscale("log")
        ax_l.set_ylabel("full-split loss")
        ax_l.set_title("loss at checkpoints (checkpoints)")
        ax_a.set_ylabel("accuracy")
        ax_a.set_ylim(-0.02, 1.02)
        ax_a.set_title("accuracy at checkpoints (checkpoints)")
    return fig


# ---------------------------------------------------------------- spectra

def _symlog_y(ax, values) -> None:
    a = np.abs(np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float))
    top = float(a.max()) if a.size else 1.0
    if np.all(np.asarray([v for v in values if v is not None and math.isfinite(v)]) > 0):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=max(top * 1e-3, 1e-12))


def spectra(rows: list[dict]) -> Figure | None:
    """Top (and bottom, if computed) Hessian eigenvalues over training, one panel per run."""
    if not rows:
        return None
    runs = _by(rows, "run_id")
    fig, axes = _grid(len(runs))
    for ax, (run, rr) in zip(axes, runs.items()):
        ranks = sorted({r["rank"] for r in rr})
        for (which, rank), pts in _by(rr, "which", "rank").items():
            pts.sort(key=lambda r: r["step"])
            col = COLORS[ranks.index(rank) % 10]
            steps = [r["step"] for r in pts]
            ev = [r["eigenvalue"] for r in pts]
            ax.plot(steps, ev, "-" if which == "LA" else "--", color=col, lw=1.2,
                    label=text(f"{'λ' if which == 'LA' else 'λmin'}{rank + 1}"))
            conv = [bool(r["converged"]) for r in pts]
            ax.scatter([s for s, c in zip(steps, conv) if c], [e for e, c in zip(ev, conv) if c], color=col, s=14)
            ax.scatter([s for s, c in zip(steps, conv) if not c], [e for e, c in zip(ev, conv) if not c],
                       facecolors="none", edgecolors=col, s=22)
        _step_axis(ax)
        _symlog_y(ax, [r["eigenvalue"] for r in rr])
        ax.set_ylabel("Hessian eigenvalue")
        ax.set_title(text(f"{run}: top eigenvalues"))
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="k"))
        labels.append("not converged")
        ax.legend(handles, labels, fontsize=7, ncols=2)
    return fig


# ---------------------------------------------------------------- densities

def densities(groups: list[dict]) -> Figure | None:
    """SLQ spectral densities over training, one panel per run, one curve per checkpoint. Each group is one
    (run, step) with the probes' stored tridiagonals; the density is the curvature engine's own
    (`SLQResult.density`: Gauss nodes and weights of each probe pooled, Gaussian-smoothed)."""
    if not groups:
        return None
    from eqlab.analyses.curvature.slq import SLQResult  # the one definition of the density (loads torch)

    runs = _by(groups, "run_id")
    fig, axes = _grid(len(runs))
    for ax, (run, gs) in zip(axes, runs.items()):
        gs.sort(key=lambda g: g["step"])
        finite = lambda g: g["alphas"] and all(a and np.isfinite(a).all() for a in g["alphas"]) and \
            all(b is not None and np.isfinite(b).all() for b in g["betas"])  # noqa: E731
        res = [(g["step"], SLQResult(int(g["dim"]), [list(a) for a in g["alphas"]], [list(b) for b in g["betas"]], 0))
               for g in gs if finite(g)]
        if not res:
            ax.set_visible(False)
            continue
        nodes = np.concatenate([r.pooled()[0] for _, r in res])
        lo, hi = float(nodes.min()), float(nodes.max())
        span = (hi - lo) or max(abs(hi), 1.0)
        grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 1200)
        sigma = 0.02 * span  # the smoothing of results/README.md's recipe
        cmap = _viridis()
        peak = 0.0
        for i, (step, r) in enumerate(res):
            d = r.density(grid, sigma)
            peak = max(peak, float(d.max()))
            ax.plot(grid, d, color=cmap(i / max(len(res) - 1, 1)), lw=1.2, label=f"step {step}")
        ax.set_yscale("log")
        if peak > 0:
            ax.set_ylim(peak * 1e-6, peak * 2)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("spectral density")
        ax.set_title(text(f"{run}: SLQ density (σ = {sigma:.2g})"))
        ax.legend(fontsize=7)
    return fig


def _viridis():
    from matplotlib import colormaps
    return colormaps["viridis"]


# ---------------------------------------------------------------- block spectra

def block_heatmap(run: str, rows: list[dict], full: list[dict]) -> Figure | None:
    """Top eigenvalue of each layer's Hessian block (rows) at each checkpoint (columns) for one run; the full
    Hessian's top eigenvalue (spectra, rank 0) as the first row when it was computed."""
    top = [r for r in rows if r["which"] == "LA" and r["rank"] == 0]
    if not top:
        return None
    steps = sorted({r["step"] for r in top})
    dims = {r["block"]: r["dim"] for r in top}
    blocks = sorted(dims, key=natural_key)
    labels = [text(f"{b} ({dims[b]})") for b in blocks]
    M = np.full((len(blocks), len(steps)), np.nan)
    for r in top:
        M[blocks.index(r["block"]), steps.index(r["step"])] = r["eigenvalue"]
    full_top = {r["step"]: r["eigenvalue"] for r in full if r["which"] == "LA" and r["rank"] == 0}
    if full_top:
        M = np.vstack([[full_top.get(s, np.nan) for s in steps], M])
        labels = ["full Hessian"] + labels
    finite = M[np.isfinite(M)]
    fig = Figure(figsize=(max(5.0, 1.0 + 0.7 * len(steps)) + 3.0, 1.4 + 0.28 * len(labels)), layout="constrained")
    ax = fig.subplots()
    if finite.size and finite.min() > 0:
        norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.max() > finite.min() else None
    elif finite.size:
        norm = SymLogNorm(linthresh=max(np.abs(finite).max() * 1e-3, 1e-12), vmin=finite.min(), vmax=finite.max())
    else:
        norm = None
    im = ax.imshow(np.ma.masked_invalid(M), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 12 else 8)
    if full_top:
        ax.axhline(0.5, color="w", lw=1.5)
    ax.set_xlabel("step")
    ax.set_title(text(f"{run}: top eigenvalue of each block's Hessian (block_spectra)"))
    fig.colorbar(im, ax=ax, label="λmax of the block")
    return fig


# ---------------------------------------------------------------- identities

def identities(rows: list[dict]) -> Figure | None:
    """Each identity check's residual (top) and residual / its own tolerance (bottom), per dtype (columns) and
    order (x), one colour per symmetry; negative controls as crosses."""
    rows = [r for r in rows if r["order"] is not None and r["order"] >= 0]
    if not rows:
        return None
    dtypes = sorted({r["dtype"] for r in rows}, reverse=True)  # float64 first
    syms = sorted({r["symmetry"] for r in rows}, key=natural_key)
    orders = sorted({r["order"] for r in rows})
    fig = Figure(figsize=(max(4.5 * len(dtypes), 6) + 2.2, 7.2), layout="constrained")
    axes = fig.subplots(2, len(dtypes), squeeze=False, sharex=True)
    rng = np.random.default_rng(0)
    for j, dtype in enumerate(dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        f_res = zero_floor([r["residual"] for r in mine])
        f_rat = zero_floor([r["residual"] / r["tolerance"] for r in mine if r["residual"] is not None and r["tolerance"]])
        for si, sym in enumerate(syms):
            for control in (False, True):
                pts = [r for r in rows if r["dtype"] == dtype and r["symmetry"] == sym and bool(r["control"]) == control]
                if not pts:
                    continue
                x = np.array([orders.index(r["order"]) for r in pts], float)
                x += (si - (len(syms) - 1) / 2) * 0.6 / max(len(syms), 1) + rng.uniform(-0.02, 0.02, len(x))
                res = np.array([np.nan if r["residual"] is None else r["residual"] for r in pts], float)
                tol = np.array([r["tolerance"] if r["tolerance"] else np.nan for r in pts], float)
                kw = dict(color=color(si, len(syms)), s=18 if not control else 26, marker="x" if control else "o",
                          alpha=0.75, linewidths=1.2)
                axes[0, j].scatter(x, _clip(res, f_res), **kw)
                axes[1, j].scatter(x, _clip(res / tol, f_rat), **kw)
        for i, f in ((0, f_res), (1, f_rat)):
            ax = axes[i, j]
            ax.set_yscale("log")
            _mark_floor(ax, f)
            ax.set_xticks(range(len(orders)), [f"order {o}" for o in orders])
        axes[1, j].axhline(1.0, color="k", lw=1, ls="--")
        axes[0, j].set_title(text(f"{dtype}"))
        axes[0, j].set_ylabel("relative residual")
        axes[1, j].set_ylabel("residual / tolerance (--- = 1)")
    handles = [Line2D([], [], ls="", marker="o", color=color(i, len(syms)), label=text(s)) for i, s in enumerate(syms)]
    handles.append(Line2D([], [], ls="", marker="x", color="k", label="negative control"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle("identity checks per dtype and order (identities)")
    return fig


# ---------------------------------------------------------------- conservation

def conservation(rows: list[dict]) -> Figure | None:
    """Left: each conserved family's one-step change ‖ΔQ‖ against the learning rate (log–log), with the fitted
    slope per (optimizer, symmetry) where there are two learning rates or more (SGD's exact law: 2; Adam: 1).
    Right: measured against the exact law's predicted change (SGD), y = x dashed.

    The slope is the drift finding's own fit (`analyses.drift.fit_drift_slope`: one intercept per ``cell``,
    a checkpoint of one seed; points at or below their rounding ``level`` left out), pooled here over all
    runs of an optimizer, where the finding fits each lr sweep apart (its rows: the findings section)."""
    rows = [r for r in rows if r["change"] is not None]
    if not rows:
        return None
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    syms = sorted({r["symmetry"] for r in rows}, key=natural_key)
    markers = {"sgd": "o", "adam": "s", "adamw": "^"}
    f_ch = zero_floor([r["change"] for r in rows])
    law_rows = [r for r in rows if r["predicted_change"] is not None and math.isfinite(r["predicted_change"])]
    f_law = zero_floor([r["change"] for r in law_rows] + [r["predicted_change"] for r in law_rows])
    for (opt, sym), pts in _by(rows, "optimizer", "symmetry").items():
        col = color(syms.index(sym), len(syms))
        lrs = [r["lr"] for r in pts]
        ch = [r["change"] for r in pts]
        levels = [r.get("level") or 0.0 for r in pts]
        fit = fit_drift_slope(lrs, ch, cells=[r.get("cell") for r in pts], levels=levels)
        if fit.ok:
            what = f"slope {fit.slope:.2f}" + ("" if math.isnan(fit.se) else f" ± {fit.se:.2f}")
        elif len({l for l in lrs if l}) < 2:
            what = "one lr: no slope"
        else:
            what = "no change above rounding: no slope"
        a1.scatter(lrs, _clip(ch, f_ch), marker=markers.get(opt, "D"), color=col, s=20, alpha=0.75,
                   label=text(f"{opt} {sym}: {what}"))
        if fit.ok:  # drawn through the mean of the points in the fit (the fit has an intercept per cell)
            ok = [(l, c) for l, c, v in zip(lrs, ch, levels) if l and l > 0 and c and c > v and c > 0]
            xs = np.array([min(l for l, _ in ok), max(l for l, _ in ok)])
            b = np.mean([math.log(c) - fit.slope * math.log(l) for l, c in ok])
            a1.plot(xs, np.exp(b) * xs ** fit.slope, color=col, lw=1)
        law = [r for r in pts if r["predicted_change"] is not None and math.isfinite(r["predicted_change"])]
        if law:
            a2.scatter(_clip([r["predicted_change"] for r in law], f_law),
                       _clip([r["change"] for r in law], f_law), marker=markers.get(opt, "D"), color=col, s=20,
                       alpha=0.75, label=text(f"{opt} {sym}"))
    a1.set_xscale("log")
    a1.set_yscale("log")
    _mark_floor(a1, f_ch)
    a1.set_xlabel("learning rate")
    a1.set_ylabel("‖Q(θ_t+1) − Q(θ_t)‖")
    a1.set_title("conservation drift vs learning rate (conservation)")
    a1.legend(fontsize=7)
    if a2.collections:
        a2.set_xscale("log")
        a2.set_yscale("log")
        lo, hi = a2.dataLim.intervalx
        a2.plot([lo, hi], [lo, hi], "k--", lw=1)
        _mark_floor(a2, f_law)
        _mark_floor(a2, f_law, "x")
        a2.legend(fontsize=7)
    else:
        a2.text(0.5, 0.5, "no optimizer here has an exact law (e.g. Adam)", ha="center", va="center",
                transform=a2.transAxes)
    a2.set_xlabel("predicted change (exact law)")
    a2.set_ylabel("measured change")
    a2.set_title("measured vs the exact discrete-time law")
    return fig
