"""Finding 3, SGD against Adam: block-curvature anisotropy compared across runs that differ only in their
optimizer, written as study-level `findings` rows (like finding 5's drift, `pipeline.findings_drift`).

What the theory says (theory.md §1.4, R11, rows 6b/6d/14, §6 (c)/(d), §7 Zhang 2024), in our words: a block's
sharpness is not intrinsic, it depends on where θ sits on its rescaling orbit, i.e. on the conserved
imbalance; SGD conserves the imbalance up to O(η²) per step while Adam breaks it at O(η), so the two
optimizers can end up at different orbit positions and so at different block heterogeneity. The catalog
does not say which optimizer ends with more anisotropy, nor by how much: it asks to compare. So every row
here is a measurement: ``predicted``, ``residual`` and ``verdict`` are NULL.

The statistics, per checkpoint of a run, from that checkpoint's finding-3 rows (`pipeline.findings_blocks`):
* ``log_sharpness_spread``: the sample standard deviation over the run's blocks (heads Q/K/V/O, unit groups,
  BN filters) of ln λ_max(block) (``block_sharpness`` rows with λ_max > 0): scale-free, 0 when every
  block is equally sharp; e^spread is the typical factor between blocks;
* ``imbalance_slope[<family>]``: the across-group log–log slope of the sharpness ratio on the conserved norm
  ratio (``block_sharpness_imbalance`` rows of kind across, prediction rows only), per family instance.

A *comparison group* is a set of the study's runs (status ``ok``) whose identity is the same apart from
run_id, optimizer, lr, momentum, seed and checkpoint schedule (the natural learning rates of SGD and Adam
differ by orders of magnitude; weight decay, model, data, batch size and steps must match), with at least
two optimizers. Step 0 is left out of every mean: at the same seed every optimizer starts from the same
weights, so it shows no optimizer effect (the rows' reason gives its value, a check that the runs match).
Rows, keyed run_id = ``optimizers-<name>`` (the runs' common name without optimizer, lr and seed tags),
step = -1 (`store.RUN_LEVEL`):
* one per optimizer and statistic (``optimizer`` = that optimizer, ``lr`` its learning rate when the group
  has one per optimizer): statistic = the mean over its (seed, checkpoint) cells, statistic_std their
  standard deviation, probes = the number of cells, tolerance = the 95% t half-width of the mean;
* one per pair of optimizers and statistic (``optimizer`` = ``"a-b"``, ``transformation`` ends in
  ``[a-b]``): the mean over matched (seed, step) cells of a's value minus b's, with the same uncertainty.
The uncertainty is honest about what it is: checkpoints of one run are not independent draws (one
trajectory), so with one seed the half-width describes the spread over training, not a sampling error;
seeds are independent. The reason text says how many seeds and checkpoints went in.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from eqlab.pipeline import store
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.study import SAFE_NAME, RunSpec, Study

FINDING = "block_anisotropy_optimizer"
SPREAD = "log_sharpness_spread"
SLOPE = "imbalance_slope"
CI = 0.95
SETTINGS = {"ci": CI, "statistics": (SPREAD, SLOPE), "skip_step0": True}  # in the rows' hash
_GROUP_FIELDS_IGNORED = ("run_id", "optimizer", "lr", "momentum", "seed", "checkpoint_steps")
_SOURCE_FINDINGS = ("block_sharpness", "block_sharpness_imbalance")


def _group_key(spec: RunSpec) -> str:
    d = {k: v for k, v in spec.hash_identity().items() if k not in _GROUP_FIELDS_IGNORED}
    return json.dumps(d, sort_keys=True, default=list)


def _base_name(spec: RunSpec) -> str:
    drop = {spec.optimizer, f"lr{spec.lr:g}", f"s{spec.seed}"}
    return "-".join(t for t in spec.run_id.split("-") if t not in drop)


def comparison_groups(study: Study) -> dict[str, list[RunSpec]]:
    """The study's optimizer comparisons (runs alike but for optimizer/lr/momentum/seed, two optimizers or
    more), by their rows' run_id; never a run's own id."""
    groups: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in study.runs:
        groups[_group_key(spec)].append(spec)
    taken = {s.run_id for s in study.runs}
    out: dict[str, list[RunSpec]] = {}
    for key, specs in groups.items():
        if len({s.optimizer for s in specs}) < 2:
            continue
        bases = {_base_name(s) for s in specs}
        name = f"optimizers-{bases.pop()}" if len(bases) == 1 and "" not in bases else ""
        if not name or not SAFE_NAME.fullmatch(name) or name in taken or name in out:
            name = f"optimizers-{config_hash('optimizers', key)[:8]}"
        out[name] = specs
    return out


def checkpoint_statistics(rows: list[dict]) -> dict[str, float]:
    """{statistic name: value} of one (run, step) from its finding-3 rows."""
    logs = [math.log(r["statistic"]) for r in rows
            if r["finding"] == "block_sharpness" and r["statistic"] is not None and r["statistic"] > 0]
    out = {}
    if len(logs) >= 2:
        m = sum(logs) / len(logs)
        out[SPREAD] = math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))
    for r in rows:
        if (r["finding"] == "block_sharpness_imbalance" and not r["control"] and r["transformation"].endswith("[across]")
                and r["statistic"] is not None and math.isfinite(r["statistic"])):
            out[f"{SLOPE}[{r['transformation'][:-len('[across]')]}]"] = float(r["statistic"])
    return out


def mean_and_halfwidth(values: list[float], ci: float = CI) -> tuple[float, float, float]:
    """(mean, sample std, t half-width of the mean at ``ci``); std and half-width NaN below two values."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))
    from scipy.stats import t as student_t
    return m, sd, float(student_t.ppf(0.5 + ci / 2, n - 1)) * sd / math.sqrt(n)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def optimizer_rows(specs: list[RunSpec], findings: list[dict], status: dict[str, str]) -> list[dict]:
    """The rows of one comparison group from its runs' per-checkpoint finding-3 rows (module doc)."""
    ok = [s for s in specs if status.get(s.run_id, "ok") == "ok"]
    by_run = {s.run_id: s for s in ok}
    per_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in findings:
        if r["run_id"] in by_run and r["step"] is not None and r["step"] >= 0 and r["finding"] in _SOURCE_FINDINGS:
            per_key[(r["run_id"], int(r["step"]))].append(r)
    # cells[optimizer][statistic][(seed, step)] = value; step 0 apart (the common start)
    cells: dict = defaultdict(lambda: defaultdict(dict))
    start: dict = defaultdict(lambda: defaultdict(dict))
    for (run_id, step), rs in per_key.items():
        spec = by_run[run_id]
        for name, v in checkpoint_statistics(rs).items():
            (start if step == 0 else cells)[spec.optimizer][name][(spec.seed, step)] = v
    optimizers = sorted(cells)
    lrs = {o: sorted({s.lr for s in ok if s.optimizer == o}) for o in optimizers}
    s0 = ok[0] if ok else specs[0]
    left_out = sorted(s.run_id for s in specs if s not in ok)
    tail = f"; runs left out (not ok): {', '.join(left_out)}" if left_out else ""
    rows = []

    def row(transformation, optimizer, lr, values, what):
        m, sd, half = mean_and_halfwidth(values)
        seeds = sorted({k[0] for k in what})
        steps = sorted({k[1] for k in what})
        reason = (f"measurement, no prediction (the theory asks to compare SGD and Adam, it does not say which ends "
                  f"more anisotropic): mean over {len(values)} cells ({len(seeds)} seed(s) x checkpoints at steps "
                  f"{', '.join(map(str, steps))}; step 0 left out, the common start); statistic_std = their sample "
                  f"std, tolerance = the {CI:.0%} t half-width of the mean"
                  + ("; with one seed the checkpoints are one trajectory, not independent draws: the half-width "
                     "describes the spread over training" if len(seeds) == 1 else "") + tail)
        return {"finding": FINDING, "transformation": transformation, "symmetry": None, "control": False,
                "optimizer": optimizer, "lr": lr, "momentum": None, "weight_decay": float(s0.weight_decay),
                "dtype": "float64", "n_examples": None, "probes": len(values), "rank": None, "eigenvalue": None,
                "eigen_residual": None, "statistic": m, "statistic_std": _finite(sd), "predicted": None,
                "residual": None, "tolerance": _finite(half), "scale": None, "verdict": None,
                "tolerance_reason": reason, "hvps": 0}

    names = sorted({n for o in optimizers for n in cells[o]})
    for name in names:
        for o in optimizers:
            vals = cells[o].get(name, {})
            if vals:
                r = row(name, o, lrs[o][0] if len(lrs[o]) == 1 else None, list(vals.values()), list(vals))
                st = start[o].get(name, {})
                if st:
                    r["tolerance_reason"] += f"; at step 0: {sum(st.values()) / len(st):.6g}"
                rows.append(r)
        for i, a in enumerate(optimizers):
            for b in optimizers[i + 1:]:
                va, vb = cells[a].get(name, {}), cells[b].get(name, {})
                common = sorted(set(va) & set(vb))
                if common:
                    rows.append(row(f"{name}[{a}-{b}]", f"{a}-{b}", None, [va[k] - vb[k] for k in common], common))
    return rows


