"""`eqlab submit / status / logs`: a study sent to a running Ray cluster through the Ray Jobs API.

The job's working directory holds only the study file (the cluster has eqlab installed: the image in
`cluster/`, or this venv for a local head), and its entrypoint is `eqlab run` against the cluster
(`--address auto`: the job's driver runs on the head). The job records which eqlab and which study it
runs in its metadata, and the entrypoint refuses to run under another eqlab version than the one
that submitted it (results must come from the pinned stack). Progress is read from the job's own log
lines (`== run i/N`, `[spectra] … step …`), so `eqlab status` needs nothing but the Jobs API.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import eqlab
from eqlab.pipeline.study import Study, StudyError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TAG = "eqlab"  # metadata key marking eqlab's jobs among a cluster's others


class JobError(StudyError):
    """A submission or job problem, reported in one line like a malformed study."""


def results_location(results: str | None, study: Study) -> str:
    """Where the job writes: a path made absolute here (a relative one would land in the job's temporary
    working directory). URLs are refused: the store needs a POSIX filesystem (atomic rename, flock)."""
    if results and "://" in results:
        raise JobError(f"--results: {results} is a URL; the results store needs a filesystem path on the "
                       "cluster (a shared mount)")
    return str(Path(results or Path("results") / study.name).resolve())


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    from eqlab.pipeline.cluster import apply_defaults, check_token_destination

    apply_defaults()
    check_token_destination(address)  # a local token goes only to this machine's own cluster
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001  (connection refused, auth, not a Jobs API: all one line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JobError(f"no Ray Jobs API answers at {address} ({first}); is the head's dashboard running?") from None


def submit(study: Study, study_file: Path, address: str, results: str) -> str:
    """Submit ``study`` (already validated); returns the job id."""
    from eqlab.pipeline.study import user_family_files

    beside = user_family_files(study, study_file)  # a StudyError here names the run before anything is sent
    c = client(address)
    staging = Path(tempfile.mkdtemp(prefix="eqlab-submit-"))
    try:
        shutil.copyfile(study_file, staging / "study.toml")
        for src, rel in beside:  # a `file.py:FUNC` family resolves against the study file's folder
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
        # `python` and `eqlab` of the cluster's environment (its image, or the venv the head was started from)
        entry = (f"python -m eqlab.pipeline.jobs --expect-version {shlex.quote(eqlab.__version__)} && "
                 f"eqlab run study.toml --address auto --results {shlex.quote(results)}")
        job = c.submit_job(entrypoint=entry, runtime_env={"working_dir": str(staging)},
                           metadata={TAG: eqlab.__version__, "study": study.name, "runs": str(len(study.runs)),
                                     "results": results, "study_hash": study.hash})
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JobError(f"the cluster at {address} refused the job ({first})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # Ray has uploaded its own copy
    return job


@dataclass
class Progress:
    """What a job's log says so far."""
    runs_total: int
    run_index: int = 0          # the run now in progress (1-based; 0: none started)
    run_id: str = ""
    stage: str = ""
    checkpoints_done: int = 0   # top-k spectra written (all runs)
    hvps: int = 0               # HVPs the spectra logged
    finished: bool = False

    @property
    def runs_done(self) -> int:
        return self.runs_total if self.finished else max(self.run_index - 1, 0)


_RUN = re.compile(r"^== run (\d+)/(\d+): (\S+)")
_STAGE = re.compile(r"^\[(\w+)\] ")
_SPECTRA = re.compile(r"^\[spectra\] \S+: step \d+: .* in (\d+) HVPs")


def progress(log: str, runs_total: int) -> Progress:
    p = Progress(runs_total)
    for line in log.splitlines():
        if m := _RUN.match(line):
            p.run_index, p.runs_total, p.run_id, p.stage = int(m[1]), int(m[2]), m[3], "train"
        elif m := _SPECTRA.match(line):
            p.checkpoints_done += 1
            p.hvps += int(m[1])
            p.stage = "spectra"
        elif (m := _STAGE.match(line)) and m[1] != "ray":
            p.stage = m[1]
        if line.startswith("eqlab: study ") and " finished in " in line:
            p.finished = True
    return p


def _ask(what: str, call, *args):
    try:
        return call(*args)
    except Exception as e:  # noqa: BLE001  (an unknown id, a lost head: one line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JobError(f"{what}: {first}") from None


def status_lines(address: str, job: str | None = None) -> list[str]:
    c = client(address)
    jobs = ([_ask(f"job {job}", c.get_job_info, job)] if job else
            [j for j in _ask("listing jobs", c.list_jobs) if (j.metadata or {}).get(TAG)])
    if not jobs:
        return ["no eqlab jobs on this cluster"]
    out = []
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = j.metadata or {}
        jid = j.submission_id or j.job_id
        p = progress(c.get_job_logs(jid), int(meta.get("runs", "0") or 0))
        elapsed = ((j.end_time or time.time() * 1000) - (j.start_time or 0)) / 1000 if j.start_time else 0.0
        running = 0 if p.finished or str(j.status) != "RUNNING" else int(p.run_index > 0)
        pending = max(p.runs_total - p.runs_done - running, 0)
        eta = ""
        if running and p.runs_done:
            eta = f", ETA ~{elapsed / p.runs_done * (p.runs_total - p.runs_done):.0f}s (from finished runs)"
        now = f" — now {p.run_id} ({p.stage})" if running else ""
        out.append(f"{jid}  {j.status}  study {meta.get('study', '?')!r}: {p.runs_done} runs done, {running} running, "
                   f"{pending} pending; {p.checkpoints_done} checkpoints' spectra, {p.hvps} HVPs; "
                   f"{elapsed:.0f}s{eta}{now}; results: {meta.get('results', '?')}")
    return out


def follow_logs(address: str, job: str, out=sys.stdout) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    from ray.job_submission import JobStatus

    c = client(address)
    shown = 0
    while True:
        status = _ask(f"job {job}", c.get_job_status, job)
        text = _ask(f"job {job}", c.get_job_logs, job)
        out.write(text[shown:])
        out.flush()
        shown = len(text)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(1.0)


def _check_version(expected: str) -> int:
    """The job's first command: refuse another eqlab than the submitter's (one line, exit 2)."""
    if eqlab.__version__ != expected:
        print(f"eqlab: error: this cluster runs eqlab {eqlab.__version__}, the study was submitted with "
              f"{expected}; install the same version on the cluster", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_check_version(sys.argv[sys.argv.index("--expect-version") + 1]))
