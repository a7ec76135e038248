"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Why these choices:

* Full reorthogonalisation (two passes of classical Gram–Schmidt, "twice is enough"): without it,
  converged Ritz values reappear as spurious copies (hessian-eigenthings returns repeated λ1 that way,
  see shared/peers.md). It costs O(m·dim) per step, nothing next to an HVP on the models we study.
* True residuals at no HVP cost: we keep W = H Q, the matvec outputs we compute anyway, so for a Ritz
  vector y = Q s, H y = W s exactly and ‖H y − θ y‖ is measured, not estimated. The cheap estimate
  β_m |s_m| is only used to decide when the exact check is worth doing.
* Invariant-subspace breakdown (β ≈ 0): the Krylov space so far is invariant, its Ritz pairs are exact,
  and the recurrence restarts from a random vector orthogonal to the basis (T gets a zero coupling, so
  it stays the exact projection). Low-rank and degenerate operators need this.
* Multiplicities. One Krylov sequence contains each distinct eigenvalue at most once. After a breakdown
  the finished block is exact, and a block that still improved the wanted set may hide further copies,
  so another block is run; a block that ends without improving the wanted set certifies (in exact
  arithmetic, with a random start) that the complement holds nothing better. While such a check is
  pending, the current block's own extreme Ritz pair must also converge before stopping.
  Limitation: an exactly repeated eigenvalue of an operator whose Krylov space never breaks down
  (a generic spectrum with some exact degeneracies) is found once; use dense eigh or a block method.
* Stopping rules. ``tol`` (default rule): residual ≤ tol·max|θ| for every wanted pair, which judges
  small wanted eigenvalues against λ₁ (tol = 1e-2 may leave a 10% error on λ₅). ``rtol`` (opt-in):
  a bound on each *eigenvalue's* error, b_i = min(r_i, r_i²/gap_i), must satisfy
  b_i ≤ max(rtol·|θ_i|, atol·max|θ|). r_i bounds |λ − θ_i| for some eigenvalue λ (symmetric H); r_i²/gap_i
  is the sharper bound once the other eigenvalues are at least gap_i away. The gap is taken from the
  other Ritz values, shrunk by their own (cheap, β|s_mj|) residuals so that unconverged neighbours
  do not inflate it. With ``rtol`` the Krylov dimension must also reach ``min_iter`` (default
  ARPACK-like max(2·wanted + 1, 20), capped at dim) before convergence is accepted, so a wanted
  eigenvalue that the first few steps have not seen yet is not missed.
* The basis lives in a `KrylovBackend` (`backend.py`): one process by default, or parameter slices
  on several workers (`pipeline/sharded_basis.py`); the recurrence only sees scalars and handles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.linalg.lapack import dstev
from torch import Tensor

from analyses.curvature.backend import KrylovBackend, LocalBackend


@dataclass
class LanczosResult:
    """Eigenvalues: largest first ("LA"), smallest first ("SA"), or top-k then bottom-k ("both").

    ``residuals`` are the true ‖H y − θ y‖ of the returned unit vectors; ``converged[i]`` means
    residual ≤ tol · max|θ| (rule "residual"), or, with ``rtol`` (rule "eigenvalue"),
    ``errors[i]`` ≤ max(rtol·|θ_i|, atol·max|θ|), where ``errors[i]`` = min(r_i, r_i²/gap_i) bounds
    the eigenvalue's error (module doc). ``alphas``/``betas`` are the tridiagonal T (len(betas) = len(alphas) − 1;
    a 0.0 coupling marks a restart after breakdown), kept so spectral densities can be re-derived.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: list[float]
    n_matvec: int
    alphas: list[float]
    betas: list[float]
    converged: list[bool]
    iterations: int
    restarts: int = 0
    which: str = "LA"
    scale: float = field(default=0.0)  # max |θ| of the final T: what tol is relative to
    errors: list[float] = field(default_factory=list)  # eigenvalue error bounds min(r, r²/gap)
    rule: str = "residual"


def _dstev(alphas, betas, vectors: bool):
    # LAPACK's dstev directly: scipy's `eigh_tridiagonal` wrapper validates and dispatches on every call,
    # which is half its cost at the sizes Lanczos sees (m ≲ 300). Falls back to it if dstev fails.
    d, e = np.array(alphas, dtype=np.float64), np.array(betas, dtype=np.float64)
    if len(d) > 1:
        w, z, info = dstev(d, e, compute_v=int(vectors))
        if info == 0:
            return (w, z) if vectors else w
    return eigh_tridiagonal(d, e, eigvals_only=not vectors, check_finite=False)


def tridiagonal_eigh(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues and eigenvectors of the symmetric tridiagonal (alphas, betas)."""
    return _dstev(alphas, betas, True)


