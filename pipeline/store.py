"""Keyed, atomic Parquet writes: one file per (table, run, step); rewriting a key replaces its rows.

Layout: ``<results>/<table>/<run_id>/<step:09d>.parquet`` (a run-level table uses step -1 → ``run``).
A file is written under a temporary name and renamed into place, so a crash never leaves a partial
file and a rerun of a stage replaces exactly that stage's rows: nothing is lost or duplicated.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import SCHEMA_VERSION, TABLES

RUN_LEVEL = -1  # the `step` of rows that describe a whole run rather than one checkpoint


def _key_path(results: Path, table: str, run_id: str, step: int) -> Path:
    name = "run" if step == RUN_LEVEL else f"{step:09d}"
    return Path(results) / table / run_id / f"{name}.parquet"


def _provenance(study_hash: str | None) -> dict[bytes, bytes]:
    versions = {}
    for dist in ("torch", "ray", "transformers", "pyarrow", "numpy", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    meta = {"eqlab_version": metadata.version("eqlab"), "git_commit": commit, "versions": versions,
            "schema_version": SCHEMA_VERSION, "study_hash": study_hash or ""}
    return {b"eqlab": json.dumps(meta).encode()}


def write_rows(results: Path, table: str, run_id: str, step: int, rows: list[dict],
               study: str, study_hash: str | None = None) -> Path:
    """Replace the rows of key (table, run_id, step) with ``rows`` (dicts of the table's columns)."""
    schema = TABLES[table]
    full = [{"schema_version": SCHEMA_VERSION, "study": study, "run_id": run_id, "step": step, **r} for r in rows]
    unknown = {k for r in full for k in r} - set(schema.names)
    if unknown:
        raise KeyError(f"table {table!r} has no columns {sorted(unknown)}")
    arrow = pa.Table.from_pylist(full, schema=schema).replace_schema_metadata(_provenance(study_hash))
    path = _key_path(results, table, run_id, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(arrow, tmp)
    os.replace(tmp, path)
    return path


def has_rows(results: Path, table: str, run_id: str, step: int) -> bool:
    return _key_path(results, table, run_id, step).exists()


def table_files(results: Path, table: str) -> list[Path]:
    root = Path(results) / table
    return sorted(root.glob("*/*.parquet")) if root.is_dir() else []


def read_table(results: Path, table: str) -> pa.Table:
    """All rows of a table (empty table with the declared schema when nothing is written yet)."""
    files = table_files(results, table)
    if not files:
        return TABLES[table].empty_table()
    return pa.concat_tables([pq.read_table(f, schema=TABLES[table]) for f in files])
