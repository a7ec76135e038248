"""One study end to end: train → checkpoints → sharded spectra → identity checks → Parquet tables.

Each stage writes its rows per (run, step) key and skips keys already written, so an interrupted
study resumes where it stopped without losing or duplicating rows.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ray

from pipeline import checkpoint as ckpt
from pipeline import store
from pipeline.cluster import connect
from pipeline.block_spectra import BlockSpectraPool
from pipeline.conservation_stage import conservation_rows
from pipeline.identities import identity_rows
from pipeline.spectra import FamilySource, ShardedHessian, density_rows, spectrum_rows
from pipeline.study import RunSpec, Study
from pipeline.train import train_run

CONTROL_MIN = 1e-2  # the residual a negative control must reach (the bar)
LAW_TOL = 1e-8      # float64 replay of one step: the exact optimizer law holds to rounding


@dataclass
class RunSummary:
    run_id: str
    family: str
    final_loss: float = float("nan")
    final_test_acc: float = float("nan")
    top_eigenvalues: list[tuple[int, float]] = field(default_factory=list)
    # symmetry -> (checks, held, control, worst order-2 residual (float64, float32), best order-2 residual)
    identities: dict[str, tuple] = field(default_factory=dict)
    # (optimizer, families, worst exact-law residual or None, max drift / lr)
    conservation: tuple | None = None


def _n_params(spec: RunSpec) -> tuple[int, int, int]:
    from models import build_task

    task = build_task(spec.family, spec.model, seed=spec.seed)
    return sum(p.numel() for p in task.model.parameters()), len(task.train[1]), len(task.test[1])


def _stage_train(study: Study, spec: RunSpec, results: Path, log) -> dict[int, Path]:
    storage = results / "checkpoints"
    steps = ckpt.list_steps(storage / spec.run_id)
    done = set(spec.checkpoint_steps) <= set(steps) and all(
        store.has_rows(results, "checkpoints", spec.run_id, s) for s in spec.checkpoint_steps)
    if done:
        log(f"[train] {spec.run_id}: all {len(spec.checkpoint_steps)} checkpoints present, skipping")
        return {s: steps[s] for s in spec.checkpoint_steps}
    cpus = min(1.0, study.num_cpus / spec.train_workers)
    steps = train_run(spec, storage, cpus_per_worker=cpus, log=log)
    for s in spec.checkpoint_steps:
        m = ckpt.load_metrics(steps[s])
        row = {k: m[k] for k in ("train_loss", "test_loss", "train_acc", "test_acc", "param_norm", "grad_norm")}
        store.write_rows(results, "checkpoints", spec.run_id, s, [{**row, "checkpoint_uri": str(steps[s])}],
                         study.name, study.hash)
    return {s: steps[s] for s in spec.checkpoint_steps}


def _stage_spectra(study: Study, spec: RunSpec, steps: dict[int, Path], results: Path, log) -> None:
    """Top-k Lanczos (tables spectra, lanczos) and the SLQ density (densities) on one actor pool."""
    sp = study.spectra
    need_top = {s for s in steps if not store.has_rows(results, "spectra", spec.run_id, s)}
    need_density = {s for s in steps if sp.density_probes and not store.has_rows(results, "densities", spec.run_id, s)}
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
                store.write_rows(results, "lanczos", spec.run_id, s, [tri], study.name, study.hash)
                store.write_rows(results, "spectra", spec.run_id, s, rows, study.name, study.hash)
                lam = ", ".join(f"{r['eigenvalue']:.4g}" for r in rows)
                log(f"[spectra] {spec.run_id}: step {s}: top-{sp.top_k} [{lam}] in {rows[0]['hvps']} HVPs "
                    f"on {workers} actor(s) ({rows[0]['seconds']:.1f}s)")
            if s in need_density:
                rows = density_rows(pool, state, sp.density_probes, sp.density_steps, seed=study.seed)
                store.write_rows(results, "densities", spec.run_id, s, rows, study.name, study.hash)
                log(f"[density] {spec.run_id}: step {s}: SLQ {len(rows)} probes x {len(rows[0]['alphas'])} "
                    f"steps in lockstep ({sum(r['hvps'] for r in rows)} HVPs, {rows[0]['seconds']:.1f}s)")
    finally:
        pool.shutdown()


def _stage_block_spectra(study: Study, spec: RunSpec, steps: dict[int, Path], results: Path, log) -> None:
    sp = study.spectra
    todo = [s for s in steps if not store.has_rows(results, "block_spectra", spec.run_id, s)]
    if sp.block_top_k == 0 or not todo:
        return
    source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
    pool = BlockSpectraPool(source, sp.workers, sp.dtype, cpus_per_worker=study.num_cpus / sp.workers)
    try:
        for s in todo:  # blocks of one checkpoint are spread over the actors; checkpoints run in turn
            rows = pool.run(ckpt.load_state(steps[s]), k=sp.block_top_k, tol=sp.tol, max_iter=sp.max_iter,
                            seed=study.seed)
            rows = [{**r, "dtype": sp.dtype} for r in rows]
            store.write_rows(results, "block_spectra", spec.run_id, s, rows, study.name, study.hash)
            top = max(rows, key=lambda r: r["eigenvalue"])
            log(f"[blocks] {spec.run_id}: step {s}: {len({r['block'] for r in rows})} blocks, sharpest "
                f"{top['block']} ({top['eigenvalue']:.4g}), {sum(r['hvps'] for r in rows if r['rank'] == 0)} "
                f"block HVPs ({sum(r['seconds'] for r in rows if r['rank'] == 0):.1f}s of actor time)")
    finally:
        pool.shutdown()


def _stage_identities(study: Study, spec: RunSpec, steps: dict[int, Path], results: Path, log) -> None:
    todo = [s for s in steps if not store.has_rows(results, "identities", spec.run_id, s)]
    if not todo:
        log(f"[identities] {spec.run_id}: all checkpoints done, skipping")
        return
    remote = ray.remote(num_cpus=1)(identity_rows)
    ident = asdict(study.identities)
    pending = {remote.remote(asdict(spec), str(steps[s]), ident): s for s in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        rows = ray.get(ready[0])
        store.write_rows(results, "identities", spec.run_id, s, rows, study.name, study.hash)
        held = sum(r["holds"] != r["control"] for r in rows)
        log(f"[identities] {spec.run_id}: step {s}: {held}/{len(rows)} checks as predicted")


def _stage_conservation(study: Study, spec: RunSpec, steps: dict[int, Path], results: Path, log) -> None:
    todo = [s for s in steps if s < spec.steps and not store.has_rows(results, "conservation", spec.run_id, s)]
    if not todo:
        return
    remote = ray.remote(num_cpus=1)(conservation_rows)
    pending = {remote.remote(asdict(spec), str(steps[s])): s for s in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        rows = ray.get(ready[0])
        store.write_rows(results, "conservation", spec.run_id, s, rows, study.name, study.hash)
        exact = [r["residual"] for r in rows if not math.isnan(r["residual"])]
        law = f"exact law residual <= {max(exact):.1e}" if exact else \
            f"no exact law for {spec.optimizer}: drift/lr up to {max((r['drift_per_lr'] for r in rows), default=0):.3g}"
        log(f"[conservation] {spec.run_id}: step {s}->{s + 1}: {len(rows)} conserved families, {law}")


def run_study(study: Study, results: Path, address: str | None = None, dashboard: bool = False,
              log=print) -> list[RunSummary]:
    results = Path(results).resolve()
    t0 = time.time()
    log(f"eqlab: study {study.name!r} ({study.source}), {len(study.runs)} runs -> {results}")
    resources = connect(study.num_cpus, address=address, dashboard=dashboard)
    results.mkdir(parents=True, exist_ok=True)
    log(f"[ray] cluster ready: {resources.get('CPU', 0):g} CPUs ({time.time() - t0:.1f}s)")
    for i, spec in enumerate(study.runs, 1):
        log(f"== run {i}/{len(study.runs)}: {spec.run_id}")
        n_params, n_train, n_test = _n_params(spec)
        store.write_rows(results, "runs", spec.run_id, store.RUN_LEVEL, [{
            "family": spec.family, "optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": spec.weight_decay,
            "steps": spec.steps, "seed": spec.seed, "n_params": n_params, "n_train": n_train, "n_test": n_test,
            "train_workers": spec.train_workers, "config_json": json.dumps(asdict(spec)),
            "created_at": datetime.now(timezone.utc)}], study.name, study.hash)
        steps = _stage_train(study, spec, results, log)
        _stage_spectra(study, spec, steps, results, log)
        _stage_block_spectra(study, spec, steps, results, log)
        _stage_identities(study, spec, steps, results, log)
        _stage_conservation(study, spec, steps, results, log)
    log(f"eqlab: study {study.name!r} finished in {time.time() - t0:.1f}s")
    return summarize(results, study)


def summarize(results: Path, study: Study) -> list[RunSummary]:
    from pipeline.query import run_query

    out = []
    for spec in study.runs:
        rs = RunSummary(spec.run_id, spec.family)
        _, last = run_query(results, f"select train_loss, test_acc from checkpoints where run_id = '{spec.run_id}' "
                                     "order by step desc limit 1")
        if last:
            rs.final_loss, rs.final_test_acc = last[0]
        _, rs.top_eigenvalues = run_query(
            results, f"select step, eigenvalue from spectra where run_id = '{spec.run_id}' and rank = 0 "
                     "and which = 'LA' order by step")
        _, fams = run_query(results, f"""
            select symmetry, count(*), count(*) filter (where holds), bool_or(control),
                   max(residual) filter (where "order" = 2 and dtype = 'float64'),
                   max(residual) filter (where "order" = 2 and dtype = 'float32'),
                   min(residual) filter (where "order" = 2)
            from identities where run_id = '{spec.run_id}' group by symmetry order by symmetry""")
        rs.identities = {f: (int(n), int(h), bool(c), (w64, w32), b) for f, n, h, c, w64, w32, b in fams}
        _, cons = run_query(results, f"""
            select count(distinct transformation), max(residual) filter (where not isnan(residual)),
                   max(drift_per_lr) from conservation where run_id = '{spec.run_id}'""")
        if cons and cons[0][0]:
            rs.conservation = (spec.optimizer, int(cons[0][0]), cons[0][1], cons[0][2])
        out.append(rs)
    return out


def _worst(worst: tuple) -> str:
    parts = [f"{name} <= {w:.1e}" for name, w in zip(("float64", "float32"), worst) if w is not None]
    return ", ".join(parts) or "n/a"


def print_summary(summary: list[RunSummary]) -> None:
    print("\n=== summary ===")
    for rs in summary:
        traj = "  ".join(f"{s}:{v:.3g}" for s, v in rs.top_eigenvalues)
        print(f"{rs.run_id} ({rs.family}): final train loss {rs.final_loss:.4f}, test acc {rs.final_test_acc:.3f}")
        print(f"  top Hessian eigenvalue by step: {traj}")
        for fam, (total, held, control, worst, best) in rs.identities.items():
            if control:  # judged at second order, where a non-symmetry must show residual >= 1e-2
                verdict = (f"rejected at every checkpoint, as a negative control must be (order-2 residual "
                           f">= {best:.2g})" if best is not None and best >= CONTROL_MIN else
                           f"NOT rejected: order-2 residual down to {best:.2g}")
            elif held == total:
                verdict = f"held at every checkpoint (order-2 residual {_worst(worst)})"
            else:
                verdict = f"broken: {held}/{total} checks within tolerance (order-2 residual {_worst(worst)})"
            print(f"  {fam:<26} {verdict}  [{total} checks]")
        if rs.conservation:
            opt, fams, worst, drift = rs.conservation
            if worst is None:
                law = f"no exact law for {opt}: conserved quantities drift, up to {drift:.3g} x lr per step"
            elif worst <= LAW_TOL:
                law = f"the exact discrete-time law holds at every checkpoint (residual <= {worst:.1e})"
            else:
                law = f"the exact discrete-time law is VIOLATED (residual up to {worst:.2g})"
            print(f"  conserved quantities ({fams} families, {opt}): {law}")
