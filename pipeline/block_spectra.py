"""Per-block Hessian spectra in parallel: each Ray actor owns whole parameter blocks and all the data.

A block's Hessian H_bb (the diagonal sub-block of H for the block's parameters) needs no other
block's vectors, so blocks are embarrassingly parallel: an actor runs its own Lanczos per block,
with the full Hessian batch, and returns rows; nothing moves during a Lanczos step. The price is one
full forward/backward per block HVP (generic autodiff cannot share the first-order graph across
blocks), so the total cost is Σ_blocks iterations × one HVP, spread over the workers.

Blocks are assigned largest first to the least-loaded worker (by parameter count, a proxy for
Lanczos work). A worker that dies has its blocks rerun on a fresh actor: it holds no state that
cannot be rebuilt from the source. An actor that asked Ray for ``num_gpus`` and was assigned a GPU
keeps its model and batches there (`pipeline.devices`), as the spectra pool's actors do.
"""
from __future__ import annotations

import time

import ray
import torch
from ray.exceptions import RayActorError

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.pipeline import interrupt
from eqlab.pipeline.allocator import keep_freed_memory
from eqlab.pipeline.devices import assigned_device, to_device
from eqlab.pipeline.spectra import DTYPES, check_gpus, placement


def layer_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """Trainable parameters grouped by owning module (``net.0.weight``, ``net.0.bias`` → ``net.0``)."""
    blocks: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            blocks.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return blocks


class BlockSpectrumWorker:
    def __init__(self, source, dtype: str, threads: int):
        torch.set_num_threads(threads)
        keep_freed_memory()  # allocator.py: no page faults per HVP
        self.dtype = DTYPES[dtype]
        self.device = assigned_device()  # its GPU when Ray assigned it one
        model, self.loss, batches = source(self.dtype)  # all micro-batches: the full data
        self.model, self.batches = model.to(self.device), [to_device(b, self.device) for b in batches]
        self.method = self.conv = "auto"

    def where(self) -> dict:
        """The device this worker computes on and the resources Ray assigned it (`spectra.placement`)."""
        return placement(self.model, self.device)

    def spectra(self, state, blocks: dict, k: int, which: str, tol: float, max_iter: int, seed: int) -> list:
        if state is not None:
            self.model.load_state_dict(state)
        rows = []
        for block, names in blocks.items():
            t0 = time.perf_counter()
            op = HessianOperator(self.model, self.loss, self.batches, names=names, method=self.method,
                                 dtype=self.dtype, conv=self.conv)
            self.method, self.conv = op.method, op.conv  # measured once per worker, then reused
            res = lanczos(op.matvec, op.dim, k=min(k, op.dim), which=which, tol=tol,
                          max_iter=min(max_iter, op.dim), seed=seed, dtype=torch.float64)
            seconds = time.perf_counter() - t0
            rows += [{"block": block, "dim": op.dim, "which": which, "rank": i, "eigenvalue": float(lam),
                      "residual": float(r), "converged": bool(c), "hvps": int(res.n_matvec), "seconds": seconds}
                     for i, (lam, r, c) in enumerate(zip(res.eigenvalues.tolist(), res.residuals, res.converged))]
        return rows


BlockActor = ray.remote(BlockSpectrumWorker)


