"""Load check (not a test): a grid study with twice as many runs in flight as cores, interrupted twice.

    python -m bench.load [--study pipeline/studies/grid.toml] [--concurrent N] [--out bench/results/load.md]

Phase 1 runs `eqlab run` with ``[ray] concurrent_runs = N`` (default 2 × cores), samples the memory of
the whole process tree (driver, embedded Ray, every worker: summed PSS, so shared pages count once)
and sends SIGINT (a terminal's Ctrl-C) once a third of the runs have their spectra: it records the exit
status, the seconds from the signal to exit, and any process of the tree still alive afterwards.
Phase 2 reruns it and SIGKILLs the process group once half the runs are trained. Phase 3 reruns it to
the end. Rows are counted per table after each phase; the final tables are checked for duplicated keys
and for runs or checkpoints without rows, and phase 3's log for work that had already been finished.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("runs", "checkpoints", "metrics", "spectra", "lanczos", "densities", "identities", "conservation",
          "findings")


class Memory(threading.Thread):
    """Peak summed PSS (RSS where PSS is unreadable) of a process and all its descendants."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop, self.seen = pid, 0, threading.Event(), set()

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def run(self):
        while not self.stop.wait(0.5):
            total = 0
            for p in self.tree():
                try:
                    self.seen.add((p.pid, p.create_time()))
                    m = p.memory_full_info()
                    total += getattr(m, "pss", m.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)


def alive(seen: set) -> list[int]:
    out = []
    for pid, created in seen:
        try:
            if psutil.Process(pid).create_time() == created:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def files(results: Path, table: str) -> int:
    d = results / table
    return len(list(d.glob("*/*.parquet"))) if d.is_dir() else 0


def runs_with(results: Path, table: str) -> int:
    d = results / table
    return sum(1 for r in d.iterdir() if any(r.glob("*.parquet"))) if d.is_dir() else 0


def counts(results: Path) -> dict:
    import duckdb

    out = {}
    for t in TABLES:
        if files(results, t):
            out[t] = duckdb.sql(f"select count(*) from read_parquet('{results}/{t}/*/*.parquet')").fetchall()[0][0]
    return out


def phase(cmd, results: Path, until=None, sig=None) -> dict:
    """Run ``cmd``; when ``until()`` holds send ``sig`` to its process group. Returns what happened."""
    t0 = time.time()
    log = open(results.parent / f"phase-{int(t0)}.log", "w")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    mem = Memory(proc.pid)
    mem.start()
    sent = None
    while proc.poll() is None:
        if until is not None and sent is None and until():
            mem.seen |= {(p.pid, p.create_time()) for p in mem.tree()}
            os.killpg(proc.pid, sig)
            sent = time.time()
        time.sleep(0.2)
    err = proc.stderr.read()
    end = time.time()
    time.sleep(10)  # what is still alive 10 s after the driver exited
    left = alive(mem.seen)
    mem.stop.set()
    if left and sig == signal.SIGKILL:  # a SIGKILLed driver cannot clean up: end its orphans for the next phase
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    log.close()
    return {"rc": proc.returncode, "wall_s": end - t0, "stop_s": None if sent is None else end - sent,
            "peak_gib": mem.peak / 2**30, "left": left, "stderr": [l for l in err.splitlines() if l.startswith("eqlab:")],
            "log": log.name}


