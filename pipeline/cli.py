"""The `eqlab` command line: run studies, query their tables (more verbs are added by later stages)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(args) -> int:
    from pipeline.study import load_study

    study = load_study(args.study)  # validates before anything starts or is written
    from pipeline.runner import print_summary, run_study

    results = Path(args.results) if args.results else Path("results") / study.name
    summary = run_study(study, results, address=args.address, dashboard=args.dashboard)
    print_summary(summary)
    print(f"\nresults: {results}   (try: eqlab query --results {results} \"select * from spectra limit 5\")")
    return 0


def _query(args) -> int:
    from pipeline import query as q

    results = Path(args.results) if args.results else Path("results") / "default"
    columns, rows = q.run_query(results, args.sql)
    fmt = {"table": q.format_table, "csv": q.format_csv, "json": q.format_json}[args.format]
    text = fmt(columns, rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqlab", description="Test what parameter symmetries predict about "
                                "gradients and Hessians, on a Ray cluster, into Parquet tables.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a study (the default study if no file is given)")
    r.add_argument("study", nargs="?", help="study TOML file (default: the study shipped with eqlab)")
    r.add_argument("--results", help="where the tables go (default: results/<study name>)")
    r.add_argument("--address", help="an existing Ray cluster (default: start a local one on 127.0.0.1)")
    r.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1) too")
    r.set_defaults(func=_run)

    q = sub.add_parser("query", help="run DuckDB SQL over a study's tables (each table is a view)")
    q.add_argument("sql", help='e.g. "select run_id, step, eigenvalue from spectra where rank = 0"')
    q.add_argument("--results", help="a study's results folder (default: results/default)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.set_defaults(func=_query)
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.query import QueryError
    from pipeline.study import StudyError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StudyError, QueryError) as e:
        print(f"eqlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eqlab: interrupted; rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
