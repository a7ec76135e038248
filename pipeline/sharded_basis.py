"""A Krylov basis cut into parameter slices across Ray actors: no process holds the m×dim basis.

Layout. Worker w owns the contiguous coordinates [lo_w, hi_w) of *every* vector: its slice of each
basis column of Q, of each W = H Q column, and of every live work block. It also holds a model
replica and a fixed data shard (micro-batches j ≡ w mod W, as in `pipeline/spectra.py`). The driver
holds only handles, the small projected matrices, and (at the very end) the k Ritz vectors.

One operator application H X (X: dim×b), the only step that needs whole vectors:
  1. all-gather: every worker fetches all W slices of X from the object store → full X (O(dim·b));
  2. each worker computes its shard's *unnormalised* float64 sum Σ n_b H_b X (full length) and
     returns it cut into W slices (W objects);
  3. reduce-scatter: worker w fetches the w-th slice from every worker, adds them in worker order
     and divides by the global example count.
Inner products (Gram matrices, Qᵀ X, residual norms) are sums of per-slice partial results added
on the driver in float64; linear combinations are local to each slice and move only coefficients.

Per worker: O(dim) for the model, its gradient graph, the gathered X and the partial H X (times b),
plus O(m·dim/W) for its slices of Q and W. Driver: O(m²) plus handles; O(k·dim) for the returned
Ritz vectors.

Failure and recovery. A worker that dies loses its model replica and data shard (rebuilt from the
source and the checkpoint state) and its slices of the basis and of the live blocks — state that
exists nowhere else. With ``checkpoint=True`` (default) every block a worker creates is also returned
to the driver as a task result, so it sits in the object store owned by the *driver* (not by the
worker) and survives the worker. A replacement actor is then rebuilt, restored from those objects,
and the failed operation is rerun on it alone (operations never modify their inputs, so that is
safe); the Lanczos result is unchanged. Cost: the object store holds a second copy of the basis
(O(m·dim/W) per worker's share, in shared memory or spilled to disk). With ``checkpoint=False`` only
blocks about to be applied are exported, and a death raises, saying what was lost.
"""
from __future__ import annotations

import itertools
import resource
import weakref

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from eqlab.analyses.curvature.backend import KrylovBackend, dot64
from eqlab.pipeline.spectra import DTYPES, HessianShardCore