def check_final(results: Path, study: dict) -> dict:
    import duckdb

    dup = duckdb.sql(f"""select count(*) from (select run_id, step, which, rank, count(*) n from
        read_parquet('{results}/spectra/*/*.parquet') group by all having n > 1)""").fetchall()[0][0]
    per = duckdb.sql(f"""select run_id, count(distinct step) from read_parquet('{results}/spectra/*/*.parquet')
        group by run_id""").fetchall()
    ck = duckdb.sql(f"""select run_id, count(*) from read_parquet('{results}/checkpoints/*/*.parquet')
        group by run_id""").fetchall()
    return {"duplicated_spectra_keys": dup, "runs_with_spectra": len(per),
            "spectra_steps_per_run": sorted({n for _, n in per}), "checkpoints_per_run": sorted({n for _, n in ck})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default=str(ROOT / "pipeline/studies/grid.toml"))
    ap.add_argument("--concurrent", type=int, default=2 * (len(os.sched_getaffinity(0))))
    ap.add_argument("--out", default=str(ROOT / "bench/results/load.md"))
    ap.add_argument("--work", default=None, help="folder for the study copy and results (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="eqlab-load-"))
    work.mkdir(parents=True, exist_ok=True)
    text = Path(args.study).read_text()
    text = re.sub(r"^\[ray\]\n", f"[ray]\nconcurrent_runs = {args.concurrent}\n", text, count=1, flags=re.M)
    study_file = work / "study.toml"
    study_file.write_text(text)
    study = tomllib.loads(text)
    results = work / "results"
    eqlab = str(Path(sys.executable).with_name("eqlab"))
    cmd = [eqlab, "run", str(study_file), "--results", str(results)]
    n_runs = len(json.loads(subprocess.run(cmd + ["--dry-run", "--json"], capture_output=True, text=True,
                                           check=True, cwd=ROOT).stdout))
    print(f"load: {n_runs} runs, {args.concurrent} at a time, {len(os.sched_getaffinity(0))} cores -> {work}")

    p1 = phase(cmd, results, until=lambda: runs_with(results, "spectra") >= max(1, n_runs // 3), sig=signal.SIGINT)
    c1 = counts(results)
    print("phase 1 (Ctrl-C):", p1, c1)
    p2 = phase(cmd, results, until=lambda: files(results, "runs") >= n_runs // 2, sig=signal.SIGKILL)
    c2 = counts(results)
    keys2 = files(results, "spectra")  # (run, step) keys with spectra when the driver was killed
    print("phase 2 (SIGKILL):", p2, c2)
    p3 = phase(cmd, results)
    c3 = counts(results)
    final = check_final(results, study)
    log3 = Path(p3["log"]).read_text()
    redone_train = len(re.findall(r"\[train\] \S+: all \d+ checkpoints present", log3))
    lanczos_runs = len(re.findall(r"\[spectra\] \S+: step \d+: top-", log3))
    print("phase 3 (to the end):", p3, c3, final)

    lines = [
        "# Load check: a grid with twice as many runs in flight as cores, Ctrl-C and SIGKILL mid-study",
        "",
        f"`python -m bench.load` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): `{Path(args.study).name}`, "
        f"{n_runs} runs, `concurrent_runs = {args.concurrent}` on {len(os.sched_getaffinity(0))} cores. "
        "Memory: peak summed PSS of the driver, the embedded Ray cluster and every worker.",
        "",
        "| phase | exit | wall s | signal → exit s | peak memory GiB | processes left 10 s after exit | rows after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p, c in (("1: Ctrl-C once a third of the runs have spectra", p1, c1),
                       ("2: SIGKILL once half the runs are trained", p2, c2), ("3: rerun to the end", p3, c3)):
        stop = "" if p["stop_s"] is None else f"{p['stop_s']:.1f}"
        lines.append(f"| {name} | {p['rc']} | {p['wall_s']:.0f} | {stop} | {p['peak_gib']:.2f} | "
                     f"{len(p['left'])} | {', '.join(f'{t} {n}' for t, n in c.items())} |")
    lines += [
        "",
        f"Ctrl-C message: `{' / '.join(p1['stderr'])}`",
        "",
        f"Final tables: {final['duplicated_spectra_keys']} duplicated spectra keys; {final['runs_with_spectra']} of "
        f"{n_runs} runs with spectra, at {final['spectra_steps_per_run']} checkpoints each; checkpoint rows per run "
        f"{final['checkpoints_per_run']}. Phase 3 found {redone_train} run(s) already trained and ran "
        f"{lanczos_runs} top-k Lanczos computations for the {files(results, 'spectra') - keys2} (run, step) keys "
        f"phases 1–2 had left without spectra ({keys2} had them): "
        + ("nothing finished was redone." if lanczos_runs == files(results, "spectra") - keys2 else
           "MORE than the missing keys: finished work was redone."),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = (p1["rc"] == 130 and not p1["left"] and p3["rc"] == 0 and final["duplicated_spectra_keys"] == 0
          and final["runs_with_spectra"] == n_runs and max(p["peak_gib"] for p in (p1, p2, p3)) < 16)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
