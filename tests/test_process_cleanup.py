"""A stopped eqlab leaves no process behind: a tiny study (embedded cluster) runs as a subprocess in its
own session with its own Ray temp dir; it is killed mid-study (its whole process group with SIGKILL, or
the driver alone with SIGTERM), and within a bounded time no process of that study may remain. Before
the fix Ray 2.60 put every worker in a process group of its own, so a group kill missed them and they
were reparented to PID 1."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from tiny_study import tiny_study


ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 15.0
STUDY = tiny_study("cleanup")


def study_processes(tmp: str) -> list[tuple[int, str, int]]:
    """(pid, name, ppid) of every process that belongs to the study run under ``tmp``."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            mine = (p.environ().get("RAY_TMPDIR") == tmp or any(tmp in a for a in p.info["cmdline"] or [])
                    or any(f.path.startswith(tmp) for f in p.open_files()))
            if mine:
                out.append((p.pid, p.name(), p.ppid()))
        except psutil.Error:
            pass
    return out


# driver-SIGINT: a Ctrl-C after training, during analysis: Ray Train 2.60's TrainController of the finished
# run outlived ray.shutdown() (reparented to PID 1) until eqlab's exit hook ended it (`_shutdown_embedded`)
@pytest.mark.parametrize("how", ["group-SIGKILL", "driver-SIGTERM", "driver-SIGINT"])
def test_killed_study_leaves_no_process(tmp_path, how):
    tmp = tempfile.mkdtemp(prefix="eqc", dir="/tmp")  # short: Ray's socket paths live under it
    study = tmp_path / "tiny.toml"
    study.write_text(STUDY)
    env = dict(os.environ, RAY_TMPDIR=tmp)
    log = open(tmp_path / "eqlab.log", "w")
    p = subprocess.Popen([str(Path(sys.executable).parent / "eqlab"), "run", str(study), "--results",
                          str(tmp_path / "results")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # the workers exist; for Ctrl-C, training is over (its controller lingers) and analysis runs
        ready = "] cnn: done in" if how == "driver-SIGINT" else "[train]"
        while ready not in (tmp_path / "eqlab.log").read_text():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "eqlab.log").read_text()[-3000:]
            time.sleep(0.5)
        before = study_processes(tmp)
        assert any(n.startswith("ray::") for _, n, _ in before), before  # there are workers to leave behind
        if how == "group-SIGKILL":
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.send_signal(signal.SIGTERM if how == "driver-SIGTERM" else signal.SIGINT)
        rc = p.wait(60)
        if how == "driver-SIGINT":
            assert rc == 130, (tmp_path / "eqlab.log").read_text()[-3000:]
        t0 = time.monotonic()
        left = study_processes(tmp)
        while left and time.monotonic() - t0 < GONE_WITHIN_S:
            time.sleep(0.5)
            left = study_processes(tmp)
        assert not left, f"{how}: still alive {time.monotonic() - t0:.0f} s later: {left} (before: {before})"
    finally:
        for pid, _, _ in study_processes(tmp):  # only this study's processes, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if p.poll() is None:
            p.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
