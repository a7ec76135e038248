"""The `eqlab` command line: run studies, query their tables, inspect and measure a user's own model."""
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


def _inspect(args) -> int:
    from pipeline import inspect_cmd as ic

    from pipeline.userfunc import parse_overrides

    rows = ic.inspect_model(args.model, examples=args.examples, overrides=parse_overrides(args.config))
    path = ic.write_inspection(rows, Path(args.results), args.model)
    if args.json:
        print(ic.to_json(rows))
    else:
        print(ic.format_inspection(args.model, rows))
        print(f"table: {path}")
    return 0


def _spectrum(args) -> int:
    from pipeline import spectrum_cmd as sc
    from pipeline.allocator import keep_freed_memory
    from pipeline.userfunc import parse_overrides

    keep_freed_memory()  # the CLI owns its process: steady, fault-free HVPs (pipeline/allocator.py)
    if args.method != "auto" and (args.workers > 1 or args.sharded_basis):
        print("eqlab: error: --method applies in-process; with --workers > 1 each actor measures its own",
              file=sys.stderr)
        return 2

    if args.sharded_basis and (args.workers < 2 or args.density or args.trace):
        print("eqlab: error: --sharded-basis needs --workers >= 2 and works with --top/--bottom only",
              file=sys.stderr)
        return 2
    out = sc.compute_spectrum(args.model, top=args.top, bottom=args.bottom, block=args.block,
                              workers=args.workers, dtype=args.dtype, tol=args.tol, max_iter=args.max_iter,
                              address=args.address, density=args.density, density_steps=args.density_steps,
                              probes=args.probes, trace=args.trace, trace_matvecs=args.trace_matvecs,
                              sharded_basis=args.sharded_basis, overrides=parse_overrides(args.config),
                              method=args.method)
    print(sc.to_json(out) if args.json else sc.format_spectrum(out))
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

    i = sub.add_parser("inspect", help="discover and verify the transformations a model carries")
    i.add_argument("model", help="FILE.py:FUNC (returning model, batch, loss) or a transformers model folder")
    i.add_argument("--json", action="store_true", help="print a JSON list, one object per transformation")
    i.add_argument("--results", default="results/inspect", help="where the inspections table goes")
    i.add_argument("--examples", type=int, default=32, help="examples of the batch used for verification")
    i.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a transformers config field, e.g. num_hidden_layers=1 (repeatable)")
    i.set_defaults(func=_inspect)

    s = sub.add_parser("spectrum", help="top/bottom Hessian eigenvalues of a model (FILE.py:FUNC)")
    s.add_argument("model", help="FILE.py:FUNC (returning model, batch, loss) or a transformers model folder")
    s.add_argument("--top", type=int, default=5, help="largest eigenvalues (default 5)")
    s.add_argument("--bottom", type=int, default=0, help="smallest (most negative) eigenvalues")
    s.add_argument("--block", help="regex on parameter names: the spectrum of that diagonal block")
    s.add_argument("--workers", type=int, default=1, help="Ray actors sharing the batch (default 1: in-process)")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    s.add_argument("--method", default="auto",
                   choices=("auto", "double_backward", "forward_over_reverse", "double_backward_cached", "compiled"),
                   help="HVP method in-process (default auto: measured; compiled: torch.compile, slow to start, "
                        "fastest per product on small models)")
    s.add_argument("--tol", type=float, default=1e-6, help="relative true-residual tolerance")
    s.add_argument("--max-iter", type=int, default=200)
    s.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    s.add_argument("--density-steps", type=int, default=40, help="Lanczos steps per SLQ probe")
    s.add_argument("--probes", type=int, default=4, help="SLQ probe vectors")
    s.add_argument("--trace", action="store_true", help="Hessian trace by Hutch++")
    s.add_argument("--trace-matvecs", type=int, default=30, help="HVP budget of the trace estimate")
    s.add_argument("--sharded-basis", action="store_true",
                   help="keep the Lanczos basis on the workers, cut by parameter slice (large models)")
    s.add_argument("--address", help="Ray cluster for --workers > 1 (default: a local one)")
    s.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a transformers config field, e.g. num_hidden_layers=1 (repeatable)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_spectrum)
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cluster import ClusterError
    from pipeline.query import QueryError
    from pipeline.study import StudyError
    from pipeline.userfunc import UserModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StudyError, QueryError, UserModelError, ClusterError) as e:
        print(f"eqlab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `eqlab query ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("eqlab: interrupted; rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
