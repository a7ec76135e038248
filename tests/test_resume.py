"""Resume that checks what it resumes: config-hash keys, verified skips, the results lock, divergence,
and a study SIGKILLed mid-training that goes on from its last checkpoint (not step 0)."""
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import store
from eqlab.pipeline.lock import ResultsInUse, results_lock
from eqlab.pipeline.query import run_query
from eqlab.pipeline.runner import run_study
from eqlab.pipeline.study import parse_study

TINY = {
    "study": {"name": "resume", "seed": 0},
    "ray": {"num_cpus": 2},
    "spectra": {"top_k": 2, "tol": 1e-6, "max_iter": 40, "workers": 1, "examples": 64, "microbatch": 64,
                "dtype": "float64", "block_top_k": 0, "density_probes": 1, "density_steps": 8},
    "identities": {"dtypes": ["float64"], "examples": 32, "probes": 1},
    # the two findings whose row count does not depend on the weights: these tests compare row counts
    # across edited and reseeded runs (the other findings have their own tests and run in test_end_to_end)
    "findings": {"include": ["flat_symmetry_direction", "gradient_hessian_alignment"]},
    "runs": [{"name": "cnn", "family": "digits_cnn", "model": {"channels": [2, 2], "hidden": 4, "bn_eps": 1e-20},
              "optimizer": "sgd", "lr": 0.1, "batch_size": 32, "steps": 6, "checkpoint_steps": [0, 3, 6]}],
}
TABLES = ["runs", "checkpoints", "metrics", "spectra", "lanczos", "densities", "identities", "conservation", "findings"]


def study_with(**run):
    d = copy.deepcopy(TINY)
    d["runs"][0].update(run)
    return parse_study(d)


def snapshot(results):
    """Every table's rows, keyed and sorted, without wall-clock columns (and without the HVP method's
    reason, which quotes the memory the machine had free when the rule was applied)."""
    out = {}
    for t in TABLES:
        table = store.read_table(results, t)
        rows = table.drop_columns([c for c in ("seconds", "created_at", "saved_at", "computed_at", "checkpoint_uri",
                                             "hvp_method_reason")
                                   if c in table.column_names])
        out[t] = sorted(map(repr, rows.to_pylist()))
    return out


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory):
    results = tmp_path_factory.mktemp("base")
    run_study(study_with(), results, log=lambda *_: None)
    return results, snapshot(results)


def test_rerun_of_a_finished_study_recomputes_nothing(baseline, tmp_path):
    results, before = baseline
    logs = []
    run_study(study_with(), results, log=logs.append)
    assert any("present and verified, skipping" in line for line in logs)
    assert not any("HVPs" in line for line in logs), "a finished stage was recomputed"
    assert snapshot(results) == before


def finished_copy(baseline, tmp_path, without=()):
    """A copy of the finished baseline study's folder (what rerunning it would write, without its cost),
    less the tables named in ``without`` (a study run on it recomputes just those)."""
    import shutil

    from eqlab.pipeline.lock import LOCK_FILE

    results = tmp_path / "r"
    shutil.copytree(baseline[0], results, ignore=shutil.ignore_patterns(LOCK_FILE, *without))
    return results


def trained_copy(baseline, tmp_path):
    """The finished baseline with only what training writes (checkpoints, metrics, runs): a study run on
    it goes straight to its analysis stages."""
    return finished_copy(baseline, tmp_path, without=("spectra", "lanczos", "densities", "block_spectra",
                                                      "identities", "conservation", "findings"))


