"""One run end to end: train, and analyse each checkpoint as it lands while training goes on.

Training runs in a thread of its own (`train.train_run`, blocking on Ray Train); this thread watches
the run's storage and, for every checkpoint whose files all match its manifest, writes its
`checkpoints`/`metrics` rows and runs every stage on it (`stage.run_stages`), so the curvature of step
s is computed while step s' > s trains. With ``analyse_while_training = false`` it waits for training
first. Rows are keyed exactly as before (the checkpoint's weights digest), so a study resumed after a
crash skips what was analysed, whichever order it was analysed in.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import interrupt, store
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.stage import Checkpoints, PoolStage, StageContext, run_stages, task_sizes
from eqlab.pipeline.stages import STAGES
from eqlab.pipeline.study import RunSpec
from eqlab.pipeline.train import TrainResult, prepare_run_dir, train_hash, train_run

POLL_S = 0.5  # how often the storage is looked at for a new checkpoint while training


class Activity:
    """What each run in flight is doing now, for the message a Ctrl-C prints (read by the main thread)."""

    def __init__(self):
        self._lock, self._now = threading.Lock(), {}

    def set(self, run_id: str, part: str, label: str | None) -> None:
        with self._lock:
            parts = self._now.setdefault(run_id, {})
            if label is None:
                parts.pop(part, None)
            else:
                parts[part] = label

    def done(self, run_id: str) -> None:
        with self._lock:
            self._now.pop(run_id, None)

    def describe(self) -> str:
        """e.g. "training of run 'a' (and spectra of its checkpoints so far), identity checks of run 'b'"."""
        with self._lock:
            out = []
            for rid, parts in self._now.items():
                main = parts.get("train") or parts.get("analysis")
                if not main:
                    continue
                extra = f" (and {parts['analysis']} of its checkpoints so far)" if "train" in parts and \
                    "analysis" in parts else ""
                out.append(f"{main} of run {rid!r}{extra}")
            return ", ".join(out) or "start-up"


def _trained(ctx: StageContext, spec: RunSpec) -> Checkpoints | None:
    """The run's checkpoints if training is finished and verified (rows included), else None."""
    results, log = ctx.results, ctx.log
    thash = train_hash(spec)
    have = ckpt.list_steps(results / "checkpoints" / spec.run_id)
    if not store.has_rows(results, "runs", spec.run_id, store.RUN_LEVEL, thash, log):
        return None
    diverged = _recorded_divergence(results, spec)
    wanted = [s for s in spec.checkpoint_steps if diverged is None or s < diverged]
    keys = {}
    for s in wanted:
        if s not in have or ckpt.verify(have[s], thash) is not None:
            return None
        keys[s] = config_hash(thash, ckpt.weights_digest(have[s]))
        if not store.has_rows(results, "checkpoints", spec.run_id, s, keys[s], log):
            return None
    for s in wanted:  # metrics rows for a results folder written before that table existed
        if not store.has_rows(results, "metrics", spec.run_id, s, keys[s], log):
            _write_metrics(ctx, spec, s, have[s], keys[s])
    log(f"[train] {spec.run_id}: all {len(wanted)} checkpoints present and verified, skipping")
    return Checkpoints({s: have[s] for s in wanted}, keys, diverged)


def _write_metrics(ctx: StageContext, spec: RunSpec, step: int, d: Path, key: str) -> None:
    ctx.write(spec, step, "metrics", ckpt.load_metrics(d).get("history", []), key)


def _record(ctx: StageContext, spec: RunSpec, fresh: dict[int, Path]) -> Checkpoints:
    """Rows of newly landed checkpoints (`checkpoints`, `metrics`), and their stage keys."""
    thash = train_hash(spec)
    keys = {s: config_hash(thash, ckpt.weights_digest(d)) for s, d in fresh.items()}
    for s, d in fresh.items():
        m = ckpt.load_metrics(d)
        row = {k: m[k] for k in ("train_loss", "test_loss", "train_acc", "test_acc", "param_norm", "grad_norm")}
        saved = m.get("saved_at")
        ctx.write(spec, s, "checkpoints", [{**row, "checkpoint_uri": str(d), "saved_at": None if saved is None
                                            else datetime.fromtimestamp(saved, timezone.utc)}], keys[s])
        _write_metrics(ctx, spec, s, d, keys[s])
    return Checkpoints(dict(fresh), keys)


def _landed(run_dir: Path, spec: RunSpec, thash: str, seen: set[int]) -> dict[int, Path]:
    """Checkpoints of the schedule not analysed yet whose every file matches its manifest (one still
    being copied into storage does not, yet)."""
    return {s: d for s, d in ckpt.list_steps(run_dir).items()
            if s in spec.checkpoint_steps and s not in seen and ckpt.verify(d, thash) is None}


class _Training(threading.Thread):
    def __init__(self, on_exit, **kwargs):
        super().__init__(daemon=True, name=f"train-{kwargs['spec'].run_id}")
        self.on_exit, self.kwargs, self.result, self.error = on_exit, kwargs, None, None

    def run(self):
        try:
            self.result = train_run(**self.kwargs)
        except BaseException as e:  # noqa: BLE001  (handed to the run's thread, which raises it)
            self.error = e
        finally:
            self.on_exit()  # at once, not when the run's thread next looks: a Ctrl-C message must be right


