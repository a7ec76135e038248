"""Dense float64 Hessians and their eigendecomposition: the ground truth every spectral test uses.

Only for small parameter spaces (dim up to a few thousand: the matrix is dim² float64 numbers).
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_hessian(operator, chunk: int = 64, symmetry_rtol: float | None = None) -> Tensor:
    """The operator's matrix in float64, column block by column block (``operator.matmat`` on I).

    An exact Hessian is symmetric to round-off; a larger asymmetry means the operator is not a
    Hessian (or is wrong), so it raises instead of silently symmetrising. Returns (H + Hᵀ)/2.
    """
    dim = operator.shape[0]
    H = torch.empty(dim, dim, dtype=torch.float64)
    for start in range(0, dim, chunk):
        stop = min(start + chunk, dim)
        E = torch.zeros(dim, stop - start, dtype=torch.float64)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        H[:, start:stop] = operator.matmat(E).to(torch.float64).cpu()
    if symmetry_rtol is None:
        work = getattr(operator, "dtype", torch.float64)
        symmetry_rtol = 1e4 * torch.finfo(work).eps
    scale = H.abs().max().clamp_min(1e-300)
    asym = float((H - H.T).abs().max() / scale)
    if asym > symmetry_rtol:
        raise RuntimeError(f"operator matrix is not symmetric: max |H - Hᵀ| / max |H| = {asym:.2e}")
    return (H + H.T) / 2


def dense_eigh(operator_or_matrix) -> tuple[Tensor, Tensor]:
    """All eigenvalues (ascending) and orthonormal eigenvectors (columns), in float64."""
    H = operator_or_matrix if torch.is_tensor(operator_or_matrix) else dense_hessian(operator_or_matrix)
    return torch.linalg.eigh(H.to(torch.float64))
