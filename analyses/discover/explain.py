"""Why a candidate was not proposed: every pattern finder records, for each site it looked at (a norm, an
attention block, an MLP, a residual stream), the candidate family it considered and the one-line reason it
gave up, instead of returning silently. `discover` collects them; `eqlab inspect --explain` prints them and
the inspections table stores them (verdict "not_proposed").
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

_LOG: contextvars.ContextVar = contextvars.ContextVar("eqlab_discover_rejections", default=None)


@dataclass
class Rejection:
    site: str       # what was looked at: an op / parameter name ("attention at ...q_proj")
    family: str     # the candidate family considered ("vo_gl", "qk_gl", ...)
    reason: str     # one line: why it was not proposed

    def as_row(self) -> dict:
        return {"site": self.site, "family": self.family, "reason": self.reason}


def reject(site: str, family: str, reason: str):
    """Record one considered-and-rejected candidate (a no-op outside `collecting`); returns None so that a
    finder can ``return reject(...)`` where it used to ``return None``."""
    log = _LOG.get()
    if log is not None:
        log.append(Rejection(site, family, reason))
    return None


@contextlib.contextmanager
def collecting():
    """Collect the rejections of the finders run inside; yields the list they are appended to."""
    log: list = []
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)
