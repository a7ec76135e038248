"""`eqlab report`: a study's tables as one self-contained HTML page with PNG figures.

Reads the results folder through the same confined DuckDB connection as `eqlab query` (every table a
view; nothing outside the folder readable) and writes ``index.html`` and ``fig-*.png`` into the output
folder (default ``<results>/report``): runs, training curves, Hessian spectra and SLQ densities over
training, per-block sharpness, identity residuals per dtype and order, conservation drift against the
learning rate, each finding against its prediction, and the findings table with its verdicts. A table
that is missing or empty gives a one-line note in the page instead of its figure; the page has no
script and loads nothing but its own PNGs.

Imports: duckdb, pyarrow's table names and matplotlib (Agg canvas). torch loads only to draw the
densities figure, whose density is the curvature engine's own (`analyses/curvature/slq.SLQResult`),
and only when the `densities` table has rows.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from eqlab.pipeline.query import QueryError, connect

FIGURE_GLOB = "fig-*.png"   # the files a report writes (and replaces) in its output folder
MAX_ROWS = 5000             # rows of the full findings table shown in the page (all are counted)
KNOWN_FINDINGS = ("flat_symmetry_direction", "gradient_hessian_alignment")


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


def _spectra(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("spectra", TITLES["spectra"])
    why = t.why_empty("spectra")
    if why:
        sec.note(f"no spectra figure: {why}")
        return sec
    t.need("spectra", ["which", "rank", "eigenvalue", "converged"])
    rows = t.rows("select run_id, step, which, rank, eigenvalue, converged from spectra")
    _figure(sec, out, "spectra", rf.spectra(rows), "top Hessian eigenvalues over training",
            "Lanczos eigenvalues of the full Hessian at each checkpoint (spectra), one line per rank; hollow "
            "markers: not converged (true residual above the tolerance, or the verification block found a "
            "missed eigenvalue).")
    return sec


def _densities(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("densities", TITLES["densities"])
    why = t.why_empty("densities")
    if why:
        sec.note(f"no densities figure: {why}")
        return sec
    t.need("densities", ["probe", "dim", "alphas", "betas"])
    groups = t.rows("""select run_id, step, max(dim) as dim, list(alphas order by probe) as alphas,
                              list(betas order by probe) as betas from densities group by run_id, step""")
    _figure(sec, out, "densities", rf.densities(groups), "SLQ spectral densities over training",
            "Stochastic Lanczos quadrature densities re-derived from the stored tridiagonals (densities): each "
            "probe's Gauss nodes and weights pooled, Gaussian-smoothed (σ = 2 % of the run's spectral range), "
            "one curve per checkpoint, log scale.")
    return sec


def _blocks(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("blocks", TITLES["blocks"])
    why = t.why_empty("block_spectra")
    if why:
        sec.note(f"no per-block heatmap: {why}")
        return sec
    t.need("block_spectra", ["block", "dim", "which", "rank", "eigenvalue"])
    rows = t.rows("select run_id, step, block, dim, which, rank, eigenvalue from block_spectra")
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
    return sec


def _identities(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("identities", TITLES["identities"])
    why = t.why_empty("identities")
    if why:
        sec.note(f"no identities figure: {why}")
        return sec
    t.need("identities", ["symmetry", "order", "control", "dtype", "residual", "tolerance", "verdict"])
    rows = t.rows('select run_id, step, symmetry, "order", control, dtype, residual, tolerance, verdict '
                  "from identities")
    _figure(sec, out, "identities", rf.identities(rows), "identity residuals per dtype and order",
            "Every identity check (identities): order 0 the loss at finite group elements, 1 the gradient identity, "
            "2 the Hessian identity, per dtype; top the relative residual, bottom the residual over the row's "
            "own rounding-derived tolerance (below the dashed line: holds). Crosses: negative controls, which "
            "must come out above it.")
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
    return sec


def _conservation(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("conservation", TITLES["conservation"])
    why = t.why_empty("conservation")
    if why:
        sec.note(f"no conservation figure: {why}")
        return sec
    t.need("conservation", ["symmetry", "optimizer", "lr", "change", "predicted_change", "verdict"])
    rows = t.rows("select run_id, step, symmetry, optimizer, lr, change, predicted_change, verdict from conservation")
    _figure(sec, out, "conservation", rf.conservation(rows), "conservation drift vs learning rate",
            "Each conserved family's change over the replayed step after each checkpoint (conservation) against "
            "the run's learning rate, log-log, with the least-squares slope per optimizer and family when the "
            "study has two learning rates or more (SGD's exact law: slope 2; Adam's drift: slope 1); right: the "
            "measured change against the exact discrete-time law's prediction.")
    summary = t.rows('''select run_id, optimizer, symmetry, count(*) as n,
                               string_agg(distinct verdict, ', ' order by verdict) as verdicts
                        from conservation group by all order by all''')
    sec.parts.append("<h3>Verdicts</h3>" + _table(
        ["run", "optimizer", "symmetry", "checkpoints", "verdicts"],
        [[r["run_id"], r["optimizer"], r["symmetry"], r["n"], r["verdicts"]] for r in summary], cls="summary"))
    return sec


def _findings(t: Tables, out: Path) -> Section:
    from eqlab.pipeline import report_figures as rf

    sec = Section("findings", TITLES["findings"])
    why = t.why_empty("findings")
    if why:
        sec.note(f"no findings figures or table: {why}")
        return sec
    t.need("findings", ["finding", "transformation", "symmetry", "control", "statistic", "predicted", "residual",
                        "tolerance", "verdict"])
    cols = t.columns("findings")
    opt = lambda c: c if c in cols else f"NULL as {c}"  # noqa: E731  (columns added later in the schema)
    rows = t.rows(f"""select run_id, step, finding, transformation, symmetry, control, {opt('rank')},
                             {opt('eigenvalue')}, statistic, {opt('statistic_std')}, predicted, residual, tolerance,
                             verdict, {opt('tolerance_reason')} from findings""")
    names = sorted({r["finding"] for r in rows},
                   key=lambda f: (KNOWN_FINDINGS.index(f) if f in KNOWN_FINDINGS else len(KNOWN_FINDINGS), f))
    for i, name in enumerate(names):
        _figure(sec, out, f"finding-{i}", rf.finding(name, [r for r in rows if r["finding"] == name]),
                f"finding {name}: measured vs predicted",
                f"{name} (findings): left, each row's measured statistic against the theory's prediction (dashed: "
                "equal); right, |measured − predicted| over the row's tolerance at each checkpoint (dashed: 1). "
                "Filled: symmetry rows; hollow: negative controls; colour: verdict.")
    summary = t.rows('''select finding, run_id, symmetry, control, count(*) as n,
                               count(*) filter (where verdict = 'holds') as holds,
                               count(*) filter (where verdict = 'violated') as violated,
                               count(*) filter (where verdict = 'inconclusive') as inconclusive,
                               count(*) filter (where verdict not in ('holds', 'violated', 'inconclusive')) as other,
                               max(residual / nullif(tolerance, 0)) as worst
                        from findings group by all order by all''')
    sec.parts.append("<h3>Verdicts by finding, run and family</h3>" + _table(
        ["finding", "run", "symmetry", "control", "rows", "holds", "violated", "inconclusive",
         "other", "max residual / tolerance"],
        [[r[c] for c in ("finding", "run_id", "symmetry", "control", "n", "holds", "violated",
                         "inconclusive", "other", "worst")] for r in summary],
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
    return sec


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
                anchor = make.__name__.strip("_")
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
