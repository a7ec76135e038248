"""How a study's Ray CPUs are shared: among the runs in flight, and within a run between its training
workers and its analysis stages (which work on the checkpoints already written while training goes on).

Ray's logical CPUs are admission control, not threads. Every share below is rounded down to Ray's
resource unit, so the shares of all runs in flight never add up past ``ray.num_cpus``: whatever one run
asks for can be placed while every other run holds all of its own share. That is what rules out the
partial-gang deadlock (two Hessian pools each holding half their actors, each waiting for the other's
CPUs). Torch thread counts come from the run's whole share and never from the moment a stage started,
so no result depends on how training and analysis happened to overlap.

GPUs (the cluster's, counted when the study starts) are shared the same way among the runs in flight,
but within a run the split is fixed for the whole run, because the device decides the rounding of every
product: the Hessian pool's ``[spectra] workers × num_gpus`` are the run's analysis GPUs from start to
end, and training gets the rest of the run's share (`RunShare.per_train_worker_gpus`). Nothing can
deadlock: every pool of every run in flight fits beside every other at once (checked here, a
`StudyError` naming ``spectra.num_gpus`` otherwise), and a Ray Train worker group is gang-scheduled
and waits on no analysis, so a training group that finds a GPU taken waits only for work that ends.
Analysis tasks (identities, conservation, findings) ask for no GPU and run on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from eqlab.pipeline.study import Study, StudyError

QUANTUM = 1e-4  # Ray accounts resources in units of 1e-4 (ray_constants.MIN_RESOURCE_GRANULARITY)


def floor_share(total: float, parts: int) -> float:
    """``total / parts`` rounded down to Ray's unit: ``parts`` of them never exceed ``total``."""
    return math.floor(total / parts / QUANTUM + 1e-9) * QUANTUM


@dataclass(frozen=True)
class RunShare:
    """One run's share of the cluster. While it trains and analyses at once, each side gets half of its
    CPUs; after training, analysis gets them all. GPUs: the pool's ``analysis_gpus`` for the whole run,
    training the rest."""
    cpus: float
    overlap: bool
    gpus: float = 0.0           # the run's share of the cluster's GPUs
    analysis_gpus: float = 0.0  # what its Hessian pool holds: [spectra] workers × num_gpus

    def train_gpus(self) -> float:
        """GPUs left to training: the run's share less the pool's, whenever the two may overlap."""
        left = self.gpus - self.analysis_gpus if self.overlap else self.gpus
        return max(0.0, math.floor(left / QUANTUM + 1e-9) * QUANTUM)

    def per_train_worker_gpus(self, workers: int) -> float:
        """GPUs for each Ray Train worker: a whole one each when there is one per worker; one worker may
        also take a fraction (sharing its GPU with the run's Hessian actors); otherwise 0, training on
        CPUs: DDP over NCCL needs a device of its own per rank, and two ranks on one GPU are refused."""
        left = self.train_gpus()
        if left >= workers:
            return 1.0
        return left if workers == 1 and left < 1.0 else 0.0

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


def cluster_gpus() -> float:
    """The connected Ray cluster's GPUs (0 where Ray is not started: nothing here starts it)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def run_share(study: Study, gpus: float | None = None) -> RunShare:
    """``gpus``: the cluster's GPUs (default: the connected cluster's, `cluster_gpus`). Refuses, naming
    ``spectra.num_gpus``, a GPU request that the runs in flight could not all hold at once."""
    runs = study.schedule.concurrent_runs
    total = cluster_gpus() if gpus is None else float(gpus)
    share = floor_share(total, runs)
    sp = study.spectra
    pool = sp.workers * sp.num_gpus
    if pool > 0 and pool > share + QUANTUM / 2:  # both multiples of QUANTUM: half of one tells them apart
        where = (f"this cluster has {total:g} GPUs" + (f", {share:g} for each of the {runs} runs in flight "
                 "(ray.concurrent_runs)" if runs > 1 else ""))
        raise StudyError(f"spectra.num_gpus: {sp.workers} Hessian actors (spectra.workers) x {sp.num_gpus:g} GPU "
                         f"= {pool:g} GPUs per run, but {where}; lower num_gpus or workers, or set it to 0 "
                         "for the CPU")
    return RunShare(floor_share(study.num_cpus, runs), study.schedule.analyse_while_training, share, pool)
