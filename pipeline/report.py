"""`eqlab report`: a study's tables as one self-contained HTML page with PNG figures.

Reads the results folder through the same confined DuckDB connection as `eqlab query` (every table a
view; nothing outside the folder readable) and writes ``index.html`` and ``fig-*.png`` into the output
folder (default ``<results>/report``): runs, training curves, Hessian spectra and SLQ densities over
training, per-block sharpness, identity residuals per dtype and order, conservation drift against the
learning rate, and the findings: each named with the line `eqlab reproduce --list` gives it, each row
finding against its prediction, findings 3-6 also in a figure of what their own theory says
(`report_findings`), and the findings table with its verdicts (the drift finding's fitted slopes ± SE in
its summary). A table that is missing or empty (or a finding without rows) gives a one-line note in the
page instead of its figure; the page has no script and loads nothing but its own PNGs.

Most sections are one `TableSection` each: the table they draw, the columns they need, their query and
their figure; the findings section reads the conservation and runs tables too, for the drift figure.

Imports: duckdb, pyarrow's table names and matplotlib (Agg canvas). torch loads only to draw the
densities figure, whose density is the curvature engine's own (`analyses/curvature/slq.SLQResult`),
and only when the `densities` table has rows.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from eqlab.pipeline.query import QueryError, connect

FIGURE_GLOB = "fig-*.png"   # the files a report writes (and replaces) in its output folder
MAX_ROWS = 5000             # rows of the full findings table shown in the page (all are counted)


class ReportError(QueryError):
    """The results folder cannot be reported on (missing, not a folder, no tables); one line."""


def esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def fmt(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    return str(v)


@dataclass
class Section:
    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, in order
    figures: list[str] = field(default_factory=list)  # PNG file names written for this section
    notes: list[str] = field(default_factory=list)    # plain-text notes (escaped when written)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.parts.append(f'<p class="note">{esc(text)}</p>')


@dataclass
class Report:
    index: Path
    figures: list[Path]
    notes: list[str]


class Tables:
    """The results folder's tables, read through `eqlab query`'s confined connection."""

    def __init__(self, results: Path):
        self.results = Path(results)
        self.con = connect(self.results)  # QueryError: missing / not a folder / unreadable table
        self.present = {r[0] for r in self.con.execute(
            "select view_name from duckdb_views() where not internal").fetchall()}
        self._columns: dict[str, set[str]] = {}

    def close(self) -> None:
        self.con.close()

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            self._columns[table] = ({r[0] for r in self.con.execute(f"describe {table}").fetchall()}
                                    if table in self.present else set())
        return self._columns[table]

    def count(self, table: str) -> int:
        return self.con.execute(f"select count(*) from {table}").fetchone()[0] if table in self.present else 0

    def rows(self, sql: str) -> list[dict]:
        cur = self.con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def why_empty(self, table: str) -> str | None:
        """None when ``table`` has rows; else the one-line reason a figure of it is omitted."""
        if table not in self.present:
            return f"table {table} is missing in {self.results}"
        if self.count(table) == 0:
            return f"table {table} is empty in {self.results}"
        return None

    def need(self, table: str, cols: list[str]) -> None:
        missing = [c for c in cols if c not in self.columns(table)]
        if missing:
            raise _Skip(f"table {table} has no column {', '.join(missing)} (written by an older eqlab?)")


class _Skip(Exception):
    pass


def check_results(results: Path) -> None:
    """Fail in one line, before anything is written, unless ``results`` is a folder holding result tables."""
    t = Tables(results)
    try:
        if not t.present:
            hint = ""
            try:
                inner = sorted(p.name for p in Path(results).iterdir() if (p / "runs").is_dir())
            except OSError:
                inner = []
            if inner:
                hint = f"; study folders inside it: {', '.join(inner)} (pass --results {Path(results) / inner[0]})"
            raise ReportError(f"no result tables in {results} (run a study first, or pass --results DIR){hint}")
    finally:
        t.close()


# ----------------------------------------------------------------------------------------- sections

def _figure(sec: Section, out: Path, name: str, fig, alt: str, caption: str) -> None:
    from eqlab.pipeline.report_figures import save_png

    if fig is None:
        sec.note(f"no figure {alt}: nothing to draw")
        return
    path = out / f"fig-{name}.png"
    w, h = save_png(fig, path)
    sec.figures.append(path.name)
    sec.parts.append(f'<figure><img src="{esc(path.name)}" alt="{esc(alt)}" width="{w}" height="{h}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")


def _table(columns: list[str], rows: list[list], cls: str = "", verdict_col: int | None = None,
           titles: list[str] | None = None, id_: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            if j == verdict_col:
                # a measurement-only row has no verdict (NULL): an empty cell, class "v-"
                slug = "".join(ch if ch.isalnum() or ch == "_" else "-" for ch in ("" if v is None else str(v)))
                title = f' title="{esc(titles[i])}"' if titles and titles[i] else ""
                cells.append(f'<td class="verdict v-{esc(slug)}"{title}>{esc(v)}</td>')
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attrs = (f' id="{esc(id_)}"' if id_ else "") + (f' class="{esc(cls)}"' if cls else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs(t: Tables, out: Path) -> Section:
    sec = Section("runs", TITLES["runs"])
    why = t.why_empty("runs")
    if why:
        sec.note(f"no runs table: {why}")
        return sec
    want = ["run_id", "family", "optimizer", "lr", "weight_decay", "steps", "seed", "n_params", "status",
            "diverged_at_step"]
    cols = [c for c in want if c in t.columns("runs")]
    rows = t.rows(f"select {', '.join(cols)} from runs order by run_id")
    sec.parts.append(_table(cols, [[r[c] for c in cols] for r in rows], cls="runs", id_="runs-table"))
    return sec


def _training(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("training", TITLES["training"])
    metrics, checkpoints = [], []
    why = t.why_empty("metrics")
    if why:
        sec.note(f"no training-loss curves: {why}")
    else:
        t.need("metrics", ["train_step", "loss"])
        metrics = t.rows("select run_id, train_step, loss from metrics")
    why = t.why_empty("checkpoints")
    if why:
        sec.note(f"no checkpoint losses: {why}")
    else:
        t.need("checkpoints", ["train_loss", "test_loss", "train_acc", "test_acc"])
        checkpoints = t.rows("select run_id, step, train_loss, test_loss, train_acc, test_acc from checkpoints")
    if metrics or checkpoints:
        _figure(sec, out, "training", rf.training(metrics, checkpoints), "training loss curves",
                "Minibatch training loss at every optimizer step (metrics); loss and accuracy on the full train "
                "and test splits at each checkpoint (checkpoints).")
    return sec


def _rf():
    from eqlab.pipeline import report_figures  # matplotlib loads only once a section draws

    return report_figures


@dataclass(frozen=True)
class Fig:
    """One figure of a table section: ``fn`` names the `report_figures` function drawn on the rows."""
    name: str
    fn: str
    alt: str
    caption: str


@dataclass(frozen=True)
class TableSection:
    """A section drawn from one table: a note instead when the table is missing or empty, the columns it
    needs checked (`Tables.need`), its rows read by ``sql`` (text, or a function of the Tables for columns
    added later in the schema), then ``figure`` drawn on them and ``then(t, sec, out, rows)`` (more
    figures, verdict tables) called."""
    anchor: str
    table: str
    omitted: str                 # what the note says is left out: "no spectra figure"
    columns: tuple[str, ...]
    sql: str | Callable[[Tables], str]
    figure: Fig | None = None
    then: Callable | None = None

    def __call__(self, t: Tables, out: Path) -> Section:
        sec = Section(self.anchor, TITLES[self.anchor])
        why = t.why_empty(self.table)
        if why:
            sec.note(f"{self.omitted}: {why}")
            return sec
        t.need(self.table, list(self.columns))
        rows = t.rows(self.sql(t) if callable(self.sql) else self.sql)
        if self.figure:
            f = self.figure
            _figure(sec, out, f.name, getattr(_rf(), f.fn)(rows), f.alt, f.caption)
        if self.then:
            self.then(t, sec, out, rows)
        return sec


def _optional(t: Tables, table: str, *names: str) -> str:
    """Select items for columns added later in the schema: the column where the table has it, else NULL."""
    cols = t.columns(table)
    return ", ".join(c if c in cols else f"NULL as {c}" for c in names)


_spectra = TableSection(
    "spectra", "spectra", "no spectra figure", ("which", "rank", "eigenvalue", "converged"),
    "select run_id, step, which, rank, eigenvalue, converged from spectra",
    Fig("spectra", "spectra", "top Hessian eigenvalues over training",
        "Lanczos eigenvalues of the full Hessian at each checkpoint (spectra), one line per rank; hollow "
        "markers: not converged (true residual above the tolerance, or the verification block found a "
        "missed eigenvalue)."))

_densities = TableSection(
    "densities", "densities", "no densities figure", ("probe", "dim", "alphas", "betas"),
    """select run_id, step, max(dim) as dim, list(alphas order by probe) as alphas,
              list(betas order by probe) as betas from densities group by run_id, step""",
    Fig("densities", "densities", "SLQ spectral densities over training",
        "Stochastic Lanczos quadrature densities re-derived from the stored tridiagonals (densities): each "
        "probe's Gauss nodes and weights pooled, Gaussian-smoothed (σ = 2 % of the run's spectral range), "
        "one curve per checkpoint, log scale."))


def _block_heatmaps(t: Tables, sec: Section, out: Path, rows: list[dict]) -> None:
    rf = _rf()
    full = ([] if t.why_empty("spectra") else
            t.rows("select run_id, step, which, rank, eigenvalue from spectra where rank = 0"))
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    for i, run in enumerate(sorted(by_run, key=rf.natural_key)):
        _figure(sec, out, f"blocks-{i}", rf.block_heatmap(run, by_run[run], [r for r in full if r["run_id"] == run]),
                f"per-block sharpness heatmap of run {run}",
                f"Run {run}: the top eigenvalue of each layer's own Hessian block H_bb (block_spectra; the "
                "block's parameter count in brackets) at each checkpoint, with the full Hessian's top eigenvalue "
                "as the first row (spectra). By Cauchy interlacing no block exceeds it.")


_blocks = TableSection(
    "blocks", "block_spectra", "no per-block heatmap", ("block", "dim", "which", "rank", "eigenvalue"),
    "select run_id, step, block, dim, which, rank, eigenvalue from block_spectra", then=_block_heatmaps)


def _identity_verdicts(t: Tables, sec: Section, out: Path, rows: list[dict]) -> None:
    summary = t.rows('''select run_id, symmetry, dtype, "order", control, count(*) as n,
                               string_agg(distinct verdict, ', ' order by verdict) as verdicts,
                               max(residual / nullif(tolerance, 0)) as worst
                        from identities where "order" >= 0 group by all order by all''')
    sec.parts.append("<h3>Verdicts</h3>" + _table(
        ["run", "symmetry", "dtype", "order", "control", "checks", "verdicts", "max residual / tolerance"],
        [[r["run_id"], r["symmetry"], r["dtype"], r["order"], r["control"], r["n"], r["verdicts"], r["worst"]]
         for r in summary], cls="summary"))
    missing = t.rows('''select run_id, symmetry, any_value(tolerance_reason) as reason from identities
                        where verdict = 'missing' group by all order by all''') \
        if "tolerance_reason" in t.columns("identities") else []
    for r in missing:
        sec.note(f"declared symmetry missing in run {r['run_id']}: {r['symmetry']} ({r['reason']})")


_identities = TableSection(
    "identities", "identities", "no identities figure",
    ("symmetry", "order", "control", "dtype", "residual", "tolerance", "verdict"),
    'select run_id, step, symmetry, "order", control, dtype, residual, tolerance, verdict from identities',
    Fig("identities", "identities", "identity residuals per dtype and order",
        "Every identity check (identities): order 0 the loss at finite group elements, 1 the gradient identity, "
        "2 the Hessian identity, per dtype; top the relative residual, bottom the residual over the row's "
        "own rounding-derived tolerance (below the dashed line: holds). Crosses: negative controls, which "
        "must come out above it."),
    _identity_verdicts)


def _sweep_of(t: Tables) -> dict[str, str]:
    """{run id: the name of its lr sweep}, grouped as the drift finding groups them (`findings_drift.sweeps`
    on the run specs stored in runs.config_json); a run in no sweep is absent."""
    if t.why_empty("runs") or "config_json" not in t.columns("runs"):
        return {}
    from types import SimpleNamespace

    from eqlab.pipeline.findings_drift import sweeps
    from eqlab.pipeline.study import RunSpec

    specs = []
    for r in t.rows("select distinct run_id, config_json from runs order by run_id"):
        try:
            d = json.loads(r["config_json"])
            specs.append(RunSpec(**{**d, "checkpoint_steps": tuple(d.get("checkpoint_steps") or ())}))
        except (TypeError, ValueError):  # no spec, or one of an older schema: in no sweep
            continue
    return {s.run_id: name for name, members in sweeps(SimpleNamespace(runs=specs)).items() for s in members}


def _conservation_sql(t: Tables) -> str:
    return f"""select run_id, step, transformation, symmetry, optimizer, lr, change, predicted_change, verdict,
                      {_optional(t, 'conservation', 'tolerance_reason')} from conservation"""


def _conservation_points(t: Tables, rows: list[dict]) -> list[dict]:
    """The conservation rows with what the drift fit needs of each: ``checkpoint`` (seed and step), ``cell``
    (the fit's intercept group: that checkpoint within one sweep and one transformation, as
    `findings_drift.drift_rows` forms them), ``level`` (the change's rounding level,
    `findings_drift.rounding_level`), ``sweep`` (None: the run is in no sweep) and ``in_fit`` (the run
    ended ok and the change is above its level: the points `analyses.drift.fit_drift_slope` keeps)."""
    from eqlab.pipeline.findings_drift import rounding_level

    runs = {} if t.why_empty("runs") else {
        r["run_id"]: r for r in t.rows(f"select run_id, {_optional(t, 'runs', 'seed', 'status')} from runs")}
    sweep_of = _sweep_of(t)
    for r in rows:
        run = runs.get(r["run_id"], {})
        r["sweep"] = sweep_of.get(r["run_id"])
        r["checkpoint"] = f"s{run.get('seed')}@{r['step']}"
        r["cell"] = f"{r['sweep'] or r['run_id']}|{r['transformation']}|{r['checkpoint']}"
        r["level"] = rounding_level(r["tolerance_reason"])
        r["in_fit"] = bool((run.get("status") or "ok") == "ok" and r["lr"] and r["lr"] > 0 and r["change"] is not None
                           and math.isfinite(r["change"]) and r["change"] > max(r["level"], 0.0))
    return rows


def _conservation_section(t: Tables, sec: Section, out: Path, rows: list[dict]) -> None:
    _figure(sec, out, "conservation", _rf().conservation(_conservation_points(t, rows)),
            "conservation drift vs learning rate",
            "Each conserved family's change over the replayed step after each checkpoint (conservation) against "
            "the run's learning rate, log-log, with the slope per optimizer and family when the study has two "
            "learning rates or more, fitted as the drift finding fits it (analyses.drift.fit_drift_slope: an "
            "intercept per checkpoint, points at their rounding level left out; SGD's exact law: slope 2, "
            "Adam's drift: slope 1; the finding's own per-sweep fits are in the findings section); right: the "
            "measured change against the exact discrete-time law's prediction.")
    summary = t.rows('''select run_id, optimizer, symmetry, count(*) as n,
                               string_agg(distinct verdict, ', ' order by verdict) as verdicts
                        from conservation group by all order by all''')
    sec.parts.append("<h3>Verdicts</h3>" + _table(
        ["run", "optimizer", "symmetry", "checkpoints", "verdicts"],
        [[r["run_id"], r["optimizer"], r["symmetry"], r["n"], r["verdicts"]] for r in summary], cls="summary"))


_conservation = TableSection(
    "conservation", "conservation", "no conservation figure",
    ("transformation", "symmetry", "optimizer", "lr", "change", "predicted_change", "verdict"), _conservation_sql,
    then=_conservation_section)


# ----------------------------------------------------------------------------------------- findings

def finding_groups():
    """`eqlab reproduce`'s findings (1-6, in its order): (number, its reproduce.Finding, the row finding
    names that belong to it: its predictions, then its measurements, finding 3's block_sharpness included)."""
    from eqlab.pipeline.report_findings import BLOCK_SHARPNESS
    from eqlab.pipeline.reproduce import FINDINGS

    return [(i + 1, f, f.row_findings + tuple(getattr(f, "measured", ()))
             + ((BLOCK_SHARPNESS,) if f.name == "blocks" else ())) for i, f in enumerate(FINDINGS)]


