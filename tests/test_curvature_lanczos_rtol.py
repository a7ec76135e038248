"""The per-eigenvalue stopping rule (``rtol``) of `lanczos` against dense eigh, with controls."""
import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from test_curvature_operator import reference_hessian, tiny_cnn

F64 = torch.float64


def planted(evals, seed=0):
    n = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return (Q * torch.as_tensor(evals, dtype=F64)) @ Q.T, Q


def dominant_top():
    """λ₁ = 100 far above λ₂..λ₅ ≈ 2: a tolerance relative to λ₁ says little about λ₅."""
    rng = np.random.default_rng(0)
    ev = np.concatenate([[100.0, 2.0, 1.9, 1.85, 1.8], rng.uniform(0, 1.7, 295)])
    return planted(ev)[0]


def rel_errors(res, H, which="LA"):
    exact = np.linalg.eigvalsh(H.numpy())
    k = len(res.eigenvalues)
    ref = exact[::-1][:k] if which == "LA" else exact[:k]
    return np.abs(res.eigenvalues.numpy() - ref), np.abs(ref)


@pytest.mark.parametrize("rtol", [1e-2, 1e-3, 1e-6])
def test_rtol_bounds_every_eigenvalue(rtol):
    H = dominant_top()
    res = lanczos(lambda v: H @ v, H.shape[0], k=5, rtol=rtol)
    err, ref = rel_errors(res, H)
    assert res.rule == "eigenvalue" and all(res.converged)
    assert np.all(err <= rtol * ref)  # the promise: each eigenvalue to rtol of itself
    assert np.all(err <= np.array(res.errors))  # and the reported bounds are bounds
    assert res.n_matvec >= 20  # the minimum Krylov dimension


def test_old_rule_is_kept_and_misses_small_eigenvalues():
    """Control: tol=1e-2 (relative to λ₁) stops early with a large error on λ₅; same call as before."""
    H = dominant_top()
    res = lanczos(lambda v: H @ v, H.shape[0], k=5, tol=1e-2)
    err, ref = rel_errors(res, H)
    assert res.rule == "residual" and all(res.converged)
    assert np.max(err / ref) > 1e-2
    assert all(r <= 1e-2 * res.scale for r in res.residuals)  # what the old rule promises, and keeps


def test_rtol_on_a_real_hessian_both_ends():
    model, loss, batch = tiny_cnn("tanh")
    H = reference_hessian(model, loss, [batch])
    op = HessianOperator(model, loss, batch, method="double_backward_cached")
    for which in ("LA", "SA"):
        res = lanczos(op.matvec, op.dim, k=4, which=which, rtol=1e-3, atol=1e-10)
        err, ref = rel_errors(res, H, which)
        assert np.all(err <= np.maximum(1e-3 * ref, 1e-10 * res.scale)), (which, err, ref)


def test_minimum_krylov_dimension_finds_a_hidden_top_eigenvalue():
    """A start almost orthogonal to the top eigenvector (1e-8): after a few steps λ₂ looks converged."""
    ev = np.concatenate([[1.5, 1.0], np.linspace(0, 0.5, 198)])
    H, Q = planted(ev, 1)
    v0 = Q[:, 1:] @ torch.randn(199, generator=torch.Generator().manual_seed(4), dtype=F64)
    v0 = v0 / v0.norm() + 1e-8 * Q[:, 0]
    for control in (lanczos(lambda v: H @ v, 200, k=1, v0=v0, tol=1e-3, verify=False),
                    lanczos(lambda v: H @ v, 200, k=1, v0=v0, rtol=1e-3, min_iter=1, verify=False)):
        assert abs(float(control.eigenvalues[0]) - 1.0) < 1e-3 and control.n_matvec < 10  # λ₂, not λ₁
    res = lanczos(lambda v: H @ v, 200, k=1, v0=v0, rtol=1e-3)
    assert abs(float(res.eigenvalues[0]) - 1.5) <= 1.5e-3 and res.n_matvec >= 20
    # the verification block (an independent start) finds λ₁ even with the rules that stopped early above
    for res in (lanczos(lambda v: H @ v, 200, k=1, v0=v0, tol=1e-3),
                lanczos(lambda v: H @ v, 200, k=1, v0=v0, rtol=1e-3, min_iter=1)):
        assert abs(float(res.eigenvalues[0]) - 1.5) <= max(res.errors[0], 1.5e-3) and all(res.converged)
