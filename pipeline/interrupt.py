"""Stopping a study on Ctrl-C while several runs, and a run's training beside its analysis, are in flight.

Python delivers SIGINT to the main thread only. The threads that drive runs (`pipeline/schedule.py`)
learn of it from `STOP`, which they check before every Hessian-pool call, between checkpoints and while
they wait on Ray; so each stops within one product and never between a row's write and its rename.
Ray Train workers (possibly on other nodes) learn of it from a stop file beside the checkpoints (their
storage is shared by construction): rank 0 checks it every step and the ranks agree on it in that
step's loss all-reduce, so all of them stop after the same step and no checkpoint is half-reported.
"""
from __future__ import annotations

import threading
from pathlib import Path

STOP = threading.Event()
STOP_FILE = ".stop"  # under <results>/checkpoints


class Stopped(KeyboardInterrupt):
    """Raised in a run's thread once the study has been asked to stop."""


def reset(storage: Path) -> None:
    """A study starts: forget an earlier interruption (its stop file too)."""
    STOP.clear()
    (Path(storage) / STOP_FILE).unlink(missing_ok=True)


def request(storage: Path) -> None:
    STOP.set()
    Path(storage).mkdir(parents=True, exist_ok=True)
    (Path(storage) / STOP_FILE).write_text("stop\n")


def check() -> None:
    if STOP.is_set():
        raise Stopped()


def sleep(seconds: float) -> None:
    """Wait ``seconds``, or raise `Stopped` as soon as a stop is requested."""
    if STOP.wait(seconds):
        raise Stopped()


def get(refs, poll: float = 0.25):
    """``ray.get(refs)`` that raises `Stopped` within ``poll`` seconds of a stop request."""
    import ray

    many = isinstance(refs, list)
    pending = list(refs) if many else [refs]
    while True:
        check()
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=poll)
        if len(ready) == len(pending):
            return ray.get(refs)
