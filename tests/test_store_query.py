"""Keyed Parquet writes replace rather than duplicate; DuckDB sees every table as a view."""
import json

import pyarrow.parquet as pq
import pytest

from eqlab.pipeline import query, store
from eqlab.pipeline.schema import SCHEMA_VERSION


def spectra_row(lam, rank=0):
    return {"which": "LA", "rank": rank, "eigenvalue": lam, "residual": 1e-9, "converged": True, "hvps": 30,
            "iterations": 30, "workers": 2, "n_examples": 512, "dtype": "float64", "seconds": 0.5}


def test_rewrite_replaces_rows_atomically(tmp_path):
    store.write_rows(tmp_path, "spectra", "cnn", 10, [spectra_row(3.0), spectra_row(2.0, 1)], "s", "abc")
    store.write_rows(tmp_path, "spectra", "cnn", 10, [spectra_row(4.0)], "s", "abc")
    store.write_rows(tmp_path, "spectra", "cnn", 20, [spectra_row(5.0)], "s", "abc")
    table = store.read_table(tmp_path, "spectra")
    assert sorted(table.column("eigenvalue").to_pylist()) == [4.0, 5.0]
    assert set(table.column("schema_version").to_pylist()) == {SCHEMA_VERSION}
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind
    meta = json.loads(pq.read_schema(store.table_files(tmp_path, "spectra")[0]).metadata[b"eqlab"])
    assert meta["study_hash"] == "abc" and meta["versions"]["torch"].startswith("2.13")


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(KeyError):
        store.write_rows(tmp_path, "spectra", "cnn", 0, [{**spectra_row(1.0), "bogus": 1}], "s")
    assert not store.table_files(tmp_path, "spectra")


def test_query_views_and_formats(tmp_path):
    for step, lam in [(0, 1.5), (3, 2.5)]:
        store.write_rows(tmp_path, "spectra", "cnn", step, [spectra_row(lam)], "s")
    cols, rows = query.run_query(tmp_path, "select step, eigenvalue from spectra order by step")
    assert cols == ["step", "eigenvalue"] and rows == [(0, 1.5), (3, 2.5)]
    assert query.format_csv(cols, rows).splitlines() == ["step,eigenvalue", "0,1.5", "3,2.5"]
    assert json.loads(query.format_json(cols, rows)) == [{"step": 0, "eigenvalue": 1.5}, {"step": 3, "eigenvalue": 2.5}]
    assert "(2 rows)" in query.format_table(cols, rows)
    with pytest.raises(query.QueryError, match="identities"):
        query.run_query(tmp_path, "select * from identities")  # no such table written yet


def test_query_without_results(tmp_path):
    with pytest.raises(query.QueryError, match="no results"):
        query.run_query(tmp_path / "nothing", "select 1")
