"""Per-block Hessian spectra on the run's Hessian pool: each layer's own block H_bb, one Lanczos each.

A block's Hessian H_bb (the diagonal sub-block of H for the block's parameters) is the Hessian of the
loss in those parameters alone, so its products are the pool's products restricted to them
(`ShardedHessian.restrict`): each actor answers with the sum over its own micro-batches, as for the
full Hessian, and the driver sums the shards. So blocks need no actors of their own: the spectra stage
computes them on the pool it already holds (`pipeline/spectra_stage.py`), and a run opens one pool for
spectra, density and blocks. The price of a block product is one full forward/backward of the model
(generic autodiff cannot share the first-order graph across blocks): Σ_blocks iterations × one HVP.
"""
from __future__ import annotations

import time

import torch

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.pipeline.spectra import ShardedHessian


def layer_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """Trainable parameters grouped by owning module (``net.0.weight``, ``net.0.bias`` → ``net.0``)."""
    blocks: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            blocks.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return blocks


def block_rows(pool: ShardedHessian, state: dict | None, k: int = 3, which: str = "LA", tol: float = 1e-8,
               max_iter: int = 200, seed: int = 0, blocks: dict[str, list[str]] | None = None) -> list[dict]:
    """Top-``k`` (or bottom) eigenpairs of every block's Hessian at ``state``, in block order.
    ``blocks``: {block name: parameter names}; default the pool's model's `layer_blocks`."""
    pool.load(state)
    blocks = pool.layer_blocks() if blocks is None else blocks
    rows = []
    try:
        for block, names in blocks.items():
            t0 = time.perf_counter()
            dim = pool.restrict(names)
            res = lanczos(pool.matvec, dim, k=min(k, dim), which=which, tol=tol, max_iter=min(max_iter, dim),
                          seed=seed, dtype=torch.float64)
            seconds = time.perf_counter() - t0
            rows += [{"block": block, "dim": dim, "which": which, "rank": i, "eigenvalue": float(lam),
                      "residual": float(r), "converged": bool(c), "hvps": int(res.n_matvec), "seconds": seconds}
                     for i, (lam, r, c) in enumerate(zip(res.eigenvalues.tolist(), res.residuals, res.converged))]
    finally:
        pool.restrict(None)
    return rows


def block_spectra(source, blocks: dict[str, list[str]] | None = None, workers: int = 2, k: int = 3,
                  which: str = "LA", tol: float = 1e-8, max_iter: int = 200, seed: int = 0,
                  dtype: str = "float64", cpus_per_worker: float = 1.0, state: dict | None = None,
                  num_gpus: float = 0.0) -> list[dict]:
    """`block_rows` on a pool opened for this call only (a study keeps its pool: the spectra stage)."""
    pool = ShardedHessian(source, workers, dtype, cpus_per_worker, num_gpus=num_gpus)
    try:
        return block_rows(pool, state, k, which, tol, max_iter, seed, blocks)
    finally:
        pool.shutdown()


def block_settings(study) -> dict:
    from eqlab.pipeline.spectra_stage import pool_settings
    sp = study.spectra
    return {**pool_settings(study), "k": sp.block_top_k, "tol": sp.tol, "max_iter": sp.max_iter}