class SliceWorker(HessianShardCore):
    """A `HessianShardCore` that also keeps one parameter slice of every Krylov vector."""

    def set_method(self, method: str) -> None:
        self.method = method  # skip the auto timing (e.g. for a benchmark that fixes the method)

    def configure(self, bounds: list[int], basis_dtype: str, shard: int) -> None:
        self.bounds, self.w = list(bounds), shard
        self.lo, self.hi = bounds[shard], bounds[shard + 1]
        self.dim = bounds[-1]
        self.bdtype = DTYPES[basis_dtype]
        self.blocks: dict[int, torch.Tensor] = {}
        self.m = 0
        self.Q = torch.empty(0, self.hi - self.lo, dtype=self.bdtype)  # rows: basis columns' slices
        self.W = torch.empty(0, self.hi - self.lo, dtype=self.bdtype)

    def _keep(self, bid: int, X: torch.Tensor, export: bool):
        self.blocks[bid] = X
        return 0, (X.numpy() if export else None)

    def _c(self, C) -> torch.Tensor:
        return torch.as_tensor(np.asarray(C, dtype=np.float64)).to(self.bdtype)

    def random(self, bid, b, seed, export):
        g = torch.Generator().manual_seed(int(seed))  # the full draw, so the slice equals the local one
        X = torch.randn(self.dim, b, generator=g, dtype=torch.float64)[self.lo:self.hi]
        return self._keep(bid, X.to(self.bdtype).contiguous(), export)

    def put(self, bid, X, export):
        return self._keep(bid, torch.as_tensor(np.array(X)).to(self.bdtype), export)

    def export(self, bid):
        return 0, self.blocks[bid].numpy()

    def hvp_parts(self, refs):
        """Step 2 above: this shard's unnormalised H X, cut into the W slices, plus the example count."""
        X = torch.cat([torch.as_tensor(p) for p in ray.get(list(refs))]).to(torch.float64)
        if self.op is None:
            total, n = torch.zeros_like(X), 0
        elif X.shape[1] == 1:  # the operator's single-vector path, as the local backend uses
            total, n = self.op.sum_matvec(X[:, 0])
            total = total[:, None]
        else:
            total, n = self.op.sum_matmat(X)
        total = total.double().cpu()
        return [total[a:b].numpy() for a, b in zip(self.bounds[:-1], self.bounds[1:])] + [n]

    def reduce(self, bid, refs, n_total, export):
        parts = ray.get(list(refs))
        total = torch.as_tensor(parts[0]).clone()
        for p in parts[1:]:
            total += torch.as_tensor(p)
        return self._keep(bid, (total / n_total).to(self.bdtype), export)

    def gram(self, x, y):
        # accumulated in float64 like LocalBackend's (backend.dot64: float32 sums over 10⁶⁺ entries are biased)
        return dot64(self.blocks[x].T, self.blocks[y]).numpy()

    def lincomb(self, bid, terms, export):
        return self._keep(bid, sum(self.blocks[x] @ self._c(C) for x, C in terms), export)

    def append(self, at, qid, wid) -> int:
        """Put the block's slices at basis position ``at`` (idempotent, so a retry cannot double it)."""
        Q, W = self.blocks[qid], self.blocks[wid]
        end = at + Q.shape[1]
        if end > self.Q.shape[0]:  # grow by doubling
            cap = max(2 * self.Q.shape[0], end)
            for name in ("Q", "W"):
                new = torch.empty(cap, self.hi - self.lo, dtype=self.bdtype)
                new[: self.m] = getattr(self, name)[: self.m]
                setattr(self, name, new)
        self.Q[at:end], self.W[at:end] = Q.T, W.T
        self.m = end
        return 0

    def project(self, x):
        return dot64(self.Q[: self.m], self.blocks[x]).numpy()

    def subtract_basis(self, bid, x, C, export):
        return self._keep(bid, self.blocks[x] - self.Q[: self.m].T @ self._c(C), export)

    def residual_sq(self, S, theta):
        S = self._c(S)
        R = self.W[: self.m].T @ S - (self.Q[: self.m].T @ S) * self._c(theta)
        return (R.double() ** 2).sum(0).numpy()

    def ritz(self, S):
        S = self._c(S)
        return (self.Q[: self.m].T @ S).numpy(), (self.W[: self.m].T @ S).numpy()

    def free(self, ids) -> int:
        for i in ids:
            self.blocks.pop(i, None)
        return 0

    def restore(self, basis: list, live: dict) -> int:
        """Rebuild a replacement's state from driver-owned copies: basis blocks, then live blocks."""
        for at, (qref, wref) in basis:
            Q, W = ray.get([qref, wref])
            self.blocks[-1], self.blocks[-2] = torch.as_tensor(Q), torch.as_tensor(W)
            self.append(at, -1, -2)
        self.free([-1, -2])
        for bid, ref in live.items():
            self.blocks[bid] = torch.as_tensor(ray.get(ref))
        return 0

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def memory_mb(self) -> dict:
        return memory_mb()


def memory_mb() -> dict:
    """Peak RSS and the current RSS split (Linux): private pages vs shared memory (the object store
    is mapped into every process that reads or writes it, and ru_maxrss counts those pages too)."""
    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssShmem", "RssFile")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


SliceActor = ray.remote(SliceWorker)