def run_one(ctx: StageContext, spec: RunSpec, activity: Activity) -> None:
    """Train (or resume) one run and run every stage on each of its checkpoints."""
    results, log = ctx.results, ctx.log
    run_ctx = None
    try:
        ck = _trained(ctx, spec)
        if ck is not None:
            _analyse(ctx, spec, ck, activity)
            return
        storage = results / "checkpoints"
        run_dir, thash = storage / spec.run_id, train_hash(spec)
        prepare_run_dir(run_dir, thash, log)
        training = _Training(lambda: activity.set(spec.run_id, "train", None), spec=spec, storage=storage, log=log,
                             inject=ctx.inject.get("train"), prepared=True,
                             cpus_per_worker=ctx.share.per_train_worker(spec.train_workers))
        run_ctx = StageContext(ctx.study, results, log, ctx.inject, ctx.share, training=training.is_alive)
        activity.set(spec.run_id, "train", "training")
        training.start()
        if _prepare_pool(ctx.study):
            STAGES[0].prepare(run_ctx, spec)  # its actors start beside Ray Train's, not after a checkpoint
        seen: set[int] = set()
        ended = []  # set once training's end was handled (`finish_training`): its result is used once

        def finish_training() -> Checkpoints | None:
            """Training ended: raise its error, or verify and record the checkpoints not seen yet and
            write the run row (`_finish`) before they are analysed: a rerun then knows training is done."""
            ended.append(True)
            activity.set(spec.run_id, "train", None)
            if training.error is not None:
                raise training.error
            res = training.result
            fresh = {s: d for s, d in res.checkpoints.items() if s not in seen}
            bad = {s: why for s, d in fresh.items() if (why := ckpt.verify(d, thash)) is not None}
            if bad:
                raise RuntimeError(f"run {spec.run_id!r}: checkpoint(s) failed their manifest check after "
                                   f"training: {bad}")
            seen.update(fresh)
            landed = _record(run_ctx, spec, fresh) if fresh else None
            _finish(run_ctx, spec, res)
            return landed

        def more() -> Checkpoints | None:
            """Checkpoints landed since last asked, recorded. Once training has ended, the rest of them
            after the run row (`finish_training`): a pool still open takes them in instead of a second
            pool being opened for them."""
            if not training.is_alive():
                return None if ended else finish_training()
            fresh = _landed(run_dir, spec, thash, seen)
            if not fresh:
                return None
            seen.update(fresh)
            return _record(run_ctx, spec, fresh)

        while training.is_alive():
            ck = more() if ctx.study.schedule.analyse_while_training else None
            if ck is not None:
                _analyse(run_ctx, spec, ck, activity, more)
            else:
                interrupt.sleep(POLL_S)
        if not ended:
            ck = finish_training()
            if ck is not None:  # on run_ctx: a pool prepared there is this batch's (its CPUs are held)
                _analyse(run_ctx, spec, ck, activity)
    finally:
        if run_ctx is not None:
            run_ctx.close_prepared()  # training failed or was stopped before its first checkpoint
        activity.done(spec.run_id)


def _prepare_pool(study) -> bool:
    """Whether a run opens its first stage's pool as training starts. Only for a study with one run in
    flight: Ray starts at most as many worker processes at once as the node has CPUs, so pool actors of
    several runs started beside their Ray Train processes queue those behind them (measured on 2 cores:
    the 3-run study of tests/test_end_to_end.py 105 s → 139 s, training 34–42 s → 67–70 s), while for
    one run they fill CPU that Ray Train's start-up leaves idle (the tiny study: 52 s → 48 s)."""
    first = STAGES[0]
    return (study.schedule.analyse_while_training and study.schedule.concurrent_runs == 1
            and isinstance(first, PoolStage) and any(o.enabled(study) for o in first.outputs))


def _analyse(ctx: StageContext, spec: RunSpec, ck: Checkpoints, activity: Activity, more=None) -> None:
    run_stages(STAGES, ctx, spec, ck, on_stage=lambda label: activity.set(spec.run_id, "analysis", label),
               more=more)
    activity.set(spec.run_id, "analysis", None)


def _finish(ctx: StageContext, spec: RunSpec, res: TrainResult) -> None:
    """Training ended: prune rows of steps the schedule no longer has, write the run row (after every
    checkpoint's row: it is what tells a rerun that training is complete)."""
    for table in store.TABLES_BY_RUN:
        store.prune(ctx.results, table, spec.run_id, keep=set(res.checkpoints))
    if res.diverged_at is not None:
        ctx.log(f"[{spec.run_id}] diverged at step {res.diverged_at}: later stages ran only on the "
                f"{len(res.checkpoints)} checkpoint(s) before it")
    n_params, n_train, n_test = task_sizes(spec)
    ctx.write(spec, store.RUN_LEVEL, "runs", [{
        "family": spec.family, "optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": spec.weight_decay,
        "steps": spec.steps, "seed": spec.seed, "n_params": n_params, "n_train": n_train, "n_test": n_test,
        "train_workers": spec.train_workers, "config_json": json.dumps(asdict(spec)),
        "created_at": datetime.now(timezone.utc), "status": "ok" if res.diverged_at is None else "diverged",
        "diverged_at_step": res.diverged_at}], train_hash(spec))


def _recorded_divergence(results: Path, spec: RunSpec) -> int | None:
    t = store.read_key(results, "runs", spec.run_id, store.RUN_LEVEL)
    v = t.column("diverged_at_step")[0].as_py() if t.num_rows else None
    return None if v is None else int(v)