def _theory_figure(name: str, t: Tables, rows: list[dict]):
    """The figure drawn from what finding ``name``'s own theory says (`report_findings`)."""
    from eqlab.pipeline import report_findings as rfn

    if name == "drift":
        points = [] if t.why_empty("conservation") else _conservation_points(t, t.rows(_conservation_sql(t)))
        return rfn.drift(rows, [p for p in points if p["sweep"] is not None])
    return {"blocks": rfn.block_anisotropy, "indefinite": rfn.indefiniteness,
            "saddles": rfn.discrete_saddles}[name](rows)


THEORY = {  # reproduce name -> (alt text, caption) of the finding's own figure
    "blocks": ("finding 3: orbit congruence, imbalance slopes, sharpness against norm",
               "Block anisotropy (findings rows block_orbit_congruence, block_sharpness_imbalance, block_sharpness): "
               "left, each moved block's measured sharpness ratio ρ′/ρ along the orbit against the predicted c^(−2e) "
               "(c^−2 or c^2 by side; dashed: equal); middle, the slope of log sharpness on the log norm ratio, "
               "along the orbit (predicted exactly ±1) and across a layer's groups (empirical), with each row's "
               "tolerance; right, each block's λ_max against its ‖θ_B‖² at every checkpoint (the blocks × steps "
               "heatmap is the per-block section's). Hollow: negative controls (one-sided moves, shuffled pairings)."),
    "indefinite": ("finding 4: lambda_min against the Rayleigh-Ritz bound",
                   "Indefiniteness (findings rows indefiniteness, indefinite_hessian_min): left, each scale-invariant block's λ_min (Lanczos) "
                   "against the bound −‖g_S‖²/(μ₊‖θ_S‖²), shaded where the bound holds; hollow: the convex classifier "
                   "head (λ_min = 0), which must miss it; stars: the whole Hessian's λ_min against the sharpest "
                   "block's bound (indefinite_hessian_min); right, each block's λ_min and its bound over training."),
    "drift": ("finding 5: drift against learning rate with fitted and predicted slopes",
              "Conservation drift (findings rows conservation_drift_slope, one per lr sweep and conserved family, "
              "over the conservation rows of the sweep's runs): first, each sweep's fitted log–log slope ± its "
              "standard error (thick) and ± the verdict's tolerance (thin) against the predicted slope (black: 2 "
              "for plain SGD, 1 for Adam and for weight decay); then each sweep's ‖ΔQ‖ against η with the fitted "
              "(solid) and predicted (dashed) slope through each checkpoint's points (the fit gives every "
              "checkpoint its own intercept); grey hollow: at the rounding level, left out of the fit."),
    "saddles": ("finding 6: saddle spectra against the weight-decay threshold",
                "Discrete saddles (findings rows discrete_saddle_spectrum, discrete_saddle_wd_threshold): left, "
                "against the predicted threshold γ* = −λ_min of the first-order block, the bottom Ritz value of H "
                "on the dead or duplicated unit's subspace (circles: predicted on the dashed y = −γ*) and "
                "λ_min(H_sub + γ₊I) just above the threshold (triangles: above 0 when γ* is right); hollow: the "
                "untouched trained units (control); right, the measured threshold ± its tolerance over training "
                "with the predicted γ* as a bar."),
}

