"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Why these choices:

* Full reorthogonalisation (classical Gram–Schmidt, with the second pass of "twice is enough" only where
  the first cancelled: `backend.REORTH_ETA`): without it, converged Ritz values reappear as spurious
  copies (hessian-eigenthings returns repeated λ1 that way). It costs O(m·dim) per step: nothing next to
  an HVP on small models, but at 2·10⁷ parameters a pass over the basis costs about half an HVP, so a
  step's remainder (already nearly orthogonal to the basis) gets one pass, not two.
* True residuals at no HVP cost: we keep W = H Q, the matvec outputs we compute anyway, so for a Ritz
  vector y = Q s, H y = W s exactly and ‖H y − θ y‖ is measured, not estimated. The cheap estimate
  β_m |s_m| is only used to decide when the exact check is worth doing.
* Invariant-subspace breakdown (β ≈ 0): the Krylov space so far is invariant, its Ritz pairs are exact,
  and the recurrence restarts from a random vector orthogonal to the basis (T gets a zero coupling, so
  it stays the exact projection). Low-rank and degenerate operators need this.
* What ``converged`` means. A residual r says θ is within r of *some* eigenvalue, not that no larger
  one was skipped: a start vector that barely touches λ_k's eigenvector (next to a nearly degenerate
  λ_{k+1}: 90.1154 / 89.9940 on a LLaMA block) lets θ_k converge to λ_{k+1}, and the r²/gap bound,
  whose gap comes from the Ritz values, then certifies the wrong eigenvalue. So the stopping rule has
  two parts. (1) The rule below holds for every wanted pair (true residuals). (2) Verification: the
  recurrence restarts from an independent random vector orthogonal to the basis and runs a verification
  block until that block's own extreme Ritz value (a Ritz value of PHP, P the complement of the earlier
  basis, whose top is ≈ λ_{k+1} if nothing was missed and the missed λ_k otherwise) has residual
  ≤ √tol·max|θ| (√rtol for the eigenvalue rule), or the block breaks down. If that value lies beyond
  the k-th wanted one by more than their bounds, the block found something: when the block was cut
  off (not a breakdown) the run starts once more from the wanted Ritz vectors of the union (which now
  hold the missed direction; a union of two cut-off Krylov blocks converges slowly), otherwise another
  verification block follows; only a block that finds nothing certifies. The projection stays exact
  after a cut-off restart: the only entries of QᵀHQ off the tridiagonal are q_endᵀHq_j = rᵀq_j (r the
  residual left at the cut), computed with one inner product per step (``couplings``).
  ``converged[i]`` = (1) and (2) hold (or the basis fills the space), and then
  ``errors[i]`` bounds |θ_i − λ_i| for λ_i the i-th eigenvalue from that end: min(r_i, r_i²/gap_i).
  Argument: with two independent random starts, a λ_k the final answer misses must have a small weight
  in both; the verification block's extreme pair converges only once its Krylov polynomial has
  amplified everything above it, and for a tiny weight w the mixture residual ≈ δ·√w (δ the distance)
  stays above √tol·‖H‖ unless w ≲ tol·‖H‖²/δ². Not a proof (no Krylov method certifies an unseen
  eigenvalue), tested against dense truth on built near-degenerate, clustered, gapped and negative
  spectra (tests/test_curvature_lanczos_verify.py). Exact multiplicities are found the same way: each
  copy takes another block (a block that breaks down is exact). ``verify=False`` restores the old
  single-part rule (cheaper, can be wrong as above).
  Cost: the verification block converges one more pair, ≈ 1.3–2× the products of the rule alone
  (COST.md); a loose tol next to a near pair may spend max_iter and then says ``converged`` False.
