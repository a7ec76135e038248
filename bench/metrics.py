"""Measurement helpers: interleaved timing, exact Wasserstein-1 between spectral measures, errors.

Timing on a shared 2-core machine is noisy (other engineers' tests run at the same time), so
contenders are *interleaved*: every repeat runs each contender once, in a rotated order, so a burst
of outside load hits all of them alike. We report median and minimum; the minimum is the best
estimate of the uncontended cost, the median of what a user sees.
"""
from __future__ import annotations

import time

import numpy as np


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """{name: [seconds per repeat]} for callables run round-robin (rotated start each repeat)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med_min(xs) -> tuple[float, float]:
    return float(np.median(xs)), float(np.min(xs))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def topk_err(got, exact) -> float:
    """max_i |θ_i − λ_i| / |λ_i| over the k largest (both sorted descending)."""
    got, exact = np.sort(np.asarray(got))[::-1], np.asarray(exact)
    k = len(exact)
    if len(got) < k:
        return float("inf")
    return float(np.max(np.abs(got[:k] - exact) / np.abs(exact)))


def ritz_top(alphas, betas, j: int, k: int) -> np.ndarray:
    """The k largest Ritz values of the leading j×j block of the tridiagonal."""
    from scipy.linalg import eigh_tridiagonal
    ev = eigh_tridiagonal(np.asarray(alphas[:j]), np.asarray(betas[: j - 1]), eigvals_only=True)
    return np.sort(ev)[::-1][:k]


def first_step_within(alphas, betas, exact_top, rtol: float) -> int | None:
    """Smallest j at which the top-k Ritz values of T_j are all within rtol of the exact ones."""
    k = len(exact_top)
    for j in range(k, len(alphas) + 1):
        if topk_err(ritz_top(alphas, betas, j, k), exact_top) <= rtol:
            return j
    return None


def w1_discrete(nodes, weights, evals) -> float:
    """Exact W1 between the measure Σ w_i δ(θ_i) and the uniform measure on ``evals``:
    ∫ |F(x) − G(x)| dx, both CDFs piecewise constant on the merged support."""
    nodes, weights = np.asarray(nodes, float), np.asarray(weights, float)
    weights = weights / weights.sum()
    evals = np.sort(np.asarray(evals, float))
    xs = np.concatenate([nodes, evals])
    ws = np.concatenate([weights, -np.full(len(evals), 1.0 / len(evals))])
    order = np.argsort(xs, kind="mergesort")
    xs, cum = xs[order], np.cumsum(ws[order])
    return float(np.sum(np.abs(cum[:-1]) * np.diff(xs)))


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
