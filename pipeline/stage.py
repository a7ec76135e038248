"""What a stage is: one declared analysis of a run's checkpoints, and the one loop that runs them all.

A stage names its outputs (the tables it writes per (run, step), and the study settings those rows
depend on), which checkpoints it wants, and how it computes: `TaskStage` runs one pure function per
checkpoint as a Ray task (identities, conservation); `PoolStage` opens a pool of Ray actors once per
batch of checkpoints and feeds it them in turn (spectra, density, block spectra), because its setup
(model replicas, HVP graphs) costs more than one checkpoint's work. A run analysed after training is one batch;
one analysed while it trains gets a batch per poll that found checkpoints, and its first stage takes
in those that land while it runs (`run_stages`' ``more``), the last ones as training ends included. A
run alone in flight opens that stage's pool as training starts (`PoolStage.prepare`). Adding a stage is
one module that declares a ``STAGE`` plus its schema, listed in `pipeline/stages.py`.

Keys: every row carries hash(stage output, the checkpoint's key, the output's settings); a checkpoint is
done for an output when all its tables hold a readable file with that hash (`store.has_rows`). So an
edit recomputes only the outputs whose settings changed, and an interrupted stage resumes at the first
checkpoint it had not written. Specs cross Ray boundaries as the frozen dataclasses they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import interrupt, store
from eqlab.pipeline.budget import RunShare, run_share
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.study import RunSpec, Study


@dataclass
class Checkpoints:
    """What training left for the later stages: {step: folder}, each folder's stage key, divergence."""
    steps: dict[int, Path]
    keys: dict[int, str]             # step -> hash(training config, weights digest): every derived row's root
    diverged_at: int | None = None

    def add(self, landed: "Checkpoints") -> None:
        """Take in checkpoints that landed while a stage was running (`run_stages`' ``more``)."""
        self.steps.update(landed.steps)
        self.keys.update(landed.keys)


# What `run_stages` may call for checkpoints that landed since it started (each recorded, at most once):
# None when there are none.
More = Callable[[], "Checkpoints | None"]


@dataclass(frozen=True)
class Output:
    """Rows a stage writes per (run, step) into ``tables``; they depend on ``settings(study)``."""
    name: str                                   # also the key's salt (kept stable: stored keys stay valid)
    tables: tuple[str, ...]
    settings: Callable[[Study], object] = lambda study: None
    enabled: Callable[[Study], bool] = lambda study: True


@dataclass
class StageContext:
    """What every stage run sees: the study, where rows go, the log, fault-injection hooks (tests), the
    run's share of the cluster, and whether the run is still training beside it (`pipeline/budget.py`)."""
    study: Study
    results: Path
    log: Callable[[str], None]
    inject: dict = field(default_factory=dict)
    share: RunShare | None = None
    training: Callable[[], bool] = lambda: False
    # pools opened before their stage first runs ({stage name: pool}, `PoolStage.prepare`); each is used
    # by its stage's next run, and whoever prepared them shuts down what is left unused (`close_prepared`)
    prepared: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.share is None:
            self.share = run_share(self.study)

    def actor_cpus(self, actors: int) -> float:
        """Logical CPUs for each of ``actors`` pool actors opened now."""
        return self.share.per_actor(actors, self.training())

    def threads(self, actors: int) -> int:
        return self.share.threads(actors)

    def write(self, spec: RunSpec, step: int, table: str, rows: list[dict], key: str) -> None:
        store.write_rows(self.results, table, spec.run_id, step, rows, self.study.name, self.study.hash, key)

    def close_prepared(self) -> None:
        while self.prepared:
            self.prepared.popitem()[1].shutdown()


class Stage:
    name: str            # log tag, e.g. "identities"
    label: str           # what a user reads when it is interrupted, e.g. "identity checks"
    outputs: tuple[Output, ...]

    def wants(self, spec: RunSpec, step: int) -> bool:
        """Whether this stage analyses the checkpoint at ``step`` (conservation needs a step after it)."""
        return True

    def key(self, ctx: StageContext, ck: Checkpoints, step: int, out: Output) -> str:
        return config_hash(out.name, ck.keys[step], *(() if out.settings(ctx.study) is None
                                                       else (out.settings(ctx.study),)))

    def todo(self, ctx: StageContext, spec: RunSpec, ck: Checkpoints) -> dict[int, list[Output]]:
        """{step: the outputs still missing there}, in step order."""
        need = {}
        for s in sorted(ck.steps):
            if not self.wants(spec, s):
                continue
            missing = [o for o in self.outputs if o.enabled(ctx.study) and not all(
                store.has_rows(ctx.results, t, spec.run_id, s, self.key(ctx, ck, s, o), ctx.log) for t in o.tables)]
            if missing:
                need[s] = missing
        return need

    def run(self, ctx: StageContext, spec: RunSpec, ck: Checkpoints, todo: dict[int, list[Output]],
            more: More | None = None) -> None:
        """Compute ``todo``; a stage that can take in later checkpoints cheaply (a pool already open) adds
        what ``more`` returns to ``ck`` and computes it too."""
        raise NotImplementedError


