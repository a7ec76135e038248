"""Findings stage 1: flat and sharp symmetry directions at every checkpoint (`findings` rows).

Runs as a Ray task per checkpoint, in float64: discover the model's transformations on a training
batch (as the identity stage does), keep the verified continuous families, and for each one compare the
Hessian's Rayleigh quotient along random generators with the second-order identity's prediction
(`analyses.predictions.flat_directions`), plus a control row of random directions of the same norms.
A few HVPs per family per checkpoint (2 per probe, plus one for the curvature scale), so it is cheap
next to the spectra stage.
"""
from __future__ import annotations

import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.predictions.flat_directions import VERDICTS, flat_direction_findings
from eqlab.models import build_task
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.stage import Output, TaskStage
from eqlab.pipeline.study import RunSpec

FINDING = "flat_symmetry_direction"
SETTINGS = {"examples": 64, "probes": 2}  # in the key: changing them recomputes the rows


def flat_direction_rows(spec: RunSpec, checkpoint_dir: str, settings: dict) -> list[dict]:
    torch.set_num_threads(1)
    task = build_task(spec.family, spec.model, seed=spec.seed, dtype=torch.float64)
    task.model.load_state_dict(ckpt.load_state(checkpoint_dir))
    task.model.train()  # the training objective: BatchNorm with batch statistics
    X, y = task.train
    batch = (X[: settings["examples"]], y[: settings["examples"]])
    found = discover(task.model, task.loss, batch)
    verified = [f.transformation for f in found.found if f.verified]
    rows = []
    for f in flat_direction_findings(task.model, task.loss, batch, verified, probes=settings["probes"],
                                     seed=spec.seed):
        w = f.worst
        rows.append({"finding": FINDING, "transformation": f.transformation, "symmetry": f.family,
                     "control": f.control, "optimizer": spec.optimizer, "lr": float(spec.lr),
                     "momentum": float(spec.momentum), "weight_decay": float(spec.weight_decay),
                     "dtype": f.dtype, "n_examples": int(len(batch[1])), "probes": len(f.probes),
                     "statistic": f.statistic, "statistic_std": f.statistic_std, "predicted": f.prediction,
                     "residual": abs(w.rayleigh - w.predicted), "tolerance": w.tolerance,
                     "scale": w.curvature_scale, "verdict": f.verdict, "tolerance_reason": f.tolerance_reason,
                     "hvps": f.n_hvp})
    return rows


class FlatDirectionStage(TaskStage):
    name, label = "findings_flat", "flat symmetry directions"
    outputs = (Output("findings_flat", ("findings",), lambda study: SETTINGS),)

    def compute(self, spec, checkpoint_dir, settings):
        return flat_direction_rows(spec, checkpoint_dir, settings)

    def describe(self, spec, step, rows):
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
        return f"step {step}: {len(rows)} findings: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


STAGE = FlatDirectionStage()
