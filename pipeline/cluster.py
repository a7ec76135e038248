"""Connecting to Ray: an embedded local cluster on loopback by default, or an existing cluster.

The embedded cluster binds to 127.0.0.1, starts no dashboard unless asked, sends no usage stats, and
declares its CPUs explicitly (Ray's resources are logical; the stages size their actors from them).
Its worker processes stay in this process's process group, so killing the group (or this process:
Ray's reaper then signals the group) leaves no Ray process behind.

Joining (``--address``): the local token file is only sent to this machine's own cluster; a cluster
at another address gets only a token the user named (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``).

Training (`train_backend_config`): Ray Train's torch rendezvous store is created here on a socket
bound to rank 0's node address (127.0.0.1 on the embedded cluster) instead of torch's default of all
interfaces.
"""
from __future__ import annotations

import atexit
import ipaddress
import logging
import math
import os
import socket
import sys
from pathlib import Path

from eqlab.pipeline.env import apply_defaults, worker_env

TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # a token the user chose (Ray reads these first)


class ClusterError(ConnectionError):
    """Ray could not be reached; the message says where and what to try."""


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a plain ``HOST:PORT`` GCS address; None for ``auto`` or ``ray://`` addresses."""
    if "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return (host, int(port)) if port.isdigit() else None


def _address_host(address: str) -> str | None:
    """The host an address points at (``ray://HOST:PORT`` too); None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:rest.find("]")] if "]" in rest else rest
    return rest.rpartition(":")[0] if ":" in rest else rest


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (Python 3.11 does not call it loopback)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _token_mode() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def check_token_destination(address: str) -> None:
    """Refuse to send the local token file (``~/.ray/auth_token``, which a local ``ray.init`` writes)
    to a cluster at another address: there it must be a token the user named explicitly.

    Ray 2.60 with ``RAY_AUTH_MODE=token`` reads ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``, and sends it in plain text (gRPC without TLS) to the address given."""
    host = _address_host(address)
    if host is None or _is_loopback(host) or not _token_mode():
        return
    if any(os.environ.get(k) for k in TOKEN_ENV):
        return
    raise ClusterError(
        f"not sending this machine's ~/.ray/auth_token to {address}: Ray sends the token unencrypted to "
        "that address, and that file is usually the token a local Ray generated. Name the cluster's token "
        "explicitly: RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=FILE (that may be ~/.ray/auth_token if it "
        "really is the cluster's token)")


def _keep_local_token_private() -> None:
    """Ray 2.60 writes ``~/.ray/auth_token`` with the process umask (0644: every local user can read the
    token that guards the loopback cluster). Create it 0600 before Ray does, or make it 0600."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or any(os.environ.get(k) for k in TOKEN_ENV):
        return
    path = Path.home() / ".ray" / "auth_token"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            st = path.stat()
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(path, 0o600)
            return
        import secrets

        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator writes (256 random bits, hex)
    except OSError:
        pass  # Ray then makes (or reads) it as usual


def _warn_if_off_loopback(address: str) -> None:
    """A loopback address, but the node this driver joined registered under another address: its traffic
    leaves loopback (`ray start` rewrites --node-ip-address=127.0.0.1 unless told not to)."""
    import ray

    host = _address_host(address)
    if host is None or not _is_loopback(host):
        return
    try:
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only a warning
        return
    if not _is_loopback(node_ip):
        print(f"eqlab: warning: the Ray node at {address} registered as {node_ip}, so its traffic is not "
              "loopback-only; start the head with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (README, "
              "\"On a Ray cluster\")", file=sys.stderr)


