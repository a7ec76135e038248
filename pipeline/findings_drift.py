"""Finding 5, conservation under real optimizers: the drift of each conserved quantity against the learning
rate across an lr sweep, fitted on log–log (`analyses.drift`), written as study-level `findings` rows.

It runs once, after every run of the study is done (`pipeline.runner.run_study`), on the `conservation`
table (one replayed step per checkpoint) and the `runs` table (which runs ended `ok`). A *sweep* is a set
of the study's runs that differ only in `lr` (and `seed`, pooled: each seed's checkpoints are their own
cells of the fit); a sweep with one learning rate fixes no slope and gets no row.

Rows are keyed run_id = the sweep's name (the runs' common name without their `lr…` and `s…` grid tags,
e.g. `cnn-sgd` for `cnn-sgd-lr0.01-s0`, …), step = -1 (`store.RUN_LEVEL`): one file
`findings/<sweep>/run.parquet`, next to the per-checkpoint findings of the runs (steps >= 0), selected
with `where finding = 'conservation_drift_slope'`. Per conserved family: the prediction row (slope 2 for
plain SGD, 1 for Adam, AdamW and SGD with weight decay) and a control row (`control = true`): the same
fit against the other order, which must come out `violated`.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from eqlab.analyses.drift import ADAM_SLOPE, BOOTSTRAP, SGD_SLOPE, SIGMAS, drift_verdict, fit_drift_slope, predicted_slope
from eqlab.pipeline import store
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.study import RunSpec, Study

FINDING = "conservation_drift_slope"
SETTINGS = {"sigmas": SIGMAS, "bootstrap": BOOTSTRAP}  # in the rows' hash: a change recomputes them
# The conservation stage's worst-case rounding level of ‖measured − predicted ΔQ‖ heads its reason text,
# with the length n of the sums it bounds: "2·γ_n(u)·R = 6.5e-12: n = 5300 ..." (analyses/conservation.py).
_LEVEL = re.compile(r"·R = ([-+0-9.eEinfa]+):")
_N = re.compile(r"\bn = (\d+)")
_SWEEP_FIELDS_IGNORED = ("run_id", "lr", "seed", "checkpoint_steps")


def rounding_level(reason: str | None) -> float:
    """The typical rounding of a row's ‖ΔQ‖: the stage's worst-case γ_n(u)·R over √n. Rounding errors of
    n-term sums grow like √n·u, not n·u, but for adversarial inputs (the probabilistic model of Higham &
    Mary 2019); the worst case (n·u) sits far above changes the exact law matches to six digits (a 1M-parameter
    GPT-2: level 5.8e-6, n = 2.1e6, against a ΔQ of 1.7e-7 that equals η²Q(g) to 1e-13)."""
    m = _LEVEL.search(reason or "")
    try:
        level = float(m.group(1)) if m else 0.0
    except ValueError:
        return 0.0
    n = _N.search(reason or "")
    return level / math.sqrt(int(n.group(1))) if n and int(n.group(1)) > 0 else level


def _sweep_key(spec: RunSpec) -> str:
    # the run's identity (a user family by file name, function and content, not by where it lies)
    d = {k: v for k, v in spec.hash_identity().items() if k not in _SWEEP_FIELDS_IGNORED}
    return json.dumps(d, sort_keys=True, default=list)


def _strip_tags(spec: RunSpec) -> str:
    drop = {f"lr{spec.lr:g}", f"s{spec.seed}"}
    return "-".join(t for t in spec.run_id.split("-") if t not in drop)


def sweeps(study: Study) -> dict[str, list[RunSpec]]:
    """The study's lr sweeps (two learning rates or more), by name."""
    groups: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in study.runs:
        groups[_sweep_key(spec)].append(spec)
    out: dict[str, list[RunSpec]] = {}
    for key, specs in groups.items():
        if len({s.lr for s in specs}) < 2:
            continue
        names = {_strip_tags(s) for s in specs}
        name = names.pop() if len(names) == 1 else ""
        if not name or not store_safe(name) or name in out:
            name = f"sweep-{config_hash('sweep', key)[:8]}"
        out[name] = specs
    return out


def store_safe(name: str) -> bool:
    from eqlab.pipeline.study import SAFE_NAME
    return bool(SAFE_NAME.fullmatch(name))


