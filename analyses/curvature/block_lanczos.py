"""Block Lanczos with full reorthogonalisation: extreme eigenpairs *with their multiplicities*.

Why a block method. A single Krylov sequence K(H, q) meets each eigenspace in one direction only (the
projection of q), so an eigenvalue of multiplicity μ embedded in a generic spectrum is found once.
A block start of width b ≥ μ with random columns has μ independent components in that eigenspace, so
the block Krylov space K(H, Q₁) holds min(μ, b) copies and Rayleigh–Ritz returns all of them.
A cluster of b equal Ritz values therefore only proves multiplicity ≥ b: ``multiplicity_limited``
says when that happened, and the cure is a larger ``block_size``.

Choices (why):

* The projected matrix is the *exact* Rayleigh quotient T = Qᵀ H Q, assembled from Qᵀ W (W = H Q
  kept, see `backend.py`), not the recurrence coefficients. So T stays correct through deflation and
  random replacement of columns, where the textbook block-tridiagonal form would need bookkeeping.
* Full reorthogonalisation, block classical Gram–Schmidt against the whole basis (a second pass where a
  column cancelled in the first, `backend.REORTH_ETA`): in
  block Lanczos loss of orthogonality shows up as spurious multiplicities, exactly what we measure.
* Rank-revealing orthonormalisation of the residual block (eigen-decomposition of its Gram matrix,
  done twice): a direction with norm ≤ break_tol·‖T‖ means the block Krylov space is (nearly)
  invariant there; it is replaced by a random direction orthogonal to everything so far (with a zero
  coupling, which T = QᵀWQ records automatically), so the block width and the search continue.
* True residuals ‖H y − θ y‖ from W at no HVP cost; the cheap estimate ‖B S_last‖ only decides when
  the exact check is worth doing. ``max_iter`` counts matvecs (columns), like `lanczos`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from eqlab.analyses.curvature.backend import KrylovBackend, LocalBackend, column_norms
from eqlab.analyses.curvature.lanczos import LanczosResult, _select, next_seed


@dataclass
class BlockLanczosResult(LanczosResult):
    """`LanczosResult` (``alphas``/``betas`` empty) plus the projected matrix and the block facts."""

    block_size: int = 1
    projection: np.ndarray | None = None       # T = QᵀHQ, m×m
    multiplicities: list[int] = field(default_factory=list)  # per returned value: Ritz values within tol
    multiplicity_limited: bool = False          # some returned cluster has ≥ block_size members


def _orthonormalise(be: KrylovBackend, R, floor: float, gen: torch.Generator):
    """(P, B) with R ≈ P B, P orthonormal and orthogonal to the basis; columns of R with norm ≤ floor
    in the complement are replaced by random directions (their rows of B are zero)."""
    b = len(be.gram(R, R))
    P, B = R, np.eye(b)
    kept = b
    for _ in range(2):  # the second pass repairs what the first lost to conditioning
        G = be.gram(P, P)
        lam, U = np.linalg.eigh((G + G.T) / 2)
        lam, U = lam[::-1], U[:, ::-1]
        keep = lam > floor ** 2 if _ == 0 else lam > 0.25  # after pass one, kept columns have norm ≈ 1
        kept = min(kept, int(keep.sum()))
        U, s = U[:, :kept], np.sqrt(lam[:kept])
        P = be.lincomb([(P, U / s)])
        B = (s[:, None] * U.T) @ B
        if kept:
            P = be.orthogonalise(P)
    if kept == b:
        return P, B
    # replace the lost directions: random, orthogonal to the basis and to the kept ones, orthonormal
    Z = be.orthogonalise(be.random(b - kept, next_seed(gen)))
    for _ in range(2):
        if kept:
            Z = be.lincomb([(Z, np.eye(b - kept)), (P, -be.gram(P, Z))])
        Z = be.orthogonalise(Z)
        G = be.gram(Z, Z)
        lam, U = np.linalg.eigh((G + G.T) / 2)
        Z = be.lincomb([(Z, U / np.sqrt(np.maximum(lam, 1e-300)))])
    P = be.lincomb([(P, np.eye(kept, b)), (Z, np.eye(b - kept, b, k=kept))]) if kept else Z
    return P, np.vstack([B, np.zeros((b - kept, b))])


def block_lanczos(matmat=None, dim: int | None = None, k: int = 5, block_size: int = 4, which: str = "LA",
                  tol: float = 1e-8, max_iter: int | None = None, seed: int = 0, dtype=torch.float64,
                  device=None, V0: Tensor | None = None, backend: KrylovBackend | None = None,
                  matvec=None) -> BlockLanczosResult:
    """The ``k`` extreme eigenpairs (with multiplicities up to ``block_size``) of a symmetric operator.

    ``matmat``: dim×b → dim×b (e.g. `HessianOperator.matmat`, which batches the b HVPs); or give
    ``matvec`` (looped) or a ``backend``. Stops when every wanted pair has true residual
    ≤ ``tol · max|θ|``, when the space fills ``dim``, or after ``max_iter`` matvecs (default
    ``min(dim, 300 + block_size)``, rounded down to whole blocks).
    """
    if backend is None:
        if dim is None:
            raise ValueError("need dim (or a backend)")
        backend = LocalBackend(dim, matvec=matvec, matmat=matmat, dtype=dtype, device=device)
    be, dim = backend, backend.dim
    if which not in ("LA", "SA", "both"):
        raise ValueError(f"which must be 'LA', 'SA' or 'both', got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    if not 1 <= block_size <= dim:
        raise ValueError(f"need 1 <= block_size <= dim, got {block_size}")
    if be.m:
        raise ValueError("the backend already holds a basis; give block_lanczos a fresh one")
    b = block_size
    n_wanted = 2 * k if which == "both" else k
    max_iter = min(dim, 300 + b) if max_iter is None else min(max_iter, dim)
    max_iter = max(max_iter, min(b, dim))
    tiny = torch.finfo(dtype).tiny
    break_tol = min(tol, 1e-6) * 1e-2
    gen = torch.Generator().manual_seed(seed)

    X = be.random(b, next_seed(gen)) if V0 is None else be.from_tensor(V0.reshape(dim, -1))
    P, _ = _orthonormalise(be, X, 0.0, gen)
    T = np.zeros((0, 0))
    scale, restarts, blocks = tiny, 0, 0
    while True:
        m0 = be.m
        W = be.apply(P)
        be.append(P, W)
        m, blocks = be.m, blocks + 1
        C = be.project(W)                       # Qᵀ(HP): the new block column of T = QᵀHQ
        T = np.pad(T, ((0, m - m0), (0, m - m0)))
        T[:m0, m0:], T[m0:, :m0] = C[:m0], C[:m0].T
        T[m0:, m0:] = (C[m0:] + C[m0:].T) / 2
        evals, S = np.linalg.eigh(T)
        scale = max(float(np.abs(evals).max()), tiny)
        chosen = _select(evals, min(k, m), which)
        room = min(dim, max_iter) - m           # columns the basis may still grow by
        if room <= 0:                           # full space (T exact) or budget spent
            break
        R = be.subtract_basis(W, C)             # first Gram–Schmidt pass uses the T column itself
        R = be.subtract_basis(R, be.project(R))
        P, B = _orthonormalise(be, R, break_tol * scale, gen)
        restarts += int(np.sum(np.abs(B).sum(1) == 0))
        estimate = np.linalg.norm(B @ S[m0:, chosen], axis=0)
        if m >= n_wanted and estimate.max() <= tol * scale:
            if bool((be.residual_norms(S[:, chosen], evals[chosen]) <= tol * scale).all()):
                break
        if room < len(B):  # the last block is narrower: keep its strongest directions
            P = be.lincomb([(P, np.eye(len(B), room))])

    Y, HY = be.ritz_vectors(S[:, chosen])
    theta = torch.as_tensor(evals[chosen].copy(), dtype=Y.dtype, device=Y.device)
    res = column_norms(HY - Y * theta)  # float64 accumulation (backend.dot64)
    gap = 1e3 * tol * scale
    mult = [int(np.sum(np.abs(evals - evals[i]) <= gap)) for i in chosen]
    return BlockLanczosResult(
        eigenvalues=torch.as_tensor(evals[chosen].copy(), dtype=torch.float64), eigenvectors=Y,
        residuals=[float(x) for x in res], n_matvec=be.m, alphas=[], betas=[],
        converged=[bool(x <= tol * scale) for x in res], iterations=blocks,
        restarts=restarts, which=which, scale=scale, block_size=block_size, projection=T,
        multiplicities=mult, multiplicity_limited=any(c >= block_size for c in mult) and block_size < dim)
