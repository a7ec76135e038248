"""The conservation stage: at one checkpoint, replay the next optimizer step exactly and compare each
symmetry's conserved quantity Q(θ) with the exact discrete-time law.

The checkpoint holds the weights *and* the optimizer state, and minibatches are a function of
(seed, step), so the step the training run took can be replayed in float64 on a copy. For SGD (any
momentum / weight decay) `analyses.conservation` predicts Q(θ_{t+1}) exactly (the η² term, the
velocity term, the (1−ηλ)² factor); for Adam there is no exact law and the O(η) drift is recorded.
With several DDP workers and BatchNorm the replay normalises over the whole minibatch, unlike the
workers did, so it is the single-worker step.
"""
from __future__ import annotations

import math

import torch

from eqlab.analyses.conservation import run_steps
from eqlab.analyses.discover import discover
from eqlab.analyses.transforms import GLFamily, ScaleFamily, TranslationFamily
from eqlab.models import build_task
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.stage import Output, TaskStage
from eqlab.pipeline.study import RunSpec
from eqlab.pipeline.train import make_optimizer, minibatch_indices


def _conserved(t) -> bool:
    """A symmetry (not an equivariance) with a conserved quantity of the forms the toolbox knows."""
    if not isinstance(t, (ScaleFamily, GLFamily, TranslationFamily)) or not t.expected:
        return False
    return not any(getattr(t, "output_scale", None) or []) and not any(getattr(t, "loss_rate", None) or [])


def conservation_rows(run: RunSpec, checkpoint_dir: str, verify_examples: int = 32) -> list[dict]:
    torch.set_num_threads(1)
    step = ckpt.load_metrics(checkpoint_dir)["step"]
    if step >= run.steps:
        return []  # no step after the last checkpoint
    task = build_task(run.family, run.model, seed=run.seed, dtype=torch.float64)
    task.model.load_state_dict(ckpt.load_state(checkpoint_dir))
    task.model.train()
    X, y = task.train
    idx = minibatch_indices(len(y), run.batch_size, run.seed, step)
    batch = (X[idx], y[idx])
    found = discover(task.model, task.loss, batch, verify_examples=verify_examples)
    state = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    rows = []
    for f in found.found:
        t = f.transformation
        if not (f.verified and _conserved(t)):
            continue
        with torch.no_grad():  # every family replays the same step from the same θ and optimizer state
            for n, p in task.model.named_parameters():
                p.copy_(state[n])
        opt = make_optimizer(run, task.model.parameters())
        opt.load_state_dict(ckpt.load_optimizer_state(checkpoint_dir))  # state is cast to float64
        (s,) = run_steps(task.model, task.loss, batch, t, opt, steps=1)
        change = float(torch.linalg.vector_norm(s.change))
        predicted = None if s.predicted is None else float(torch.linalg.vector_norm(s.predicted - s.before))
        rows.append({"transformation": t.name, "symmetry": t.family, "optimizer": run.optimizer, "lr": run.lr,
                     "n_quantities": int(s.before.numel()), "q_norm": float(torch.linalg.vector_norm(s.before)),
                     "change": change, "predicted_change": math.nan if predicted is None else predicted,
                     "residual": s.residual, "drift_per_lr": change / run.lr,
                     "eta2_term": float(run.lr ** 2 * torch.linalg.vector_norm(s.grad_term)),
                     "tolerance": s.tolerance, "verdict": s.verdict, "tolerance_reason": s.rounding_reason})
    return rows


class ConservationStage(TaskStage):
    name, label = "conservation", "conservation"
    outputs = (Output("conservation", ("conservation",)),)

    def wants(self, spec, step):
        return step < spec.steps  # the step after the checkpoint is replayed

    def compute(self, spec, checkpoint_dir, settings):
        return conservation_rows(spec, checkpoint_dir)

    def describe(self, spec, step, rows):
        verdicts = sorted({r["verdict"] for r in rows})
        exact = [r["residual"] for r in rows if not math.isnan(r["residual"])]
        law = (f"exact law residual <= {max(exact):.1e} ({', '.join(verdicts)})" if exact else
               f"no exact law for {spec.optimizer}: drift/lr up to "
               f"{max((r['drift_per_lr'] for r in rows), default=0):.3g}")
        return f"step {step}->{step + 1}: {len(rows)} conserved families, {law}"


STAGE = ConservationStage()