class TaskStage(Stage):
    """One Ray task per checkpoint running ``compute(spec, checkpoint_dir, settings, **hooks)`` → rows
    of the stage's single output; rows are written as tasks finish (Ray retries a task whose worker dies)."""
    num_cpus: float = 1.0

    def compute(self, spec: RunSpec, checkpoint_dir: str, settings, **hooks) -> list[dict]:
        raise NotImplementedError

    def hooks(self, ctx: StageContext) -> dict:
        return {}

    def describe(self, spec: RunSpec, step: int, rows: list[dict]) -> str:
        return f"{len(rows)} rows"

    def run(self, ctx, spec, ck, todo, more=None):
        (out,) = self.outputs
        cpus = min(self.num_cpus, ctx.share.per_task(ctx.training()))
        remote = ray.remote(num_cpus=cpus)(type(self)._remote_compute)
        settings = out.settings(ctx.study)
        pending = {remote.remote(self, spec, str(ck.steps[s]), settings, self.hooks(ctx)): s for s in todo}
        while pending:
            interrupt.check()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            if not ready:
                continue
            s = pending.pop(ready[0])
            rows = ray.get(ready[0])
            for table in out.tables:
                ctx.write(spec, s, table, rows, self.key(ctx, ck, s, out))
            ctx.log(f"[{self.name}] {spec.run_id}: {self.describe(spec, s, rows)}")

    @staticmethod
    def _remote_compute(stage: "TaskStage", spec, checkpoint_dir, settings, hooks):
        return stage.compute(spec, checkpoint_dir, settings, **hooks)


class PoolStage(Stage):
    """A pool of actors opened once per batch (``open``), given each checkpoint's weights in turn;
    ``compute`` returns {table: rows} for one output at one checkpoint."""

    def open(self, ctx: StageContext, spec: RunSpec):
        raise NotImplementedError

    def prepare(self, ctx: StageContext, spec: RunSpec) -> None:
        """Open the pool now, for this stage's next run on ``ctx``: its actors start (a process each,
        importing torch and building the model) while training starts, not after the first checkpoint."""
        if self.name not in ctx.prepared:
            ctx.prepared[self.name] = self.open(ctx, spec)

    def compute(self, ctx: StageContext, pool, spec: RunSpec, step: int, state: dict, out: Output) -> dict:
        raise NotImplementedError

    def run(self, ctx, spec, ck, todo, more=None):
        """Before closing the pool, take in the checkpoints that landed meanwhile (``more``): a run that
        analyses while it trains then opens its pools once for all of them instead of once per batch
        (every actor is a fresh process that imports torch: seconds of CPU each on a small machine)."""
        pool = ctx.prepared.pop(self.name, None) or self.open(ctx, spec)
        try:
            while todo:
                for s, outs in todo.items():
                    interrupt.check()
                    state = ckpt.load_state(ck.steps[s])
                    for out in outs:
                        for table, rows in self.compute(ctx, pool, spec, s, state, out).items():
                            ctx.write(spec, s, table, rows, self.key(ctx, ck, s, out))
                landed = more() if more is not None else None
                todo = {}
                if landed is not None:
                    ck.add(landed)
                    todo = self.todo(ctx, spec, landed)
        finally:
            pool.shutdown()


def task_sizes(spec: RunSpec) -> tuple[int, int, int]:
    """(parameters, training examples, test examples) of a run's task (builds it once, on the CPU)."""
    from eqlab.models import build_task

    task = build_task(spec.family, spec.model, seed=spec.seed)
    return sum(p.numel() for p in task.model.parameters()), len(task.train[1]), len(task.test[1])


def run_stages(stages, ctx: StageContext, spec: RunSpec, ck: Checkpoints, on_stage=lambda label: None,
               more: More | None = None) -> None:
    """Run every stage's missing work for one run, in order; ``on_stage`` hears which one is running.
    Only the first stage is given ``more``: checkpoints it takes in are then in ``ck`` for every later
    stage, so none is left with a checkpoint whose earlier stages have not run."""
    for i, stage in enumerate(stages):
        on_stage(stage.label)
        todo = stage.todo(ctx, spec, ck)
        if not todo:
            if stage.name in ctx.prepared:  # its CPUs are the run's analysis share: the next stage needs them
                ctx.prepared.pop(stage.name).shutdown()
            if any(o.enabled(ctx.study) for o in stage.outputs):
                ctx.log(f"[{stage.name}] {spec.run_id}: all checkpoints done, skipping")
            continue
        stage.run(ctx, spec, ck, todo, more=more if i == 0 else None)
