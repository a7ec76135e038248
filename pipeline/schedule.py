"""Runs in flight at once: up to ``ray.concurrent_runs`` run threads (`run_pipeline.run_one`), each with
its share of the cluster (`pipeline/budget.py`), started in study order as earlier ones finish.

The main thread only waits, so it is the one a Ctrl-C reaches. It then asks every run to stop
(`pipeline.interrupt`), says what each was doing, and gives them `GRACE_S` to reach a point where
nothing is half-written (each checks between products, checkpoints and row writes), then raises
KeyboardInterrupt. A run that fails lets the runs already in flight finish (their rows are good), starts
no new one, and its error is raised after them.
"""
from __future__ import annotations

import sys
import threading
import time

from eqlab.pipeline import interrupt
from eqlab.pipeline.run_pipeline import Activity, run_one
from eqlab.pipeline.stage import StageContext

GRACE_S = 30.0  # Ctrl-C: how long runs get to stop at a clean point (a second Ctrl-C stops at once)


class _Run(threading.Thread):
    def __init__(self, ctx: StageContext, spec, activity: Activity):
        super().__init__(daemon=True, name=f"run-{spec.run_id}")
        self.ctx, self.spec, self.activity, self.error = ctx, spec, activity, None

    def run(self):
        try:
            run_one(self.ctx, self.spec, self.activity)
        except BaseException as e:  # noqa: BLE001  (re-raised by the main thread)
            self.error = e


def run_all(ctx: StageContext, storage, log) -> None:
    """Run every run of ``ctx.study``, ``concurrent_runs`` at a time; returns when all are done."""
    study = ctx.study
    activity = Activity()
    queue = list(enumerate(study.runs, 1))
    running: list[_Run] = []
    failed: BaseException | None = None
    try:
        while queue or running:
            while queue and failed is None and len(running) < study.schedule.concurrent_runs:
                i, spec = queue.pop(0)
                log(f"== run {i}/{len(study.runs)}: {spec.run_id}")
                t = _Run(ctx, spec, activity)
                t.start()
                running.append(t)
            if failed is not None:
                queue.clear()
            for t in list(running):
                t.join(0.1 if len(running) == 1 else 0.1 / len(running))
                if not t.is_alive():
                    running.remove(t)
                    if t.error is not None and failed is None:
                        failed = t.error
                        if running:
                            log(f"eqlab: run {t.spec.run_id!r} failed; waiting for the {len(running)} run(s) "
                                "in flight, starting no other")
    except KeyboardInterrupt:
        where = activity.describe()
        interrupt.request(storage)
        print(f"eqlab: interrupted during {where}; stopping (every finished checkpoint and row is kept in "
              f"{ctx.results})", file=sys.stderr, flush=True)
        deadline = time.time() + GRACE_S
        for t in running:
            t.join(max(0.0, deadline - time.time()))
        raise KeyboardInterrupt(where) from None
    if failed is not None:
        raise failed
