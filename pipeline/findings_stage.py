"""The findings stage: every curvature prediction at every checkpoint, one Ray task per checkpoint.

One stage writes the whole `findings` key of a checkpoint (the store keeps one file per table, run and
step), so each finding is a row function here (`findings_flat`, `findings_align`) run on one float64
model, one training batch and one discovery. Every row carries the run's condition from its spec.
"""
from __future__ import annotations

import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.predictions.flat_directions import VERDICTS
from eqlab.models import build_task
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.findings_align import alignment_rows
from eqlab.pipeline.findings_flat import flat_direction_rows
from eqlab.pipeline.stage import Output, TaskStage
from eqlab.pipeline.study import RunSpec

# in the key: changing one recomputes the rows. Small on purpose: the default study runs this stage on
# every checkpoint (a few seconds each; the alignment's Lanczos is at most max_iter HVPs).
SETTINGS = {"examples": 64, "probes": 2, "top_k": 3, "max_iter": 60}
FINDINGS = (flat_direction_rows, alignment_rows)


def findings_rows(spec: RunSpec, checkpoint_dir: str, settings: dict) -> list[dict]:
    torch.set_num_threads(1)
    task = build_task(spec.family, spec.model, seed=spec.seed, dtype=torch.float64)
    task.model.load_state_dict(ckpt.load_state(checkpoint_dir))
    task.model.train()  # the training objective: BatchNorm with batch statistics
    X, y = task.train
    batch = (X[: settings["examples"]], y[: settings["examples"]])
    verified = [f.transformation for f in discover(task.model, task.loss, batch).found if f.verified]
    condition = {"optimizer": spec.optimizer, "lr": float(spec.lr), "momentum": float(spec.momentum),
                 "weight_decay": float(spec.weight_decay), "n_examples": int(len(batch[1]))}
    return [{**condition, **row} for rows_of in FINDINGS
            for row in rows_of(spec, task.model, task.loss, batch, verified, settings)]


class FindingsStage(TaskStage):
    name, label = "findings", "curvature findings"
    outputs = (Output("findings", ("findings",), lambda study: SETTINGS),)

    def compute(self, spec, checkpoint_dir, settings):
        return findings_rows(spec, checkpoint_dir, settings)

    def describe(self, spec, step, rows):
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
        return f"step {step}: {len(rows)} findings: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


STAGE = FindingsStage()
