"""SQL over a study's result tables with DuckDB: every table folder is a view named after it.

The connection is confined: only one read-only statement (a SELECT, or what DuckDB rewrites into one:
FROM ..., DESCRIBE, SHOW, SUMMARIZE, PIVOT; or EXPLAIN [ANALYZE] of one) runs; file access is limited to the results folder
(``enable_external_access = false`` with ``allowed_directories``), extensions are neither installed
nor loaded, and the configuration is locked before the user's SQL is seen. So ``COPY ... TO``,
``ATTACH``, ``read_csv('/etc/passwd')``, ``INSTALL``/``LOAD`` and ``SET`` are refused.

Only duckdb and the table schemas (pyarrow) are imported, and only when a query runs (no torch):
`eqlab query` answers in well under a second.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path


class QueryError(ValueError):
    pass


def _message(e: Exception) -> str:
    """DuckDB's error on one line, its hints ("Did you mean ...") included, the caret picture dropped."""
    lines = []
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith("LINE "):
            break
        if line:
            lines.append(line)
    return " ".join(lines) or type(e).__name__


def connect(results: Path):
    import duckdb

    from eqlab.pipeline.schema import TABLES

    results = Path(results)
    if not results.exists():
        raise QueryError(f"no results at {results} (run a study first, or pass --results DIR)")
    if not results.is_dir():
        raise QueryError(f"--results {results}: not a folder")
    root = results.resolve()
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False,
                                             "allow_community_extensions": False})
    try:
        for table in TABLES:
            try:
                files = sorted((root / table).glob("*/*.parquet"))
            except OSError:
                files = []
            if files:
                listing = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
                try:
                    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
                except duckdb.Error as e:
                    raise QueryError(f"cannot read table {table} in {results}: {_message(e)} (rerunning the study "
                                     "moves unreadable files aside and recomputes them)") from None
        con.execute("SET allowed_directories = ?", [[str(root) + "/"]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as e:
        con.close()
        raise QueryError(f"cannot open the tables in {results}: {_message(e)}") from None
    except QueryError:
        con.close()
        raise
    return con


def run_query(results: Path, sql: str) -> tuple[list[str], list[tuple]]:
    import duckdb

    if not sql or not re.sub(r"[\s;]", "", sql):
        raise QueryError("empty SQL: give one SELECT statement, e.g. \"select * from runs\"")
    con = connect(results)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryError(_message(e)) from None
        if len(statements) != 1:
            raise QueryError(f"expected one SQL statement, got {len(statements)}")
        kind = statements[0].type
        if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN [ANALYZE] runs its statement: judge that one
            inner = re.match(r"\s*explain(\s+analyze)?\s+(.*)", sql, re.IGNORECASE | re.DOTALL)
            try:
                inner_kinds = [s.type for s in con.extract_statements(inner.group(2))] if inner else []
            except duckdb.Error:
                inner_kinds = []
            if inner_kinds == [duckdb.StatementType.SELECT]:
                kind = duckdb.StatementType.SELECT
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(f"only a read-only SELECT may run here (got a statement of type {kind.name}); "
                             "eqlab query changes no table and writes no file")
        try:
            cur = con.execute(statements[0])
            if cur.description is None:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()
        except duckdb.Error as e:
            raise QueryError(_message(e)) from None
    finally:
        con.close()


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return "NULL" if v is None else str(v)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 48) -> str:
    cells = [[_cell(v)[:max_width] for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [line(columns), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def format_csv(columns: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows([[("" if v is None else v) for v in r] for r in rows])
    return buf.getvalue()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def format_json(columns: list[str], rows: list[tuple]) -> str:
    return json.dumps([{c: _jsonable(v) for c, v in zip(columns, r)} for r in rows])