* Stopping rules. ``tol`` (default rule): residual ≤ tol·max|θ| for every wanted pair, which judges
  small wanted eigenvalues against λ₁ (tol = 1e-2 may leave a 10% error on λ₅). ``rtol`` (opt-in):
  a bound on each *eigenvalue's* error, b_i = min(r_i, r_i²/gap_i), must satisfy
  b_i ≤ max(rtol·|θ_i|, atol·max|θ|). r_i bounds |λ − θ_i| for some eigenvalue λ (symmetric H); r_i²/gap_i
  is the sharper bound once the other eigenvalues are at least gap_i away. The gap is taken from the
  other Ritz values, shrunk by their own (cheap, β|s_mj|) residuals so that unconverged neighbours
  do not inflate it. With ``rtol`` the Krylov dimension must also reach ``min_iter`` (default
  ARPACK-like max(2·wanted + 1, 20), capped at dim) before convergence is accepted.
  Defaults (tol = √eps of the products' dtype, max_iter) come from `defaults.py`.
* Inner products over dim (α, β, Gram–Schmidt coefficients, residual norms) are accumulated in float64
  whatever the basis dtype (`backend.dot64`): a float32 basis stores and combines vectors in float32,
  but float32 running sums over 10⁶–10⁷ entries are biased (‖q‖ = 1 + 1e-3 and Ritz values 2e-3·λ1 high
  at 21.5M parameters; tests/test_curvature_lanczos_float32.py), and T is only the projection if they
  are not.
* The basis lives in a `KrylovBackend` (`backend.py`): one process by default, or parameter slices
  on several workers (`pipeline/sharded_basis.py`); the recurrence only sees scalars and handles.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.linalg.lapack import dstev
from torch import Tensor

from eqlab.analyses.curvature.backend import KrylovBackend, LocalBackend, column_norms
from eqlab.analyses.curvature.defaults import as_dtype, for_dtype, product_dtype


@dataclass
class LanczosResult:
    """Eigenvalues: largest first ("LA"), smallest first ("SA"), or top-k then bottom-k ("both").

    ``residuals`` are the true ‖H y − θ y‖ of the returned unit vectors; ``converged[i]`` means the
    rule holds (residual ≤ tol · max|θ|, rule "residual"; or, with ``rtol``, rule "eigenvalue",
    ``errors[i]`` ≤ max(rtol·|θ_i|, atol·max|θ|)) *and* a verification block certified that nothing
    beyond the wanted set was skipped (``verified``; module doc). Then ``errors[i]`` = min(r_i, r_i²/gap_i)
    bounds |θ_i − λ_i|, λ_i the i-th eigenvalue from that end. After a restart from the union's Ritz
    vectors, ``alphas``/``betas`` are those of the final run (``n_matvec`` counts all). ``alphas``/``betas`` are the tridiagonal T (len(betas) = len(alphas) − 1;
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
    tol: float = 0.0  # the residual tolerance used (the dtype's default when none was given)
    verified: bool = False  # a verification block found nothing beyond the wanted set (module doc)
    verifications: int = 0  # verification blocks run
    couplings: list = field(default_factory=list)  # (end, values) per cut-off block: T's off-tridiagonal part


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


def _eig(alphas, betas, couplings, vectors: bool = True):
    """Ascending eigenpairs of the projection T: the tridiagonal (alphas, betas) plus, for every
    verification restart, the couplings of its block's last vector to all later ones (module doc)."""
    if not couplings:
        return _dstev(alphas, betas, vectors) if vectors else _dstev(alphas, betas, False)
    m = len(alphas)
    T = np.diag(np.asarray(alphas, dtype=np.float64))
    if m > 1:
        T += np.diag(np.asarray(betas, dtype=np.float64), 1) + np.diag(np.asarray(betas, dtype=np.float64), -1)
    for c in couplings:
        vals = np.asarray(c.values, dtype=np.float64)
        T[c.end, c.end + 1:c.end + 1 + len(vals)] = vals
        T[c.end + 1:c.end + 1 + len(vals), c.end] = vals
    return np.linalg.eigh(T) if vectors else np.linalg.eigvalsh(T)


@dataclass
class _Coupling:
    """The residual r (norm beta) left at the end of a block that a verification restart cut short:
    q_endᵀ H q_j = rᵀ q_j for every later basis vector q_j (the only entries of QᵀHQ off the tridiagonal)."""
    end: int
    r: object
    beta: float
    values: list = field(default_factory=list)

    def outside(self) -> float:
        """‖r minus its part in the later basis vectors‖: what r adds to residual estimates."""
        return float(np.sqrt(max(self.beta ** 2 - float(np.sum(np.square(self.values))), 0.0)))


def _block_settled(alphas, betas, beta: float, which: str, bound: float) -> bool:
    """Has the verification block's extreme Ritz pair (each wanted side) a cheap residual β|s_m| ≤ bound?
    (The same test the verification step applies below, on the block's own tridiagonal.)"""
    ev_v, S_v = _dstev(alphas, betas, True)
    r_v = beta * np.abs(S_v[-1, :])
    ends = ([len(ev_v) - 1] if which in ("LA", "both") else []) + ([0] if which in ("SA", "both") else [])
    return all(r_v[j] <= bound for j in ends)


def lanczos(matvec: Callable[[Tensor], Tensor] | None, dim: int, k: int = 5, which: str = "LA",
            tol: float | None = None, max_iter: int | None = None, seed: int = 0, dtype=torch.float64,
            device=None, v0: Tensor | None = None, backend: KrylovBackend | None = None, *,
            rtol: float | None = None, atol: float = 0.0, min_iter: int | None = None, verify: bool = True,
            precision=None, warn: bool = True, _reruns: int = 1) -> LanczosResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``matvec`` (1-D ``dtype`` tensors).

    Rule ``tol`` (default): true residual ≤ ``tol · max|θ|`` for every wanted pair. Rule ``rtol``:
    every wanted θ_i has error bound ≤ max(rtol·|θ_i|, atol·max|θ|, 16·eps·max|θ|) and at least
    ``min_iter`` steps were taken (default max(2·wanted + 1, 20), capped at dim).
    ``verify`` (default True): once the rule holds, a verification block from an independent random
    start (orthogonal to the basis) must end without finding anything beyond the k-th wanted value
    (module doc); only then are pairs reported ``converged``. ``verify=False`` stops at the rule alone,
    which can return λ_{k+1} in place of a λ_k the start vector barely touches.
    Stops when converged, when the Krylov space fills ``dim``, or after ``max_iter`` matvecs.
    Defaults (``tol``, ``max_iter``) come from `analyses.curvature.defaults` for ``precision``: the dtype
    the products are computed in (default: ``matvec.__self__.dtype`` when it has one, else ``dtype``;
    the lower precision of that and ``dtype`` counts). A ``tol`` below that dtype's ``min_tol`` raises
    ValueError; ``max_iter`` < the number of wanted pairs (or < 1) raises ValueError; a result with an
    unconverged pair warns (RuntimeWarning) unless ``warn=False``.
    ``backend``: where the basis lives (default: a `LocalBackend` on ``matvec``); with a backend,
    ``matvec`` may be None and the backend applies the operator.
    """
    if which not in ("LA", "SA", "both"):
        raise ValueError(f"which must be 'LA', 'SA' or 'both', got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    n_wanted = 2 * k if which == "both" else k
    prec = product_dtype(matvec if matvec is not None else backend, dtype) if precision is None \
        else as_dtype(precision)
    if prec is None:
        raise ValueError(f"precision must be a floating dtype, got {precision!r}")
    table = for_dtype(prec if torch.finfo(prec).eps >= torch.finfo(dtype).eps else dtype)
    if max_iter is None:
        max_iter = table.max_iter
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < min(n_wanted, dim) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= the {min(n_wanted, dim)} wanted pairs "
                         f"(a Krylov space of m vectors has only m Ritz values), got {max_iter!r}")
    max_iter = min(int(max_iter), dim)
    if tol is None:
        tol = table.tol
    if not (tol > 0 and np.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if rtol is None and tol < table.min_tol:
        raise ValueError(f"tol={tol:g} cannot be reached with {table.dtype} products: a residual below "
                         f"{table.min_tol:.1e}·max|θ| (4 eps) is under the rounding of the product itself; "
                         f"use tol >= {table.min_tol:.1e} (default {table.tol:.1e}) or float64")
    if rtol is not None and not (rtol > 0 and np.isfinite(rtol)):
        raise ValueError(f"rtol must be a finite number > 0, got {rtol!r}")
    tiny = torch.finfo(dtype).tiny
    if min_iter is None:
        min_iter = max(2 * n_wanted + 1, 20) if rtol is not None else n_wanted
    min_iter = min(min_iter, dim, max_iter)
    eps = max(torch.finfo(dtype).eps, table.eps)
    floor = max(atol, 16 * eps)

    def passes(idx, r, evals, r_all, scale):
        """Per pair: does it meet the active stopping rule? Also returns the eigenvalue error bounds."""
        # below ~eps·‖H‖ rounding in θ itself dominates, whatever the residual says
        b = np.maximum(error_bounds(evals, idx, r, r_all), 16 * eps * scale)
        if rtol is None:
            return r <= tol * scale, b
        return b <= np.maximum(rtol * np.abs(evals[idx]), floor * scale), b

    verify_tol = float(np.sqrt(tol if rtol is None else rtol))
    break_tol = min(tol, 1e-6) * 1e-2  # β below this (relative) is an invariant subspace
    gen = torch.Generator().manual_seed(seed)
    be = backend if backend is not None else LocalBackend(dim, matvec, dtype=dtype, device=device,
                                                          capacity=min(max_iter, 64))
    if be.m:
        raise ValueError("the backend already holds a basis; give lanczos a fresh one")

    def random_start():
        for _ in range(3):
            r = be.orthogonalise(be.random(1, next_seed(gen)))
            nr = be.norm(r)
            if nr > 1e-8 * np.sqrt(dim):  # else the basis spans (almost) everything
                return be.lincomb([(r, [[1.0 / nr]])])
        return None

    def cheap_residuals(S, beta_now, broke):
        """Upper bounds on ‖H y − θ y‖ for every Ritz vector y = Q s of the projection (module doc)."""
        r_all = np.zeros(S.shape[1]) if broke else beta_now * np.abs(S[-1, :])
        for c in couplings:
            r_all = r_all + c.outside() * np.abs(S[c.end, :])
        return r_all

    def sides_of(evals, bounds_by_index):
        """Per side: (θ_k, its bound) of the worst wanted value."""
        out = {}
        for side in (("LA", "SA") if which == "both" else (which,)):
            idx = _select(evals, k, side)
            worst = idx[-1]
            out[side] = (float(evals[worst]), float(bounds_by_index.get(int(worst), 0.0)))
        return out

    if v0 is None:
        q = random_start()
    else:
        q = be.from_tensor(v0.reshape(dim, 1))
        q = be.lincomb([(q, [[1.0 / be.norm(q)]])])
    alphas: list[float] = []
    betas: list[float] = []
    couplings: list[_Coupling] = []
    q_prev, beta_prev = None, 0.0
    block_start, restarts, verifications = 0, 0, 0
    vref = None  # per side (θ_k, bound) when the current verification block started; None: not verifying
    certified = missed = False
    done = broke = False
    while not done:
        r, alpha, beta = be.lanczos_step(q, q_prev, beta_prev)
        for c in couplings:  # q_endᵀ H q = rᵀ q: the projection's entries off the tridiagonal
            c.values.append(float(be.gram(c.r, q)[0, 0]))
        alphas.append(alpha)
        m = be.m
        enough = m >= min(n_wanted, dim)
        evals = _eig(alphas, betas, couplings, vectors=False)
        scale = max(float(np.abs(evals).max()), tiny)
        broke = beta <= break_tol * scale or m == dim
        restart_verify = False
        # The union already shows a better k-th value: the first run missed it. After a cut-off block
        # (couplings) the union is not a Krylov space of H and converges slowly, so start once more from
        # its wanted Ritz vectors (they hold the missed direction with a fair weight). After a breakdown
        # (the multiplicity case), or once that restart was spent, the union simply goes on.
        if vref is not None and enough and couplings and _reruns > 0 and (backend is None or hasattr(be, "reset")):
            for side, (ref, ref_b) in vref.items():
                worst = float(evals[_select(evals, k, side)[-1]])
                margin = max(ref_b, 16 * eps * scale, tol * scale if rtol is None else 0.0)
                missed |= (worst > ref + margin) if side == "LA" else (worst < ref - margin)
            # Restart only where it can pay: a union allowed to fill the space ends exact (m == dim), and a
            # restart rebuilds the whole run, so with less budget left than spent so far it cannot finish.
            # (A restart from one vector also sees a multiple eigenvalue once: it cannot resolve copies.)
            if missed and max_iter < dim and max_iter - m >= max(m, min(n_wanted, dim)):
                break
            missed = False
        if enough and (broke or m >= min_iter):
            evals, S = _eig(alphas, betas, couplings)
            chosen = _select(evals, k, which)
            r_all = cheap_residuals(S, beta, broke)
            check = np.sort(chosen)
            # While a verification block runs, nothing is decided until its own extreme pair settles, so
            # the union's true residuals (two k×m by m×dim products: ~0.5 s a step at 2·10⁷ parameters)
            # wait for that; the decisions, and so the result, are the same as checking every step.
            waiting = vref is not None and not broke and not _block_settled(
                alphas[block_start:], betas[block_start:], beta, which, verify_tol * scale)
            if not waiting and bool(passes(check, r_all[check], evals, r_all, scale)[0].all()):
                residuals = be.residual_norms(S[:, check], evals[check])
                r_all[check] = residuals
                ok, b = passes(check, residuals, evals, r_all, scale)
                if bool(ok.all()):
                    if m == dim or not verify:
                        certified = m == dim
                        done = True
                    elif vref is None:
                        restart_verify = True  # the rule holds: now an independent start must agree
                    else:
                        # the verification block alone: its own tridiagonal (a projection of PHP, P the
                        # complement of the earlier basis), extreme Ritz values and residual estimates
                        ev_v, S_v = _dstev(alphas[block_start:], betas[block_start:], True)
                        r_v = np.zeros(len(ev_v)) if broke else beta * np.abs(S_v[-1, :])
                        ends = []
                        if which in ("LA", "both"):
                            ends.append(("LA", len(ev_v) - 1))
                        if which in ("SA", "both"):
                            ends.append(("SA", 0))
                        settled = True
                        found = False
                        for side, j in ends:
                            b_j = np.maximum(error_bounds(ev_v, np.array([j]), r_v[j:j + 1], r_v), 16 * eps * scale)
                            if not (broke or r_v[j] <= verify_tol * scale):
                                settled = False
                                continue
                            ref, ref_b = vref[side]
                            margin = max(ref_b, float(b_j[0]), tol * scale if rtol is None else 0.0,
                                         16 * eps * scale)
                            if (ev_v[j] > ref + margin) if side == "LA" else (ev_v[j] < ref - margin):
                                found = True  # it held a better value: another independent start must agree
                        if settled and not found:
                            certified = done = True
                        elif settled:
                            restart_verify = True
        if m >= max_iter or done:
            break
        if broke or restart_verify:
            q_next = random_start()
            if q_next is None:
                certified = True  # the basis spans (almost) the whole space
                break
            if restart_verify:
                verifications += 1
                bounds = {int(i): float(x) for i, x in zip(check, b)}
                vref = sides_of(evals, bounds)
                if not broke:  # the cut-off residual couples this block to the next (exact projection)
                    couplings.append(_Coupling(end=m - 1, r=r, beta=beta))
            restarts += 1
            block_start, q_prev, beta_prev = m, None, 0.0
            betas.append(0.0)
        else:
            q_next = be.lincomb([(r, [[1.0 / beta]])])
            q_prev, beta_prev = q, beta
            betas.append(beta)
        q = q_next

    evals, S = _eig(alphas, betas, couplings)
    scale = max(float(np.abs(evals).max()), tiny)
    chosen = _select(evals, min(k, len(evals)), which)
    Y, HY = be.ritz_vectors(S[:, chosen])
    if missed:
        used = be.m
        if backend is not None:
            be.reset()
        again = lanczos(matvec, dim, k=k, which=which, tol=tol, max_iter=max_iter - used, seed=seed + 1,
                        dtype=dtype, device=device, v0=Y.sum(dim=1), backend=backend, rtol=rtol, atol=atol,
                        min_iter=min_iter, verify=verify, precision=prec, warn=warn, _reruns=_reruns - 1)
        again.n_matvec += used
        again.restarts += restarts + 1
        again.verifications += verifications
        return again
    theta = torch.as_tensor(evals[chosen].copy(), dtype=Y.dtype, device=Y.device)
    # one column at a time (a dim-length temporary, not k of them); float64 sums (backend.dot64)
    res = np.array([column_norms(HY[:, j] - Y[:, j] * theta[j])[0] for j in range(Y.shape[1])])
    # the last step's cheap estimates for the gaps, true r for ours
    r_all = cheap_residuals(S, beta, broke)
    r_all[chosen] = res
    ok, bounds = passes(chosen, res, evals, r_all, scale)
    if verify and not certified:
        ok = np.zeros_like(ok)
    if warn and not ok.all():
        why = "the verification block did not finish" if verify and not certified and \
            bool(passes(chosen, res, evals, r_all, scale)[0].all()) else "the stopping rule does not hold"
        warnings.warn(f"lanczos: {int((~ok).sum())} of {len(ok)} wanted pairs not converged after {be.m} "
                      f"products (max_iter {max_iter}, {'rtol' if rtol is not None else 'tol'} "
                      f"{rtol if rtol is not None else tol:g}, {table.dtype} products): {why}",
                      RuntimeWarning, stacklevel=2)
    return LanczosResult(
        eigenvalues=torch.as_tensor(evals[chosen].copy(), dtype=torch.float64), eigenvectors=Y,
        residuals=[float(x) for x in res], n_matvec=be.m, alphas=alphas, betas=betas,
        converged=[bool(x) for x in ok], iterations=be.m, restarts=restarts,
        which=which, scale=scale, errors=[float(x) for x in bounds],
        rule="residual" if rtol is None else "eigenvalue", tol=float(tol), verified=bool(certified),
        verifications=verifications, couplings=[(c.end, list(c.values)) for c in couplings])


def next_seed(gen: torch.Generator) -> int:
    """A fresh seed for `KrylovBackend.random`, drawn on the driver so every backend sees the same."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))