def test_edited_lr_recomputes_every_row_of_that_run(baseline, tmp_path):
    results = finished_copy(baseline, tmp_path)
    run_study(study_with(lr=0.05), results, log=lambda *_: None)
    _, hashes = run_query(results, "select distinct config_hash from checkpoints")
    assert len(hashes) == 3  # one per checkpoint, none left from lr = 0.1
    after = snapshot(results)
    for t in TABLES:
        assert len(after[t]) == len(baseline[1][t]), t  # same keys, nothing duplicated
    # step 0 is before any step: identical weights; later checkpoints (and everything derived) changed
    _, rows = run_query(results, "select step, train_loss from checkpoints order by step")
    _, old = run_query(baseline[0], "select step, train_loss from checkpoints order by step")
    assert rows[0] == old[0] and rows[1][1] != old[1][1] and rows[2][1] != old[2][1]
    _, [(lr,)] = run_query(results, "select lr from runs")
    assert lr == 0.05


def test_edited_schedule_leaves_no_rows_of_dropped_steps(baseline, tmp_path):
    results = finished_copy(baseline, tmp_path)
    run_study(study_with(checkpoint_steps=[0, 6]), results, log=lambda *_: None)
    for t in ("checkpoints", "spectra", "identities", "conservation"):
        _, rows = run_query(results, f"select distinct step from {t} order by step")
        assert [r[0] for r in rows] == ([0] if t == "conservation" else [0, 6]), t


