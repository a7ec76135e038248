"""The README's "On a Ray cluster" recipe, as written: start a loopback head with its `ray start` line,
join it with `eqlab run --address`, and find the tables. The lines are read from the README itself;
the test only gives the head its own port and `--temp-dir`, and the study a tiny file. The environment
is this one without any RAY_* variable, plus exactly what the README exports. The head is ended by its
processes' ids (`ray stop` would stop every Ray on the machine, other sessions' included)."""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from eqlab.pipeline import store
from tiny_study import LIGHT, tiny_study

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray / eqlab
STUDY = tiny_study("recipe", findings=LIGHT)


def recipe() -> list[str]:
    """The command lines of the fenced block in the README's "On a Ray cluster" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "README's cluster section has no command block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def free_port() -> int:
    """A free loopback port outside Ray's worker-port range (10002-19999) and its fixed ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10000 <= port < 20000 and port not in (6379, 8265, 52365):
            return port
    raise RuntimeError("no free port")


def processes_of(tmp: str) -> list[psutil.Process]:
    """Every process whose command line or open files name ``tmp``, and their descendants."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if any(tmp in a for a in p.info["cmdline"] or []) or any(f.path.startswith(tmp) for f in p.open_files()):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            pass
    return list(found.values())


def end_processes(tmp: str, timeout: float = 30.0) -> list:
    """SIGTERM, then SIGKILL, every process of this head; returns what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = processes_of(tmp)
        if not procs:
            return []
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
    return [(p.pid, p.name()) for p in processes_of(tmp)]


def test_readme_cluster_recipe_runs_a_study(tmp_path):
    lines = recipe()
    assert any(ln.startswith("ray start --head") for ln in lines) and any("eqlab run" in ln for ln in lines)
    port, tmp = free_port(), tempfile.mkdtemp(prefix="eqr", dir="/tmp")  # short: Ray's socket paths
    study = tmp_path / "recipe.toml"
    study.write_text(STUDY)
    script = []
    for ln in lines:
        ln = ln.replace("--port=6390", f"--port={port} --temp-dir={tmp}").replace(":6390", f":{port}")
        script.append(ln.replace("STUDY.toml", shlex.quote(str(study))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    try:
        run = subprocess.run(["bash", "-euc", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=420)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "finished" in out and "not loopback-only" not in out, out[-4000:]
        results = tmp_path / "results" / "recipe"
        for table in ("runs", "checkpoints", "spectra", "identities"):
            assert store.table_files(results, table), (table, out[-2000:])
    finally:
        left = end_processes(tmp)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"head processes left: {left}"


@pytest.mark.parametrize("node_ip", ["127.0.0.2"])
def test_joins_a_head_registered_under_another_address(tmp_path, node_ip):
    """The 60 s hang: a head that registered as another address than the one eqlab insisted on
    (127.0.0.1). Here that other address is another loopback one, so nothing leaves loopback."""
    port, tmp = free_port(), tempfile.mkdtemp(prefix="eqr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled")
    probe = ("import ray, time; t = time.time(); from eqlab.pipeline.cluster import connect; "
             f"connect(address='{node_ip}:{port}'); "
             "print('joined', sorted(n['NodeManagerAddress'] for n in ray.nodes()), round(time.time() - t, 1))")
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--node-ip-address={node_ip}", f"--port={port}",
                        "--num-cpus=1", "--disable-usage-stats", "--include-dashboard=false", f"--temp-dir={tmp}"],
                       env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
        run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        line = [ln for ln in run.stdout.splitlines() if ln.startswith("joined")][0]
        assert f"['{node_ip}']" in line and float(line.split()[-1]) < 30, line
    finally:
        left = end_processes(tmp)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"head processes left: {left}"
