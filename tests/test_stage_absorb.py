"""A run's first pool stage takes in the checkpoints that land while it runs (`stage.run_stages`' ``more``):
its actors are opened once for all of them (spectra, density and block spectra alike), and every later
stage sees them. Real Ray actors, real HVPs, real Parquet rows read back."""
import torch

from eqlab.models import build_task
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import store
from eqlab.pipeline.identities import IdentityStage
from eqlab.pipeline.spectra_stage import SpectraStage
from eqlab.pipeline.stage import Checkpoints, StageContext, run_stages
from eqlab.pipeline.study import parse_study

STUDY = {
    "study": {"name": "absorb", "seed": 0},
    "ray": {"num_cpus": 2},
    "spectra": {"top_k": 1, "tol": 1e-4, "max_iter": 30, "workers": 1, "examples": 32, "microbatch": 32,
                "block_top_k": 1, "density_probes": 0},
    "runs": [{"name": "cnn", "family": "digits_cnn", "model": {"channels": [2, 3], "hidden": 6, "bn_eps": 1e-20},
              "optimizer": "sgd", "lr": 0.1, "batch_size": 16, "steps": 2, "n_checkpoints": 2}],
}


def _counting(base):
    """The stage as shipped, counting its pool opens and the ``more`` it was given."""
    class Counting(base):
        def __init__(self):
            self.opens, self.given_more = 0, []

        def open(self, ctx, spec):  # a pool stage's only
            self.opens += 1
            return super().open(ctx, spec)

        def run(self, ctx, spec, ck, todo, more=None):
            self.given_more.append(more is not None)
            return super().run(ctx, spec, ck, todo, more=more)
    return Counting()


def _checkpoint(tmp_path, step: int, scale: float) -> Checkpoints:
    task = build_task("digits_cnn", STUDY["runs"][0]["model"], seed=0)
    with torch.no_grad():
        for p in task.model.parameters():
            p.mul_(scale)  # a different point per step: different spectra
    d = tmp_path / "ckpt" / f"{step:09d}"
    d.mkdir(parents=True)
    ckpt.save(d, task.model, {})
    return Checkpoints({step: d}, {step: f"key{step}"})


def test_first_pool_stage_takes_in_landed_checkpoints_with_one_pool_open(ray_cluster, tmp_path):
    study = parse_study(STUDY)
    spec = study.runs[0]
    ctx = StageContext(study, tmp_path / "r", lambda *_: None)
    first, later = _checkpoint(tmp_path, 0, 1.0), _checkpoint(tmp_path, 2, 1.5)
    waiting = [later]
    asked = []

    def more():
        asked.append(len(waiting))
        return waiting.pop() if waiting else None

    spectra, identities = _counting(SpectraStage), _counting(IdentityStage)
    ck = Checkpoints(dict(first.steps), dict(first.keys))
    run_stages((spectra, identities), ctx, spec, ck, more=more)
    assert asked == [1, 0]  # asked after step 0, took step 2 in, asked again after it: nothing more
    assert spectra.opens == 1  # one pool for both steps, blocks included
    assert spectra.given_more == [True] and identities.given_more == [False]  # only the first stage absorbs
    assert sorted(ck.steps) == [0, 2]
    for table in ("spectra", "block_spectra"):
        tops = {s: store.read_key(ctx.results, table, "cnn", s).column("eigenvalue")[0].as_py() for s in (0, 2)}
        assert tops[0] != tops[2], (table, tops)  # each step's own weights were loaded
    assert all(store.has_rows(ctx.results, "identities", "cnn", s) for s in (0, 2))  # the later stage saw step 2


def test_without_more_a_stage_computes_only_what_it_was_given(ray_cluster, tmp_path):
    """The control: with nothing to take in, the later checkpoint is not computed (and a second batch
    would open the pool again)."""
    study = parse_study(STUDY)
    ctx = StageContext(study, tmp_path / "r", lambda *_: None)
    spectra = _counting(SpectraStage)
    run_stages((spectra,), ctx, study.runs[0], _checkpoint(tmp_path, 0, 1.0))
    assert spectra.opens == 1 and spectra.given_more == [False]
    assert store.has_rows(ctx.results, "spectra", "cnn", 0) and not store.has_rows(ctx.results, "spectra", "cnn", 2)


def test_a_prepared_pool_serves_the_next_run_and_is_shut_when_nothing_needs_it(ray_cluster, tmp_path):
    """`PoolStage.prepare` (a run alone in flight opens its pool as training starts): the stage's next
    run uses that pool instead of opening one; a prepared pool with no work left is shut before the
    next stage, whose tasks need the CPUs it holds (kept open, they would wait for ever)."""
    import pytest
    import ray
    from ray.exceptions import RayActorError

    study = parse_study(STUDY)
    spec = study.runs[0]
    ctx = StageContext(study, tmp_path / "r", lambda *_: None)
    ck = _checkpoint(tmp_path, 0, 1.0)
    spectra = _counting(SpectraStage)
    spectra.prepare(ctx, spec)
    assert spectra.opens == 1 and "spectra" in ctx.prepared
    run_stages((spectra,), ctx, spec, ck)
    assert spectra.opens == 1 and not ctx.prepared  # the prepared pool did the work
    assert store.has_rows(ctx.results, "spectra", "cnn", 0) and store.has_rows(ctx.results, "block_spectra", "cnn", 0)

    spectra.prepare(ctx, spec)  # step 0 is done: this pool finds nothing to do
    idle = ctx.prepared["spectra"]
    run_stages((spectra,), ctx, spec, ck)
    assert spectra.opens == 2 and not ctx.prepared
    with pytest.raises(RayActorError):
        ray.get(idle.actors[0].where.remote(), timeout=60)
