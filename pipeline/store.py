"""Keyed, atomic Parquet writes: one file per (table, run, step); rewriting a key replaces its rows.

Layout: ``<results>/<table>/<run_id>/<step:09d>.parquet`` (a run-level table uses step -1 → ``run``).
A file is written under a temporary name, fsynced and renamed into place, so a crash never leaves a
partial file and a rerun of a stage replaces exactly that stage's rows: nothing is lost or duplicated.

Every file records the ``config_hash`` of what produced it (column and metadata). A stage skips a key
only if `has_rows` finds a readable file (page checksums verified) carrying the hash it would write;
an unreadable file (truncated, bit-flipped) is moved aside as ``*.corrupt-<time>`` (never deleted) and
recomputed, and a file with another hash is simply rewritten.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from eqlab.pipeline.schema import SCHEMA_VERSION, TABLES

RUN_LEVEL = -1  # the `step` of rows that describe a whole run rather than one checkpoint


def _key_path(results: Path, table: str, run_id: str, step: int) -> Path:
    name = "run" if step == RUN_LEVEL else f"{step:09d}"
    return Path(results) / table / run_id / f"{name}.parquet"


def _provenance(study_hash: str | None, config_hash: str) -> dict[bytes, bytes]:
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
            "schema_version": SCHEMA_VERSION, "study_hash": study_hash or "",
            "config_hash": config_hash}
    return {b"eqlab": json.dumps(meta).encode()}


def write_rows(results: Path, table: str, run_id: str, step: int, rows: list[dict],
               study: str, study_hash: str | None = None, config_hash: str = "") -> Path:
    """Replace the rows of key (table, run_id, step) with ``rows`` (dicts of the table's columns)."""
    schema = TABLES[table]
    full = [{"schema_version": SCHEMA_VERSION, "study": study, "run_id": run_id, "step": step,
             "config_hash": config_hash, **r} for r in rows]
    unknown = {k for r in full for k in r} - set(schema.names)
    if unknown:
        raise KeyError(f"table {table!r} has no columns {sorted(unknown)}")
    arrow = pa.Table.from_pylist(full, schema=schema).replace_schema_metadata(_provenance(study_hash, config_hash))
    path = _key_path(results, table, run_id, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(arrow, tmp, write_page_checksum=True)
        with open(tmp, "rb") as f:  # durable before it becomes visible: a power cut leaves old or new, not empty
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def stored_hash(path: Path) -> str | None:
    """The config hash a result file was written with; None if the file cannot be read whole."""
    try:
        meta = pq.read_schema(path).metadata or {}
        pq.read_table(path, page_checksum_verification=True)  # every page: truncation or bit flips fail here
        return json.loads(meta.get(b"eqlab", b"{}")).get("config_hash", "")
    except (OSError, ValueError, pa.ArrowException):
        return None


def quarantine(path: Path) -> Path:
    """Move an unreadable file out of the tables (kept for inspection, never deleted)."""
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
    os.replace(path, dest)
    return dest


def has_rows(results: Path, table: str, run_id: str, step: int, config_hash: str | None = None,
             log=None) -> bool:
    """True if key (table, run_id, step) is stored, readable and (when given) written with ``config_hash``.
    An unreadable file is quarantined, so the caller recomputes the key."""
    path = _key_path(results, table, run_id, step)
    if not path.exists():
        return False
    got = stored_hash(path)
    if got is None:
        dest = quarantine(path)
        if log:
            log(f"[store] {table}/{run_id}/{path.name} is unreadable (truncated or corrupt): moved to "
                f"{dest.name}, recomputing")
        return False
    return config_hash is None or got == config_hash


# per-checkpoint tables a run's rerun may have to prune (runs and inspections are run-level)
TABLES_BY_RUN = ("checkpoints", "metrics", "spectra", "lanczos", "densities", "block_spectra", "identities", "conservation",
                 "findings")


def prune(results: Path, table: str, run_id: str, keep: set[int]) -> list[Path]:
    """Delete a run's files for steps not in ``keep`` (the caller holds the results lock)."""
    gone = []
    for f in sorted((Path(results) / table / run_id).glob("*.parquet")):
        if f.stem != "run" and int(f.stem) not in keep:
            f.unlink()
            gone.append(f)
    return gone


def read_key(results: Path, table: str, run_id: str, step: int) -> pa.Table:
    path = _key_path(results, table, run_id, step)
    return pq.read_table(path, schema=TABLES[table]) if path.exists() else TABLES[table].empty_table()


def table_files(results: Path, table: str) -> list[Path]:
    root = Path(results) / table
    return sorted(root.glob("*/*.parquet")) if root.is_dir() else []


def read_table(results: Path, table: str) -> pa.Table:
    """All rows of a table (empty table with the declared schema when nothing is written yet)."""
    files = table_files(results, table)
    if not files:
        return TABLES[table].empty_table()
    return pa.concat_tables([pq.read_table(f, schema=TABLES[table]) for f in files])
