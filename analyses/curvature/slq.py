"""Stochastic Lanczos quadrature: the spectral density as Gauss quadrature nodes/weights per probe.

For a unit probe v, m Lanczos steps give T_m = S diag(θ) Sᵀ, and Σ_i w_i f(θ_i) with w_i = S[0, i]²
equals vᵀ f(H) v exactly for every polynomial f of degree ≤ 2m − 1. With v uniform on the sphere (or
Rademacher/√dim), E[vᵀ f(H) v] = tr f(H) / dim, so the pooled nodes and weights (1/probes each) are an
unbiased spectral measure. We keep the raw alphas/betas per probe: densities and CDFs can be
re-derived later for any smoothing without new HVPs.

Full reorthogonalisation is on by default: without it, converged outliers come back as "ghost"
copies and over-weight the edges of the spectrum. ``reorthogonalise=False`` exists to show that.
At an invariant-subspace breakdown the recurrence stops: the quadrature is then exact with fewer nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from eqlab.analyses.curvature.backend import LocalBackend, column_norms, dot64, inner
from eqlab.analyses.curvature.defaults import for_dtype, product_dtype
from eqlab.analyses.curvature.lanczos import tridiagonal_eigh


def gauss_quadrature(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (ascending) and weights (sum 1) of the Gauss rule of the tridiagonal (alphas, betas)."""
    theta, S = tridiagonal_eigh(alphas, betas)
    return theta, S[0] ** 2


def tridiagonal(matvec: Callable, v0: torch.Tensor, steps: int, reorthogonalise: bool = True,
                breakdown: float = 1e-12) -> tuple[list[float], list[float]]:
    """``steps`` plain Lanczos steps from ``v0`` (fewer at breakdown); returns (alphas, betas)."""
    dim = v0.shape[0]
    steps = min(steps, dim)
    # The same local basis the Lanczos eigensolver runs on (its W = HQ rows are kept but unused here).
    basis = LocalBackend(dim, matvec, dtype=v0.dtype, device=v0.device, capacity=steps)
    # inner products accumulated in float64 (backend.dot64): float32 sums over 10⁷ entries are biased
    q, q_prev, beta = v0 / float(column_norms(v0)[0]), None, 0.0
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(q).to(device=v0.device, dtype=v0.dtype)
        basis.append(q[:, None], w[:, None])
        alpha = float(inner(q, w)[0, 0])
        alphas.append(alpha)
        r = w - alpha * q - (beta * q_prev if q_prev is not None else 0.0)
        if reorthogonalise:
            r = basis.orthogonalise(r[:, None])[:, 0]
        beta = float(column_norms(r)[0])
        scale = max(abs(a) for a in alphas + betas) if alphas else 1.0
        if j == steps - 1 or beta <= breakdown * max(scale, 1e-300):
            break
        betas.append(beta)
        q_prev, q = q, r / beta
    return alphas, betas


