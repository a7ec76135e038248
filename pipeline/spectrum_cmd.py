"""`eqlab spectrum`: Hessian spectra of a user's model (FILE.py:FUNC or a transformers folder).

One process by default; ``--workers N`` shards the batch over N Ray actors on the local (or given)
cluster, with the same float64 driver-side Lanczos.
"""
from __future__ import annotations

import json
import time

import torch

from eqlab.analyses.curvature.defaults import for_dtype
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.curvature.slq import slq
from eqlab.analyses.curvature.trace import hutchpp
from eqlab.pipeline.spectra import DTYPES
from eqlab.pipeline.userfunc import UserSource


def compute_spectrum(ref: str, top: int = 5, bottom: int = 0, block: str | None = None, workers: int = 1,
                     dtype: str = "float64", tol: float | None = None, max_iter: int | None = None, seed: int = 0,
                     address: str | None = None, density: bool = False, density_steps: int | None = None,
                     probes: int | None = None, trace: bool = False, trace_matvecs: int | None = None,
                     sharded_basis: bool = False, overrides=(), method: str = "auto") -> dict:
    """Defaults (None) come from `analyses.curvature.defaults` for ``dtype``; bad budgets raise ValueError
    before any model is built."""
    row = for_dtype(dtype)
    tol = row.tol if tol is None else tol
    max_iter = row.max_iter if max_iter is None else max_iter
    density_steps = row.slq_steps if density_steps is None else density_steps
    probes = row.slq_probes if probes is None else probes
    trace_matvecs = row.trace_matvecs if trace_matvecs is None else trace_matvecs
    wanted = max(top, bottom)
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < max(wanted, 1):
        raise ValueError(f"max_iter {max_iter!r}: must be an integer >= 1 and >= the {wanted} eigenvalues "
                         "asked for (m Lanczos steps give only m Ritz values)")
    if not tol > 0 or tol < row.min_tol:
        raise ValueError(f"tol {tol!r}: must be >= {row.min_tol:.1e} in {dtype} (4 eps; default {row.tol:.1e})")
    reason = "per actor"
    if method != "auto" and (workers > 1 or sharded_basis):
        raise ValueError("--method applies in-process; with --workers > 1 each actor measures its own")
    source = UserSource(ref, shards=workers, overrides=tuple(overrides))
    model, loss, batches = source(DTYPES[dtype])
    names = ParamSpace.matching(model, block).names if block else None
    t0 = time.perf_counter()
    pool, backend = None, None
    if sharded_basis:
        # The Krylov basis lives on the actors, cut by parameter slice: no process holds all of it.
        from eqlab.pipeline.cluster import connect
        from eqlab.pipeline.sharded_basis import ShardedBasis

        if workers < 2:
            raise ValueError("--sharded-basis needs --workers >= 2")
        connect(num_cpus=workers, address=address)
        backend = pool = ShardedBasis(source, workers, dtype, cpus_per_worker=1.0, names=names)
        dim, matvec, matmat, method = pool.load(None), None, None, "sharded-basis"
    elif workers > 1:
        from eqlab.pipeline.cluster import connect
        from eqlab.pipeline.spectra import ShardedHessian

        connect(num_cpus=workers, address=address)
        pool = ShardedHessian(source, workers, dtype, cpus_per_worker=1.0, names=names)
        dim = pool.load(None)
        matvec, matmat, method = pool.matvec, pool.matmat, "sharded"
    else:
        op = HessianOperator(model, loss, batches, names=names, dtype=DTYPES[dtype], method=method)
        dim, matvec, matmat = op.dim, op.matvec, op.matmat
        method = op.method + ("+forward_conv" if op.conv == "forward" else "")
        reason = f"{op.method_reason}; conv {op.conv_reason}"
    out = {"ref": ref, "dim": dim, "dtype": dtype, "workers": workers, "block": block, "method": method,
           "method_reason": reason if workers == 1 and not sharded_basis else "per actor",
           "tol": tol, "max_iter": max_iter,
           "eigenvalues": [], "residuals": [], "converged": [], "errors": [], "hvps": 0, "all_converged": True}
    try:
        for which, k in (("LA", top), ("SA", bottom)):
            if k <= 0:
                continue
            if backend is not None:
                backend.reset()
            res = lanczos(matvec, dim, k=min(k, dim), which=which, tol=tol, max_iter=min(max_iter, dim),
                          seed=seed, dtype=torch.float64, backend=backend, precision=DTYPES[dtype], warn=False)
            pre = "" if which == "LA" else "bottom_"
            out[pre + "eigenvalues" if pre else "eigenvalues"] = [float(x) for x in res.eigenvalues]
            out[pre + "residuals"] = [float(x) for x in res.residuals]
            out[pre + "converged"] = [bool(c) for c in res.converged]
            out[pre + "errors"] = [float(x) for x in res.errors]
            out["all_converged"] &= all(res.converged)
            out["hvps"] += int(res.n_matvec)
        if (density or trace) and backend is not None:
            raise ValueError("--density/--trace run on full vectors; drop --sharded-basis for them")
        if density:  # raw tridiagonals are kept so the density can be re-smoothed without new HVPs
            # slq.probe_path: probe after probe in process, lockstep (one multi-column product per step) on actors
            d = slq(matvec, dim, steps=min(density_steps, dim), probes=probes, seed=seed, matmat=matmat)
            nodes, weights = d.pooled()
            out["density"] = {"steps": density_steps, "probes": probes, "hvps": d.n_matvec,
                              "nodes": nodes.tolist(), "weights": weights.tolist(),
                              "alphas": d.alphas, "betas": d.betas, "path": d.path, "path_reason": d.path_reason}
            out["hvps"] += d.n_matvec
        if trace:
            t = hutchpp(matvec, dim, n_matvec=trace_matvecs, seed=seed, matmat=matmat)
            out["trace"] = {"method": "hutch++", "estimate": t.estimate, "std_error": t.std_error,
                            "hvps": t.n_matvec, "path": t.path}
            out["hvps"] += t.n_matvec
    finally:
        if pool is not None:
            pool.shutdown()
    out["seconds"] = time.perf_counter() - t0
    return out