def tridiagonal_eigvalsh(alphas, betas) -> np.ndarray:
    """Ascending eigenvalues only of the symmetric tridiagonal (alphas, betas)."""
    return _dstev(alphas, betas, False)


def _select(evals: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending ``evals`` of the wanted Ritz values, in output order."""
    n = len(evals)
    top, bottom = np.arange(n - 1, max(n - k, 0) - 1, -1), np.arange(min(k, n))
    return top if which == "LA" else bottom if which == "SA" else np.concatenate([top, bottom])


def _improves(block: np.ndarray, chosen: np.ndarray, which: str, gap: float) -> bool:
    """Does a finished block hold a value strictly better than the worst wanted one (per side)?"""
    out = False
    if which in ("LA", "both"):
        out |= block.max() > chosen["LA"].min() + gap
    if which in ("SA", "both"):
        out |= block.min() < chosen["SA"].max() - gap
    return bool(out)


def error_bounds(evals: np.ndarray, idx: np.ndarray, r: np.ndarray, r_all: np.ndarray) -> np.ndarray:
    """min(r_i, r_i²/gap_i) for Ritz values ``evals[idx]`` with residuals ``r`` (module doc).

    ``r_all``: residual estimates of every Ritz value; gap_i = min_j≠i |θ_i − θ_j| − r_j."""
    out = np.array(r, dtype=float)
    idx = np.asarray(idx, dtype=int)
    if len(evals) < 2 or not len(idx):
        return out
    d = np.abs(evals[None, :] - evals[idx][:, None]) - np.asarray(r_all, dtype=float)[None, :]
    d[np.arange(len(idx)), idx] = np.inf  # gap_i is to the *other* Ritz values
    gap = d.min(axis=1)
    ok = gap > 0
    out[ok] = np.minimum(out[ok], out[ok] ** 2 / gap[ok])
    return out


def lanczos(matvec: Callable[[Tensor], Tensor] | None, dim: int, k: int = 5, which: str = "LA", tol: float = 1e-8,
            max_iter: int | None = None, seed: int = 0, dtype=torch.float64, device=None,
            v0: Tensor | None = None, backend: KrylovBackend | None = None, *, rtol: float | None = None,
            atol: float = 0.0, min_iter: int | None = None) -> LanczosResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``matvec`` (1-D ``dtype`` tensors).

    Stops when every wanted pair has true residual ≤ ``tol · max(|θ_max|, tiny)``, when the Krylov
    space fills ``dim``, or after ``max_iter`` matvecs (default ``min(dim, 300)``).
    ``rtol``: use the per-eigenvalue rule instead (module doc): every wanted θ_i has error bound
    ≤ max(rtol·|θ_i|, atol·max|θ|, 16·eps·max|θ|) and at least ``min_iter`` steps were taken (default
    max(2·wanted + 1, 20), capped at dim). ``min_iter`` also applies to the ``tol`` rule if given.
    ``backend``: where the basis lives (default: a `LocalBackend` on ``matvec``); with a backend,
    ``matvec`` may be None and the backend applies the operator.
    """
    if which not in ("LA", "SA", "both"):
        raise ValueError(f"which must be 'LA', 'SA' or 'both', got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    n_wanted = 2 * k if which == "both" else k
    max_iter = min(dim, 300) if max_iter is None else min(max_iter, dim)
    tiny = torch.finfo(dtype).tiny
    if min_iter is None:
        min_iter = max(2 * n_wanted + 1, 20) if rtol is not None else n_wanted
    min_iter = min(min_iter, dim, max_iter)
    floor = max(atol, 16 * torch.finfo(dtype).eps)

    def passes(idx, r, evals, r_all, scale):
        """Per pair: does it meet the active stopping rule? Also returns the eigenvalue error bounds."""
        # below ~eps·‖H‖ rounding in θ itself dominates, whatever the residual says
        b = np.maximum(error_bounds(evals, idx, r, r_all), 16 * torch.finfo(dtype).eps * scale)
        if rtol is None:
            return r <= tol * scale, b
        return b <= np.maximum(rtol * np.abs(evals[idx]), floor * scale), b
    def cheap_pass(check, r_all, evals, scale) -> bool:
        """Do the cheap residual estimates already meet the rule (then the true residuals are worth it)?"""
        if rtol is None:  # the residual rule needs no eigenvalue bounds
            return bool((r_all[check] <= tol * scale).all())
        return bool(passes(check, r_all[check], evals, r_all, scale)[0].all())
    break_tol = min(tol, 1e-6) * 1e-2  # β below this (relative) is an invariant subspace
    gen = torch.Generator().manual_seed(seed)
    be = backend if backend is not None else LocalBackend(dim, matvec, dtype=dtype, device=device,
                                                          capacity=max_iter)
    if be.m:
        raise ValueError("the backend already holds a basis; give lanczos a fresh one")

    def random_start():
        for _ in range(3):
            r = be.orthogonalise(be.random(1, next_seed(gen)))
            nr = be.norm(r)
            if nr > 1e-8 * np.sqrt(dim):  # else the basis spans (almost) everything
                return be.lincomb([(r, [[1.0 / nr]])])
        return None

    if v0 is None:
        q = random_start()
    else:
        q = be.from_tensor(v0.reshape(dim, 1))
        q = be.lincomb([(q, [[1.0 / be.norm(q)]])])
    alphas: list[float] = []
    betas: list[float] = []
    q_prev, beta_prev = None, 0.0
    block_start, restarts, pending = 0, 0, False
    done = broke = False
    while not done:
        r, alpha, beta = be.lanczos_step(q, q_prev, beta_prev)
        alphas.append(alpha)
        m = be.m

        enough = m >= min(n_wanted, dim)
        S = None
        if enough and m >= min_iter:  # a stopping check follows: eigenvectors of T now
            evals, S = tridiagonal_eigh(alphas, betas)
        else:
            evals = tridiagonal_eigvalsh(alphas, betas)
        scale = max(float(np.abs(evals).max()), tiny)
        broke = beta <= break_tol * scale or m == dim
        if broke:  # the block is exact: does it leave room for further copies?
            block = tridiagonal_eigvalsh(alphas[block_start:], betas[block_start:])
            sides = {"LA": evals[_select(evals, k, "LA")], "SA": evals[_select(evals, k, "SA")]}
            pending = not enough or _improves(block, sides, which, tol * scale)
        if enough and (broke or m >= min_iter):  # eigenvectors of T and the checks only when they can stop
            if S is None:
                evals, S = tridiagonal_eigh(alphas, betas)
            chosen = _select(evals, k, which)
            # The current block's extreme Ritz pairs must converge too while a multiplicity check is pending.
            extremes = []
            if not broke and pending:
                in_block = np.flatnonzero(np.linalg.norm(S[block_start:, :], axis=0) > 0.7)  # T splits into blocks
                if len(in_block):
                    extremes = ([in_block[-1]] if which in ("LA", "both") else []) + \
                        ([in_block[0]] if which in ("SA", "both") else [])
            if extremes or which == "both":
                check = np.unique(np.concatenate([chosen, np.array(extremes, dtype=int)]))
            else:
                check = np.sort(chosen)
            r_all = np.zeros(len(evals)) if broke else beta * np.abs(S[-1, :])  # cheap estimates, all pairs
            if cheap_pass(check, r_all, evals, scale):
                residuals = be.residual_norms(S[:, check], evals[check])
                converged = passes(check, residuals, evals, r_all, scale)[0]
                done = bool(converged.all()) and not (broke and pending)
        if m >= max_iter or done:
            break
        if broke:
            q_next = random_start()
            if q_next is None:
                break
            restarts += 1
            block_start, q_prev, beta_prev = m, None, 0.0
            betas.append(0.0)
        else:
            q_next = be.lincomb([(r, [[1.0 / beta]])])
            q_prev, beta_prev = q, beta
            betas.append(beta)
        q = q_next

    evals, S = tridiagonal_eigh(alphas, betas)
    scale = max(float(np.abs(evals).max()), tiny)
    chosen = _select(evals, min(k, len(evals)), which)
    Y, HY = be.ritz_vectors(S[:, chosen])
    theta = torch.as_tensor(evals[chosen].copy(), dtype=Y.dtype, device=Y.device)
    res = torch.linalg.norm(HY - Y * theta, dim=0).double().cpu().numpy()
    # the last step's cheap estimates for the gaps, true r for ours
    r_all = np.zeros(len(evals)) if broke else beta * np.abs(S[-1, :])
    r_all[chosen] = res
    ok, bounds = passes(chosen, res, evals, r_all, scale)
    return LanczosResult(
        eigenvalues=torch.as_tensor(evals[chosen].copy(), dtype=torch.float64), eigenvectors=Y,
        residuals=[float(x) for x in res], n_matvec=be.m, alphas=alphas, betas=betas,
        converged=[bool(x) for x in ok], iterations=be.m, restarts=restarts,
        which=which, scale=scale, errors=[float(x) for x in bounds],
        rule="residual" if rtol is None else "eigenvalue")


def next_seed(gen: torch.Generator) -> int:
    """A fresh seed for `KrylovBackend.random`, drawn on the driver so every backend sees the same."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))