def drift_rows(specs: list[RunSpec], conservation: list[dict], status: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The findings rows of one sweep from its runs' conservation rows, and the families left without a row:
    every change at or below its rounding level at every lr (conserved exactly, e.g. a translation under
    SGD, where Q(g) = 0): no drift, so no slope to test."""
    ok = [s for s in specs if status.get(s.run_id, "ok") == "ok"]
    left_out = sorted(s.run_id for s in specs if s not in ok)
    by_run = {s.run_id: s for s in ok}
    fams: dict[tuple, list[dict]] = defaultdict(list)
    for r in conservation:
        if r["run_id"] in by_run:
            fams[(r["transformation"], r["symmetry"])].append(r)
    s0 = ok[0] if ok else specs[0]
    predicted, why = predicted_slope(s0.optimizer, s0.weight_decay)
    other = SGD_SLOPE if predicted == ADAM_SLOPE else ADAM_SLOPE
    rows, exact = [], []
    for (transformation, symmetry), rs in sorted(fams.items()):
        spec_of = [by_run[r["run_id"]] for r in rs]
        fit = fit_drift_slope([r["lr"] for r in rs], [r["change"] for r in rs],
                              cells=[f"s{s.seed}@{r['step']}" for s, r in zip(spec_of, rs)],
                              levels=[rounding_level(r["tolerance_reason"]) for r in rs], seed=s0.seed)
        if fit.excluded == len(rs):
            exact.append(transformation)
            continue
        for control, p in ((False, predicted), (True, other)):
            v = drift_verdict(fit, p, other if not control else predicted)
            lead = (f"control: the fit tested against the other order ({p:g}), must be violated; prediction {predicted:g}: "
                    if control else f"prediction {p:g}: ")
            tail = f"; diverged runs left out: {', '.join(left_out)}" if left_out else ""
            rows.append({"finding": FINDING, "transformation": transformation, "symmetry": symmetry,
                         "control": control, "optimizer": s0.optimizer, "lr": None, "momentum": float(s0.momentum),
                         "weight_decay": float(s0.weight_decay), "dtype": "float64",
                         "n_examples": int(s0.batch_size), "probes": int(fit.n_points),
                         "statistic": fit.slope, "statistic_std": fit.se, "predicted": p,
                         "residual": v.residual, "tolerance": v.tolerance,
                         "scale": abs(SGD_SLOPE - ADAM_SLOPE), "verdict": v.verdict,
                         "tolerance_reason": lead + why + "; " + v.reason + tail, "hvps": 0})
    return rows, exact


def write_drift_findings(results: Path, study: Study, log=print) -> dict[str, list[dict]]:
    """Compute and write every sweep's rows; remove this finding's rows of sweeps the study no longer has."""
    results = Path(results)
    cons = store.read_table(results, "conservation").to_pylist()
    runs = store.read_table(results, "runs").to_pylist()
    status = {r["run_id"]: r["status"] or "ok" for r in runs}
    hashes = {r["run_id"]: r["config_hash"] for r in runs}
    current = set()
    out = {}
    for name, specs in sweeps(study).items():
        ids = {s.run_id for s in specs}
        mine = [r for r in cons if r["run_id"] in ids]
        rows, exact = drift_rows(specs, mine, status)
        if not rows:  # no conserved family with a drift (or no replayed step): nothing to store
            log(f"[findings] {FINDING} {name}: no rows" + (f" (conserved to rounding: {', '.join(exact)})" if exact else ""))
            continue
        h = config_hash(FINDING, SETTINGS, sorted((r["run_id"], r["step"], r["config_hash"]) for r in mine),
                        sorted((i, hashes.get(i), status.get(i)) for i in ids))
        store.write_rows(results, "findings", name, store.RUN_LEVEL, rows, study=study.name,
                         study_hash=study.hash, config_hash=h)
        current.add(name)
        out[name] = rows
        counts = {v: sum(r["verdict"] == v for r in rows) for v in ("holds", "violated", "inconclusive")}
        log(f"[findings] {FINDING} {name}: {len(rows)} rows ({', '.join(f'{n} {v}' for v, n in counts.items() if n)})"
            + (f"; conserved to rounding at every lr, no drift to fit: {', '.join(exact)}" if exact else ""))
    for f in store.table_files(results, "findings"):  # a sweep dropped from the study: its old rows go
        if f.stem == "run" and f.parent.name not in current:
            t = store.read_key(results, "findings", f.parent.name, store.RUN_LEVEL)
            if t.num_rows and set(t.column("finding").to_pylist()) == {FINDING}:
                f.unlink()
    return out