def format_spectrum(out: dict) -> str:
    lines = [f"{out['ref']}: {out['dim']} parameters{' in block ' + out['block'] if out['block'] else ''}, "
             f"{out['dtype']}, {out['workers']} worker(s), HVP method {out['method']}"]
    for key, res, label in (("eigenvalues", "residuals", "top"), ("bottom_eigenvalues", "bottom_residuals", "bottom")):
        if out.get(key):
            lines.append(f"{label} eigenvalues:")
            conv = out.get("converged" if label == "top" else "bottom_converged", [True] * len(out[key]))
            lines += [f"  {i:>3}  {lam: .10g}   residual {r:.2e}{'' if c else '   NOT CONVERGED'}"
                      for i, (lam, r, c) in enumerate(zip(out[key], out[res], conv))]
    if "density" in out:
        d = out["density"]
        nodes, weights = d["nodes"], d["weights"]
        mean = sum(n * w for n, w in zip(nodes, weights))
        neg = sum(w for n, w in zip(nodes, weights) if n < 0)
        lines.append(f"spectral density (SLQ, {d['probes']} probes x {d['steps']} steps): support "
                     f"[{min(nodes):.4g}, {max(nodes):.4g}], mean {mean:.4g}, negative mass {neg:.3f}")
    if "trace" in out:
        t = out["trace"]
        se = f" +- {t['std_error']:.3g}" if t["std_error"] is not None else ""
        lines.append(f"trace (Hutch++, {t['hvps']} HVPs): {t['estimate']:.6g}{se}")
    if not out.get("all_converged", True):
        lines.append(f"WARNING: not converged within --max-iter {out.get('max_iter')} at --tol {out.get('tol'):.1e}: "
                     "the values marked NOT CONVERGED are not eigenvalues to that tolerance (raise --max-iter)")
    lines.append(f"{out['hvps']} HVPs in {out['seconds']:.2f}s")
    return "\n".join(lines)


def to_json(out: dict) -> str:
    return json.dumps(out)
