"""The findings figures of `eqlab report`: the generic one every finding gets (measured against predicted),
and one per finding that draws what its own theory says (findings 3, 4, 5, 6).

Like `report_figures` (whose helpers these use): rows already read from the tables in, a matplotlib Figure
(or None: nothing to draw) out, nothing recomputed: every number drawn is a column of a row. The row
finding names are the ones `eqlab reproduce` lists (`pipeline.reproduce.FINDINGS`), read from there so
that this module, like the report, never imports torch (the row builders do).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eqlab.pipeline.reproduce import BY_NAME
from eqlab.pipeline.report_figures import _by, _clip, _grid, _mark_floor, _step_axis, color, natural_key, text, \
    zero_floor

# findings_blocks.SHARPNESS (that module imports torch): the measurement-only rows of finding 3, which
# `eqlab reproduce` does not list because they have no verdict to count; the test checks the name
BLOCK_SHARPNESS = "block_sharpness"
CONGRUENCE, IMBALANCE = BY_NAME["blocks"].finding, BY_NAME["blocks"].also[0]
INDEFINITENESS, HESSIAN_MIN = BY_NAME["indefinite"].finding, BY_NAME["indefinite"].also[0]
DRIFT = BY_NAME["drift"].finding
SADDLE_SPECTRUM, (SUBSPACE_INVARIANCE, WD_THRESHOLD) = BY_NAME["saddles"].finding, BY_NAME["saddles"].also[:2]
# the row findings each theory figure draws, by `eqlab reproduce` name
DRAWS = {"blocks": (CONGRUENCE, IMBALANCE, BLOCK_SHARPNESS), "indefinite": (INDEFINITENESS, HESSIAN_MIN),
         "drift": (DRIFT,), "saddles": (SADDLE_SPECTRUM, WD_THRESHOLD)}


def _symlog_both(ax, vals) -> None:
    """Both axes symlog, linear within the 5 % quantile of |values|, with at most ~4 decade ticks a side."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    a = np.abs(np.asarray([v for v in vals if v is not None and math.isfinite(v)], float))
    a = a[a > 0]
    lin = max(float(np.quantile(a, 0.05)) if a.size else 1e-12, 1e-300)
    top = float(a.max()) if a.size else 1.0
    lo_dec, hi_dec = math.floor(math.log10(lin)), math.ceil(math.log10(max(top, lin)))
    stride = max(1, math.ceil((hi_dec - lo_dec) / 4))
    decades = [10.0 ** d for d in range(hi_dec, lo_dec - 1, -stride)][::-1]
    ticks = [-d for d in decades[::-1]] + [0.0] + decades
    label = FuncFormatter(lambda v, _: "0" if v == 0 else f"{'-' if v < 0 else ''}1e{round(math.log10(abs(v)))}")
    for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        scale("symlog", linthresh=lin)
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(label)
        axis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)


VERDICT_MARK = {"holds": ("o", "#2ca02c"), "violated": ("X", "#d62728"), "inconclusive": ("D", "#ff7f0e")}