MEASUREMENT_ONLY = {"block_sharpness": "each block's top Hessian eigenvalue by Lanczos on its block operator, "
                                       "a measurement (no prediction, no verdict)"}


def _findings_sql(t: Tables) -> str:
    return f"""select run_id, step, finding, transformation, symmetry, control,
                      {_optional(t, 'findings', 'rank', 'eigenvalue', 'statistic_std', 'scale', 'tolerance_reason')},
                      statistic, predicted, residual, tolerance, verdict from findings"""


def _findings_section(t: Tables, sec: Section, out: Path, rows: list[dict]) -> None:
    from eqlab.pipeline.report_findings import DRAWS, finding

    present = {r["finding"] for r in rows}
    groups = finding_groups()
    known = [n for _, _, names in groups for n in names]
    names = sorted(present, key=lambda f: (known.index(f) if f in known else len(known), f))

    def generic(i: int, name: str) -> None:
        _figure(sec, out, f"finding-{i}", finding(name, [r for r in rows if r["finding"] == name]),
                f"finding {name}: measured vs predicted",
                f"{name} (findings): left, each row's measured statistic against the theory's prediction (dashed: "
                "equal); right, |measured − predicted| over the row's tolerance at each checkpoint (dashed: 1). "
                "Filled: symmetry rows; hollow: negative controls; colour: verdict."
                + (f" {name}: {MEASUREMENT_ONLY[name]}, drawn over training." if name in MEASUREMENT_ONLY else ""))

    for number, f, row_names in groups:
        mine = [r for r in rows if r["finding"] in row_names]
        if not mine and f.name not in THEORY:
            continue  # no rows and no figure of its own
        sec.parts.append(f'<h3 id="finding-{esc(f.name)}">Finding {number}: {esc(f.name)} '
                         f'<small>(eqlab reproduce {esc(f.name)})</small></h3><p class="what">{esc(f.tests)}</p>')
        for name in row_names:
            if name in present:
                generic(names.index(name), name)
        if f.name not in THEORY:
            continue
        drawn = DRAWS[f.name]
        if any(r["finding"] in drawn for r in mine):
            alt, caption = THEORY[f.name]
            _figure(sec, out, f"theory-{f.name}", _theory_figure(f.name, t, [r for r in mine if r["finding"] in drawn]),
                    alt, caption)
        else:
            sec.note(f"no figure of finding {number} ({f.name}): the findings table has no rows of "
                     f"{', '.join(drawn)}" + (" (it needs an lr sweep: runs that differ only in lr and seed)"
                                              if f.name == "drift" else ""))
    others = [n for n in names if n not in known]
    if others:
        sec.parts.append("<h3>Other findings</h3>")
        for name in others:
            generic(names.index(name), name)
    _findings_tables(sec, t, rows)


