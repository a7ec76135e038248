"""`eqlab report` on a real study's tables: every figure written and linked, the findings table's verdicts
the stored ones, a missing or empty table a note (not a crash), hostile strings escaped, bad input one line
with exit status 2, and, where a headless Chromium is available, the page opened in it."""
import os
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eqlab.pipeline import store
from eqlab.pipeline.query import run_query

# The report needs every table with rows, and findings rows of every finding with a figure of its own (the
# drift finding's need an lr sweep). A finished study in this session's base temp folder that has all of
# them (test_end_to_end.py's module fixture, whose runs "cnn" and "cnn-lr0.03" are a sweep) is copied and
# reused; run alone, this module runs this study of its own (the same sweep, shorter).
STUDY = {
    "study": {"name": "report", "seed": 0},
    "ray": {"num_cpus": 2},
    "spectra": {"top_k": 2, "tol": 1e-6, "max_iter": 40, "workers": 1, "examples": 32, "microbatch": 32,
                "dtype": "float64", "density_probes": 2, "density_steps": 10, "block_top_k": 1},
    "identities": {"dtypes": ["float64", "float32"], "examples": 32, "probes": 1},
    "runs": [  # an lr sweep of two runs (sweep "cnn"): the drift finding (5) has rows only for a sweep
        {"name": name, "family": "digits_cnn", "model": {"channels": [2, 4], "hidden": 8, "bn_eps": 1e-20},
         "optimizer": "sgd", "lr": lr, "batch_size": 16, "steps": 4, "n_checkpoints": 2}
        for name, lr in (("cnn", 0.1), ("cnn-lr0.03", 0.03))
    ],
}
RUN = "cnn"
NEEDED = ("runs", "checkpoints", "metrics", "spectra", "densities", "block_spectra", "identities", "conservation",
          "findings")


def _complete(results: Path) -> bool:
    if not all(store.table_files(results, t) for t in NEEDED):  # the checkpoints table included
        return False
    try:
        if not all(run_query(results, f"select count(*) from {t}")[1][0][0] > 0 for t in NEEDED):
            return False
        _, rows = run_query(results, "select distinct finding from findings")
    except Exception:
        return False
    return set(THEORY_ROWS) <= {r[0] for r in rows}


# one row finding of each finding with its own figure (3 blocks, 4 indefinite, 5 drift, 6 saddles)
THEORY_ROWS = ("block_orbit_congruence", "indefiniteness", "conservation_drift_slope", "discrete_saddle_wd_threshold")


@pytest.fixture(scope="module")
def study_results(request, tmp_path_factory):
    """A results folder of a real study holding every table (a copy: the tests may edit theirs)."""
    dest = tmp_path_factory.mktemp("report_results") / "results"
    for done in sorted(tmp_path_factory.getbasetemp().glob("e2e*")):  # test_end_to_end's finished study
        if _complete(done):
            shutil.copytree(done, dest, ignore=shutil.ignore_patterns("step=*", "report", ".eqlab.lock"))
            return dest
    request.getfixturevalue("ray_cluster")
    from eqlab.pipeline.runner import run_study
    from eqlab.pipeline.study import parse_study

    run_study(parse_study(STUDY), dest, log=lambda *_: None)
    assert _complete(dest)
    return dest


def _eqlab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