def assign(sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Largest block first onto the least-loaded worker (longest-processing-time rule)."""
    load, out = [0] * workers, [[] for _ in range(workers)]
    for block in sorted(sizes, key=lambda b: -sizes[b]):
        w = load.index(min(load))
        out[w].append(block)
        load[w] += sizes[block]
    return out


class BlockSpectraPool:
    """Actors that each own whole blocks; kept across checkpoints so a run pays their start-up once."""

    def __init__(self, source, workers: int = 2, dtype: str = "float64", cpus_per_worker: float = 1.0,
                 blocks: dict[str, list[str]] | None = None, threads: int | None = None, num_gpus: float = 0.0):
        """``threads``: torch threads per actor (default: its whole CPUs, at least one).
        ``num_gpus``: GPUs each actor asks Ray for (a fraction shares one); its model then lives there."""
        check_gpus(num_gpus, workers, "block spectra pool")
        self.source, self.dtype, self.cpus, self.num_gpus = source, dtype, cpus_per_worker, num_gpus
        self.threads = max(1, int(cpus_per_worker)) if threads is None else threads
        model = source(DTYPES[dtype])[0]
        self.blocks = layer_blocks(model) if blocks is None else blocks
        sizes = {b: ParamSpace(model, names).dim for b, names in self.blocks.items()}
        self.plan = [p for p in assign(sizes, workers) if p]
        self.actors = [self._spawn() for _ in self.plan]

    def _spawn(self):
        return BlockActor.options(num_cpus=self.cpus, num_gpus=self.num_gpus).remote(self.source, self.dtype,
                                                                                     self.threads)

    def where(self) -> list[dict]:
        """Each actor's device and assigned resources (`BlockSpectrumWorker.where`)."""
        return ray.get([a.where.remote() for a in self.actors])

    def run(self, state: dict | None = None, k: int = 3, which: str = "LA", tol: float = 1e-8,
            max_iter: int = 200, seed: int = 0) -> list[dict]:
        """Top-``k`` (or bottom) eigenpairs of every block's Hessian at ``state``, in block order."""
        state_ref = None if state is None else ray.put({k_: v.cpu() for k_, v in state.items()})

        def submit(i):
            part = {b: self.blocks[b] for b in self.plan[i]}
            return self.actors[i].spectra.remote(state_ref, part, k, which, tol, max_iter, seed)

        jobs = [submit(i) for i in range(len(self.plan))]
        rows = []
        for i in range(len(self.plan)):
            for attempt in range(2):
                try:
                    rows += interrupt.get(jobs[i])  # a whole block's Lanczos: wait so Ctrl-C still stops it
                    break
                except RayActorError:  # the actor holds nothing that the source cannot rebuild
                    if attempt == 1:
                        raise
                    self.actors[i] = self._spawn()
                    jobs[i] = submit(i)
        order = {b: j for j, b in enumerate(self.blocks)}
        return sorted(rows, key=lambda r: (order[r["block"]], r["rank"]))

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)


def block_spectra(source, blocks: dict[str, list[str]] | None = None, workers: int = 2, k: int = 3,
                  which: str = "LA", tol: float = 1e-8, max_iter: int = 200, seed: int = 0,
                  dtype: str = "float64", cpus_per_worker: float = 1.0, state: dict | None = None,
                  num_gpus: float = 0.0) -> list[dict]:
    """Top-``k`` (or bottom) eigenpairs of every block's Hessian, blocks spread over ``workers`` actors.

    ``blocks``: {block name: parameter names}; default `layer_blocks` of the source's model.
    Returns rows in the order of ``blocks``. (One-off: `BlockSpectraPool` keeps the actors.)
    """
    pool = BlockSpectraPool(source, workers, dtype, cpus_per_worker, blocks, num_gpus=num_gpus)
    try:
        return pool.run(state, k, which, tol, max_iter, seed)
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------------ the stage
from eqlab.pipeline.stage import Output, PoolStage  # noqa: E402  (the pool above needs none of it)


def block_settings(study) -> dict:
    from eqlab.pipeline.spectra_stage import pool_settings
    sp = study.spectra
    return {**pool_settings(study), "k": sp.block_top_k, "tol": sp.tol, "max_iter": sp.max_iter}


class BlockSpectraStage(PoolStage):
    """Top eigenvalues of every layer's own Hessian block at each checkpoint (table `block_spectra`)."""
    name, label = "blocks", "block spectra"
    outputs = (Output("block_spectra", ("block_spectra",), block_settings,
                      enabled=lambda study: study.spectra.block_top_k > 0),)

    def open(self, ctx, spec):
        from eqlab.pipeline.spectra import FamilySource
        sp = ctx.study.spectra
        source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
        return BlockSpectraPool(source, sp.workers, sp.dtype, cpus_per_worker=ctx.actor_cpus(sp.workers),
                                threads=ctx.threads(sp.workers), num_gpus=sp.num_gpus)

    def compute(self, ctx, pool, spec, step, state, out):
        sp = ctx.study.spectra
        rows = pool.run(state, k=sp.block_top_k, tol=sp.tol, max_iter=sp.max_iter, seed=ctx.study.seed)
        rows = [{**r, "dtype": sp.dtype} for r in rows]
        top = max(rows, key=lambda r: r["eigenvalue"])
        ctx.log(f"[blocks] {spec.run_id}: step {step}: {len({r['block'] for r in rows})} blocks, sharpest "
                f"{top['block']} ({top['eigenvalue']:.4g}), {sum(r['hvps'] for r in rows if r['rank'] == 0)} "
                f"block HVPs ({sum(r['seconds'] for r in rows if r['rank'] == 0):.1f}s of actor time)")
        return {"block_spectra": rows}


STAGE = BlockSpectraStage()
