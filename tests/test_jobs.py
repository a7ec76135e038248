"""`eqlab submit / status / logs` end to end against a Ray head this test starts with `ray start` on
loopback only (dashboard, and with it the Jobs API, on 127.0.0.1, every port its own), in token mode as
the README's recipe; the job's tables are then read back with `eqlab query`."""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from test_cluster_recipe import end_processes, free_port
from tiny_study import LIGHT, tiny_study

BIN = Path(sys.executable).parent


def _eqlab(args, env, cwd, timeout=300):
    return subprocess.run([str(BIN / "eqlab"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_status_logs_and_query(tmp_path):
    tmp = tempfile.mkdtemp(prefix="eqj", dir="/tmp")  # short: Ray's socket paths
    gcs, dash, agent, agent_grpc, metrics = (free_port() for _ in range(5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    address = f"http://127.0.0.1:{dash}"
    (tmp_path / "study.toml").write_text(tiny_study("submitted", findings=LIGHT))
    try:
        # this head's own token, never ~/.ray/auth_token (other sessions' heads use that one)
        token = tmp_path / "token"
        token.write_text(secrets.token_hex(32))
        os.chmod(token, 0o600)
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                        "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={tmp}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                        f"--metrics-export-port={metrics}"],
                       env=env, cwd=tmp_path, check=True, capture_output=True, timeout=180)
        sub = _eqlab(["submit", "study.toml", "--address", address, "--results", "out"], env, tmp_path)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job = sub.stdout.split()[0]
        logs = _eqlab(["logs", job, "--address", address], env, tmp_path, timeout=600)
        assert logs.returncode == 0, (logs.stdout + logs.stderr)[-4000:]
        assert "== run 1/1: cnn" in logs.stdout and "finished in" in logs.stdout, logs.stdout[-3000:]
        st = _eqlab(["status", job, "--address", address], env, tmp_path)
        assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stdout + st.stderr
        assert "1 runs done, 0 running, 0 pending" in st.stdout and "HVPs" in st.stdout, st.stdout
        # the relative --results was made absolute at submission: the tables are where the user said
        results = tmp_path / "out"
        q = _eqlab(["query", "--results", str(results), "--format", "json",
                    "select count(*) as n from spectra"], env, tmp_path)
        assert q.returncode == 0 and json.loads(q.stdout)[0]["n"] > 0, q.stdout + q.stderr
        # bad input: an unknown job is one line, exit non-zero, no traceback
        bad = _eqlab(["status", "raysubmit_nope", "--address", address], env, tmp_path)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    finally:
        left = end_processes(tmp)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"head processes left: {left}"


def test_submit_to_nothing_is_one_line(tmp_path):
    (tmp_path / "study.toml").write_text(tiny_study("nowhere"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = _eqlab(["submit", "study.toml", "--address", f"http://127.0.0.1:{free_port()}"], env, tmp_path, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("eqlab: error:"), out.stderr
