"""The `eqlab` command line: run studies, query their tables, inspect and measure a user's own model."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

# Nothing heavy at import: torch, Ray and transformers load inside the commands, after the validation
# that needs none of them (a malformed study file or flag is answered in a fraction of a second).

MAX_WORKERS = 256


class UsageError(ValueError):
    """A malformed command line (argparse's complaints included); the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, `eqlab: error: ...`, exit 2 (not argparse's usage block)
        raise UsageError(" ".join(message.split()))


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo} (got {v})")
        return v
    parse.__name__ = f"int >= {lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text})")
    return v


def _check_writable(results: Path, flag: str = "--results") -> None:
    """Fail now, before any work, if ``results`` cannot become or be a writable folder; creates nothing."""
    if results.exists():
        if not results.is_dir():
            raise UsageError(f"{flag} {results}: is a file, not a folder")
        target = results
    else:
        target = results.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise UsageError(f"{flag} {results}: {target} is a file, not a folder")
    try:
        read_only_fs = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except OSError:
        read_only_fs = False
    if read_only_fs or not os.access(target, os.W_OK | os.X_OK):
        what = "read-only" + (" file system" if read_only_fs else "")
        raise UsageError(f"{flag} {results}: cannot write there ({target} is {what})")


def _run(args) -> int:
    from eqlab.pipeline.study import check_local, load_study

    study = load_study(args.study)  # validates before anything starts or is written (no torch, no Ray)
    if args.dry_run:
        return _print_plan(study, args.json)
    if not args.address:
        check_local(study)  # the embedded cluster runs on this machine
    results = Path(args.results) if args.results else Path("results") / study.name
    _check_writable(results)
    from eqlab.pipeline.cluster import connect
    from eqlab.pipeline.lock import refuse_if_held

    refuse_if_held(results)
    connect(study.num_cpus, address=args.address, dashboard=args.dashboard)  # fails before anything is written
    from eqlab.pipeline.runner import print_summary, run_study

    summary = run_study(study, results, address=args.address, dashboard=args.dashboard)
    print_summary(summary)
    print(f"\nresults: {results}   (try: eqlab query --results {results} \"select * from spectra limit 5\")")
    return 0


def _print_plan(study, as_json: bool) -> int:
    """`eqlab run --dry-run`: the expanded runs and their planned cost; nothing starts or is written."""
    import json

    from eqlab.pipeline.study import plan

    rows = plan(study)
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"study {study.name!r} ({study.source}): {len(rows)} runs")
    head = ("run", "family", "optimizer", "lr", "weight_decay", "seed", "parameters", "steps", "checkpoints",
            "hvps_planned_max")
    cells = [[f"{r[h]:g}" if isinstance(r[h], float) else str(r[h]) for h in head] for r in rows]
    width = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    for line in [list(head), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, width)).rstrip())
    print(f"total: {sum(r['steps'] for r in rows)} training steps, {sum(r['checkpoints'] for r in rows)} "
          f"checkpoints, at most {sum(r['hvps_planned_max'] for r in rows)} spectra HVPs (top-k Lanczos caps "
          "plus SLQ; block spectra, identity checks and conservation come on top)")
    return 0


def _jobs_address(args) -> str:
    import os

    from eqlab.pipeline.jobs import DEFAULT_ADDRESS
    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def _submit(args) -> int:
    from eqlab.pipeline.study import load_study

    study = load_study(args.study)  # validated here: a bad field never reaches the cluster
    from eqlab.pipeline import jobs

    results = jobs.results_location(args.results, study)
    job = jobs.submit(study, Path(args.study), _jobs_address(args), results)
    print(job)
    print(f"follow it: eqlab status {job} --address {_jobs_address(args)}   |   eqlab logs {job}", file=sys.stderr)
    return 0


def _status(args) -> int:
    from eqlab.pipeline import jobs

    for line in jobs.status_lines(_jobs_address(args), args.job):
        print(line)
    return 0


def _logs(args) -> int:
    from eqlab.pipeline import jobs

    status = jobs.follow_logs(_jobs_address(args), args.job)
    return 0 if status == "SUCCEEDED" else 1


