"""Where Krylov vectors live: the vector-space backend that `lanczos` and `block_lanczos` run on.

The Lanczos drivers never touch a dim-length vector themselves. They hold opaque *blocks* (dim×b,
b ≥ 1) and ask the backend for the few operations a Krylov method needs; everything that comes back
to the driver is small (b×b Gram matrices, m×b projection coefficients, residual norms). So the same
recurrence runs on one process (`LocalBackend`, plain torch) or on vectors cut into parameter slices
held by several workers (`pipeline/sharded_basis.py`), where every inner product is a sum of
per-slice partial results.

The basis is Q (orthonormal columns, appended a block at a time) together with W = H Q, the operator
outputs the method computes anyway: keeping W makes true residuals ‖H y − θ y‖ of Ritz vectors y = Q s
cost no extra HVP (H y = W s exactly).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


# Inner products over dim entries are accumulated in float64, whatever the basis dtype. Why: float32
# BLAS (MKL sdot/sgemv/sgemm) and torch.linalg.norm keep a few running float32 sums over all 10⁷ entries.
# For same-sign terms (qᵀq, qᵀHq near an eigenvector, ‖r‖², residual norms) the error is systematic:
# measured −6e-4..−1.7e-3 relative at dim = 2·10⁷ (torch.linalg.norm −8e-4), so a vector normalised by
# such a norm has ‖q‖ = 1 + 1e-3 and α = qᵀHq of it puts every Ritz value of T ≈ 2e-3·λ high while the
# Ritz vectors stay right (bench/ gpt2s_3l, COST.md). For mixed-sign terms with a few large ones (a
# localised eigenvector: Gram–Schmidt coefficients qᵀr ≈ 0 from terms ±‖q‖∞‖r‖∞) the running sum loses
# the small terms: 1.4e-3 for a true 1e-7 on a 10⁶-entry diagonal operator, orthogonality lost at 5e-5
# per step even with two Gram–Schmidt passes.
# Bound here: a product of two float32 (or lower) values is exact in float64 (2·24 ≤ 53 significand
# bits), and the float64 sum of dim of them is within γ_dim(2^-53)·Σ|x_i y_i| ≤ dim·1.2e-16·‖x‖‖y‖, below
# float32's unit roundoff 2^-24·‖x‖‖y‖ for dim ≤ 1.4·10⁸. Done in slabs of columns copied into a float64
# buffer that stays in cache: at dim = 2·10⁷ a dot costs ≈ 15 ms and Qᵀx over 40 basis rows ≈ 1.2–2× the
# float32 gemv.
# Gram–Schmidt's second pass ("twice is enough") is needed only where the first cancelled: if the
# remainder keeps at least η of the norm it came in with, its components along the basis are the first
# pass's rounding, ≤ ~2u/η of its norm, already at working precision (Daniel, Gragg, Kaufman and Stewart
# 1976; η = 1/√2, ARPACK's 0.717 rounded down). The coefficients come from dot64, so the test sees the
# vector actually passed in, cancellation in the Lanczos recurrence before it included. A Lanczos step's
# remainder is already nearly orthogonal to the basis, so on large models this halves the basis work.
REORTH_ETA = 2 ** -0.5
SLAB_BYTES = 1 << 22  # float64 buffer per operand slab (4 MiB: cache-resident on the machines used here)


def dot64(A: Tensor, B: Tensor) -> Tensor:
    """A @ B as a float64 tensor for A (a × dim) and B (dim × b), accumulated in float64 (comment above):
    float64 inputs are multiplied directly, others slab by slab through float64 copies."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B
    a, n = A.shape
    b = B.shape[1]
    out = torch.zeros(a, b, dtype=torch.float64, device=A.device)
    S = max(1024, SLAB_BYTES // (8 * max(a, b)))
    bufA = torch.empty(a, min(S, n), dtype=torch.float64, device=A.device)
    bufB = torch.empty(min(S, n), b, dtype=torch.float64, device=A.device)
    for s in range(0, n, S):
        e = min(s + S, n)
        L = e - s
        bufA[:, :L].copy_(A[:, s:e])
        bufB[:L].copy_(B[s:e])
        out.addmm_(bufA[:, :L], bufB[:L])
    return out


def inner(X: Tensor, Y: Tensor) -> np.ndarray:
    """Xᵀ Y (bx × by, float64 numpy) for dim×bx and dim×by (or 1-D) tensors, accumulated in float64."""
    X = X[:, None] if X.dim() == 1 else X
    Y = Y[:, None] if Y.dim() == 1 else Y
    return dot64(X.T, Y).cpu().numpy()


def column_norms(X: Tensor) -> np.ndarray:
    """‖X[:, j]‖ for each column of a dim×b (or 1-D) tensor, float64 numpy, squares summed in float64."""
    X = X[:, None] if X.dim() == 1 else X
    sq = [float(inner(X[:, j], X[:, j])[0, 0]) for j in range(X.shape[1])]
    return np.sqrt(np.maximum(sq, 0.0))


class KrylovBackend(ABC):
    """Blocks are opaque handles. Coefficient arrays are float64 numpy on the driver."""

    dim: int
    dtype: torch.dtype

    # -- blocks ---------------------------------------------------------------------------------------
    @abstractmethod
    def random(self, b: int, seed: int):
        """A dim×b block of standard normals, a deterministic function of ``seed`` only."""

    @abstractmethod
    def from_tensor(self, X: Tensor):
        """A block holding the given dim×b values."""

    @abstractmethod
    def apply(self, X):
        """H X: the operator on every column of the block."""

    @abstractmethod
    def gram(self, X, Y) -> np.ndarray:
        """Xᵀ Y (bx × by)."""

    @abstractmethod
    def lincomb(self, terms: Sequence[tuple[object, np.ndarray]]):
        """Σ_i X_i C_i for blocks X_i (dim×b_i) and coefficients C_i (b_i × b_out)."""

    # -- the basis ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def m(self) -> int:
        """Number of basis columns so far."""

    @abstractmethod
    def append(self, Q, W) -> None:
        """Add the orthonormal block Q and its image W = H Q to the basis."""

    @abstractmethod
    def project(self, X) -> np.ndarray:
        """Qᵀ X (m × b)."""

    @abstractmethod
    def subtract_basis(self, X, C: np.ndarray):
        """X − Q C."""

    @abstractmethod
    def residual_norms(self, S: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """‖W s_j − θ_j Q s_j‖ for each column s_j of S (m × k): true residuals of Ritz pairs."""

    @abstractmethod
    def ritz_vectors(self, S: np.ndarray) -> tuple[Tensor, Tensor]:
        """(Q S, W S) as local dim×k tensors: the only step that brings dim-length data to the driver."""

    # -- generic helpers built on the primitives ---------------------------------------------------------
    def orthogonalise(self, X):
        """Remove the basis components of X by classical Gram–Schmidt, a second pass only where the first
        cancelled (`REORTH_ETA`)."""
        if self.m == 0:
            return X
        def norms(Y):
            return np.sqrt(np.maximum(np.diag(self.gram(Y, Y)), 0.0))

        before = norms(X)
        X = self.subtract_basis(X, self.project(X))
        if np.all(norms(X) >= REORTH_ETA * before):
            return X
        return self.subtract_basis(X, self.project(X))

    def norm(self, x) -> float:
        return float(np.sqrt(max(self.gram(x, x)[0, 0], 0.0)))

    def lanczos_step(self, q, q_prev, beta_prev: float):
        """One step of single-vector Lanczos from the unit block ``q`` (dim×1): w = H q is appended with
        q to the basis, and r = w − α q − β_prev q_prev (α = qᵀw) is orthogonalised against the whole
        basis. Returns (r, α, ‖r‖). Composed of the primitives above; a backend may fuse them."""
        w = self.apply(q)
        self.append(q, w)
        alpha = float(self.gram(q, w)[0, 0])
        terms = [(w, [[1.0]]), (q, [[-alpha]])] + ([(q_prev, [[-beta_prev]])] if q_prev is not None else [])
        r = self.orthogonalise(self.lincomb(terms))
        return r, alpha, self.norm(r)


class LocalBackend(KrylovBackend):
    """Everything in one process: blocks are dim×b tensors, the basis is two row buffers."""

    def __init__(self, dim: int, matvec: Callable[[Tensor], Tensor] | None = None,
                 matmat: Callable[[Tensor], Tensor] | None = None, dtype=torch.float64, device=None,
                 capacity: int = 16):
        if matvec is None and matmat is None:
            raise ValueError("need matvec or matmat")
        self.dim, self.dtype, self.device = dim, dtype, device
        self._matvec, self._matmat = matvec, matmat
        self._m = 0
        self._Q = torch.empty(capacity, dim, dtype=dtype, device=device)
        self._W = torch.empty(capacity, dim, dtype=dtype, device=device)

    def reset(self) -> None:
        """Forget the basis (the buffers are kept): `lanczos` starts again on the same backend."""
        self._m = 0

    def _c(self, C) -> Tensor:
        return torch.as_tensor(np.asarray(C, dtype=np.float64), device=self.device).to(self.dtype)

    def random(self, b: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(self.dim, b, generator=g, dtype=torch.float64).to(device=self.device, dtype=self.dtype)

    def from_tensor(self, X: Tensor) -> Tensor:
        X = X.detach().to(device=self.device, dtype=self.dtype)
        return X.reshape(self.dim, -1).clone()

    def apply(self, X: Tensor) -> Tensor:
        # single columns go through matvec: that is the operator's cheapest, best-tested path
        if X.shape[1] == 1 and self._matvec is not None:
            out = self._matvec(X[:, 0])[:, None]
        elif self._matmat is not None:
            out = self._matmat(X)
        else:
            out = torch.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], dim=1)
        return out.to(device=self.device, dtype=self.dtype)

    def gram(self, X: Tensor, Y: Tensor) -> np.ndarray:
        return inner(X, Y)  # accumulated in float64 (comment above `dot64`)

    def lincomb(self, terms) -> Tensor:
        out = None
        for X, C in terms:
            C = np.asarray(C, dtype=np.float64)
            # single-vector Lanczos combines columns with scalars: an axpy, not a (dim×1)(1×1) matmul
            Y = X * float(C[0, 0]) if C.shape == (1, 1) else X @ self._c(C)
            out = Y if out is None else out.add_(Y)
        return out

    @property
    def m(self) -> int:
        return self._m

    @property
    def Q(self) -> Tensor:
        """The basis as m×dim rows (local only)."""
        return self._Q[: self._m]

    @property
    def W(self) -> Tensor:
        return self._W[: self._m]

    def append(self, Q: Tensor, W: Tensor) -> None:
        b = Q.shape[1]
        if self._m + b > self._Q.shape[0]:  # grow by doubling: amortised O(1) copies per column
            cap = max(2 * self._Q.shape[0], self._m + b)
            for name in ("_Q", "_W"):
                old = getattr(self, name)
                new = torch.empty(cap, self.dim, dtype=self.dtype, device=self.device)
                new[: self._m] = old[: self._m]
                setattr(self, name, new)
        if b == 1:  # a row copy: cheaper than slice assignment of a transposed block
            self._Q[self._m].copy_(Q[:, 0])
            self._W[self._m].copy_(W[:, 0])
        else:
            self._Q[self._m:self._m + b] = Q.T
            self._W[self._m:self._m + b] = W.T
        self._m += b

    def project(self, X: Tensor) -> np.ndarray:
        return dot64(self.Q, X).cpu().numpy()  # float64 accumulation (comment above `dot64`)

    # Local overrides of the generic helpers: the same arithmetic without the numpy round trips of the
    # coefficients (on small models these conversions were ~1/3 of a Lanczos step's own cost).
    def orthogonalise(self, X: Tensor) -> Tensor:
        return self._orthogonalise(X)[0]

    def _orthogonalise(self, X: Tensor) -> tuple[Tensor, np.ndarray | None]:
        """X without its basis components, and its column norms when the single pass left them known."""
        if self._m == 0:
            return X, None
        Q = self.Q
        before = column_norms(X)
        for npass in range(2):  # classical Gram–Schmidt, a second pass only where the first cancelled
            # coefficients accumulated in float64 (`dot64`): float32 gemv loses orthogonality on
            # localised vectors; the subtraction is elementwise, rounded per entry, so float32 is fine
            X = torch.addmm(X, Q.T, dot64(Q, X).to(X.dtype), alpha=-1.0)
            if npass == 0:
                after = column_norms(X)
                if np.all(after >= REORTH_ETA * before):
                    return X, after
        return X, None

    def norm(self, x: Tensor) -> float:
        return float(column_norms(x)[0])  # torch.linalg.norm in float32: −8e-4 relative at dim = 2·10⁷

    def lanczos_step(self, q: Tensor, q_prev: Tensor | None, beta_prev: float):
        # The same arithmetic as the generic step in a dozen torch calls: on small models the driver's
        # own per-step cost is Python overhead (0.23 ms a step against a 1.7 ms HVP on the tiny GPT-2).
        w = self.apply(q)
        self.append(q, w)
        alpha = float(inner(q, w)[0, 0])  # not torch.dot: float32 sdot is biased at 10⁷ (`dot64`)
        r = torch.add(w, q, alpha=-alpha)
        if q_prev is not None:
            r.add_(q_prev, alpha=-beta_prev)
        r, norms = self._orthogonalise(r)
        return r, alpha, float(norms[0]) if norms is not None else self.norm(r)  # the same column_norms value

    def subtract_basis(self, X: Tensor, C: np.ndarray) -> Tensor:
        return X - self.Q.T @ self._c(C)

    def residual_norms(self, S: np.ndarray, theta: np.ndarray) -> np.ndarray:
        # R = SᵀW − diag(θ)SᵀQ into one k×dim buffer (not Y, HY and their difference: 3 × k·dim at 10⁷)
        St = self._c(S).T.contiguous()
        R = torch.mm(St, self.W)
        R.addmm_(St * self._c(theta)[:, None], self.Q, alpha=-1.0)
        return column_norms(R.T)

    def _ritz_rows(self, S: np.ndarray) -> tuple[Tensor, Tensor]:
        # Sᵀ(Q rows) rather than (Qᵀ)S: the same product, 3× faster for a thin S (k×m by m×dim)
        St = self._c(S).T
        return St @ self.Q, St @ self.W

    def ritz_vectors(self, S: np.ndarray) -> tuple[Tensor, Tensor]:
        Y, HY = self._ritz_rows(S)
        return Y.T, HY.T
