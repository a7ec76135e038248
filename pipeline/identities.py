"""The analysis stage: at one checkpoint, discover the model's transformations and check them all.

Runs as a Ray task (one per checkpoint). Discovery and its verification are float64; the identity
checks then run in every dtype the study asks for, with the toolbox's stated tolerances. Broken
symmetries (e.g. a norm epsilon) are kept as rows with their measured violation, and negative
controls (declared transformations that are not symmetries) are recorded with ``control = True``.
"""
from __future__ import annotations

import os
import signal

import torch

from eqlab.analyses.discover import discover, negative_controls
from eqlab.analyses.identities import check_all
from eqlab.models import build_task, missing_symmetries
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.stage import Output, TaskStage
from eqlab.pipeline.study import IdentitiesSpec, RunSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# identities.verdict values (analyses.identities computes them; the summary only counts them)
# "missing": a symmetry the family declares (models/symmetry_decls.py) that discovery did not verify
VERDICTS = ("holds", "violated", "rejected", "not_discriminating", "missing")


def _cast(batch, dtype):
    X, y = batch
    return (X.to(dtype) if X.is_floating_point() else X), y


def _kill_once(marker: str | None) -> None:
    """Fault injection for tests: SIGKILL this task's worker process the first time (a marker records it);
    Ray reruns the task on a fresh worker."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def identity_rows(spec: RunSpec, checkpoint_dir: str, identities: IdentitiesSpec,
                  kill_marker: str | None = None) -> list[dict]:
    _kill_once(kill_marker)
    torch.set_num_threads(1)
    task = build_task(spec.family, spec.model, seed=spec.seed, dtype=torch.float64)
    task.model.load_state_dict(ckpt.load_state(checkpoint_dir))
    task.model.train()  # the training objective: BatchNorm with batch statistics, dropout is off
    X, y = task.train
    batch = (X[: identities.examples], y[: identities.examples])
    # Every transformation found, verified or broken (its violation is the measurement), plus the controls
    # of every family found (bias transfers, layer scales and offset gains included).
    found = discover(task.model, task.loss, batch)
    transformations = [f.transformation for f in found.found] + list(
        negative_controls(task.model, task.loss, batch, all_families=True))
    rows = [{"transformation": line.split(":", 1)[0], "symmetry": line.split(":", 1)[0], "kind": "declared",
             "order": -1, "params": [], "n_generators": 0, "control": False, "dtype": "float64",
             "residual": float("nan"), "tolerance": float("nan"), "holds": False, "hvps": 0,
             "verdict": "missing", "tolerance_reason": line}
            for line in missing_symmetries(spec.family, spec.model, found)]
    for name in identities.dtypes:
        model = task.model.to(DTYPES[name])
        for c in check_all(model, task.loss, _cast(batch, DTYPES[name]), transformations,
                           probes=identities.probes, seed=spec.seed):
            t = next(t for t in transformations if t.name == c.transformation)
            rows.append({"transformation": c.transformation, "symmetry": c.family, "kind": c.kind,
                         "order": c.order, "params": list(t.params), "n_generators": int(t.n_generators),
                         "control": not c.expected, "dtype": name, "residual": float(c.residual),
                         "tolerance": float(c.tolerance), "holds": bool(c.holds), "hvps": int(c.n_hvp),
                         "verdict": c.verdict, "tolerance_reason": c.tolerance_reason})
    return rows


class IdentityStage(TaskStage):
    name, label = "identities", "identity checks"
    outputs = (Output("identities", ("identities",), lambda study: study.identities),)

    def compute(self, spec, checkpoint_dir, settings, kill_marker=None):
        return identity_rows(spec, checkpoint_dir, settings, kill_marker)

    def hooks(self, ctx):
        return {"kill_marker": ctx.inject.get("kill_identity_task_once")}

    def describe(self, spec, step, rows):
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
        return f"step {step}: {len(rows)} checks: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


STAGE = IdentityStage()