def _query(args) -> int:
    from eqlab.pipeline import query as q  # duckdb (and pyarrow for the table names) only

    results = Path(args.results) if args.results else Path("results") / "default"
    columns, rows = q.run_query(results, args.sql)
    fmt = {"table": q.format_table, "csv": q.format_csv, "json": q.format_json}[args.format]
    text = fmt(columns, rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _report(args) -> int:
    from eqlab.pipeline import report as rp  # duckdb, matplotlib (Agg); torch only for the densities figure

    results = Path(args.results) if args.results else Path("results") / "default"
    rp.check_results(results)  # one line, nothing written, if there are no tables to report on
    out = Path(args.out) if args.out else results / "report"
    _check_writable(out, "--out")
    rep = rp.build_report(results, out)
    print(f"report: {rep.index}   ({len(rep.figures)} figures"
          + (f"; {len(rep.notes)} note{'s' if len(rep.notes) > 1 else ''}, e.g. {rep.notes[0]}" if rep.notes else "") + ")")
    return 0


def _reproduce(args) -> int:
    from eqlab.pipeline import reproduce as rp  # tomllib and the study parser: no torch, no Ray yet

    try:
        if args.list:
            print("\n".join(rp.list_lines()))
            return 0
        presets = rp.load_presets(rp.select(args.finding), args.scale)  # every file validated first
    except rp.ReproduceError as e:
        raise UsageError(str(e)) from None
    from eqlab.pipeline.study import local_cpus

    for name, study, _ in presets:  # they run on the embedded local cluster; the full ones are for a cluster
        if study.num_cpus > local_cpus():
            raise UsageError(f"reproduce --scale {args.scale}: preset {name} needs ray.num_cpus = {study.num_cpus:g}, "
                             f"this machine has {local_cpus()} CPUs; submit it to a Ray cluster: eqlab submit "
                             f"{rp.preset_path(name, args.scale)}")
        _check_writable(rp.results_for(Path(args.results) if args.results else None, name, len(presets) > 1))
    from eqlab.pipeline.runner import print_summary, run_study

    done = []
    for name, study, findings in presets:
        results = rp.results_for(Path(args.results) if args.results else None, name, len(presets) > 1)
        print_summary(run_study(study, results))
        done.append((results, study, findings))
    print("\n=== findings ===")
    for results, study, findings in done:
        for line in rp.verdict_lines(results, study, findings):
            print(f"{line}   [{results}]")
    return 0


def _inspect(args) -> int:
    from eqlab.pipeline.userfunc import parse_overrides

    overrides = parse_overrides(args.config)
    results = Path(args.results)
    _check_writable(results)
    from eqlab.pipeline import inspect_cmd as ic

    rows = ic.inspect_model(args.model, examples=args.examples, overrides=overrides)
    path = ic.write_inspection(rows, results, args.model)
    if args.json:
        print(ic.to_json(rows, args.explain))
    else:
        print(ic.format_inspection(args.model, rows, args.explain))
        print(f"table: {path}")
    return 0


def _check_spectrum_model(args, overrides) -> None:
    """Load the user's model once (kept for the command, not built twice) and check the flags against it."""
    from eqlab.pipeline.userfunc import UserSource, n_examples, shares_leading_dim

    d = UserSource(args.model, overrides=overrides).preload()
    trainable = [(n, p.numel()) for n, p in d["model"].named_parameters() if p.requires_grad]
    where = ""
    if args.block:
        regex = re.compile(args.block)
        chosen = [(n, k) for n, k in trainable if regex.search(n)]
        if not chosen:
            names = ", ".join(n for n, _ in trainable[:20]) + (" ..." if len(trainable) > 20 else "")
            raise UsageError(f"--block {args.block!r}: matches no trainable parameter (names: {names})")
        trainable, where = chosen, f" in block {args.block!r}"
    dim = sum(k for _, k in trainable)
    for flag, k in (("--top", args.top), ("--bottom", args.bottom)):
        if k > dim:
            raise UsageError(f"{flag} {k}: the model has only {dim} trainable parameters{where}")
    if args.workers > 1:
        if not shares_leading_dim(d["batch"]):
            raise UsageError(f"--workers {args.workers}: the batch cannot be split (inputs and targets do not "
                             "share their first dimension); use --workers 1")
        n = n_examples(d["batch"])
        if args.workers > n:
            raise UsageError(f"--workers {args.workers}: the batch has only {n} examples (one micro-batch per "
                             "worker at least)")


def _spectrum(args) -> int:
    from eqlab.pipeline.userfunc import parse_overrides

    if args.method != "auto" and (args.workers > 1 or args.sharded_basis):
        raise UsageError("--method applies in-process; with --workers > 1 each actor measures its own")
    if args.sharded_basis and (args.workers < 2 or args.density or args.trace):
        raise UsageError("--sharded-basis needs --workers >= 2 and works with --top/--bottom only")
    if args.top == 0 and args.bottom == 0 and not (args.density or args.trace):
        raise UsageError("nothing to compute: --top and --bottom are 0 and neither --density nor --trace is given")
    for flag, k in (("--top", args.top), ("--bottom", args.bottom)):
        if k > args.max_iter:
            raise UsageError(f"{flag} {k}: more than --max-iter {args.max_iter} Lanczos steps can find")
    if args.block is not None:
        try:
            re.compile(args.block)
        except re.error as e:
            raise UsageError(f"--block {args.block!r}: not a valid regular expression ({e})") from None
    if not args.address:
        from eqlab.pipeline.study import local_cpus

        cpus = local_cpus()
        if args.workers > cpus:
            raise UsageError(f"--workers {args.workers}: this machine has {cpus} CPUs (one Ray actor per CPU; "
                             "use --address for a larger cluster)")
    overrides = parse_overrides(args.config)
    _check_spectrum_model(args, overrides)

    from eqlab.pipeline import spectrum_cmd as sc
    from eqlab.pipeline.allocator import keep_freed_memory

    keep_freed_memory()  # the CLI owns its process: steady, fault-free HVPs (pipeline/allocator.py)
    out = sc.compute_spectrum(args.model, top=args.top, bottom=args.bottom, block=args.block,
                              workers=args.workers, dtype=args.dtype, tol=args.tol, max_iter=args.max_iter,
                              address=args.address, density=args.density, density_steps=args.density_steps,
                              probes=args.probes, trace=args.trace, trace_matvecs=args.trace_matvecs,
                              sharded_basis=args.sharded_basis, overrides=overrides,
                              method=args.method)
    print(sc.to_json(out) if args.json else sc.format_spectrum(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eqlab", description="Test what parameter symmetries predict about "
                                "gradients and Hessians, on a Ray cluster, into Parquet tables.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a study (the default study if no file is given)")
    r.add_argument("study", nargs="?", help="study TOML file (default: the study shipped with eqlab)")
    r.add_argument("--results", help="where the tables go (default: results/<study name>)")
    r.add_argument("--address", help="an existing Ray cluster (default: start a local one on 127.0.0.1)")
    r.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1) too")
    r.add_argument("--dry-run", action="store_true",
                   help="print the runs the study expands to (grids included) and their planned cost; run nothing")
    r.add_argument("--json", action="store_true", help="with --dry-run: a JSON list, one object per run")
    r.set_defaults(func=_run)

    jobs_help = "the cluster's Ray Jobs API (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    sb = sub.add_parser("submit", help="send a study to a running Ray cluster (Ray Jobs API); prints the job id")
    sb.add_argument("study", help="study TOML file (validated here first)")
    sb.add_argument("--address", help=jobs_help)
    sb.add_argument("--results", help="where the job writes, a path on the cluster's head (made absolute here; "
                                      "a shared mount for a remote cluster; default: results/<study name>)")
    sb.set_defaults(func=_submit)
    st = sub.add_parser("status", help="progress of submitted studies: runs done / running / pending, HVPs, ETA")
    st.add_argument("job", nargs="?", help="a job id (default: every eqlab job on the cluster)")
    st.add_argument("--address", help=jobs_help)
    st.set_defaults(func=_status)
    lg = sub.add_parser("logs", help="follow a submitted study's log until it ends")
    lg.add_argument("job")
    lg.add_argument("--address", help=jobs_help)
    lg.set_defaults(func=_logs)

    q = sub.add_parser("query", help="run DuckDB SQL over a study's tables (each table is a view)")
    q.add_argument("sql", help='e.g. "select run_id, step, eigenvalue from spectra where rank = 0"')
    q.add_argument("--results", help="a study's results folder (default: results/default)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.set_defaults(func=_query)

    rp = sub.add_parser("report", help="write an HTML report of a study's tables (figures and the findings table)")
    rp.add_argument("--results", help="a study's results folder (default: results/default)")
    rp.add_argument("--out", help="where index.html and its PNG figures go (default: <results>/report)")
    rp.set_defaults(func=_report)

    rr = sub.add_parser("reproduce", help="run the preset study behind each finding and print its verdicts")
    rr.add_argument("finding", nargs="?", default="all", help="flat, align, drift or all (default; --list names them)")
    rr.add_argument("--scale", choices=("small", "full"), default="small",
                    help="small: this 2-core machine (default); full: the cluster-size study (eqlab submit)")
    rr.add_argument("--results", help="where the tables go (default: results/reproduce-<preset>; with several "
                                      "presets, one folder each under it)")
    rr.add_argument("--list", action="store_true", help="one line per finding on what it tests; run nothing")
    rr.set_defaults(func=_reproduce)

    i = sub.add_parser("inspect", help="discover and verify the transformations a model carries")
    i.add_argument("model", help="FILE.py:FUNC (returning model, batch, loss) or a transformers model folder")
    i.add_argument("--json", action="store_true", help="print a JSON list, one object per transformation")
    i.add_argument("--explain", action="store_true",
                   help="also list the candidates considered and rejected, each with its reason (stored either way)")
    i.add_argument("--results", default="results/inspect", help="where the inspections table goes")
    i.add_argument("--examples", type=_int_at_least(1), default=32, help="examples of the batch used for verification")
    i.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a transformers config field, e.g. num_hidden_layers=1 (repeatable)")
    i.set_defaults(func=_inspect)

    from eqlab.analyses.curvature.defaults import TABLE  # torch-free: the one defaults table of the engine
    _CURVATURE_DEFAULTS = TABLE["float64"]  # budgets are dtype-independent; --tol None: the dtype's own
    s = sub.add_parser("spectrum", help="top/bottom Hessian eigenvalues of a model (FILE.py:FUNC)")
    s.add_argument("model", help="FILE.py:FUNC (returning model, batch, loss) or a transformers model folder")
    s.add_argument("--top", type=_int_at_least(0), default=5, help="largest eigenvalues (default 5)")
    s.add_argument("--bottom", type=_int_at_least(0), default=0, help="smallest (most negative) eigenvalues")
    s.add_argument("--block", help="regex on parameter names: the spectrum of that diagonal block")
    s.add_argument("--workers", type=_int_at_least(1), default=1, help="Ray actors sharing the batch (default 1: in-process)")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    s.add_argument("--method", default="auto",
                   choices=("auto", "double_backward", "forward_over_reverse", "double_backward_cached", "compiled"),
                   help="HVP method in-process (default auto: measured; compiled: torch.compile, slow to start, "
                        "fastest per product on small models)")
    s.add_argument("--tol", type=_positive_float, default=None, help="relative true-residual tolerance (default: sqrt(eps) of --dtype, analyses/curvature/defaults.py)")
    s.add_argument("--max-iter", type=_int_at_least(1), default=_CURVATURE_DEFAULTS.max_iter)
    s.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    s.add_argument("--density-steps", type=_int_at_least(1), default=_CURVATURE_DEFAULTS.slq_steps, help="Lanczos steps per SLQ probe")
    s.add_argument("--probes", type=_int_at_least(1), default=_CURVATURE_DEFAULTS.slq_probes, help="SLQ probe vectors")
    s.add_argument("--trace", action="store_true", help="Hessian trace by Hutch++")
    s.add_argument("--trace-matvecs", type=_int_at_least(3), default=_CURVATURE_DEFAULTS.trace_matvecs, help="HVP budget of the trace estimate")
    s.add_argument("--sharded-basis", action="store_true",
                   help="keep the Lanczos basis on the workers, cut by parameter slice (large models)")
    s.add_argument("--address", help="Ray cluster for --workers > 1 (default: a local one)")
    s.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a transformers config field, e.g. num_hidden_layers=1 (repeatable)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_spectrum)
    return p


def main(argv: list[str] | None = None) -> int:
    from eqlab.pipeline.cluster import ClusterError
    from eqlab.pipeline.query import QueryError
    from eqlab.pipeline.study import StudyError
    from eqlab.pipeline.userfunc import UserModelError

    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "workers", 1) > MAX_WORKERS:
            raise UsageError(f"argument --workers: must be <= {MAX_WORKERS} (got {args.workers})")
        return args.func(args)
    except (UsageError, StudyError, QueryError, UserModelError, ClusterError) as e:
        print(f"eqlab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `eqlab query ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except OSError as e:  # a disk or permission problem while working: say which file, no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"eqlab: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eqlab: interrupted; rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


def entry(argv: list[str] | None = None) -> int:
    """The console script and ``python -m``: `main`, and a Ctrl-C's status 130 kept through Ray's shutdown
    (`cluster.exit_after_shutdown`)."""
    code = main(argv)
    if code == 130:
        from eqlab.pipeline.cluster import exit_after_shutdown

        exit_after_shutdown(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