@dataclass
class SLQResult:
    dim: int
    alphas: list[list[float]]  # per probe
    betas: list[list[float]]
    n_matvec: int
    path: str = "sequential"  # how the probes ran: "sequential" or "lockstep" (`probe_path`)
    path_reason: str = ""     # the rule's reason for that path, to record with the result

    def quadrature(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(nodes, weights) per probe."""
        return [gauss_quadrature(a, b) for a, b in zip(self.alphas, self.betas)]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All probes' nodes, weights scaled by 1/probes: a probability measure on the spectrum."""
        q = self.quadrature()
        nodes = np.concatenate([n for n, _ in q])
        weights = np.concatenate([w for _, w in q]) / len(q)
        order = np.argsort(nodes)
        return nodes[order], weights[order]

    def cdf(self, x) -> np.ndarray:
        """Estimated fraction of eigenvalues ≤ x."""
        nodes, weights = self.pooled()
        return np.cumsum(weights)[np.searchsorted(nodes, np.asarray(x), side="right") - 1] * \
            (np.asarray(x) >= nodes[0])

    def density(self, grid, sigma: float) -> np.ndarray:
        """Gaussian-smoothed density (integrates to 1) on ``grid``."""
        nodes, weights = self.pooled()
        g = np.asarray(grid, dtype=float)[:, None]
        return (weights * np.exp(-0.5 * ((g - nodes) / sigma) ** 2)).sum(1) / (sigma * np.sqrt(2 * np.pi))

    def trace(self, f: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> float:
        """Estimate of tr f(H) = dim · E[Σ w f(θ)]."""
        nodes, weights = self.pooled()
        return float(self.dim * np.sum(weights * f(nodes)))


def tridiagonals_lockstep(matmat: Callable, V0: torch.Tensor, steps: int, reorthogonalise: bool = True,
                          breakdown: float = 1e-12) -> tuple[list[list[float]], list[list[float]], int]:
    """`tridiagonal` for every column of ``V0`` (dim × P) at once: one ``matmat`` per step carries all
    probes still running, so a sharded operator makes one round trip per step instead of P (and each
    actor batches the columns over its cached graphs). Each probe keeps its own basis; a probe that
    breaks down leaves the active set. Returns (alphas, betas, matvecs used)."""
    dim, P = V0.shape
    steps = min(steps, dim)
    Q = torch.zeros(steps, dim, P, dtype=V0.dtype, device=V0.device)  # probe p's basis: Q[:m_p, :, p]
    q = V0 / torch.as_tensor(column_norms(V0), dtype=V0.dtype, device=V0.device)  # float64 sums (dot64)
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(P, dtype=V0.dtype, device=V0.device)
    alphas: list[list[float]] = [[] for _ in range(P)]
    betas: list[list[float]] = [[] for _ in range(P)]
    active = list(range(P))
    n = 0
    for j in range(steps):
        cols = torch.tensor(active, device=V0.device)
        qa = q[:, cols]
        w = matmat(qa).to(device=V0.device, dtype=V0.dtype)
        n += len(active)
        Q[j][:, cols] = qa
        alpha = torch.as_tensor([float(inner(qa[:, i], w[:, i])[0, 0]) for i in range(len(active))],
                             dtype=V0.dtype, device=V0.device)
        r = w - alpha * qa - beta[cols] * q_prev[:, cols]
        if reorthogonalise:  # two passes of classical Gram–Schmidt, each probe against its own basis
            basis = Q[: j + 1][:, :, cols]
            for _ in range(2):
                C = torch.stack([dot64(basis[:, :, i], r[:, i:i + 1])[:, 0] for i in range(len(active))], 1)
                r = r - torch.einsum("mdp,mp->dp", basis, C.to(r.dtype))
        b = torch.as_tensor(column_norms(r), dtype=V0.dtype, device=V0.device)
        still = []
        for i, p in enumerate(active):
            alphas[p].append(float(alpha[i]))
            scale = max(max(abs(a) for a in alphas[p]), max((abs(x) for x in betas[p]), default=0.0))
            if j == steps - 1 or float(b[i]) <= breakdown * max(scale, 1e-300):
                continue
            betas[p].append(float(b[i]))
            still.append(i)
        keep = torch.tensor(still, dtype=torch.long, device=V0.device)
        nxt = [active[i] for i in still]
        if not nxt:
            break
        sel = torch.tensor(nxt, device=V0.device)
        q_prev[:, sel], beta[sel] = qa[:, keep], b[keep]
        q[:, sel] = r[:, keep] / b[keep]
        active = nxt
    return alphas, betas, n


def rademacher_probes(dim: int, probes: int, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """dim × probes matrix of ±1 entries, the same for a given seed whichever way SLQ then runs."""
    gen = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(probes)]
    return torch.stack(cols, dim=1).to(device=device, dtype=dtype)


def probe_path(matvec: Callable | None, matmat: Callable | None, lockstep: bool | None = None) -> tuple[str, str]:
    """("sequential" | "lockstep", why): how `slq` runs its probes (and the trace estimators their
    columns, `trace`). A rule on what the operator is, not a timing, so the same call always takes the
    same path.

    Lockstep saves *round trips*, not arithmetic: one multi-column product per step instead of one per
    probe. That pays where every call crosses processes (a pool of Ray actors, `pipeline.spectra`, whose
    driver-side object holds them in ``actors``; or a caller that offers only ``matmat``). In one process
    the batched product and the per-probe bases indexed across probes were slower than probe after probe
    in 16 of 18 measured cases (issue 14), so an in-process ``matvec`` (a `HessianOperator`, a function)
    runs the probes one after another. ``lockstep`` True/False overrides the rule."""
    if lockstep is not None:
        if lockstep and matmat is None:
            raise ValueError("lockstep=True needs a matmat")
        if not lockstep and matvec is None:
            raise ValueError("lockstep=False needs a matvec")
        return ("lockstep" if lockstep else "sequential"), "given"
    if matvec is None:
        if matmat is None:
            raise ValueError("give a matvec or a matmat")
        return "lockstep", "only a multi-column product was given"
    owner = getattr(matvec, "__self__", None)
    if matmat is not None and getattr(owner, "actors", None) is not None:
        return "lockstep", f"products are round trips to the {type(owner).__name__}'s actors: one per step"
    return "sequential", "products run in this process, where probe after probe is not slower"


def slq(matvec: Callable | None, dim: int, steps: int | None = None, probes: int | None = None, seed: int = 0,
        dtype=torch.float64, device=None, reorthogonalise: bool = True, matmat: Callable | None = None,
        lockstep: bool | None = None) -> SLQResult:
    """``probes`` Rademacher probes, ``steps`` Lanczos steps each (defaults: `analyses.curvature.defaults`
    for the dtype of the products, 40 × 4).

    ``matmat`` (dim × P → dim × P) lets the probes run in lockstep (`tridiagonals_lockstep`, one product of
    all running probes per step); whether they do is `probe_path`'s rule (``lockstep`` overrides it),
    recorded in ``path``/``path_reason``. Both paths start from the same probes for a given seed and
    compute the same tridiagonals up to rounding, so the result does not depend on the path."""
    row = for_dtype(product_dtype(matvec if matvec is not None else matmat, dtype))
    steps = row.slq_steps if steps is None else steps
    probes = row.slq_probes if probes is None else probes
    for name, v in (("steps", steps), ("probes", probes)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"slq: {name} must be an integer >= 1, got {v!r}")
    path, why = probe_path(matvec, matmat, lockstep)
    V = rademacher_probes(dim, probes, seed, dtype, device)
    if path == "lockstep":
        alphas, betas, n = tridiagonals_lockstep(matmat, V, steps, reorthogonalise)
        return SLQResult(dim, alphas, betas, n, path, why)
    alphas, betas, n = [], [], 0

    def counted(v):
        nonlocal n
        n += 1
        return matvec(v)

    for p in range(probes):
        a, b = tridiagonal(counted, V[:, p], steps, reorthogonalise)
        alphas.append(a)
        betas.append(b)
    return SLQResult(dim, alphas, betas, n, path, why)
