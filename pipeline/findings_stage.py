"""The findings stage: every curvature prediction at every checkpoint, one Ray task per checkpoint.

One stage writes the whole `findings` key of a checkpoint (the store keeps one file per table, run and
step), so each finding is a row function run on one float64 model, one training batch and one
discovery. Findings are registered in `FINDINGS` by their module's ``FINDING`` name; a module also
defines its ``SETTINGS`` defaults (optional) and its rows function
``rows(spec, model, loss, batch, verified, settings) -> list[dict]``. Adding one is one entry there.

A finding's settings are `DEFAULTS`, under its module's ``SETTINGS``, under the sizes the study's
``[findings]`` section sets (`study.FindingsSpec`); ``include`` picks which findings run. The resolved
settings of every included finding are the stage's key: changing one recomputes the findings rows,
and only them. Every row carries the run's condition from its spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.predictions.flat_directions import VERDICTS
from eqlab.models import build_task
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import (findings_align, findings_blocks, findings_discrete, findings_flat, findings_indefinite,
                            findings_wd)
from eqlab.pipeline.stage import Output, TaskStage
from eqlab.pipeline.study import FindingsSpec, RunSpec

# The stage's defaults, under each finding's own. Small on purpose: the default study runs this stage on
# every checkpoint (a few seconds each; the alignment's Lanczos is at most max_iter HVPs).
DEFAULTS = {"examples": 64, "probes": 2, "top_k": 3, "max_iter": 60}


@dataclass(frozen=True)
class Finding:
    """One registered finding: its name (the module's FINDING), its rows function, its default settings."""
    name: str
    rows: Callable[..., list[dict]]
    settings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, module: ModuleType, rows: Callable[..., list[dict]]) -> "Finding":
        return cls(module.FINDING, rows, dict(getattr(module, "SETTINGS", {})))


def _registry(*findings: Finding) -> dict[str, Finding]:
    out = {}
    for f in findings:
        assert f.name not in out, f"finding {f.name!r} registered twice"
        out[f.name] = f
    return out


FINDINGS: dict[str, Finding] = _registry(
    Finding.of(findings_flat, findings_flat.flat_direction_rows),
    Finding.of(findings_align, findings_align.alignment_rows),
    Finding.of(findings_blocks, findings_blocks.block_rows),
    Finding.of(findings_indefinite, findings_indefinite.indefinite_rows),
    Finding.of(findings_discrete, findings_discrete.discrete_saddle_rows),
    Finding.of(findings_wd, findings_wd.wd_stationary_rows),
)


def resolved_settings(spec: FindingsSpec) -> dict[str, dict]:
    """{finding name: its settings} for every finding the study includes, in registry order: `DEFAULTS`,
    then the module's SETTINGS, then the sizes the study sets. This is the stage's key."""
    names = spec.include if spec.include is not None else tuple(FINDINGS)
    return {n: {**DEFAULTS, **FINDINGS[n].settings, **spec.sizes()}
            for n in FINDINGS if n in names}


def findings_rows(spec: RunSpec, checkpoint_dir: str, settings: dict[str, dict]) -> list[dict]:
    torch.set_num_threads(1)
    task = build_task(spec.family, spec.model, seed=spec.seed, dtype=torch.float64)
    task.model.load_state_dict(ckpt.load_state(checkpoint_dir))
    task.model.train()  # the training objective: BatchNorm with batch statistics
    X, y = task.train
    # one discovery on the largest batch a finding asks for; each finding gets its own first examples
    n = max((s["examples"] for s in settings.values()), default=DEFAULTS["examples"])
    verified = [f.transformation for f in discover(task.model, task.loss, (X[:n], y[:n])).found if f.verified]
    condition = {"optimizer": spec.optimizer, "lr": float(spec.lr), "momentum": float(spec.momentum),
                 "weight_decay": float(spec.weight_decay)}
    rows = []
    for name, s in settings.items():
        batch = (X[: s["examples"]], y[: s["examples"]])
        rows += [{**condition, "n_examples": int(len(batch[1])), **row}
                 for row in FINDINGS[name].rows(spec, task.model, task.loss, batch, verified, s)]
    return rows


class FindingsStage(TaskStage):
    name, label = "findings", "curvature findings"
    outputs = (Output("findings", ("findings",), lambda study: resolved_settings(study.findings)),)

    def compute(self, spec, checkpoint_dir, settings):
        return findings_rows(spec, checkpoint_dir, settings)

    def describe(self, spec, step, rows):
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
        return f"step {step}: {len(rows)} findings: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


STAGE = FindingsStage()