def finding(name: str, rows: list[dict]) -> Figure | None:
    """One finding: measured statistic against the theory's prediction (left, y = x dashed), and each row's
    |measured − predicted| over its tolerance along training (right, 1 dashed); symmetries filled,
    negative controls hollow, coloured by verdict. A finding of measurements only (no prediction, e.g.
    block_sharpness) is drawn as its statistic over training instead."""
    measured = [r for r in rows if r["statistic"] is not None]
    rows = [r for r in measured if r["predicted"] is not None]
    if not rows:
        return _measurements(name, measured) if measured else None
    ratio_of = lambda r: r["residual"] / r["tolerance"] if r["tolerance"] and r["residual"] is not None else np.nan  # noqa: E731
    floor = zero_floor([ratio_of(r) for r in rows])
    fig = Figure(figsize=(12.5, 4.4), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for (control, verdict), pts in _by(rows, "control", "verdict").items():
        marker, col = VERDICT_MARK.get(verdict, ("s", "#7f7f7f"))
        kw = dict(marker=marker, s=22, alpha=0.8, label=text(f"{'control' if control else 'symmetry'}: {verdict}"))
        kw.update(dict(facecolors="none", edgecolors=col) if control else dict(color=col))
        a1.scatter([r["predicted"] for r in pts], [r["statistic"] for r in pts], **kw)
        a2.scatter(np.array([r["step"] for r in pts], float), _clip([ratio_of(r) for r in pts], floor), **kw)
    vals = [r["predicted"] for r in rows] + [r["statistic"] for r in rows]
    _symlog_both(a1, vals)
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        a1.plot([lo, hi], [lo, hi], "k--", lw=1)
    a1.set_xlabel("predicted")
    a1.set_ylabel("measured")
    a1.set_title(text(f"{name}: measured vs predicted"))
    a1.legend(fontsize=7)
    a2.set_xscale("symlog", linthresh=1)
    a2.set_yscale("log")
    a2.axhline(1.0, color="k", lw=1, ls="--")
    _mark_floor(a2, floor)
    a2.set_xlabel("step")
    a2.set_ylabel("|measured − predicted| / tolerance")
    a2.set_title(text(f"{name}: over training (all runs)"))
    return fig


def _measurements(name: str, rows: list[dict]) -> Figure:
    """A finding without a prediction: each transformation's statistic against the step, one line each."""
    fig = Figure(figsize=(12.5, 4.4), layout="constrained")
    ax = fig.subplots()
    for (run, tr), pts in sorted(_by(rows, "run_id", "transformation").items()):
        pts = sorted(pts, key=lambda r: r["step"])
        ax.plot(np.array([r["step"] for r in pts], float), [r["statistic"] for r in pts], marker="o", ms=3, lw=1,
                alpha=0.7, label=text(f"{run}: {tr}"))
    ax.set_xscale("symlog", linthresh=1)
    pos = [abs(r["statistic"]) for r in rows if r["statistic"] and math.isfinite(r["statistic"])]
    ax.set_yscale("symlog", linthresh=min(pos) if pos else 1.0)  # sharpness spans decades across blocks
    ax.set_xlabel("step")
    ax.set_ylabel("measured statistic")
    ax.set_title(text(f"{name}: measured over training (no prediction)"))
    if len(ax.get_lines()) <= 12:
        ax.legend(fontsize=6)
    return fig



# ---------------------------------------------------------------- shared

def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _verdict_kw(control, verdict, s: float = 24) -> dict:
    """The generic figure's marks: shape and colour by verdict, hollow for a negative control."""
    marker, col = VERDICT_MARK.get(verdict, ("s", "#7f7f7f"))
    kw = dict(marker=marker, s=s, alpha=0.8, linewidths=1.0)
    kw.update(dict(facecolors="none", edgecolors=col) if control else dict(color=col))
    return kw


def _verdict_handles(rows) -> list:
    out = []
    for control, verdict in sorted({(bool(r["control"]), r["verdict"] or "") for r in rows}):
        marker, col = VERDICT_MARK.get(verdict, ("s", "#7f7f7f"))
        out.append(Line2D([], [], ls="", marker=marker, color=col, mfc="none" if control else col,
                          label=text(f"{'control' if control else 'prediction'}: {verdict or 'no verdict'}")))
    return out


def _log_or_symlog(ax, vals) -> None:
    """Log–log where every value is positive; otherwise both axes symlog (a sign is part of the claim)."""
    vals = [v for v in vals if _finite(v)]
    if vals and min(vals) > 0:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        _symlog_both(ax, vals)


def _diagonal(ax, vals, slope: float = 1.0, **kw) -> None:
    vals = [v for v in vals if _finite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        xs = np.array([lo, hi]) if slope > 0 else np.array([min(lo, -hi), max(hi, -lo)])
        ax.plot(xs, slope * xs, **({"color": "k", "ls": "--", "lw": 1} | kw))


# ---------------------------------------------------------------- finding 3: block anisotropy

def block_anisotropy(rows: list[dict]) -> Figure | None:
    """Finding 3's theory: along a rescaling orbit by c each moved block's sharpness ratio ρ'/ρ is exactly
    c^{−2e} (left, y = x); the imbalance slope of log sharpness on log norm ratio is ±1 along the orbit and an
    empirical question across the groups of a layer (middle, with each row's tolerance); each block's
    sharpness against its squared norm ‖θ_B‖² at every checkpoint (right; the heatmap of `block_spectra`
    is the blocks section's)."""
    cong = [r for r in rows if r["finding"] == CONGRUENCE and _finite(r["statistic"]) and _finite(r["predicted"])]
    slopes = [r for r in rows if r["finding"] == IMBALANCE and _finite(r["statistic"])]
    sharp = [r for r in rows if r["finding"] == BLOCK_SHARPNESS and _finite(r["statistic"]) and _finite(r.get("scale"))]
    panels = [(draw, rs) for draw, rs in ((_congruence, cong), (_imbalance, slopes), (_sharpness_norm, sharp)) if rs]
    if not panels:
        return None
    fig = Figure(figsize=(5.4 * len(panels), 4.8), layout="constrained")
    for ax, (draw, rs) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        draw(ax, rs)
    return fig


def _congruence(ax, rows) -> None:
    for (control, verdict), pts in _by(rows, "control", "verdict").items():
        ax.scatter([r["predicted"] for r in pts], [r["statistic"] for r in pts], **_verdict_kw(control, verdict))
    vals = [r["predicted"] for r in rows] + [r["statistic"] for r in rows]
    _log_or_symlog(ax, vals)
    _diagonal(ax, vals)
    ax.set_xlabel("predicted ratio c^(−2e)  (e: the block's power of c)")
    ax.set_ylabel("measured ρ′/ρ along the orbit")
    ax.set_title(f"orbit congruence ({CONGRUENCE})", fontsize=10)
    ax.legend(handles=_verdict_handles(rows), fontsize=7)


def _imbalance(ax, rows) -> None:
    rows = sorted(rows, key=lambda r: (natural_key(r["run_id"]), r["step"], natural_key(r["transformation"])))
    per_step = defaultdict(int)
    for r in rows:  # the rows of one step (all runs) side by side from it
        r_x = per_step[r["step"]]
        per_step[r["step"]] += 1
        x = (r["step"] + 1) * 1.06 ** r_x  # spread on the log step axis (step + 1: step 0 included)
        tol = r["tolerance"] if _finite(r["tolerance"]) else 0.0
        marker, col = VERDICT_MARK.get(r["verdict"], ("s", "#7f7f7f"))
        ax.errorbar([x], [r["statistic"]], yerr=[tol], fmt="none", ecolor=col, elinewidth=1, capsize=2, alpha=0.6)
        ax.scatter([x], [r["statistic"]], **_verdict_kw(r["control"], r["verdict"], s=20))
    for p in sorted({r["predicted"] for r in rows if _finite(r["predicted"]) and not r["control"]}):
        ax.axhline(p, color="k", ls="--", lw=1)
        ax.text(0.99, p, f"predicted {p:g}", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7)
    # the y range of the slopes and predictions: an across-group fit of 3 points can have a tolerance of
    # +-100, which would flatten every exact ±1 orbit slope into one line
    ys = [r["statistic"] for r in rows] + [r["predicted"] for r in rows if _finite(r["predicted"])]
    pad = 0.25 * (max(ys) - min(ys)) or 1.0
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("slope of log sharpness on log norm ratio (± tolerance)")
    ax.set_title(f"imbalance slopes ({IMBALANCE})", fontsize=10)
    ax.legend(handles=_verdict_handles(rows), fontsize=7)


def _sharpness_norm(ax, rows) -> None:
    fams = sorted({r["symmetry"] or "" for r in rows}, key=natural_key)
    floor = zero_floor([r["statistic"] for r in rows])
    for fam, pts in _by(rows, "symmetry").items():
        ax.scatter([r["scale"] for r in pts], _clip([r["statistic"] for r in pts], floor), s=14, alpha=0.75,
                   color=color(fams.index(fam or ""), len(fams)), label=text(fam))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _mark_floor(ax, floor)
    ax.set_xlabel("‖θ_B‖² of the block")
    ax.set_ylabel("block λ_max (Lanczos on P_B H P_Bᵀ)")
    ax.set_title(f"block sharpness against its norm ({BLOCK_SHARPNESS}, all checkpoints)", fontsize=10)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------- finding 4: indefiniteness

def indefiniteness(rows: list[dict]) -> Figure | None:
    """Finding 4's theory: a scale-invariant block with g_S ≠ 0 has λ_min ≤ −‖g_S‖²/(μ₊‖θ_S‖²), the
    Rayleigh–Ritz bound on span{θ_S, g_S}, and so does the whole Hessian against the sharpest block's bound.
    Left: λ_min (statistic) against the bound (predicted), blocks and the whole H (stars), the region where
    the bound holds (y ≤ x) shaded; the control (the convex head, λ_min = 0) must sit above the line.
    Right: each block's λ_min and its bound over training."""
    rows = [r for r in rows if r["finding"] in (INDEFINITENESS, HESSIAN_MIN) and _finite(r["statistic"])
            and _finite(r["predicted"])]
    if not rows:
        return None
    from eqlab.pipeline.report_figures import _symlog_y

    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for (name, control, verdict), pts in _by(rows, "finding", "control", "verdict").items():
        kw = _verdict_kw(control, verdict) | ({"marker": "*", "s": 70} if name == HESSIAN_MIN else {})
        a1.scatter([r["predicted"] for r in pts], [r["statistic"] for r in pts], **kw)
    vals = [r["predicted"] for r in rows] + [r["statistic"] for r in rows]
    _symlog_both(a1, vals)
    lo, hi = min(vals), max(vals)
    a1.fill_between([lo, hi], [lo, hi], lo, color="#2ca02c", alpha=0.08, lw=0)
    a1.plot([lo, hi], [lo, hi], "k--", lw=1)
    a1.text(0.97, 0.03, "shaded: λ_min ≤ bound (the prediction)", transform=a1.transAxes, ha="right", fontsize=7)
    a1.set_xlabel("bound −‖g_S‖²/(μ₊‖θ_S‖²)")
    a1.set_ylabel("λ_min of the block (Lanczos)")
    a1.set_title(f"negative curvature against its bound ({INDEFINITENESS})", fontsize=10)
    whole = [Line2D([], [], ls="", marker="*", ms=9, color="0.3", label=f"whole H ({HESSIAN_MIN}): λ_min(H) "
                    "against the sharpest block's bound")] if any(r["finding"] == HESSIAN_MIN for r in rows) else []
    a1.legend(handles=_verdict_handles(rows) + whole, fontsize=7)
    blocks = [r for r in rows if r["finding"] == INDEFINITENESS and not r["control"]]
    keys = sorted({(r["run_id"], r["transformation"]) for r in blocks}, key=lambda k: [natural_key(x) for x in k])
    for i, key in enumerate(keys):
        pts = sorted((r for r in blocks if (r["run_id"], r["transformation"]) == key), key=lambda r: r["step"])
        col = color(i, len(keys))
        steps = [r["step"] for r in pts]
        a2.plot(steps, [r["statistic"] for r in pts], "o-", color=col, ms=4, lw=1.2, label=text(f"{key[0]}: {key[1]}"))
        a2.plot(steps, [r["predicted"] for r in pts], "--", color=col, lw=1)
    if keys:
        _symlog_y(a2, [r["statistic"] for r in blocks] + [r["predicted"] for r in blocks])
        _step_axis(a2)
        a2.set_ylabel("λ_min (solid) and its bound (dashed)")
        a2.set_title("scale-invariant blocks over training", fontsize=10)
        if len(keys) <= 12:
            a2.legend(fontsize=6)
    else:
        a2.set_visible(False)
    return fig


# ---------------------------------------------------------------- finding 5: drift against the learning rate

CELL_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "<", ">")


def drift(rows: list[dict], points: list[dict]) -> Figure | None:
    """Finding 5's theory: the one-step drift ‖ΔQ‖ of a conserved quantity scales as η² under plain SGD and as
    η under Adam (or with weight decay). First panel: each sweep's fitted slope (prediction rows: ±SE thick,
    ± the verdict's tolerance thin) against its predicted slope (black bar). Then one panel per sweep: the
    conservation points of its runs (``points``: conservation rows with ``sweep``, ``checkpoint`` (seed and
    step), ``cell`` (the fit's intercept group: checkpoint and family) and ``in_fit`` (above its rounding
    level)), log–log, with the fitted slope (solid) and the
    predicted one (dashed) through each cell's points: the fit shares the slope and gives each cell its
    intercept, so that is where its lines lie."""
    preds = sorted((r for r in rows if not r["control"]),
                   key=lambda r: (natural_key(r["run_id"]), natural_key(r["transformation"])))
    if not preds:
        return None
    sweeps = sorted({r["run_id"] for r in preds}, key=natural_key)
    fig, axes = _grid(len(sweeps) + 1, ncols=2, w=7.2, h=4.6)
    _slopes(axes[0], preds)
    for ax, sweep in zip(axes[1:], sweeps):
        _sweep(ax, sweep, [r for r in preds if r["run_id"] == sweep], [p for p in points if p["sweep"] == sweep])
    return fig


def _slopes(ax, preds) -> None:
    from eqlab.analyses.drift import ADAM_SLOPE, SGD_SLOPE

    for i, r in enumerate(preds):
        marker, col = VERDICT_MARK.get(r["verdict"], ("s", "#7f7f7f"))
        if _finite(r["statistic"]):
            if _finite(r["tolerance"]):
                ax.errorbar([i], [r["statistic"]], yerr=[r["tolerance"]], fmt="none", ecolor=col, elinewidth=1,
                            capsize=4)
            se = r["statistic_std"] if _finite(r["statistic_std"]) else 0.0
            ax.errorbar([i], [r["statistic"]], yerr=[se], fmt=marker, color=col, elinewidth=3, ms=6)
        else:
            ax.text(i, ADAM_SLOPE, "no slope", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.plot([i - 0.35, i + 0.35], [r["predicted"]] * 2, color="k", lw=2)
    for p, what in ((SGD_SLOPE, "SGD: η² law"), (ADAM_SLOPE, "Adam / weight decay: O(η)")):
        ax.axhline(p, color="0.6", ls=":", lw=1)
        ax.text(0.01, p, what, transform=ax.get_yaxis_transform(), fontsize=7, color="0.35", va="bottom")
    ax.set_xticks(range(len(preds)), [text(f"{r['run_id']}: {r['transformation']}") for r in preds],
                  rotation=60, ha="right", fontsize=6)
    ax.set_xlim(-0.7, len(preds) - 0.3)
    ax.set_ylabel("fitted slope of log‖ΔQ‖ on log η")
    ax.set_title(f"fitted slopes per sweep ({DRIFT}; black: predicted)", fontsize=10)
    handles = _verdict_handles(preds) + [Line2D([], [], color="k", lw=2, label="predicted slope")]
    ax.legend(handles=handles, fontsize=7, loc="best")


def _fit_label(transformation: str, fit: dict | None) -> str:
    """'<transformation>: slope p ± se (predicted q, verdict)' from a drift prediction row."""
    if not fit or not _finite(fit["statistic"]):
        return f"{transformation}: no slope (at rounding level, or one lr)"
    se = f" ± {fit['statistic_std']:.2g}" if _finite(fit["statistic_std"]) else ""
    return f"{transformation}: slope {fit['statistic']:.2f}{se} (predicted {fit['predicted']:g}, {fit['verdict']})"


def _sweep(ax, sweep, preds, points) -> None:
    ax.set_title(text(f"{sweep}: drift against the learning rate"), fontsize=10)
    if not points:
        ax.text(0.5, 0.5, "no conservation rows of this sweep's runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    fit_of = {(r["transformation"], r["symmetry"]): r for r in preds}
    fams = sorted({(p["transformation"], p["symmetry"]) for p in points}, key=lambda k: natural_key(k[0]))
    checkpoints = sorted({p["checkpoint"] for p in points}, key=natural_key)
    floor = zero_floor([p["change"] for p in points])
    for i, fam in enumerate(fams):
        col = color(i, len(fams))
        mine = [p for p in points if (p["transformation"], p["symmetry"]) == fam]
        fit = fit_of.get(fam)
        ax.plot([], [], color=col, lw=1.5, label=text(_fit_label(fam[0], fit)))
        for cell in sorted({p["cell"] for p in mine}, key=natural_key):
            pts = sorted((p for p in mine if p["cell"] == cell), key=lambda p: p["lr"])
            m = CELL_MARKERS[checkpoints.index(pts[0]["checkpoint"]) % len(CELL_MARKERS)]
            kept = [p for p in pts if p["in_fit"]]
            gone = [p for p in pts if not p["in_fit"]]
            ax.scatter([p["lr"] for p in kept], [p["change"] for p in kept], marker=m, color=col, s=22, alpha=0.85)
            ax.scatter([p["lr"] for p in gone], _clip([p["change"] for p in gone], floor), marker=m, s=22,
                       facecolors="none", edgecolors="0.5")
            if fit and _finite(fit["statistic"]) and len({p["lr"] for p in kept}) >= 2:
                x = np.log([p["lr"] for p in kept])
                y = np.log([p["change"] for p in kept])
                xs = np.array([x.min(), x.max()])
                for slope, ls in ((fit["statistic"], "-"), (fit["predicted"], "--")):
                    ax.plot(np.exp(xs), np.exp(y.mean() + slope * (xs - x.mean())), color=col, ls=ls, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _mark_floor(ax, floor)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("‖Q(θ_t+1) − Q(θ_t)‖")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls="-", lw=1), Line2D([], [], color="k", ls="--", lw=1),
                Line2D([], [], ls="", marker="o", mfc="none", mec="0.5")]
    labels += ["fitted slope", "predicted slope", "at its rounding level: not in the fit"]
    handles += [Line2D([], [], ls="", marker=CELL_MARKERS[j % len(CELL_MARKERS)], color="0.3")
                for j in range(len(checkpoints))]
    labels += [text(f"checkpoint {c}") for c in checkpoints]
    ax.legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))


