"""Sharded Hessian spectra: a pool of Ray actors, each holding the model and a fixed data shard.

The Hessian batch (the first ``examples`` training examples) is cut once into fixed micro-batches;
micro-batch j always lives on actor j mod W. Each actor returns the *unnormalised* sum of its
micro-batches' HVPs and its example count; the driver adds them in float64 and divides by the total.
So the operator is the same for any number of workers (also with BatchNorm, which normalises per
micro-batch), and equals the single-process `HessianOperator` over the same list of micro-batches.

An actor that dies is replaced (same shard, same weights) and its product recomputed, so Lanczos
continues with an unchanged operator. Products travel over a same-node socket beside Ray when the
driver shares the machine with every actor (`pipeline.actor_channel`: ≈ 0.15 ms instead of ≈ 2 ms
per call), and as Ray actor calls otherwise or after a failure.

Devices: an actor asks Ray for ``num_gpus`` (``[spectra] num_gpus``; fractions share one GPU), and one
that Ray assigned a GPU holds its model and micro-batches there (`pipeline.devices.assigned_device`), in
the pool's dtype, float64 included; vectors travel as float64 NumPy arrays on the host either way, and
the driver sums them on the CPU. So a GPU pool is the same operator up to rounding: its products are not
the CPU's bits (other kernels, other summation orders) and need not repeat bit for bit from run to run.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.curvature.slq import slq
from eqlab.models import build_task
from eqlab.pipeline import actor_channel, interrupt
from eqlab.pipeline.allocator import ONE_ARENA_ENV, keep_freed_memory
from eqlab.pipeline.devices import assigned_device, to_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def microbatches(batch, size: int) -> list[tuple]:
    X, y = batch
    if isinstance(X, dict):
        return [({k: v[i:i + size] for k, v in X.items()}, y[i:i + size]) for i in range(0, len(y), size)]
    return [(X[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


@dataclass(frozen=True)
class FamilySource:
    """Builds a registered family's model, loss and fixed Hessian micro-batches (picklable for actors)."""

    family: str
    options: dict
    seed: int
    examples: int
    microbatch: int

    def __call__(self, dtype):
        task = build_task(self.family, self.options, seed=self.seed, dtype=dtype)
        X, y = task.train
        task.model.train()  # the Hessian of the training objective (BatchNorm with batch statistics)
        return task.model, task.loss, microbatches((X[: self.examples], y[: self.examples]), self.microbatch)