def connect(num_cpus: float = 2, address: str | None = None, dashboard: bool = False,
            object_store_mb: int = 512) -> dict:
    """Start (or join) Ray; returns the cluster's resources. Reuses an already initialised Ray."""
    import ray

    apply_defaults()
    if not ray.is_initialized():
        runtime_env = {"env_vars": worker_env()}
        if address:
            check_token_destination(address)
            hp = _host_port(address)
            # Fail in seconds, not after Ray's minutes of retries, when nothing listens there.
            if hp and not _reachable(*hp):
                raise ClusterError(f"no Ray cluster answers at {address} (is `ray start --head` running there?)")
            # No _node_ip_address: Ray picks this machine's node of that cluster whatever address it
            # registered under (forcing 127.0.0.1 hung 60 s when the head had registered as another one).
            try:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as e:
                # Ray >= 2.59 clusters use token authentication; an explicit address does not pick up
                # a token by itself (RAY_AUTH_MODE=token is needed).
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                hint = ("; for a token-authenticated cluster set RAY_AUTH_MODE=token and the cluster's token "
                        "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; on this machine's own cluster ~/.ray/auth_token "
                        "is used too)" if not _token_mode() or isinstance(e, ray.exceptions.AuthenticationError)
                        else "")
                raise ClusterError(f"cannot connect to the Ray cluster at {address} ({first}){hint}") from None
            _warn_if_off_loopback(address)
        else:
            # address="local": always a fresh embedded cluster, never one a `ray start` left running here.
            if not dashboard:
                # Nothing reads task events without a dashboard; reporting them costs ≈ 0.35 ms per actor
                # call (2.2 → 1.9 ms round trip after 25 ms of work, 2-core VM): a sharded HVP pays it
                # on every Lanczos step. The raylet and workers inherit it from this process.
                os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
            # Ray 2.60 puts every worker in a process group of its own: a group kill of this process
            # then missed them (actors reparented to PID 1 outlived it). With 0 they stay in this group,
            # which ray.init makes a fresh one (and Ray's reaper signals when this process dies).
            os.environ.setdefault("RAY_process_group_cleanup_enabled", "0")
            # One machine has no spot node to lose: Ray Train's preemption watcher would be one more
            # process (≈ 1.5 s of CPU importing Ray) per run. Train passes the variable to its controller.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            if not dashboard:  # Ray Train's run metrics are read by the dashboard only
                os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
            _keep_local_token_private()
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     object_store_memory=object_store_mb * 2**20, runtime_env=runtime_env,
                     log_to_driver=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
                     _system_config=embedded_system_config(num_cpus))
            atexit.register(_shutdown_embedded)  # runs before Ray's own exit hook (atexit is LIFO)
    return ray.cluster_resources()


def embedded_system_config(num_cpus: float) -> dict:
    """Keep idle Ray workers for the next stage instead of starting new ones.

    Ray kills an idle worker after 1 s once more workers are alive than the node has CPUs, and each Ray
    Train run alone keeps about six service actors alive: so every analysis task after a pause landed
    on a fresh process that imported torch again (2-5 s on 2 cores). Here up to 8 idle workers beyond
    the CPU count stay for a minute (about 250 MB each with torch imported). Measured: test_resume.py
    620 s -> 477 s on 2 cores (with the preemption watcher off as well, and a 600 s idle limit; 60 s here
    is not measured yet)."""
    return {"num_workers_soft_limit": math.ceil(num_cpus) + 8, "idle_worker_killing_time_threshold_ms": 60_000}


_exit_status: int | None = None  # set by `exit_after_shutdown`


def exit_after_shutdown(status: int) -> None:
    """End the process with ``status`` as soon as the embedded cluster is shut down at exit.

    After a Ctrl-C a daemon thread of a run can still be inside a Ray call; if it touches the core
    worker once `ray.shutdown` has run, Ray ends the process with status 1 and no message (seen once in
    the suite: "The core worker process is not initialized yet or already shutdown" as the driver log's
    last line, and exit 1 instead of the CLI's 130). Nothing is left to finalise by then: every result
    is a file already renamed into place."""
    global _exit_status
    _exit_status = status


