"""Network isolation of the embedded cluster: while 2 Ray Train workers train (a torch process group with
its rendezvous store) and a sharded Hessian actor pool runs Lanczos, every TCP socket that this process
tree listens on is on loopback, and no connection of the tree goes anywhere else. Plus the token rule
for ``--address`` (no Ray needed)."""
import os
import threading

import psutil
import pytest
import torch

from eqlab.pipeline.cluster import ClusterError, _address_host, _is_loopback, check_token_destination


class Sockets(threading.Thread):
    """Samples the inet sockets of this process and all its descendants every ``period`` seconds."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.halt = period, threading.Event()
        self.samples, self.listeners, self.peers, self.titles = 0, set(), set(), set()

    def run(self):
        me = psutil.Process()
        while not self.halt.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    title = (p.cmdline() or [p.name()])[0][:48]
                    conns = p.net_connections("inet")
                except psutil.Error:
                    continue  # gone meanwhile
                self.titles.add(title)
                for c in conns:
                    if c.status == psutil.CONN_LISTEN:
                        self.listeners.add((c.laddr.ip, c.laddr.port, title))
                    elif c.raddr:
                        self.peers.add((c.raddr.ip, c.raddr.port, c.status, title))
            self.samples += 1
            self.halt.wait(self.period)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(10)


def test_training_and_actor_pool_listen_on_loopback_only(ray_cluster, tmp_path):
    from eqlab.pipeline.spectra import FamilySource, ShardedHessian, spectrum_rows
    from eqlab.pipeline.study import parse_study
    from eqlab.pipeline.train import train_run

    spec = parse_study({"runs": [{
        "name": "net2", "family": "modadd_gpt2", "model": {"p": 5, "n_embd": 8, "n_head": 2},
        "optimizer": "sgd", "lr": 0.5, "batch_size": 8, "steps": 4, "checkpoint_steps": [2, 4],
        "train_workers": 2}]}).runs[0]
    with Sockets() as s:
        ck = train_run(spec, tmp_path, cpus_per_worker=1.0, log=lambda *_: None).checkpoints
        trained = s.samples
        pool = ShardedHessian(FamilySource("digits_cnn", {"channels": [2, 3], "hidden": 6}, 0, 64, 32), workers=2,
                              cpus_per_worker=0.5)
        try:
            rows = spectrum_rows(pool, None, top_k=1, tol=1e-4, max_iter=60)
        finally:
            pool.shutdown()
    assert sorted(ck) == [0, 2, 4] and rows
    # the sampler really ran while the train workers (which hold the process group) were alive
    assert trained >= 5 and any("RayTrainWorker" in t for t in s.titles), (trained, sorted(s.titles))
    off = sorted(x for x in s.listeners if not _is_loopback(x[0]))
    assert not off, f"listening beyond loopback: {off}"
    assert s.listeners, "no listener seen at all (the sampler saw nothing)"
    far = sorted(x for x in s.peers if not _is_loopback(x[0]))
    assert not far, f"connections beyond loopback: {far}"


def test_torch_store_server_listens_on_all_interfaces_unless_given_a_socket():
    """Why the fix exists: torch 2.13's TCPStore server ignores its host and listens on [::]/0.0.0.0;
    with ``master_listen_fd`` (what pipeline.cluster uses) it listens where that socket was bound."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    me = psutil.Process()

    def listening(port):
        return {c.laddr.ip for c in me.net_connections("inet") if c.status == psutil.CONN_LISTEN
                and c.laddr.port == port}

    plain = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    assert not all(_is_loopback(ip) for ip in listening(plain.port))  # the problem (torch default)
    del plain
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    bound = dist.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False,
                          master_listen_fd=sock.fileno())
    sock.detach()
    bound.set("k", "v")
    assert listening(port) == {"127.0.0.1"} and bound.get("k") == b"v"


@pytest.mark.parametrize("address, host", [
    ("127.0.0.1:6390", "127.0.0.1"), ("[::1]:6390", "::1"), ("ray://10.1.2.3:10001", "10.1.2.3"),
    ("head.example:6379", "head.example"), ("auto", None)])
def test_address_host(address, host):
    assert _address_host(address) == host


def test_loopback_spellings():
    assert all(map(_is_loopback, ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(_is_loopback, ["0.0.0.0", "::", "192.0.2.2", "10.0.0.1", "head.example"]))


def test_local_token_file_is_not_sent_to_another_address(monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN"):
        check_token_destination("10.1.2.3:6379")
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN"):
        check_token_destination("ray://head.example:10001")
    check_token_destination("127.0.0.1:6390")  # this machine's own cluster: ~/.ray/auth_token is fine
    check_token_destination("auto")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", os.devnull)  # a token the user named: sent where they said
    check_token_destination("10.1.2.3:6379")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token is sent at all
    check_token_destination("10.1.2.3:6379")


def test_train_config_is_importable_by_reference():
    """Ray pickles the backend config to the controller: the classes must resolve as module attributes."""
    import pickle

    from eqlab.pipeline import cluster

    cfg = cluster.train_backend_config()
    assert type(pickle.loads(pickle.dumps(cfg))) is type(cfg) is cluster.BoundStoreTorchConfig
    assert cfg.backend_cls is cluster.BoundStoreBackend
    assert torch.distributed.is_available()