def placement(model: torch.nn.Module, device: torch.device) -> dict:
    """Where an actor's model lives and what Ray assigned the actor (called inside the actor)."""
    p = next(model.parameters())
    out = {"device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
           "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
           "resources": ray.get_runtime_context().get_assigned_resources(),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        out.update(name=torch.cuda.get_device_name(device), peak_mib=torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def check_gpus(num_gpus: float, actors: int, what: str) -> None:
    """Refuse a GPU request the connected cluster can never place (Ray would leave the actors pending)."""
    if num_gpus <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have < num_gpus:
        raise RuntimeError(f"{what}: {actors} actor(s) asking for {num_gpus:g} GPU each, but the Ray cluster has "
                           f"{have:g} GPUs")


def hessian_batches(family: str, options: dict, seed: int, examples: int, microbatch: int, dtype) -> list[tuple]:
    """The fixed micro-batches that define a run's Hessian (identical on driver and actors)."""
    return FamilySource(family, options, seed, examples, microbatch)(dtype)[2]


class HessianShardCore:
    """One model replica and a fixed set of micro-batches; answers unnormalised HVP sums.

    A plain class so that other actors (the sharded Krylov basis) can extend it; the actor is
    `HessianShard` below."""

    def __init__(self, source, shard: int, n_shards: int, dtype: str, threads: int, names=None):
        torch.set_num_threads(threads)
        keep_freed_memory()  # steady product times: a pool waits for its slowest actor (allocator.py)
        self.dtype = DTYPES[dtype]
        self.device = assigned_device()  # its GPU when Ray assigned it one
        model, self.loss, every = source(self.dtype)
        self.model = model.to(self.device)  # each checkpoint's weights are copied into it (load)
        self.batches = [to_device(b, self.device) for b in every[shard::n_shards]]  # moved once, not per load
        self.names = names
        self.method = self.conv = "auto"
        self.method_reason = self.conv_reason = ""
        self.op = None
        self.lock = threading.Lock()  # products may arrive on the channel thread as well as from Ray

    def open_channel(self) -> tuple[str, str | None]:
        """(this actor's node id, path of a new same-node channel; None where sockets are missing)."""
        node = ray.get_runtime_context().get_node_id()
        return node, actor_channel.serve(self) if actor_channel.AVAILABLE else None

    def load(self, state: dict | None) -> int:
        with self.lock:
            return self._load(state)

    def _load(self, state: dict | None) -> int:
        if state is not None:
            self.model.load_state_dict(state)
        if not self.batches:  # more workers than micro-batches: this shard contributes nothing
            self.op = None
            return ParamSpace(self.model, self.names).dim
        self.op = HessianOperator(self.model, self.loss, self.batches, names=self.names, method=self.method,
                                  dtype=self.dtype, conv=self.conv)
        if self.method == "auto":  # chosen once by the operator's rule, then reused for later checkpoints
            self.method_reason, self.conv_reason = self.op.method_reason, self.op.conv_reason
        self.method, self.conv = self.op.method, self.op.conv
        return self.op.dim

    def restrict(self, names) -> int:
        """Products of the Hessian block of ``names`` (None: every parameter) from now on, at the weights
        loaded (block spectra: `pipeline/block_spectra.py`); the product method chosen stays."""
        with self.lock:
            self.names = names
            return self._load(None)

    def layer_blocks(self) -> dict[str, list[str]]:
        from eqlab.pipeline.block_spectra import layer_blocks
        return layer_blocks(self.model)

    def where(self) -> dict:
        """The device this replica computes on, the resources Ray assigned it, and on a GPU its name and
        peak allocated memory (what a test and bench/gpu_check.py read back)."""
        return placement(self.model, self.device)

    def hvp_method(self) -> dict:
        """How this replica computes its products and why (recorded in the `spectra` rows)."""
        return {"method": self.method, "conv": self.conv,
                "reason": f"{self.method_reason}; conv: {self.conv_reason}"}

    def sum_matvec(self, v: np.ndarray):
        with self.lock:
            if self.op is None:
                return np.zeros(len(v)), 0
            hv, n = self.op.sum_matvec(torch.as_tensor(np.array(v), dtype=self.dtype))
            return hv.double().cpu().numpy(), n

    def sum_matmat(self, V: np.ndarray):
        """Σ n_b H_b V over this shard's micro-batches for V of shape (dim, k): k products, one call."""
        with self.lock:
            if self.op is None:
                return np.zeros(V.shape), 0
            hv, n = self.op.sum_matmat(torch.as_tensor(np.array(V), dtype=self.dtype))
            return hv.double().cpu().numpy(), n


HessianShard = ray.remote(HessianShardCore)


class ShardedHessian:
    """Driver side of the pool: a float64 matvec summed over all shards, with actor replacement."""

    def __init__(self, source, workers: int, dtype: str = "float64", cpus_per_worker: float = 1.0,
                 names=None, channel: bool = True, threads: int | None = None, num_gpus: float = 0.0):
        """``channel``: send products of at most CHANNEL_BYTES over a same-node socket beside Ray
        (`pipeline.actor_channel`) when the driver shares a machine with every actor; Ray otherwise.
        ``threads``: torch threads per actor (default: its whole CPUs, at least one).
        ``num_gpus``: GPUs each actor asks Ray for (a fraction shares one); its model then lives there."""
        check_gpus(num_gpus, workers, "Hessian pool")
        self.source, self.workers, self.dtype = source, workers, dtype
        self.cpus_per_worker, self.names, self.num_gpus = cpus_per_worker, names, num_gpus
        self.names_now = names  # the parameters products are over now (`restrict`); a replacement gets them
        self.threads = max(1, int(cpus_per_worker)) if threads is None else threads
        self.actors = [self._spawn(i) for i in range(workers)]
        self.state = None
        self.methods: list[dict] = []  # each actor's hvp_method() after the last load
        self.n_hvp = self.replaced = self.n_examples = 0
        self.use_channel, self.channel = channel and actor_channel.AVAILABLE, None

    def _spawn(self, i: int):
        return HessianShard.options(num_cpus=self.cpus_per_worker, num_gpus=self.num_gpus,
                                    runtime_env={"env_vars": ONE_ARENA_ENV}).remote(
            self.source, i, self.workers, self.dtype, self.threads, self.names_now)

    def where(self) -> list[dict]:
        """Each actor's device and assigned resources (`HessianShardCore.where`)."""
        return self._call("where")

    def _call(self, method: str, *args):
        """Call ``method`` on every actor; replace any actor that died and retry its part."""
        interrupt.check()  # each product is short: a study's Ctrl-C stops a pool within one of them
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        try:  # one wait for all: a driver that sleeps once per actor pays a thread wake-up each time
            return ray.get(refs)
        except RayActorError:
            pass
        out = []
        for i, ref in enumerate(refs):
            for attempt in range(3):
                try:
                    out.append(ray.get(ref))
                    break
                except RayActorError:
                    if attempt == 2:
                        raise
                    self.replaced += 1
                    self.actors[i] = self._spawn(i)
                    ray.get(self.actors[i].load.remote(self.state))
                    ref = getattr(self.actors[i], method).remote(*args)
        return out

    def load(self, state: dict | None = None) -> int:
        """Give every actor the weights of one checkpoint (None: keep the weights the source built)."""
        self.state = None if state is None else ray.put({k: v.cpu() for k, v in state.items()})
        dims = self._call("load", self.state)
        self.methods = self._call("hvp_method")
        self.n_hvp = 0
        if self.use_channel and self.channel is None:
            self._open_channel()
        return dims[0]

    def restrict(self, names=None) -> int:
        """Products of the Hessian block of ``names`` from now on (None: the pool's own parameters again),
        at the weights loaded; returns the block's dimension."""
        self.names_now = self.names if names is None else names
        return self._call("restrict", self.names_now)[0]

    def layer_blocks(self) -> dict[str, list[str]]:
        """The model's parameters grouped by owning module (`block_spectra.layer_blocks`), from an actor."""
        return self._call("layer_blocks")[0]

    def _open_channel(self) -> None:
        """Connect to every actor over a same-node socket; stay on Ray if any actor is elsewhere."""
        try:
            here = ray.get_runtime_context().get_node_id()
            ends = ray.get([a.open_channel.remote() for a in self.actors])
        except RayActorError:
            return  # the next product goes over Ray, replaces the actor, and tries again
        except Exception:  # noqa: BLE001  (e.g. a driver without a node of its own): Ray calls only
            self.use_channel = False
            return
        if all(node == here and path for node, path in ends):
            try:
                self.channel = actor_channel.ChannelClient([path for _, path in ends])
                return
            except actor_channel.ChannelLost:
                pass  # e.g. a Ray client driver: same node id, other file system
        self.use_channel = False

    INLINE_BYTES = 100 * 1024  # Ray's own limit for arguments carried inside the task message
    # Above this a product is long enough that Ray's ~1–2 ms per call no longer matters, and Ray's object
    # store shares one copy of the vector among all actors instead of one socket copy per actor.
    CHANNEL_BYTES = 4 * 2**20

    @classmethod
    def _argument(cls, x: np.ndarray):
        """Small vectors travel inside the call (no object-store round trip: ≈2 ms less per product
        with 2 actors on 2 cores); large ones are put once and shared by every actor."""
        return x if x.nbytes <= cls.INLINE_BYTES else ray.put(x)

    def _products(self, method: str, x: np.ndarray) -> np.ndarray:
        """Σ over actors of ``method``(x), divided by the total example count (float64)."""
        parts = None
        interrupt.check()
        if self.channel is not None and x.nbytes <= self.CHANNEL_BYTES:
            try:
                parts = self.channel.call(method, x)
            except actor_channel.ChannelLost:
                # Every connection goes: a reply may still be in flight on the others. Ray redoes the
                # product (replacing a dead actor or raising the actor's own error), then a new channel.
                self.channel.close()
                self.channel = None
        if parts is None:
            parts = self._call(method, self._argument(x))
            if self.use_channel and self.channel is None:
                self._open_channel()
        total = np.zeros_like(parts[0][0])
        for hv, _ in parts:
            total += hv
        self.n_examples = sum(n for _, n in parts)
        return total / self.n_examples

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        hv = self._products("sum_matvec", v.detach().double().cpu().numpy())
        self.n_hvp += 1
        return torch.from_numpy(hv)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (dim, k): the k columns travel in one round trip per actor (SLQ probes,
        Hutch++ sketches, block Lanczos), and each actor batches them over its graphs (`sum_matmat`)."""
        if V.dim() != 2:
            raise ValueError(f"expected a (dim, k) matrix, got shape {tuple(V.shape)}")
        hv = self._products("sum_matmat", V.detach().double().cpu().numpy())
        self.n_hvp += V.shape[1]
        return torch.from_numpy(hv)

    @contextmanager
    def ray_calls_only(self):
        """Within the block every product is a plain Ray actor call (the channel stays open, unused):
        for comparing the two transports on the same actors."""
        channel, use, self.channel, self.use_channel = self.channel, self.use_channel, None, False
        try:
            yield self
        finally:
            self.channel, self.use_channel = channel, use

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def shutdown(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for a in self.actors:
            ray.kill(a)


def hvp_method_columns(pool: ShardedHessian) -> dict:
    """The products' method (``double_backward_cached+conv=native``) and the rule that chose it, as
    stored in `spectra`; actors that chose differently (one shard over a cache limit) are all listed."""
    seen = {(m["method"], m["conv"], m["reason"]) for m in getattr(pool, "methods", None) or []} or {("", "", "")}
    return {"hvp_method": " | ".join(sorted(f"{m}+conv={c}" for m, c, _ in seen)),
            "hvp_method_reason": " | ".join(sorted(r for _, _, r in seen))}


def spectrum_rows(pool: ShardedHessian, state: dict | None, top_k: int, tol: float, max_iter: int,
                  seed: int = 0, which: str = "LA", rtol: float | None = None):
    """Lanczos on the pool at one checkpoint; returns (spectra rows, lanczos row).

    ``rtol``: `lanczos`' per-eigenvalue stopping rule instead of ``tol`` (see `lanczos`)."""
    dim = pool.load(state)
    t0 = time.perf_counter()
    res = lanczos(pool.matvec, dim, k=top_k, which=which, tol=tol, max_iter=max_iter, seed=seed,
                  dtype=torch.float64, rtol=rtol)
    seconds = time.perf_counter() - t0
    rows = [{"which": which, "rank": i, "eigenvalue": float(lam), "residual": float(r), "converged": bool(c),
             "hvps": int(res.n_matvec), "iterations": int(res.iterations), "workers": pool.workers,
             "n_examples": pool.n_examples, "dtype": pool.dtype, "seconds": seconds, **hvp_method_columns(pool),
             "computed_at": datetime.now(timezone.utc)}
            for i, (lam, r, c) in enumerate(zip(res.eigenvalues.tolist(), list(res.residuals),
                                                 list(res.converged)))]
    tri = {"which": which, "alphas": [float(a) for a in res.alphas], "betas": [float(b) for b in res.betas],
           "hvps": int(res.n_matvec)}
    return rows, tri


def density_rows(pool: ShardedHessian, state: dict | None, probes: int, steps: int, seed: int = 0) -> list[dict]:
    """SLQ at one checkpoint on the pool, probes in lockstep (one k-column round trip per step);
    one row per probe with its raw tridiagonal (see `analyses.curvature.slq`)."""
    dim = pool.load(state)
    t0 = time.perf_counter()
    res = slq(None, dim, steps=min(steps, dim), probes=probes, seed=seed, dtype=torch.float64, matmat=pool.matmat)
    seconds = time.perf_counter() - t0
    return [{"probe": p, "dim": dim, "alphas": [float(a) for a in al], "betas": [float(b) for b in be],
             "hvps": len(al), "workers": pool.workers, "n_examples": pool.n_examples, "dtype": pool.dtype,
             "seconds": seconds} for p, (al, be) in enumerate(zip(res.alphas, res.betas))]