def _drift_slopes(rows: list[dict]) -> dict[tuple, str]:
    """The drift finding's fitted slopes ± their standard errors, by the summary's (finding, run, symmetry,
    control) (each row: one sweep and one conserved family)."""
    from eqlab.pipeline.report_findings import DRIFT

    out: dict[tuple, list[str]] = {}
    for r in sorted((r for r in rows if r["finding"] == DRIFT), key=lambda r: _rf().natural_key(r["transformation"])):
        p, se = r["statistic"], r["statistic_std"]
        slope = ("no slope" if p is None or not math.isfinite(p) else
                 f"{p:.3g}" + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else
                               " ± ? (no degrees of freedom for an SE)"))
        out.setdefault((r["finding"], r["run_id"], r["symmetry"], bool(r["control"])), []).append(
            f"{r['transformation']}: {slope} (predicted {fmt(r['predicted'])})")
    return {k: "; ".join(v) for k, v in out.items()}


def _findings_tables(sec: Section, t: Tables, rows: list[dict]) -> None:
    rf = _rf()
    summary = t.rows('''select finding, run_id, symmetry, control, count(*) as n,
                               count(*) filter (where verdict = 'holds') as holds,
                               count(*) filter (where verdict = 'violated') as violated,
                               count(*) filter (where verdict = 'inconclusive') as inconclusive,
                               count(*) filter (where verdict not in ('holds', 'violated', 'inconclusive')) as other,
                               max(residual / nullif(tolerance, 0)) as worst
                        from findings group by all order by all''')
    slopes = _drift_slopes(rows)
    sec.parts.append("<h3>Verdicts by finding, run and family</h3>" + _table(
        ["finding", "run", "symmetry", "control", "rows", "holds", "violated", "inconclusive",
         "other", "max residual / tolerance", "fitted slope ± SE"],
        [[r[c] for c in ("finding", "run_id", "symmetry", "control", "n", "holds", "violated",
                         "inconclusive", "other", "worst")]
         + [slopes.get((r["finding"], r["run_id"], r["symmetry"], bool(r["control"])), "")] for r in summary],
        cls="summary", id_="findings-summary"))
    rows.sort(key=lambda r: (r["finding"], rf.natural_key(r["run_id"]), r["step"], r["transformation"],
                             bool(r["control"]), -1 if r["rank"] is None else r["rank"]))
    shown = rows[:MAX_ROWS]
    head = ["finding", "run", "step", "transformation", "symmetry", "control", "rank", "eigenvalue", "statistic",
            "std", "predicted", "residual", "tolerance", "verdict"]
    table = _table(head, [[r["finding"], r["run_id"], r["step"], r["transformation"], r["symmetry"], r["control"],
                           r["rank"], r["eigenvalue"], r["statistic"], r["statistic_std"], r["predicted"],
                           r["residual"], r["tolerance"], r["verdict"]] for r in shown],
                   cls="rows", verdict_col=len(head) - 1, titles=[r["tolerance_reason"] or "" for r in shown],
                   id_="findings-table")
    more = (f" (the first {MAX_ROWS} of {len(rows)}; all of them: eqlab query \"select * from findings\")"
            if len(rows) > MAX_ROWS else "")
    sec.parts.append(f"<details><summary>All {len(rows)} findings rows{esc(more)} — hover a verdict for its "
                     f"tolerance's reason</summary>{table}</details>")