class Block:
    """Driver-side handle of a dim×b block: its id, width, and (with checkpoints) per-worker refs."""

    def __init__(self, owner: "ShardedBasis", bid: int, b: int, refs: list | None):
        self.owner, self.id, self.b, self.refs = owner, bid, b, refs

    def __del__(self):  # freed lazily with the next operation; never blocks in a finaliser
        try:
            self.owner._to_free.append(self.id)
        except Exception:  # interpreter shutdown
            pass


class ShardedBasis(KrylovBackend):
    """`KrylovBackend` whose vectors are actor-resident parameter slices (see module doc).

    ``source``/``workers``/``dtype``/``names`` as for `pipeline.spectra.ShardedHessian`;
    ``basis_dtype`` is the dtype of the Krylov vectors (float64 by default, whatever the model's).
    Call `load` once per checkpoint before running a method, `reset` between runs.
    """

    def __init__(self, source, workers: int, dtype: str = "float64", cpus_per_worker: float = 1.0,
                 names=None, basis_dtype: str = "float64", checkpoint: bool = True, method: str = "auto"):
        self.source, self.workers, self.model_dtype = source, workers, dtype
        self.cpus_per_worker, self.names = cpus_per_worker, names
        self.basis_dtype, self.dtype = basis_dtype, DTYPES[basis_dtype]
        self.checkpoint, self.method = checkpoint, method
        self.actors = [self._spawn(i) for i in range(workers)]
        self.state = None
        self.replaced = self.n_hvp = self.n_examples = 0
        self._ids = itertools.count(1)
        self._to_free: list[int] = []
        # id -> handle of blocks still in use (only with checkpoints); weak, so dropping a handle frees it
        self._live: weakref.WeakValueDictionary[int, Block] = weakref.WeakValueDictionary()
        self._basis: list[tuple] = []  # (position, [(Q ref, W ref) per worker]) per appended block
        self._m = 0

    # -- the pool -------------------------------------------------------------------------------------
    def _spawn(self, i: int):
        threads = max(1, int(self.cpus_per_worker))
        a = SliceActor.options(num_cpus=self.cpus_per_worker).remote(
            self.source, i, self.workers, self.model_dtype, threads, self.names)
        a.set_method.remote(self.method)  # actor calls run in order: this precedes load
        return a

    def _replace(self, i: int) -> None:
        if not self.checkpoint:
            raise RuntimeError(
                f"slice worker {i} died; with checkpoint=False its slices of the basis (coordinates "
                f"{self.bounds[i]}:{self.bounds[i + 1]} of all {self._m} vectors) and of the live blocks "
                "are lost; rerun, or use checkpoint=True")
        self.replaced += 1
        self.actors[i] = a = self._spawn(i)
        ray.get(a.load.remote(self.state))
        ray.get(a.configure.remote(self.bounds, self.basis_dtype, i))
        basis = [(at, refs[i]) for at, refs in self._basis]
        live = {bid: h.refs[i] for bid, h in list(self._live.items())}
        ray.get(a.restore.remote(basis, live))

    def _each(self, call, status=lambda r: r):
        """Run ``call(i, actor) -> ref(s)`` on every worker; replace dead workers and rerun their part."""
        if self._to_free:
            ids, self._to_free = self._to_free, []
            for ref in [a.free.remote(ids) for a in self.actors]:
                try:
                    ray.get(ref)
                except RayActorError:  # noticed (and replaced) by the call below; its blocks are gone
                    pass
        refs = [call(i, a) for i, a in enumerate(self.actors)]
        out = []
        for i in range(self.workers):
            for attempt in range(3):
                try:
                    out.append(ray.get(status(refs[i])))
                    break
                except RayActorError:
                    if attempt == 2:
                        raise
                    self._replace(i)
                    refs[i] = call(i, self.actors[i])
        return out, refs

    def _new_block(self, b: int, call) -> Block:
        bid = next(self._ids)
        _, refs = self._each(lambda i, a: call(i, a, bid), status=lambda r: r[0])
        h = Block(self, bid, b, [r[1] for r in refs] if self.checkpoint else None)
        if self.checkpoint:
            self._live[bid] = h
        return h

    def load(self, state: dict | None = None) -> int:
        """Give every worker one checkpoint's weights; sets the slices; clears the basis."""
        self.state = None if state is None else ray.put({k: v.cpu() for k, v in state.items()})
        dims, _ = self._each(lambda i, a: a.load.remote(self.state))
        self.dim = dims[0]
        self.bounds = [int(x) for x in np.linspace(0, self.dim, self.workers + 1).round()]
        self.reset()
        return self.dim

    def reset(self) -> None:
        """Drop the basis and all blocks on every worker (a fresh backend for the next run)."""
        self._each(lambda i, a: a.configure.remote(self.bounds, self.basis_dtype, i))
        self._basis, self._m, self._to_free = [], 0, []
        self._live.clear()

    def peak_rss_mb(self) -> list[float]:
        return self._each(lambda i, a: a.peak_rss_mb.remote())[0]

    def memory_mb(self) -> list[dict]:
        return self._each(lambda i, a: a.memory_mb.remote())[0]

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)

    # -- KrylovBackend --------------------------------------------------------------------------------
    def _opts(self, a, method: str):
        return getattr(a, method).options(num_returns=2)

    def random(self, b, seed):
        ex = self.checkpoint
        return self._new_block(b, lambda i, a, bid: self._opts(a, "random").remote(bid, b, seed, ex))

    def from_tensor(self, X):
        X = X.detach().to(torch.float64).cpu().reshape(self.dim, -1).numpy()
        parts = [ray.put(X[lo:hi]) for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]
        ex = self.checkpoint
        return self._new_block(X.shape[1], lambda i, a, bid: self._opts(a, "put").remote(bid, parts[i], ex))

    def apply(self, X: Block) -> Block:
        W = self.workers
        src = X.refs if self.checkpoint else \
            [r[1] for r in self._each(lambda i, a: self._opts(a, "export").remote(X.id), status=lambda r: r[0])[1]]
        parts_n, parts = self._each(lambda i, a: a.hvp_parts.options(num_returns=W + 1).remote(src),
                                    status=lambda r: r[-1])
        n_total = sum(parts_n)
        ex = self.checkpoint
        out = self._new_block(X.b, lambda i, a, bid: self._opts(a, "reduce").remote(
            bid, [parts[j][i] for j in range(W)], n_total, ex))
        self.n_hvp += X.b
        self.n_examples = n_total
        return out

    def gram(self, X, Y):
        return sum(self._each(lambda i, a: a.gram.remote(X.id, Y.id))[0])

    def lincomb(self, terms):
        t = [(x.id, np.asarray(C, dtype=np.float64)) for x, C in terms]
        ex = self.checkpoint
        return self._new_block(t[0][1].shape[1], lambda i, a, bid: self._opts(a, "lincomb").remote(bid, t, ex))

    @property
    def m(self) -> int:
        return self._m

    def append(self, Q, W):
        at = self._m
        self._each(lambda i, a: a.append.remote(at, Q.id, W.id))
        if self.checkpoint:
            self._basis.append((at, [(q, w) for q, w in zip(Q.refs, W.refs)]))
        self._m += Q.b

    def project(self, X):
        return sum(self._each(lambda i, a: a.project.remote(X.id))[0])

    def subtract_basis(self, X, C):
        C = np.asarray(C, dtype=np.float64)
        ex = self.checkpoint
        return self._new_block(X.b, lambda i, a, bid: self._opts(a, "subtract_basis").remote(bid, X.id, C, ex))

    def residual_norms(self, S, theta):
        return np.sqrt(sum(self._each(lambda i, a: a.residual_sq.remote(S, theta))[0]))

    def ritz_vectors(self, S):
        parts = self._each(lambda i, a: a.ritz.remote(S))[0]
        Y = torch.as_tensor(np.concatenate([p[0] for p in parts]))
        HY = torch.as_tensor(np.concatenate([p[1] for p in parts]))
        return Y, HY