class _Page(HTMLParser):
    """The parts of index.html the tests look at: images, notes, and the rows of each table by id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs, self.notes, self.tables, self.texts = [], [], {}, []
        self._table = self._row = self._cell = None
        self._in_note = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "p" and "note" in (a.get("class") or "").split():
            self._in_note = True
            self.notes.append("")
        elif tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [tag, a, ""]

    def handle_endtag(self, tag):
        if tag == "p":
            self._in_note = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._in_note:
            self.notes[-1] += data
        if self._cell is not None:
            self._cell[2] += data


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    page.close()
    return page


def _body(page: _Page, table: str) -> list[dict]:
    head, *rows = page.tables[table]
    names = [c[2] for c in head]
    return [{n: c[2] for n, c in zip(names, r)} | {"_verdict_class": [c[1].get("class", "") for c in r][-1]}
            for r in rows]


@pytest.fixture(scope="module")
def report(study_results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report"
    res = _eqlab("report", "--results", study_results, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(out / "index.html") in res.stdout
    return study_results, out, _parse(out / "index.html")


def test_every_figure_is_written_and_linked(report):
    results, out, page = report
    srcs = [a["src"] for a in page.imgs]
    assert len(srcs) == len(set(srcs))
    for src in srcs:
        path = (out / src).resolve()
        assert path.parent == out.resolve(), src  # beside index.html: the folder is self-contained
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", src
    assert sorted(p.name for p in out.glob("*.png")) == sorted(srcs)  # nothing written that is not shown
    names = {Path(s).stem for s in srcs}
    for fig in ("fig-training", "fig-spectra", "fig-densities", "fig-identities", "fig-conservation",
                "fig-theory-blocks", "fig-theory-indefinite", "fig-theory-drift", "fig-theory-saddles"):
        assert fig in names, (fig, names)
    _, runs = run_query(results, "select count(distinct run_id) from block_spectra")
    assert sum(n.startswith("fig-blocks-") for n in names) == runs[0][0]
    _, findings = run_query(results, "select count(distinct finding) from findings")
    assert sum(n.startswith("fig-finding-") for n in names) == findings[0][0] >= 2
    assert page.notes == [], page.notes  # every table has rows: nothing omitted
    assert all(a.get("alt") for a in page.imgs)


def test_findings_table_lists_the_stored_verdicts(report):
    results, _, page = report
    shown = _body(page, "findings-table")
    _, stored = run_query(results, "select finding, run_id, step, transformation, control, verdict from findings")
    # a measurement-only row (block_sharpness) has no verdict: an empty cell
    key = lambda r: (r[0], r[1], int(r[2]), r[3], str(r[4]).lower(), r[5] or "")  # noqa: E731
    assert Counter(key((r["finding"], r["run"], r["step"], r["transformation"], r["control"], r["verdict"]))
                   for r in shown) == Counter(key(r) for r in stored)
    assert {"holds", "violated"} <= {r["verdict"] for r in shown}
    assert all(r["_verdict_class"].split() == ["verdict", f"v-{r['verdict']}"] for r in shown)
    # the summary counts the same rows
    summary = _body(page, "findings-summary")
    assert sum(int(r["rows"]) for r in summary) == len(stored)
    assert sum(int(r["holds"]) for r in summary) == sum(r[5] == "holds" for r in stored)


def _run_in_subprocess(results: Path, out: Path):
    """build_report in a fresh interpreter; returns whether torch was imported there."""
    code = ("import sys; from pathlib import Path; from eqlab.pipeline.report import build_report; "
            f"r = build_report(Path({str(results)!r}), Path({str(out)!r})); "
            "print('torch' in sys.modules); print(len(r.figures))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    torch_loaded, n = res.stdout.split()
    return torch_loaded == "True", int(n)


def test_a_missing_or_empty_table_gives_a_note_not_a_crash(study_results, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(study_results, results)
    shutil.rmtree(results / "densities")                  # missing
    for f in store.table_files(results, "block_spectra"):  # empty: a file with the schema and no rows
        f.unlink()
    store.write_rows(results, "block_spectra", RUN, 0, [], study="report")
    shutil.rmtree(results / "conservation")
    out = tmp_path / "out"
    torch_loaded, n = _run_in_subprocess(results, out)
    assert not torch_loaded  # without densities to draw, the report never imports torch
    page = _parse(out / "index.html")
    notes = " | ".join(page.notes)
    assert "table densities is missing" in notes and "table block_spectra is empty" in notes, notes
    assert "table conservation is missing" in notes, notes
    assert len(page.notes) == 3, page.notes
    names = {Path(a["src"]).stem for a in page.imgs}
    assert not any(n.startswith(("fig-densities", "fig-blocks", "fig-conservation")) for n in names)
    assert {"fig-training", "fig-spectra", "fig-identities"} <= names and len(names) == n
    # an earlier report's figures in the same folder are replaced, not left behind
    assert sorted(p.name for p in out.glob("*.png")) == sorted(a["src"] for a in page.imgs)


def test_only_some_tables_and_hostile_strings(tmp_path):
    """A folder with only runs and findings (no Ray, written directly): the rest are notes; run ids,
    transformations and reasons with markup, quotes and `$` are escaped in the page and drawn as text."""
    results = tmp_path / "results"
    run = '<script>alert("x")</script>&$a_b$'
    store.write_rows(results, "runs", "hostile", -1, [{"family": "digits_cnn", "optimizer": "sgd", "lr": 0.1,
                                                       "status": "ok", "n_params": 10}], study="<b>s</b>")
    rows = []
    for step in (0, 3):
        for control, verdict in ((False, "holds"), (True, "violated")):
            rows.append({"finding": "flat_symmetry_direction", "transformation": "t<i>1</i>&'q'",
                         "symmetry": "_bn<scale>", "control": control, "statistic": 1e-3 if control else 1e-17,
                         "predicted": 0.0, "residual": 1e-3 if control else 1e-17, "tolerance": 1e-14,
                         "statistic_std": 0.0, "verdict": verdict, "tolerance_reason": 'γ <n> "u" & more'})
        store.write_rows(results, "findings", "hostile", step, rows[-2:], study="<b>s</b>")
    import pyarrow as pa
    import pyarrow.parquet as pq

    for r in ("runs", "findings"):  # the stored run id is the hostile one (it has a "/": not a folder name)
        for f in store.table_files(results, r):
            t = pq.read_table(f)
            pq.write_table(t.set_column(t.schema.get_field_index("run_id"), "run_id",
                                        [[run] * t.num_rows]), f)
    # a table of an older schema, without a column a figure needs: that section is a note
    old = results / "identities" / "old" / "000000000.parquet"
    old.parent.mkdir(parents=True)
    pq.write_table(pa.table({"schema_version": pa.array([1], pa.int32()), "study": ["s"], "run_id": [run],
                             "step": pa.array([0], pa.int64()), "symmetry": ["bn_scale"], "residual": [1e-16]}), old)
    out = tmp_path / "out"
    torch_loaded, n = _run_in_subprocess(results, out)
    assert not torch_loaded and n == 1
    text = (out / "index.html").read_text()
    assert "<script>" not in text and "<b>" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;$a_b$" in text
    assert 'title="γ &lt;n&gt; &quot;u&quot; &amp; more"' in text
    page = _parse(out / "index.html")
    assert _body(page, "runs-table")[0]["run_id"] == run
    assert [r["verdict"] for r in _body(page, "findings-table")] == ["holds", "violated"] * 2
    notes = " | ".join(page.notes)
    for table in ("metrics", "checkpoints", "spectra", "densities", "block_spectra", "conservation"):
        assert f"table {table} is missing" in notes, (table, notes)
    assert "table identities has no column order, control, dtype, tolerance, verdict" in notes, notes


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = [(["--results", tmp_path / "nope"], "no results at"),
             (["--results", tmp_path], "no result tables in"),
             (["--results", tmp_path / "file.txt"], "not a folder")]
    (tmp_path / "file.txt").write_text("x")
    store.write_rows(tmp_path / "study", "runs", "r", -1, [{"family": "f"}], study="s")
    cases.append((["--results", tmp_path / "study", "--out", tmp_path / "file.txt"], "--out"))
    for args, expect in cases:
        res = _eqlab("report", *args, timeout=120)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eqlab: error: ") and expect in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "report").exists() and not (tmp_path / "nope").exists()
    # a parent of study folders: the message names them
    res = _eqlab("report", "--results", tmp_path, timeout=120)
    assert "study folders inside it: study" in res.stderr


def test_default_out_is_inside_the_results_folder(study_results, tmp_path):
    results = tmp_path / "results"
    for t in ("runs", "checkpoints"):  # two tables are enough (and quick): the default --out is tested here
        shutil.copytree(study_results / t, results / t, ignore=shutil.ignore_patterns("step=*"))
    res = _eqlab("report", "--results", results)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (results / "report" / "index.html").stat().st_size > 0
    # the report folder is not a table: queries still see only the tables
    _, rows = run_query(results, "select count(*) from runs")
    assert rows[0][0] > 0


def _chromium(p) -> str | None:
    """A Chromium playwright can drive: its own download, else the system's (Debian: chromium-headless-shell)."""
    try:
        own = p.chromium.executable_path
        if own and Path(own).exists():
            return own
    except Exception:
        pass
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_page_opens_in_a_headless_browser(report):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -c requirements.lock -e '.[test]')")
    _, out, page = report
    with sync_api.sync_playwright() as p:
        exe = _chromium(p)
        if exe is None:
            pytest.skip("no headless Chromium on this machine: playwright's browser download is unreachable here; "
                        "install Debian's (apt-get install chromium-headless-shell) or run `playwright install "
                        "chromium` where its host is reachable")
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            problems = []
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            tab.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            tab.goto((out / "index.html").as_uri(), wait_until="load")
            images = tab.evaluate("Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        finally:
            browser.close()
    assert problems == [], problems
    assert len(images) == len(page.imgs) >= 7
    assert all(done and width > 0 for _, done, width in images), images


def _finding_rows(results: Path) -> list[dict]:
    """The findings rows as the report reads them (its own query, through its confined connection)."""
    from eqlab.pipeline.report import Tables, _findings_sql

    t = Tables(results)
    try:
        return t.rows(_findings_sql(t))
    finally:
        t.close()


def _offsets(ax) -> set[tuple[float, float]]:
    """The data points of an axes' scatters (PathCollections; a shaded region is a collection too)."""
    from matplotlib.collections import PathCollection

    return {(float(x), float(y)) for c in ax.collections if isinstance(c, PathCollection) for x, y in c.get_offsets()}


def test_theory_figures_draw_the_findings_rows(report):
    """Findings 3, 4, 6: the points drawn are the stored rows' own (predicted, measured) values; finding 5: the
    fitted slopes shown (figure legend, summary column) are the stored rows' slopes and standard errors."""
    from eqlab.pipeline import findings_blocks, findings_discrete, findings_drift, findings_indefinite
    from eqlab.pipeline import report_findings as rfn
    from eqlab.pipeline.report import Tables, _conservation_points, _conservation_sql

    # the report reads the row finding names from `eqlab reproduce`'s list (no torch): the builders' own
    assert (rfn.BLOCK_SHARPNESS, rfn.CONGRUENCE, rfn.IMBALANCE) == findings_blocks.ROW_FINDINGS
    assert (rfn.INDEFINITENESS, rfn.HESSIAN_MIN) == (findings_indefinite.FINDING, findings_indefinite.HESSIAN_MIN)
    assert rfn.DRIFT == findings_drift.FINDING
    assert {rfn.SADDLE_SPECTRUM, rfn.SUBSPACE_INVARIANCE, rfn.WD_THRESHOLD} == set(findings_discrete.ROW_FINDINGS)
    results, _, page = report
    rows = _finding_rows(results)
    of = lambda *names: [r for r in rows if r["finding"] in names]  # noqa: E731

    blocks = rfn.block_anisotropy(of(rfn.BLOCK_SHARPNESS, rfn.CONGRUENCE, rfn.IMBALANCE))
    cong = of(rfn.CONGRUENCE)
    assert cong and _offsets(blocks.axes[0]) == {(r["predicted"], r["statistic"]) for r in cong}
    positive = {(r["scale"], r["statistic"]) for r in of(rfn.BLOCK_SHARPNESS) if r["statistic"] > 0}
    lowest = min(y for _, y in positive)  # an exact 0 is drawn a decade below it (report_figures.zero_floor)
    assert positive and {p for p in _offsets(blocks.axes[2]) if p[1] >= lowest} == positive

    ind = of(rfn.INDEFINITENESS, rfn.HESSIAN_MIN)
    fig = rfn.indefiniteness(ind)
    assert {r["finding"] for r in ind} == {rfn.INDEFINITENESS, rfn.HESSIAN_MIN}
    assert ind and _offsets(fig.axes[0]) == {(r["predicted"], r["statistic"]) for r in ind}
    assert any(r["control"] for r in ind) and any(not r["control"] for r in ind)

    sad = of(rfn.SADDLE_SPECTRUM, rfn.WD_THRESHOLD, rfn.SUBSPACE_INVARIANCE)
    fig = rfn.discrete_saddles(sad)
    key = lambda r: (r["run_id"], r["step"], r["transformation"], r["control"])  # noqa: E731
    gstar = {key(r): r["predicted"] for r in sad if r["finding"] == rfn.WD_THRESHOLD}
    want = ({(gstar[key(r)], r["eigenvalue"]) for r in sad if r["finding"] == rfn.SADDLE_SPECTRUM}
            | {(r["predicted"], r["eigenvalue"]) for r in sad if r["finding"] == rfn.WD_THRESHOLD})
    assert gstar and _offsets(fig.axes[0]) == want

    drift = of(rfn.DRIFT)
    t = Tables(results)
    try:
        points = [p for p in _conservation_points(t, t.rows(_conservation_sql(t))) if p["sweep"] is not None]
    finally:
        t.close()
    assert {p["sweep"] for p in points} == {r["run_id"] for r in drift} == {"cnn"}  # the sweep of both runs
    assert {p["run_id"] for p in points} == {"cnn", "cnn-lr0.03"}
    fig = rfn.drift(drift, points)
    labels = " | ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
    summary = " | ".join(r["fitted slope ± SE"] for r in _body(page, "findings-summary"))
    for r in drift:
        if r["control"] or r["statistic"] is None or r["statistic"] != r["statistic"]:
            continue
        assert f"{r['transformation']}: slope {r['statistic']:.2f}" in labels, (r, labels)
        assert f"{r['transformation']}: {r['statistic']:.3g}" in summary, (r, summary)
    # each finding named with the line `eqlab reproduce --list` gives it
    from eqlab.pipeline.reproduce import FINDINGS

    text = " ".join(" ".join(page.texts).split())
    for f in FINDINGS:
        assert " ".join(f.tests.split()) in text, f.name


def test_theory_figures_absent_with_a_note_without_their_rows(study_results, tmp_path):
    """Without the rows of findings 3, 4, 5, 6 (the other findings kept), each of their figures is left out
    and a note says which rows are missing; the generic figures of the rest stay."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from eqlab.pipeline.report_findings import DRAWS

    results = tmp_path / "results"
    shutil.copytree(study_results, results)
    gone = [n for names in DRAWS.values() for n in names]  # the rows each theory figure draws
    for f in store.table_files(results, "findings"):
        t = pq.read_table(f)
        kept = t.filter(pc.invert(pc.is_in(t.column("finding"), value_set=pa.array(gone, pa.string()))))
        if kept.num_rows:
            pq.write_table(kept, f)
        else:
            f.unlink()
    _, left = run_query(results, "select count(distinct finding) from findings")
    assert left[0][0] >= 1
    shutil.rmtree(results / "densities")  # quicker (no torch)
    out = tmp_path / "out"
    _run_in_subprocess(results, out)
    page = _parse(out / "index.html")
    names = {Path(a["src"]).stem for a in page.imgs}
    assert not any(n.startswith("fig-theory-") for n in names), names
    assert sum(n.startswith("fig-finding-") for n in names) == left[0][0]
    notes = [n for n in page.notes if n.startswith("no figure of finding")]
    assert len(notes) == 4, page.notes
    for number, name in ((3, "blocks"), (4, "indefinite"), (5, "drift"), (6, "saddles")):
        note = next(n for n in notes if n.startswith(f"no figure of finding {number} ({name})"))
        assert all(r in note for r in DRAWS[name]), note
    assert "lr sweep" in next(n for n in notes if "(drift)" in n)