def _shutdown_embedded(wait_s: float = 5.0) -> None:
    """Stop the embedded cluster at exit and end whatever of it outlived ``ray.shutdown()``: Ray Train
    2.60's TrainController of a run stopped early (Ctrl-C) survives it, reparented to PID 1."""
    import psutil
    import ray
    from ray._private import auto_init_hook

    # A run thread still inside a Ray call (Ctrl-C gives them GRACE_S, then the process exits) must not
    # start a second cluster by Ray's auto-init once this one is gone: its agents would outlive us. This
    # is what RAY_ENABLE_AUTO_CONNECT=0 sets, but Ray reads that variable only when it is imported.
    auto_init_hook.enable_auto_connect = False
    ours = psutil.Process().children(recursive=True)  # GCS, raylet, and every worker and actor under it
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=wait_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if _exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


# --- Ray Train: a torch rendezvous store bound to rank 0's node address ----------------------------------
#
# Ray Train 2.60's TorchConfig (ray/train/torch/config.py, `_TorchBackend.on_start`, used by Train v2 too)
# sets MASTER_ADDR/MASTER_PORT to rank 0's node IP and a free port and calls
# `init_process_group(init_method="env://")`. torch then creates rank 0's TCPStore server, and torch 2.13's
# TCPStore server (libuv and legacy) listens on [::] / 0.0.0.0 whatever host it is given: anyone on the
# network could set and get the group's keys. torch's supported way to choose the socket is
# `TCPStore(master_listen_fd=...)` with a socket we bound ourselves; the group is then made from that
# store (`init_process_group(store=...)`). Gloo's own sockets follow GLOO_SOCKET_IFNAME, set here to the
# interface holding that address unless the user chose one.

_STORE: dict = {}  # per worker process: rank 0's server store until it joins the group


def _interface_of(addr: str) -> str | None:
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == addr for a in addrs):
            return name
    return None


def _serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """Rank 0: a TCPStore server listening only on this node's Ray address; returns (address, port)."""
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((addr, 0))
        sock.listen(max(128, world_size))
        port = sock.getsockname()[1]
        _STORE["store"] = dist.TCPStore(addr, port, world_size, True, timeout=timedelta(seconds=timeout_s),
                                        wait_for_workers=False, master_listen_fd=sock.fileno())
        sock.detach()  # the store's server owns (and closes) the descriptor now
    finally:
        sock.close()  # only if the store was not made
    return addr, port


def _join_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = _STORE.pop("store") if world_rank == 0 else dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)  # what TorchConfig would set
    iface = _interface_of(addr)
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        if "nccl" in backend:
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    if "nccl" in backend:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray's TorchConfig does
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


_TRAIN_CLASSES: dict = {}


def _train_classes() -> dict:
    """Made on first use (importing ray.train.torch costs seconds); module attributes, so that Ray pickles
    them by reference (`pipeline.cluster.BoundStoreTorchConfig`)."""
    if _TRAIN_CLASSES:
        return _TRAIN_CLASSES
    import ray
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

    class BoundStoreBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            import torch.distributed as dist

            backend = backend_config.backend
            if backend is None:
                backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
            if not dist.is_available() or backend not in ("gloo", "nccl") or backend_config.init_method != "env":
                return super().on_start(worker_group, backend_config)
            n = len(worker_group)
            addr, port = worker_group.execute_single(0, _serve_store, world_size=n, timeout_s=backend_config.timeout_s)
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _join_group, backend=backend, world_rank=i, world_size=n,
                                                       addr=addr, port=port, timeout_s=backend_config.timeout_s)
                     for i in range(n)])

    class BoundStoreTorchConfig(TorchConfig):
        """`TorchConfig` whose rendezvous store listens only on rank 0's node address."""

        @property
        def backend_cls(self):
            return BoundStoreBackend

    for cls in (BoundStoreBackend, BoundStoreTorchConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls
        _TRAIN_CLASSES[cls.__name__] = cls
    return _TRAIN_CLASSES


def __getattr__(name: str):
    if name in ("BoundStoreBackend", "BoundStoreTorchConfig"):
        return _train_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train_backend_config(**kwargs):
    """The `torch_config=` for `TorchTrainer` (TorchConfig's own arguments: backend, timeout_s)."""
    return _train_classes()["BoundStoreTorchConfig"](**kwargs)
