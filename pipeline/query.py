"""SQL over a study's result tables with DuckDB: every table folder is a view named after it."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import duckdb

from pipeline.schema import TABLES


class QueryError(ValueError):
    pass


def connect(results: Path) -> duckdb.DuckDBPyConnection:
    results = Path(results)
    if not results.is_dir():
        raise QueryError(f"no results at {results} (run a study first, or pass --results DIR)")
    con = duckdb.connect()
    for table in TABLES:
        files = sorted((results / table).glob("*/*.parquet"))
        if files:
            listing = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
    return con


def run_query(results: Path, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(results)
    try:
        cur = con.execute(sql)
    except duckdb.Error as e:
        raise QueryError(str(e).splitlines()[0]) from None
    if cur.description is None:
        return [], []
    return [d[0] for d in cur.description], cur.fetchall()


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
