"""One study end to end: train → checkpoints → sharded spectra → identity checks → Parquet tables.

Each stage writes its rows per (run, step) key with the config hash of what produced them (the run's
training hash, the stage's settings, the checkpoint's weights digest) and skips a key only when the
stored file is readable and carries that hash: an interrupted study resumes where it stopped without
losing or duplicating rows, and an edited study recomputes exactly the stages its edit changed. The
results folder is locked for the whole study (`pipeline.lock`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ray

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import store
from eqlab.pipeline.cluster import connect
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.lock import results_lock
from eqlab.pipeline.block_spectra import BlockSpectraPool
from eqlab.pipeline.conservation_stage import conservation_rows
from eqlab.pipeline.identities import identity_rows
from eqlab.pipeline.spectra import FamilySource, ShardedHessian, density_rows, spectrum_rows
from eqlab.pipeline.study import RunSpec, Study
from eqlab.pipeline.train import TrainResult, train_hash, train_run

# identities.verdict values (analyses.identities computes them; the summary only counts them)
VERDICTS = ("holds", "violated", "rejected", "not_discriminating")


@dataclass
class Checkpoints:
    """What training left for the later stages: {step: folder}, each folder's stage key, divergence."""
    steps: dict[int, Path]
    keys: dict[int, str]             # step -> hash(training config, weights digest): every derived row's root
    diverged_at: int | None = None


def _stage_key(ck: Checkpoints, step: int, stage: str, *settings) -> str:
    return config_hash(stage, ck.keys[step], *settings)


@dataclass
class RunSummary:
    run_id: str
    family: str
    final_loss: float = float("nan")
    final_test_acc: float = float("nan")
    top_eigenvalues: list[tuple[int, float]] = field(default_factory=list)
    diverged_at: int | None = None
    # symmetry -> {verdict: count}, and the worst order-2 residual per dtype (float64, float32)
    identities: dict[str, tuple[dict[str, int], tuple]] = field(default_factory=dict)
    # (optimizer, families, worst exact-law residual or None, max drift / lr)
    conservation: tuple | None = None


def _n_params(spec: RunSpec) -> tuple[int, int, int]:
    from eqlab.models import build_task

    task = build_task(spec.family, spec.model, seed=spec.seed)
    return sum(p.numel() for p in task.model.parameters()), len(task.train[1]), len(task.test[1])


def _stage_train(study: Study, spec: RunSpec, results: Path, log) -> Checkpoints:
    storage = results / "checkpoints"
    thash = train_hash(spec)
    have = ckpt.list_steps(storage / spec.run_id)
    run_row = store.has_rows(results, "runs", spec.run_id, store.RUN_LEVEL, thash, log)
    diverged = _recorded_divergence(results, spec) if run_row else None
    wanted = [s for s in spec.checkpoint_steps if diverged is None or s < diverged]
    done = run_row and set(wanted) <= set(have) and all(
        ckpt.verify(have[s], thash) is None and store.has_rows(results, "checkpoints", spec.run_id, s,
                                                               config_hash(thash, ckpt.weights_digest(have[s])), log)
        for s in wanted)
    if done:
        log(f"[train] {spec.run_id}: all {len(wanted)} checkpoints present and verified, skipping")
        res = TrainResult({s: have[s] for s in wanted}, diverged)
    else:
        cpus = min(1.0, study.num_cpus / spec.train_workers)
        res = train_run(spec, storage, cpus_per_worker=cpus, log=log)
    keys = {s: config_hash(thash, ckpt.weights_digest(d)) for s, d in res.checkpoints.items()}
    for table in store.TABLES_BY_RUN:  # rows of steps this configuration no longer has (an edited schedule)
        store.prune(results, table, spec.run_id, keep=set(res.checkpoints))
    for s, d in res.checkpoints.items():
        if done:
            continue
        m = ckpt.load_metrics(d)
        row = {k: m[k] for k in ("train_loss", "test_loss", "train_acc", "test_acc", "param_norm", "grad_norm")}
        store.write_rows(results, "checkpoints", spec.run_id, s, [{**row, "checkpoint_uri": str(d)}],
                         study.name, study.hash, keys[s])
    if not done:
        _write_run_row(study, spec, results, thash, res.diverged_at)
    return Checkpoints(res.checkpoints, keys, res.diverged_at)


def _recorded_divergence(results: Path, spec: RunSpec) -> int | None:
    t = store.read_key(results, "runs", spec.run_id, store.RUN_LEVEL)
    v = t.column("diverged_at_step")[0].as_py() if t.num_rows else None
    return None if v is None else int(v)


