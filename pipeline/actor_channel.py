"""A same-node request/reply channel beside Ray, for an actor's small and frequent array calls.

Why: a Lanczos step on a sharded Hessian is one round trip per actor, and on a small model the
round trip is a large part of the step. A Ray actor call costs 1.1–2.1 ms on a 2-core VM (COST.md,
"where the 2-actor loss goes"); a Unix-socket round trip with the same array costs ≈ 0.15 ms, because
it is one blocking read on each side instead of gRPC, a scheduler queue and an executor thread.
Ray's own low-latency path (Compiled Graphs) busy-waits in the driver and in idle actors: with two
actors on two cores that steals the cores the products need (measured 2.6 ms per call, worse).

Ray stays in charge of everything else: it places the actors, carries weights and large vectors,
and detects and replaces dead actors. The channel only exists when the driver and the actor share a
machine (a Unix socket in a private temporary directory); any failure on it (the actor died, the
actor raised, the socket closed) is reported as `ChannelLost`, and the caller redoes the product
over Ray, which raises the actor's real error or replaces the dead actor.

Wire format, little-endian: request = op (u8), rows (i64), cols (i64; 0 for a vector), then
rows·max(cols, 1) float64 values; reply = status (u8, 0 ok), examples (i64), payload bytes (i64),
then the payload (float64 values of the request's shape, or a UTF-8 error message).
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading

import numpy as np

HEADER = struct.Struct("<Bqq")
OPS = {1: "sum_matvec", 2: "sum_matmat"}
CODES = {name: code for code, name in OPS.items()}
ACCEPT_TIMEOUT_S = 60.0  # a driver that never connects (another machine) leaves no thread behind
AVAILABLE = hasattr(socket, "AF_UNIX")


class ChannelLost(ConnectionError):
    """The channel to one actor failed; redo the call over Ray."""


def _recv_into(sock: socket.socket, buf) -> None:
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelLost("the actor closed the channel")
        got += k


def _recv_header(sock: socket.socket) -> tuple[int, int, int]:
    buf = bytearray(HEADER.size)
    _recv_into(sock, buf)
    return HEADER.unpack(buf)


def serve(target) -> str:
    """Actor side: listen for one driver connection and answer ``OPS`` on ``target`` (whose methods
    must be safe to call from this thread as well as from Ray's).

    Returns the socket's path. The listening socket and its directory are removed as soon as the
    driver connects (or after ACCEPT_TIMEOUT_S), so a killed actor leaves nothing on disk; each call
    makes a new channel, and a channel's thread ends when its driver closes it."""
    directory = tempfile.mkdtemp(prefix="eqlab-ch-")  # mode 0700: only this user can connect
    path = os.path.join(directory, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(ACCEPT_TIMEOUT_S)

    def run():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        finally:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
        conn.settimeout(None)
        with conn:
            try:
                while True:
                    op, rows, cols = _recv_header(conn)
                    x = np.empty((rows, cols) if cols else (rows,))
                    _recv_into(conn, x)
                    try:
                        out, n = getattr(target, OPS[op])(x)
                        out = np.ascontiguousarray(out, dtype=np.float64)
                        conn.sendall(HEADER.pack(0, n, out.nbytes))
                        conn.sendall(out)
                    except Exception as exc:  # the driver redoes the call over Ray, which reports it
                        message = f"{type(exc).__name__}: {exc}".encode()
                        conn.sendall(HEADER.pack(1, 0, len(message)) + message)
            except (ChannelLost, OSError):
                return  # the driver closed the channel (or fell back to Ray)

    threading.Thread(target=run, name="eqlab-actor-channel", daemon=True).start()
    return path


class ChannelClient:
    """Driver side: one connected socket per actor; `call` sends to all, then reads every reply."""

    def __init__(self, paths: list[str]):
        self.socks = []
        try:
            for path in paths:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.socks.append(s)
                s.connect(path)
        except OSError as exc:
            self.close()
            raise ChannelLost(f"cannot connect to {path}: {exc}") from None

    def call(self, method: str, x: np.ndarray) -> list[tuple[np.ndarray, int]]:
        x = np.ascontiguousarray(x, dtype=np.float64)
        header = HEADER.pack(CODES[method], x.shape[0], x.shape[1] if x.ndim == 2 else 0)
        try:
            for s in self.socks:  # every actor starts before the driver waits for any
                s.sendall(header)
                s.sendall(x)
            out = []
            for i, s in enumerate(self.socks):
                status, n, nbytes = _recv_header(s)
                if status:
                    message = bytearray(nbytes)
                    _recv_into(s, message)
                    raise ChannelLost(f"actor {i} raised {message.decode(errors='replace')}")
                if nbytes != x.nbytes:
                    raise ChannelLost(f"actor {i} answered {nbytes} bytes for a {x.nbytes}-byte request")
                hv = np.empty_like(x)
                _recv_into(s, hv)
                out.append((hv, n))
            return out
        except OSError as exc:
            raise ChannelLost(str(exc)) from None

    def close(self) -> None:
        """Close every socket: after a failure a reply may still be in flight on the others."""
        for s in self.socks:
            s.close()
        self.socks = []