# ---------------------------------------------------------------- finding 6: discrete saddles

def _construction(transformation: str) -> str:
    """dead_unit / duplicated_unit, from a row's transformation ('<group>:<construction>(<units>)[:trained]')."""
    head = str(transformation).rsplit("(", 1)[0]
    return head.rsplit(":", 1)[-1]


def discrete_saddles(rows: list[dict]) -> Figure | None:
    """Finding 6's theory: at a dead or duplicated unit the Hessian on the unit's subspace has the spectrum of
    a first-order block, so the point is a saddle with λ_min = −γ* and L2 weight decay γ stabilises it exactly
    above γ*. Left: against γ* (the threshold row's prediction, −λ_min of the block), the bottom Ritz value of
    H on the subspace (the spectrum row's eigenvalue: on y = −x) and λ_min(H_sub + γ₊I) just above the
    threshold (the threshold row's eigenvalue: above 0). Right: the measured threshold ± its tolerance over
    training, the predicted γ* as a bar."""
    key = lambda r: (r["run_id"], r["step"], r["transformation"], bool(r["control"]))  # noqa: E731
    spectrum = {key(r): r for r in rows if r["finding"] == SADDLE_SPECTRUM}
    pairs = [(spectrum[key(r)], r) for r in rows if r["finding"] == WD_THRESHOLD and key(r) in spectrum
             and _finite(r["predicted"]) and _finite(r["eigenvalue"]) and _finite(spectrum[key(r)]["eigenvalue"])]
    if not pairs:
        return None
    fig = Figure(figsize=(12.5, 4.8), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    groups = defaultdict(list)
    for s, wd in pairs:
        groups[(bool(s["control"]), s["verdict"])].append((s, wd))
    for (control, verdict), pts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        a1.scatter([wd["predicted"] for _, wd in pts], [s["eigenvalue"] for s, _ in pts],
                   **_verdict_kw(control, verdict))
    for (control, verdict), pts in _by([wd for _, wd in pairs], "control", "verdict").items():
        a1.scatter([r["predicted"] for r in pts], [r["eigenvalue"] for r in pts], **_verdict_kw(control, verdict, 30)
                   | dict(marker="^"))
    gstar = [wd["predicted"] for _, wd in pairs]
    vals = gstar + [-g for g in gstar] + [s["eigenvalue"] for s, _ in pairs] + [wd["eigenvalue"] for _, wd in pairs]
    _symlog_both(a1, vals)
    _diagonal(a1, gstar, slope=-1.0)
    a1.axhline(0.0, color="0.5", lw=0.8, ls=":")
    if max(gstar) <= 0:
        a1.text(0.5, 0.5, "γ* = 0 on every row: the first-order block is 0 to rounding\n(ReLU: σ′(0) = 0), so "
                "no threshold is tested (inconclusive)", transform=a1.transAxes, ha="center", fontsize=8,
                color="0.3")
    a1.set_xlabel("γ* = −λ_min of the first-order block (predicted threshold)")
    a1.set_ylabel("eigenvalue on the unit's subspace")
    a1.set_title(f"saddle spectra ({SADDLE_SPECTRUM}, {WD_THRESHOLD})", fontsize=10)
    handles = _verdict_handles([s for s, _ in pairs]) + [
        Line2D([], [], ls="", marker="o", color="0.3", label="bottom Ritz value at the point"),
        Line2D([], [], ls="", marker="^", color="0.3", label="λ_min(H_sub + γ₊I), γ₊ just above γ*"),
        Line2D([], [], color="k", ls="--", lw=1, label="λ_min = −γ* (prediction)")]
    a1.legend(handles=handles, fontsize=6)
    kinds = sorted({_construction(wd["transformation"]) for _, wd in pairs})
    seen = set()
    for _, wd in sorted(pairs, key=lambda p: p[1]["step"]):
        kind = _construction(wd["transformation"])
        col = color(kinds.index(kind), len(kinds))
        x = wd["step"] + 1
        tol = wd["tolerance"] if _finite(wd["tolerance"]) else 0.0
        if _finite(wd["statistic"]):
            a2.errorbar([x], [wd["statistic"]], yerr=[tol], fmt="o", color=col, mfc="none" if wd["control"] else col,
                        ms=5, elinewidth=1, capsize=2, alpha=0.8)
        a2.scatter([x], [wd["predicted"]], marker="_", s=160, color=col)
        lab = f"{kind}{' (control: trained units)' if wd['control'] else ''}"
        if lab not in seen:
            seen.add(lab)
            a2.plot([], [], "o", color=col, mfc="none" if wd["control"] else col, label=text(lab))
    a2.plot([], [], "_", color="k", ms=12, label="predicted γ*")
    a2.set_xscale("log")
    from eqlab.pipeline.report_figures import _symlog_y
    _symlog_y(a2, [wd["statistic"] for _, wd in pairs if _finite(wd["statistic"])] + gstar)
    a2.set_xlabel("step + 1")
    a2.set_ylabel("weight-decay threshold: measured −λ_min(H_sub) ± tolerance")
    a2.set_title(f"stabilising weight decay over training ({WD_THRESHOLD})", fontsize=10)
    a2.legend(fontsize=7)
    return fig
