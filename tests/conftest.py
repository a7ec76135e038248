"""One real local Ray cluster for the whole test session, on loopback only."""
import os
import signal

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported anywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import eqlab.pipeline  # noqa: E402,F401  (applies the rest of eqlab's Ray environment defaults)

# A shell without job control that starts pytest in the background (`pytest &`, nohup) leaves SIGINT
# ignored, and an ignored signal stays ignored across exec: the Ctrl-C tests' studies would never see
# theirs. A handler (unlike SIG_IGN) is reset to the default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from eqlab.pipeline.cluster import connect

    resources = connect(num_cpus=2)
    node_ips = {n["NodeManagerAddress"] for n in ray.nodes()}
    assert node_ips == {"127.0.0.1"}, f"Ray must stay on loopback, nodes at {node_ips}"
    yield resources
    import psutil

    ours = psutil.Process().children(recursive=True)  # the raylet, GCS and every worker this session started
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=15)
    # Ray Train 2.60's TrainController actors of runs a test stopped early have outlived ray.shutdown()
    # (reparented to PID 1): end them, and say so, so that the suite leaves no process behind.
    for p in alive:
        try:
            name = p.name()
            p.kill()
        except psutil.Error:
            continue
        print(f"\nconftest: ended {name} (pid {p.pid}), still alive after ray.shutdown()")