def _write_run_row(study: Study, spec: RunSpec, results: Path, thash: str, diverged_at: int | None) -> None:
    n_params, n_train, n_test = _n_params(spec)
    store.write_rows(results, "runs", spec.run_id, store.RUN_LEVEL, [{
        "family": spec.family, "optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": spec.weight_decay,
        "steps": spec.steps, "seed": spec.seed, "n_params": n_params, "n_train": n_train, "n_test": n_test,
        "train_workers": spec.train_workers, "config_json": json.dumps(asdict(spec)),
        "created_at": datetime.now(timezone.utc), "status": "ok" if diverged_at is None else "diverged",
        "diverged_at_step": diverged_at}], study.name, study.hash, thash)


def _spectra_settings(study: Study) -> tuple[dict, dict]:
    """The settings each table's rows depend on (so editing density_steps leaves the top-k rows alone)."""
    sp = study.spectra
    shared = {"seed": study.seed, "workers": sp.workers, "examples": sp.examples, "microbatch": sp.microbatch,
              "dtype": sp.dtype}
    return ({**shared, "top_k": sp.top_k, "tol": sp.tol, "max_iter": sp.max_iter},
            {**shared, "probes": sp.density_probes, "steps": sp.density_steps})


def _stage_spectra(study: Study, spec: RunSpec, ck: Checkpoints, results: Path, log) -> None:
    """Top-k Lanczos (tables spectra, lanczos) and the SLQ density (densities) on one actor pool."""
    sp = study.spectra
    steps = ck.steps
    top_set, dens_set = _spectra_settings(study)
    top_key = {s: _stage_key(ck, s, "spectra", top_set) for s in steps}
    dens_key = {s: _stage_key(ck, s, "densities", dens_set) for s in steps}
    need_top = {s for s in steps if not (store.has_rows(results, "spectra", spec.run_id, s, top_key[s], log) and
                                         store.has_rows(results, "lanczos", spec.run_id, s, top_key[s], log))}
    need_density = {s for s in steps if sp.density_probes and
                    not store.has_rows(results, "densities", spec.run_id, s, dens_key[s], log)}
    todo = sorted(need_top | need_density)
    if not todo:
        log(f"[spectra] {spec.run_id}: all checkpoints done, skipping")
        return
    source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
    n_micro = -(-min(sp.examples, _n_params(spec)[1]) // sp.microbatch)
    workers = min(sp.workers, n_micro)  # an actor without a micro-batch would only cost memory
    pool = ShardedHessian(source, workers, sp.dtype, cpus_per_worker=study.num_cpus / workers)
    try:
        for s in todo:
            state = ckpt.load_state(steps[s])
            if s in need_top:
                rows, tri = spectrum_rows(pool, state, sp.top_k, sp.tol, sp.max_iter, seed=study.seed)
                store.write_rows(results, "lanczos", spec.run_id, s, [tri], study.name, study.hash, top_key[s])
                store.write_rows(results, "spectra", spec.run_id, s, rows, study.name, study.hash, top_key[s])
                lam = ", ".join(f"{r['eigenvalue']:.4g}" for r in rows)
                log(f"[spectra] {spec.run_id}: step {s}: top-{sp.top_k} [{lam}] in {rows[0]['hvps']} HVPs "
                    f"on {workers} actor(s) ({rows[0]['seconds']:.1f}s)")
            if s in need_density:
                rows = density_rows(pool, state, sp.density_probes, sp.density_steps, seed=study.seed)
                store.write_rows(results, "densities", spec.run_id, s, rows, study.name, study.hash, dens_key[s])
                log(f"[density] {spec.run_id}: step {s}: SLQ {len(rows)} probes x {len(rows[0]['alphas'])} "
                    f"steps in lockstep ({sum(r['hvps'] for r in rows)} HVPs, {rows[0]['seconds']:.1f}s)")
    finally:
        pool.shutdown()


def _stage_block_spectra(study: Study, spec: RunSpec, ck: Checkpoints, results: Path, log) -> None:
    sp = study.spectra
    steps = ck.steps
    settings = {"seed": study.seed, "workers": sp.workers, "examples": sp.examples, "microbatch": sp.microbatch,
                "dtype": sp.dtype, "k": sp.block_top_k, "tol": sp.tol, "max_iter": sp.max_iter}
    key = {s: _stage_key(ck, s, "block_spectra", settings) for s in steps}
    todo = [s for s in steps if not store.has_rows(results, "block_spectra", spec.run_id, s, key[s], log)]
    if sp.block_top_k == 0 or not todo:
        return
    source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
    pool = BlockSpectraPool(source, sp.workers, sp.dtype, cpus_per_worker=study.num_cpus / sp.workers)
    try:
        for s in todo:  # blocks of one checkpoint are spread over the actors; checkpoints run in turn
            rows = pool.run(ckpt.load_state(steps[s]), k=sp.block_top_k, tol=sp.tol, max_iter=sp.max_iter,
                            seed=study.seed)
            rows = [{**r, "dtype": sp.dtype} for r in rows]
            store.write_rows(results, "block_spectra", spec.run_id, s, rows, study.name, study.hash, key[s])
            top = max(rows, key=lambda r: r["eigenvalue"])
            log(f"[blocks] {spec.run_id}: step {s}: {len({r['block'] for r in rows})} blocks, sharpest "
                f"{top['block']} ({top['eigenvalue']:.4g}), {sum(r['hvps'] for r in rows if r['rank'] == 0)} "
                f"block HVPs ({sum(r['seconds'] for r in rows if r['rank'] == 0):.1f}s of actor time)")
    finally:
        pool.shutdown()


def _stage_identities(study: Study, spec: RunSpec, ck: Checkpoints, results: Path, log, inject=None) -> None:
    steps = ck.steps
    key = {s: _stage_key(ck, s, "identities", study.identities) for s in steps}
    todo = [s for s in steps if not store.has_rows(results, "identities", spec.run_id, s, key[s], log)]
    if not todo:
        log(f"[identities] {spec.run_id}: all checkpoints done, skipping")
        return
    remote = ray.remote(num_cpus=1)(identity_rows)
    ident = asdict(study.identities)
    marker = (inject or {}).get("kill_identity_task_once")
    pending = {remote.remote(asdict(spec), str(steps[s]), ident, marker): s for s in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        rows = ray.get(ready[0])
        store.write_rows(results, "identities", spec.run_id, s, rows, study.name, study.hash, key[s])
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS if any(r["verdict"] == v for r in rows)}
        log(f"[identities] {spec.run_id}: step {s}: {len(rows)} checks: "
            + ", ".join(f"{n} {v}" for v, n in counts.items()))


def _stage_conservation(study: Study, spec: RunSpec, ck: Checkpoints, results: Path, log) -> None:
    steps = ck.steps
    key = {s: _stage_key(ck, s, "conservation") for s in steps}
    todo = [s for s in steps if s < spec.steps and
            not store.has_rows(results, "conservation", spec.run_id, s, key[s], log)]
    if not todo:
        return
    remote = ray.remote(num_cpus=1)(conservation_rows)
    pending = {remote.remote(asdict(spec), str(steps[s])): s for s in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        rows = ray.get(ready[0])
        store.write_rows(results, "conservation", spec.run_id, s, rows, study.name, study.hash, key[s])
        exact = [r["residual"] for r in rows if not math.isnan(r["residual"])]
        law = f"exact law residual <= {max(exact):.1e}" if exact else \
            f"no exact law for {spec.optimizer}: drift/lr up to {max((r['drift_per_lr'] for r in rows), default=0):.3g}"
        log(f"[conservation] {spec.run_id}: step {s}->{s + 1}: {len(rows)} conserved families, {law}")


def run_study(study: Study, results: Path, address: str | None = None, dashboard: bool = False,
              log=print, inject: dict | None = None) -> list[RunSummary]:
    """Run (or resume) a study into ``results``; ``inject`` is for fault-injection tests only."""
    results = Path(results).resolve()
    with results_lock(results):
        t0 = time.time()
        log(f"eqlab: study {study.name!r} ({study.source}), {len(study.runs)} runs -> {results}")
        resources = connect(study.num_cpus, address=address, dashboard=dashboard)
        log(f"[ray] cluster ready: {resources.get('CPU', 0):g} CPUs ({time.time() - t0:.1f}s)")
        for i, spec in enumerate(study.runs, 1):
            log(f"== run {i}/{len(study.runs)}: {spec.run_id}")
            stage = "training"
            try:
                ck = _stage_train(study, spec, results, log)
                if ck.diverged_at is not None:
                    log(f"[{spec.run_id}] diverged at step {ck.diverged_at}: later stages run only on the "
                        f"{len(ck.steps)} checkpoint(s) before it")
                stage = "spectra"
                _stage_spectra(study, spec, ck, results, log)
                stage = "block spectra"
                _stage_block_spectra(study, spec, ck, results, log)
                stage = "identity checks"
                _stage_identities(study, spec, ck, results, log, inject)
                stage = "conservation"
                _stage_conservation(study, spec, ck, results, log)
            except KeyboardInterrupt:
                # Rows are written whole or not at all (store.write_rows), so nothing is half-written.
                print(f"eqlab: interrupted during {stage} of run {spec.run_id!r}; every finished checkpoint "
                      f"and row is kept in {results}", file=sys.stderr)
                raise
        log(f"eqlab: study {study.name!r} finished in {time.time() - t0:.1f}s")
        return summarize(results, study)


def summarize(results: Path, study: Study) -> list[RunSummary]:
    """Read back what the tables say (verdicts included): the summary computes no verdict of its own."""
    from eqlab.pipeline.query import run_query

    out = []
    for spec in study.runs:
        rs = RunSummary(spec.run_id, spec.family)
        rid = spec.run_id.replace("'", "''")
        _, status = run_query(results, f"select diverged_at_step from runs where run_id = '{rid}'")
        if status and status[0][0] is not None:
            rs.diverged_at = int(status[0][0])
        _, last = run_query(results, f"select train_loss, test_acc from checkpoints where run_id = '{rid}' "
                                     "order by step desc limit 1")
        if last:
            rs.final_loss, rs.final_test_acc = last[0]
        _, rs.top_eigenvalues = run_query(
            results, f"select step, eigenvalue from spectra where run_id = '{rid}' and rank = 0 "
                     "and which = 'LA' order by step")
        _, fams = run_query(results, f"""
            select symmetry, verdict, count(*),
                   max(residual) filter (where "order" = 2 and dtype = 'float64'),
                   max(residual) filter (where "order" = 2 and dtype = 'float32')
            from identities where run_id = '{rid}' group by symmetry, verdict order by symmetry, verdict""")
        for fam, verdict, n, w64, w32 in fams:
            counts, worst = rs.identities.get(fam, ({}, (None, None)))
            counts[verdict] = int(n)
            worst = tuple(w if o is None else (o if w is None else max(o, w)) for w, o in zip((w64, w32), worst))
            rs.identities[fam] = (counts, worst)
        _, cons = run_query(results, f"""
            select count(distinct transformation), max(residual) filter (where not isnan(residual)),
                   max(drift_per_lr), count(*) filter (where verdict = 'violated'),
                   count(*) filter (where verdict = 'not_discriminating'), count(*)
            from conservation where run_id = '{rid}'""")
        if cons and cons[0][0]:
            rs.conservation = (spec.optimizer, *cons[0])
        out.append(rs)
    return out


def _worst(worst: tuple) -> str:
    parts = [f"{name} <= {w:.1e}" for name, w in zip(("float64", "float32"), worst) if w is not None]
    return ", ".join(parts) or "n/a"


def _identity_line(counts: dict[str, int], worst: tuple) -> str:
    """One family's stored verdicts, counted: the words follow the table's verdict column exactly."""
    total = sum(counts.values())
    if set(counts) <= {"rejected", "not_discriminating"}:  # a negative control
        if "not_discriminating" not in counts:
            return f"negative control rejected by all {total} checks, as it must be"
        return (f"negative control rejected by {counts.get('rejected', 0)}/{total} checks; "
                f"{counts['not_discriminating']} cannot discriminate (the control passes at that order and dtype)")
    if set(counts) == {"holds"}:
        return f"held in all {total} checks (order-2 residual {_worst(worst)})"
    return f"violated in {counts.get('violated', 0)}/{total} checks (order-2 residual {_worst(worst)})"


def print_summary(summary: list[RunSummary]) -> None:
    print("\n=== summary ===")
    for rs in summary:
        traj = "  ".join(f"{s}:{v:.3g}" for s, v in rs.top_eigenvalues)
        print(f"{rs.run_id} ({rs.family}): final train loss {rs.final_loss:.4f}, test acc {rs.final_test_acc:.3f}")
        if rs.diverged_at is not None:
            print(f"  DIVERGED at step {rs.diverged_at}: no checkpoint after it was analysed")
        print(f"  top Hessian eigenvalue by step: {traj or 'n/a'}")
        for fam, (counts, worst) in rs.identities.items():
            print(f"  {fam:<26} {_identity_line(counts, worst)}")
        if rs.conservation:
            opt, fams, worst, drift, violated, blind, n = rs.conservation
            if worst is None:
                law = f"no exact law for {opt}: conserved quantities drift, up to {drift:.3g} x lr per step"
            elif violated:
                law = (f"the exact discrete-time law is VIOLATED in {violated} of {n} rows beyond rounding "
                       f"(residual up to {worst:.2g})")
            else:
                law = (f"the exact discrete-time law holds within rounding in every row (residual <= {worst:.1e})"
                       + (f"; {blind} rows cannot discriminate (the step's generic change is below rounding)"
                          if blind else ""))
            print(f"  conserved quantities ({fams} families, {opt}): {law}")
