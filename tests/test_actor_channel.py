"""The same-node channel beside Ray: exact round trips, errors and a dead server reported as
`ChannelLost` (the caller then goes over Ray), and nothing left on disk once connected."""
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from eqlab.pipeline import actor_channel
from eqlab.pipeline.actor_channel import ChannelClient, ChannelLost, serve

pytestmark = pytest.mark.skipif(not actor_channel.AVAILABLE, reason="no Unix sockets on this platform")


class Shard:
    """Answers like `HessianShardCore`: an unnormalised sum and an example count."""

    def __init__(self, scale: float, n: int):
        self.scale, self.n = scale, n

    def sum_matvec(self, v):
        if len(v) == 3:
            raise ValueError("vector of length 3 does not match this model")
        return self.scale * v, self.n

    def sum_matmat(self, V):
        return self.scale * V + np.arange(V.shape[1]), self.n


def test_round_trip_is_exact_for_vectors_and_blocks_and_leaves_no_socket_file():
    from eqlab.pipeline.spectra import ShardedHessian  # (not at module level: the spawned server below stays light)

    paths = [serve(Shard(2.0, 7)), serve(Shard(-0.5, 3))]
    client = ChannelClient(paths)
    try:
        time.sleep(0.2)  # the server threads accept, then remove their listening sockets
        assert not any(os.path.exists(os.path.dirname(p)) for p in paths)
        v = np.random.default_rng(0).standard_normal(1001)
        (a, na), (b, nb) = client.call("sum_matvec", v)
        assert (na, nb) == (7, 3)
        assert np.array_equal(a, 2.0 * v) and np.array_equal(b, -0.5 * v)
        V = np.asfortranarray(np.random.default_rng(1).standard_normal((513, 4)))  # non-C-contiguous input
        (A, _), (B, _) = client.call("sum_matmat", V)
        assert A.shape == V.shape and np.array_equal(A, 2.0 * V + np.arange(4))
        assert np.array_equal(B, -0.5 * V + np.arange(4))
        # Larger than the sockets' buffers: partial reads and writes, and no deadlock while every server's
        # reply waits for the driver, which reads only after it has sent to all of them.
        big = np.random.default_rng(2).standard_normal((ShardedHessian.CHANNEL_BYTES // 8 // 4, 4))
        (A, _), (B, _) = client.call("sum_matmat", big)
        assert np.array_equal(A, 2.0 * big + np.arange(4)) and np.array_equal(B, -0.5 * big + np.arange(4))
    finally:
        client.close()


def test_an_exception_in_the_target_is_reported_with_its_message():
    client = ChannelClient([serve(Shard(1.0, 1))])
    try:
        with pytest.raises(ChannelLost, match="ValueError: vector of length 3"):
            client.call("sum_matvec", np.ones(3))
    finally:
        client.close()


def _serve_in_child(conn):
    conn.send(serve(Shard(1.0, 1)))
    signal.pause()


def test_a_dead_server_process_is_reported_not_waited_for():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_in_child, args=(child,), daemon=True)
    proc.start()
    try:
        client = ChannelClient([parent.recv()])
        (hv, n), = client.call("sum_matvec", np.ones(5))
        assert n == 1 and np.array_equal(hv, np.ones(5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with pytest.raises(ChannelLost):
            client.call("sum_matvec", np.ones(5))
        client.close()
    finally:
        if proc.is_alive():
            proc.kill()


def test_connecting_to_a_missing_socket_is_channel_lost():
    with pytest.raises(ChannelLost, match="cannot connect"):
        ChannelClient(["/nonexistent/eqlab-ch/s"])
