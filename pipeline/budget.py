"""How a study's Ray CPUs are shared: among the runs in flight, and within a run between its training
workers and its analysis stages (which work on the checkpoints already written while training goes on).

Ray's logical CPUs are admission control, not threads. Every share below is rounded down to Ray's
resource unit, so the shares of all runs in flight never add up past ``ray.num_cpus``: whatever one run
asks for can be placed while every other run holds all of its own share. That is what rules out the
partial-gang deadlock (two Hessian pools each holding half their actors, each waiting for the other's
CPUs). Torch thread counts come from the run's whole share and never from the moment a stage started,
so no result depends on how training and analysis happened to overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from eqlab.pipeline.study import Study

QUANTUM = 1e-4  # Ray accounts resources in units of 1e-4 (ray_constants.MIN_RESOURCE_GRANULARITY)


def floor_share(total: float, parts: int) -> float:
    """``total / parts`` rounded down to Ray's unit: ``parts`` of them never exceed ``total``."""
    return math.floor(total / parts / QUANTUM + 1e-9) * QUANTUM


@dataclass(frozen=True)
class RunShare:
    """One run's share of the cluster. While it trains and analyses at once, each side gets half; after
    training, analysis gets the whole share."""
    cpus: float
    overlap: bool

    def train_cpus(self) -> float:
        return floor_share(self.cpus, 2) if self.overlap else self.cpus

    def analysis_cpus(self, training: bool) -> float:
        return floor_share(self.cpus, 2) if training and self.overlap else self.cpus

    def per_train_worker(self, workers: int) -> float:
        # at most one CPU each: a Ray Train worker runs one torch thread (train_loop's "threads")
        return min(1.0, floor_share(self.train_cpus(), workers))

    def per_actor(self, actors: int, training: bool) -> float:
        return floor_share(self.analysis_cpus(training), actors)

    def per_task(self, training: bool) -> float:
        """A single-threaded analysis task (identities, conservation, findings) asks for at most one CPU."""
        return min(1.0, self.analysis_cpus(training))

    def threads(self, actors: int) -> int:
        """Torch threads per pool actor: from the run's whole share, whatever is running beside it."""
        return max(1, int(self.cpus / actors))


def run_share(study: Study) -> RunShare:
    return RunShare(floor_share(study.num_cpus, study.schedule.concurrent_runs),
                    study.schedule.analyse_while_training)
