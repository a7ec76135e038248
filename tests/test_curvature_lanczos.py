"""Lanczos against numpy.linalg.eigh of dense float64 matrices (real Hessians and built spectra)."""
import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.models import build_task

F64 = torch.float64
torch.set_num_threads(1)  # tiny problems: extra threads only contend on the shared 2-core machine


def hessian_of(family):
    if family == "digits_cnn":
        task = build_task("digits_cnn", {"channels": (2, 4), "hidden": 8, "bn_eps": 1e-12}, dtype=F64)
        X, y = task.train
        batch = (X[:64], y[:64])
    else:
        task = build_task("modadd_gpt2", {"p": 5, "n_embd": 8, "n_head": 2}, dtype=F64)
        batch = task.train
    op = HessianOperator(task.model, task.loss, batch, method="double_backward")
    return op, dense_hessian(op)


@pytest.fixture(scope="module", params=["digits_cnn", "modadd_gpt2"])
def hessian(request):
    return hessian_of(request.param)


def mv(A):
    return lambda v: A @ v


def check_against_dense(res, A, expected, tol):
    scale = np.abs(expected).max()
    got = res.eigenvalues.numpy()
    assert np.all(np.abs(got - expected) <= 1e-6 * np.maximum(np.abs(expected), 1e-3 * scale)), (got, expected)
    # reported residuals are the true ones, and small
    Y = res.eigenvectors
    true = torch.linalg.norm(A @ Y - Y * res.eigenvalues, dim=0).numpy()
    assert np.allclose(res.residuals, true, rtol=1e-6, atol=1e-13 * scale)
    assert all(res.converged) and max(res.residuals) <= tol * res.scale
    assert torch.allclose(Y.T @ Y, torch.eye(Y.shape[1], dtype=F64), atol=1e-10)
    assert len(res.betas) == len(res.alphas) - 1 == res.n_matvec - 1


def test_top5_bottom3_match_eigh(hessian):
    _, H = hessian
    exact = np.linalg.eigh(H.numpy())[0]
    top = lanczos(mv(H), H.shape[0], k=5, which="LA", tol=1e-10)
    check_against_dense(top, H, exact[::-1][:5], 1e-10)
    bottom = lanczos(mv(H), H.shape[0], k=3, which="SA", tol=1e-10)
    check_against_dense(bottom, H, exact[:3], 1e-10)
    both = lanczos(mv(H), H.shape[0], k=3, which="both", tol=1e-10)
    check_against_dense(both, H, np.concatenate([exact[::-1][:3], exact[:3]]), 1e-10)


def test_with_the_operator_counts_hvps(hessian):
    op, H = hessian
    before = op.n_hvp
    res = lanczos(op.matvec, op.dim, k=5, tol=1e-8)
    assert op.n_hvp - before == res.n_matvec < op.dim
    check_against_dense(res, H, np.linalg.eigh(H.numpy())[0][::-1][:5], 1e-8)


def rotated(diag, seed=0):
    Q, _ = torch.linalg.qr(torch.randn(len(diag), len(diag), generator=torch.Generator().manual_seed(seed),
                                       dtype=F64))
    return Q @ torch.diag(torch.tensor(diag, dtype=F64)) @ Q.T


DEGENERATE = [5.0] * 3 + [3.0] * 2 + [1.0] * 10 + [0.0] * 12 + [-2.0] * 3


@pytest.mark.parametrize("rotate", [False, True])
def test_degenerate_spectrum_multiplicities(rotate):
    A = rotated(DEGENERATE) if rotate else torch.diag(torch.tensor(DEGENERATE, dtype=F64))
    top = lanczos(mv(A), A.shape[0], k=5, which="LA")
    check_against_dense(top, A, np.array([5, 5, 5, 3, 3.0]), 1e-8)
    assert top.restarts >= 2 and 0.0 in top.betas
    bottom = lanczos(mv(A), A.shape[0], k=3, which="SA")
    check_against_dense(bottom, A, np.array([-2, -2, -2.0]), 1e-8)


def test_rank_deficient():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=F64))
    A = U @ torch.diag(torch.tensor([3.0, 2.0, 0.5, -1.0], dtype=F64)) @ U.T
    top = lanczos(mv(A), 60, k=5, which="LA")
    check_against_dense(top, A, np.array([3, 2, 0.5, 0, 0.0]), 1e-8)
    bottom = lanczos(mv(A), 60, k=3, which="SA")
    check_against_dense(bottom, A, np.array([-1, 0, 0.0]), 1e-8)
    zero = lanczos(lambda v: 0 * v, 10, k=2, which="LA")
    assert zero.eigenvalues.tolist() == [0.0, 0.0] and all(zero.converged)


def test_tiny_full_space_and_v0():
    A = rotated([4.0, 1.0, -3.0], seed=1)
    res = lanczos(mv(A), 3, k=3, which="LA", v0=torch.ones(3, dtype=F64))
    check_against_dense(res, A, np.array([4.0, 1.0, -3.0]), 1e-8)


def test_nonsymmetric_operator_is_not_reported_converged():
    """Negative control: a matvec that is not a symmetric operator must show large true residuals."""
    g = torch.Generator().manual_seed(4)
    A = rotated(list(np.linspace(-1, 5, 40)))
    B = A + 0.3 * torch.randn(40, 40, generator=g, dtype=F64).triu(1)
    res = lanczos(mv(B), 40, k=3, tol=1e-10, max_iter=25)
    assert not all(res.converged) and max(res.residuals) > 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError):
        lanczos(lambda v: v, 5, k=6)
    with pytest.raises(ValueError):
        lanczos(lambda v: v, 5, which="LM")