def test_truncated_parquet_is_moved_aside_and_recomputed(baseline, tmp_path):
    results = finished_copy(baseline, tmp_path)
    victim = store.table_files(results, "spectra")[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    logs = []
    run_study(study_with(), results, log=logs.append)
    assert any("unreadable" in line for line in logs)
    assert list(victim.parent.glob(victim.name + ".corrupt-*"))  # kept for inspection, not deleted
    pq.read_table(victim)  # rewritten whole
    assert snapshot(results)["spectra"] == baseline[1]["spectra"]


def test_truncated_weights_are_detected_and_retrained(baseline, tmp_path):
    results = finished_copy(baseline, tmp_path)
    weights = results / "checkpoints" / "cnn" / "step=000003" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    logs = []
    run_study(study_with(), results, log=logs.append)
    assert any("starting over" in line and "manifest digest" in line for line in logs)
    assert ckpt.verify(weights.parent, ckpt.manifest(weights.parent)["config_hash"]) is None
    # training is deterministic: the same weights again, so no derived row needed recomputing
    assert snapshot(results) == baseline[1]


def test_second_process_on_one_results_folder_is_refused(tmp_path):
    with results_lock(tmp_path):
        with pytest.raises(ResultsInUse, match="in use by another eqlab process"):
            with results_lock(tmp_path):
                pass
        out = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "run", "--results", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "in use by another eqlab process" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    with results_lock(tmp_path):  # released when its holder leaves
        pass


def test_diverged_run_is_recorded_and_the_study_goes_on(baseline, tmp_path):
    d = copy.deepcopy(TINY)
    d["runs"].insert(0, {**TINY["runs"][0], "name": "bad", "lr": 1e20})
    study = parse_study(d)
    results = finished_copy(baseline, tmp_path)  # run "cnn" is finished there: only "bad" trains
    logs = []
    summary = run_study(study, results, log=logs.append)
    _, rows = run_query(results, "select run_id, status, diverged_at_step from runs order by run_id")
    assert rows[0][0] == "bad" and rows[0][1] == "diverged" and rows[0][2] is not None
    assert rows[1] == ("cnn", "ok", None)
    at = rows[0][2]
    _, steps = run_query(results, "select distinct step from spectra where run_id = 'bad'")
    assert steps and all(s < at for (s,) in steps)  # analysed only before it diverged
    # the study went on past the divergence to run "cnn", whose rows are all there, unchanged
    assert [r for r in snapshot(results)["spectra"] if "'run_id': 'cnn'," in r] == baseline[1]["spectra"]
    assert summary[0].diverged_at == at
    again = []
    run_study(study, results, log=again.append)  # a rerun neither retrains nor crashes
    assert any("[train] bad: all" in line for line in again)


# The tiny study in a process of its own, its training held at step 4 (after step 3's checkpoint) on a file
# that never appears, so the kill lands mid-training however fast or slow the machine is.
_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_resume import study_with
from eqlab.pipeline.runner import run_study
hold = {{"pause_at": 4, "until_exists": {never!r}, "pause_limit_s": 200}}
run_study(study_with(), {results!r}, log=print, inject={{"train": hold}})
"""


def _listed(results, step):
    """Step ``step``'s checkpoint is whole and in Ray Train's snapshot (what a resume starts from)."""
    d = results / "checkpoints" / "cnn"
    snap = d / "checkpoint_manager_snapshot.json"
    name = ckpt.step_dir_name(step)
    return (d / name / ckpt.MANIFEST).exists() and snap.exists() and name in snap.read_text()


def test_sigkill_during_training_resumes_from_the_last_checkpoint(baseline, tmp_path):
    results = tmp_path / "r"
    code = _DRIVER.format(tests=str(Path(__file__).parent), results=str(results), never=str(tmp_path / "never"))
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not _listed(results, 3):
            assert proc.poll() is None and time.time() < deadline, "the study ended before step 3's checkpoint"
            time.sleep(0.2)
        assert not (results / "checkpoints" / "cnn" / "step=000006").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started
        proc.wait()
    logs = []
    run_study(study_with(), results, log=logs.append)
    assert any("resuming from the latest of 2" in line for line in logs), logs
    assert snapshot(results) == baseline[1]  # the same rows as the study that was never killed


# `eqlab run` as a user types it, its training held at step 4 like _DRIVER's (run_study with the hold)
_CLI_HOLDING_TRAINING = """
import functools, sys
from eqlab.pipeline import cli, runner
hold = {{"pause_at": 4, "until_exists": {never!r}, "pause_limit_s": 200}}
runner.run_study = functools.partial(runner.run_study, inject={{"train": hold}})
sys.exit(cli.entry(sys.argv[1:]))
"""


def _interrupt_when(results, ready, tmp_path, tag, sig=signal.SIGINT, hold_training=False):
    """Start the tiny study in its own process group, signal the group (SIGINT: as a terminal's Ctrl-C)
    once ``ready()`` holds, and return (exit status, stderr, seconds from the signal to exit)."""
    args = ["run", str(tmp_path / f"{tag}.toml"), "--results", str(results)]
    cmd = [sys.executable, "-m", "eqlab.pipeline.cli", *args]
    if hold_training:
        cmd = [sys.executable, "-c", _CLI_HOLDING_TRAINING.format(never=str(tmp_path / "never")), *args]
    proc = subprocess.Popen(cmd, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not ready():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        t0 = time.time()
        err = proc.communicate(timeout=60)[1]
        return proc.returncode, err, time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _write_study(path, ray=None, spectra=None, **run):
    """The tiny study, edited, as a TOML file for `eqlab run`; returns the parsed study."""
    import json

    d = copy.deepcopy(TINY)
    d["runs"][0].update(run)
    d["ray"].update(ray or {})
    d["spectra"].update(spectra or {})
    lines = []
    for section in ("study", "ray", "spectra", "identities", "findings"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in d[section].items()]
    for r in d["runs"]:
        lines.append("[[runs]]")
        lines += [f"{k} = {json.dumps(v)}" if not isinstance(v, dict) else
                  f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}" for k, v in r.items()]
    path.write_text("\n".join(lines) + "\n")
    return parse_study(d)


@pytest.mark.parametrize("stage", ["training", "spectra"])
def test_ctrl_c_stops_says_where_and_resumes(baseline, tmp_path, stage):
    if stage == "training":  # held at step 4 with the spectra of steps 0 and 3 running beside it (the default)
        results = tmp_path / "r"
        study = _write_study(tmp_path / f"{stage}.toml")
        ready = lambda: _listed(results, 3)
    else:  # on the trained baseline; densities of 120 products a checkpoint keep the stage going for
        # seconds after its first row, so the signal lands in it on a fast machine too
        results = trained_copy(baseline, tmp_path)
        study = _write_study(tmp_path / f"{stage}.toml", ray={"analyse_while_training": False},
                             spectra={"density_probes": 3, "density_steps": 40})
        ready = lambda: len(store.table_files(results, "spectra")) >= 1
    rc, err, seconds = _interrupt_when(results, ready, tmp_path, stage, hold_training=stage == "training")
    assert rc == 130, err
    assert f"interrupted during {stage} of run 'cnn'" in err and "Traceback" not in err, err
    assert not list(results.rglob("*.tmp")), "a half-written file was left"
    logs = []
    run_study(study, results, log=logs.append)  # resumes (the lock was released)
    if stage == "training":
        assert any("resuming from the latest of 2" in line for line in logs), logs
    else:
        assert any("[train] cnn: all 3 checkpoints present" in line for line in logs), logs


def test_four_runs_at_once_on_two_cpus_analyse_while_training_and_match_the_single_run_tables(baseline, tmp_path):
    """Twice as many runs in flight as cores, each analysing its checkpoints while it trains: nothing
    deadlocks, run 'cnn' ends with exactly the rows it has when trained alone, the others with every
    row. Each run's training pauses at step 4 until its own step-0 spectra row exists: a pipeline that
    analysed only after training would stop there with an error, so the overlap is shown, not timed."""
    d = copy.deepcopy(TINY)
    d["ray"]["concurrent_runs"] = 4
    d["runs"] += [{**TINY["runs"][0], "name": f"cnn{i}", "seed": i} for i in (1, 2, 3)]
    results = tmp_path / "r"
    logs = []
    pause = {"pause_at": 4, "until_exists": str(results / "spectra" / "{run_id}" / f"{0:09d}.parquet"),
             "pause_limit_s": 60}
    run_study(parse_study(d), results, log=logs.append, inject={"train": pause})
    assert any("[schedule] 4 runs at a time, 0.5 CPUs each" in line for line in logs), logs
    got = snapshot(results)
    assert {t: [r for r in rows if "'run_id': 'cnn'," in r] for t, rows in got.items()} == baseline[1]
    for rid in ("cnn", "cnn1", "cnn2", "cnn3"):
        for t in TABLES:
            n = sum(f"'run_id': '{rid}'," in r for r in got[t])
            assert n == sum(f"'run_id': 'cnn'," in r for r in baseline[1][t]) or t == "conservation", (rid, t, n)
        _, [(first_done, last_saved)] = run_query(results, f"""
            select (select min(computed_at) from spectra where run_id = '{rid}'),
                   (select max(saved_at) from checkpoints where run_id = '{rid}')""")
        assert first_done < last_saved, (rid, first_done, last_saved)  # curvature of step 0 before step 6 existed


def test_sigkill_during_spectra_resumes_to_the_uninterrupted_tables(baseline, tmp_path):
    results = trained_copy(baseline, tmp_path)  # training done: the kill lands in the spectra stage
    _write_study(tmp_path / "kill.toml", ray={"analyse_while_training": False})
    rc, _, _ = _interrupt_when(results, lambda: len(store.table_files(results, "spectra")) >= 1, tmp_path, "kill",
                               sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL
    logs = []
    run_study(study_with(), results, log=logs.append)
    assert any("[train] cnn: all 3 checkpoints present" in line for line in logs)
    assert sum("[spectra] cnn: step" in line for line in logs) <= 2  # the finished checkpoint is not redone
    assert snapshot(results) == baseline[1]


def test_sigkilled_identity_task_is_rerun_and_tables_unchanged(baseline, tmp_path):
    marker = tmp_path / "killed"
    results = finished_copy(baseline, tmp_path, without=("identities",))  # only that stage has work left
    logs = []
    run_study(study_with(), results, log=logs.append, inject={"kill_identity_task_once": str(marker)})
    assert marker.exists()  # a worker really died of SIGKILL mid-stage
    assert sum("[identities] cnn: step" in line for line in logs) == 3, logs
    assert snapshot(results) == baseline[1]