def write_optimizer_findings(results: Path, study: Study, log=print) -> dict[str, list[dict]]:
    """Compute and write every comparison group's rows; remove this finding's rows of groups the study no
    longer has (a run-level file holding only this finding's rows)."""
    results = Path(results)
    groups = comparison_groups(study)
    runs = store.read_table(results, "runs").to_pylist()
    status = {r["run_id"]: r["status"] or "ok" for r in runs}
    hashes = {r["run_id"]: r["config_hash"] for r in runs}
    current, out = set(), {}
    if groups:
        table = store.read_table(results, "findings")
        findings = [r for r in table.to_pylist() if r["finding"] in _SOURCE_FINDINGS]
    for name, specs in groups.items():
        ids = {s.run_id for s in specs}
        mine = [r for r in findings if r["run_id"] in ids]
        rows = optimizer_rows(specs, mine, status)
        if not rows:
            log(f"[findings] {FINDING} {name}: no rows (no block_sharpness rows after step 0: is block_anisotropy "
                "in [findings] include?)")
            continue
        keys = sorted({(r["run_id"], r["step"], r["config_hash"]) for r in mine})
        h = config_hash(FINDING, SETTINGS, keys, sorted((i, hashes.get(i), status.get(i)) for i in ids))
        store.write_rows(results, "findings", name, store.RUN_LEVEL, rows, study=study.name,
                         study_hash=study.hash, config_hash=h)
        current.add(name)
        out[name] = rows
        spread = {r["optimizer"]: r["statistic"] for r in rows if r["transformation"] == SPREAD}
        log(f"[findings] {FINDING} {name}: {len(rows)} measurement rows; log-sharpness spread "
            + ", ".join(f"{o} {v:.3g}" for o, v in sorted(spread.items())))
    for f in store.table_files(results, "findings"):
        if f.stem == "run" and f.parent.name not in current:
            t = store.read_key(results, "findings", f.parent.name, store.RUN_LEVEL)
            if t.num_rows and set(t.column("finding").to_pylist()) == {FINDING}:
                f.unlink()
    return out
