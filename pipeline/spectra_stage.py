"""The spectra stage: top-k Lanczos (tables `spectra`, `lanczos`), the SLQ density (`densities`) and
every layer block's top eigenvalues (`block_spectra`) of each checkpoint's Hessian, on one data-parallel
actor pool per run (`pipeline/spectra.py`; blocks: `pipeline/block_spectra.py`).

One pool for the three: every actor is a fresh process that imports torch and builds the model (seconds
of CPU each on a small machine), and a second pool could not start beside the first anyway (it holds
the run's analysis CPUs). Three outputs with their own settings, so editing density_steps recomputes
only `densities`."""
from __future__ import annotations

from eqlab.pipeline.block_spectra import block_rows, block_settings
from eqlab.pipeline.spectra import FamilySource, ShardedHessian, density_rows, spectrum_rows
from eqlab.pipeline.stage import Output, PoolStage, task_sizes
from eqlab.pipeline.study import Study


def pool_settings(study: Study) -> dict:
    """What every Hessian pool's rows depend on (data, shards, dtype, seed, and the device: GPU products
    round otherwise, so rows computed on a GPU are not taken for CPU ones, nor the other way; CPU pools
    keep the keys they had before the setting existed)."""
    sp = study.spectra
    return {"seed": study.seed, "workers": sp.workers, "examples": sp.examples, "microbatch": sp.microbatch,
            "dtype": sp.dtype, **({"device": "cuda"} if sp.num_gpus > 0 else {})}


def top_settings(study: Study) -> dict:
    sp = study.spectra
    return {**pool_settings(study), "top_k": sp.top_k, "tol": sp.tol, "max_iter": sp.max_iter}


def density_settings(study: Study) -> dict:
    sp = study.spectra
    return {**pool_settings(study), "probes": sp.density_probes, "steps": sp.density_steps}


TOP = Output("spectra", ("spectra", "lanczos"), top_settings)
DENSITY = Output("densities", ("densities",), density_settings, enabled=lambda study: study.spectra.density_probes > 0)
BLOCKS = Output("block_spectra", ("block_spectra",), block_settings, enabled=lambda study: study.spectra.block_top_k > 0)


class SpectraStage(PoolStage):
    name, label = "spectra", "spectra"
    outputs = (TOP, DENSITY, BLOCKS)

    def open(self, ctx, spec):
        sp = ctx.study.spectra
        source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
        n_micro = -(-min(sp.examples, task_sizes(spec)[1]) // sp.microbatch)
        workers = min(sp.workers, n_micro)  # an actor without a micro-batch would only cost memory
        return ShardedHessian(source, workers, sp.dtype, cpus_per_worker=ctx.actor_cpus(workers),
                              threads=ctx.threads(workers), num_gpus=sp.num_gpus)

    def compute(self, ctx, pool, spec, step, state, out):
        sp, seed = ctx.study.spectra, ctx.study.seed
        if out is TOP:
            rows, tri = spectrum_rows(pool, state, sp.top_k, sp.tol, sp.max_iter, seed=seed)
            lam = ", ".join(f"{r['eigenvalue']:.4g}" for r in rows)
            ctx.log(f"[spectra] {spec.run_id}: step {step}: top-{sp.top_k} [{lam}] in {rows[0]['hvps']} HVPs "
                    f"on {pool.workers} actor(s) ({rows[0]['seconds']:.1f}s)")
            return {"lanczos": [tri], "spectra": rows}
        if out is BLOCKS:
            rows = [{**r, "dtype": sp.dtype} for r in block_rows(pool, state, k=sp.block_top_k, tol=sp.tol,
                                                                  max_iter=sp.max_iter, seed=seed)]
            top = max(rows, key=lambda r: r["eigenvalue"])
            ctx.log(f"[blocks] {spec.run_id}: step {step}: {len({r['block'] for r in rows})} blocks, sharpest "
                    f"{top['block']} ({top['eigenvalue']:.4g}), {sum(r['hvps'] for r in rows if r['rank'] == 0)} "
                    f"block HVPs ({sum(r['seconds'] for r in rows if r['rank'] == 0):.1f}s)")
            return {"block_spectra": rows}
        rows = density_rows(pool, state, sp.density_probes, sp.density_steps, seed=seed)
        ctx.log(f"[density] {spec.run_id}: step {step}: SLQ {len(rows)} probes x {len(rows[0]['alphas'])} "
                f"steps ({sum(r['hvps'] for r in rows)} HVPs, {rows[0]['seconds']:.1f}s)")
        return {"densities": rows}


STAGE = SpectraStage()