_findings = TableSection(
    "findings", "findings", "no findings figures or table",
    ("finding", "transformation", "symmetry", "control", "statistic", "predicted", "residual", "tolerance", "verdict"),
    _findings_sql, then=_findings_section)


TITLES = {"runs": "Runs", "training": "Training", "spectra": "Hessian spectra over training",
          "densities": "Spectral densities (SLQ) over training", "blocks": "Per-block sharpness over training",
          "identities": "Symmetry identities", "conservation": "Conserved quantities under the optimizers",
          "findings": "Findings"}
SECTIONS = (_runs, _training, _spectra, _densities, _blocks, _identities, _conservation, _findings)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 1.5em 3em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-top: 0.6em; }
.meta { color: #555; margin-top: 0; } nav a { margin-right: 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 13px; max-width: 1100px; }
.note { color: #7a4b00; background: #fff6e0; border-left: 3px solid #e0a000; padding: 0.3em 0.7em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.v-holds { background: #e3f5e1; } .v-violated, .v-rejected { background: #fbe1e1; }
.v-not_discriminating, .v-inconclusive { background: #fff1d6; }
p.what { color: #333; margin-top: 0; max-width: 1100px; }
details summary { cursor: pointer; margin: 0.6em 0; }
"""


def build_report(results: Path, out: Path | None = None) -> Report:
    """Write ``index.html`` and its figures into ``out`` (default ``<results>/report``); returns what was
    written. Raises ReportError / QueryError (one line) for a folder without readable tables."""
    results = Path(results)
    check_results(results)
    out = Path(out) if out is not None else results / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(FIGURE_GLOB):  # a previous report's figures (one may be omitted this time)
        old.unlink()
    t = Tables(results)
    try:
        studies = [r["study"] for r in t.rows("select distinct study from runs order by 1")] \
            if "runs" in t.present else []
        sections = []
        for make in SECTIONS:
            try:
                sections.append(make(t, out))
            except Exception as e:  # one section's trouble (an old schema, odd values) never loses the page
                anchor = getattr(make, "anchor", None) or make.__name__.strip("_")
                sec = Section(anchor, TITLES.get(anchor, anchor.capitalize()))
                sec.note(str(e) if isinstance(e, _Skip) else
                         f"this section could not be drawn: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                sections.append(sec)
        linked = {f for s in sections for f in s.figures}
        for orphan in out.glob(FIGURE_GLOB):  # written by a section that then failed
            if orphan.name not in linked:
                orphan.unlink()
    finally:
        t.close()
    import eqlab

    title = f"eqlab report: {', '.join(studies) or results.name}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>\n' + "\n".join(s.parts) + "</section>"
                     for s in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n'
            f"<h1>{esc(title)}</h1>\n"
            f'<p class="meta">results: <code>{esc(results.resolve())}</code> · written {esc(now)} by eqlab '
            f"{esc(eqlab.__version__)} · query the same tables: <code>eqlab query --results {esc(results)} "
            f"&quot;select * from findings&quot;</code></p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")
    index = out / "index.html"
    tmp = out / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return Report(index, [out / f for s in sections for f in s.figures], [n for s in sections for n in s.notes])
