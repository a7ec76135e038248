"""One eqlab process per results folder: an advisory lock held for the whole study.

Two studies writing one folder would replace each other's checkpoints and rows mid-write. The lock is
`fcntl.flock` on ``<results>/.eqlab.lock``: the kernel drops it when the holder dies (even by SIGKILL),
so a crashed study never blocks its own resume. The file records the holder's pid and host for the
refusal message; it is never deleted (deleting a lock file others may hold open breaks the protocol).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from eqlab.pipeline.study import StudyError

LOCK_FILE = ".eqlab.lock"


class ResultsInUse(StudyError):
    """Another eqlab process holds the results folder."""


def refuse_if_held(results: Path) -> None:
    """Raise ResultsInUse now if another process holds ``results``, creating nothing: the CLI asks this
    before it starts Ray, so a refused run costs no cluster start-up (the study still takes the lock)."""
    if (Path(results) / LOCK_FILE).exists():
        with results_lock(results):
            pass


@contextmanager
def results_lock(results: Path, command: str = "eqlab run"):
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    fd = os.open(results / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise ResultsInUse(f"{results}: in use by another eqlab process ({who}); wait for it to finish or "
                               "use another --results folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
