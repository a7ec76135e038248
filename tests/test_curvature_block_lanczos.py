"""Block Lanczos against dense float64 eigh: exact multiplicities, embedded in generic spectra."""
import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.backend import LocalBackend
from eqlab.analyses.curvature.block_lanczos import block_lanczos
from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.models.toy_mlp import MLP

F64 = torch.float64
torch.set_num_threads(1)


def clusters(ev, rtol=1e-8):
    """Sizes of groups of equal eigenvalues in ``ev`` (sorted), relative gap ``rtol``."""
    scale, out, i = np.abs(ev).max(), [], 0
    while i < len(ev):
        j = i
        while j + 1 < len(ev) and abs(ev[j + 1] - ev[i]) <= rtol * scale:
            j += 1
        out += [j - i + 1] * (j - i + 1)
        i = j + 1
    return out


def check(res, A, expected, tol):
    scale = np.abs(expected).max()
    got = res.eigenvalues.numpy()
    assert np.abs(got - expected).max() <= 1e-8 * scale, (got, expected)
    Y = res.eigenvectors
    true = torch.linalg.norm(A @ Y - Y * res.eigenvalues, dim=0).numpy()
    assert np.allclose(res.residuals, true, rtol=1e-6, atol=1e-13 * scale)
    assert all(res.converged) and max(res.residuals) <= tol * res.scale
    assert torch.allclose(Y.T @ Y, torch.eye(Y.shape[1], dtype=F64), atol=1e-10)


def embedded(n=150, seed=0):
    """A generic spectrum in [-2, 5] with exact multiplicities 3 (at 7), 2 (at 6.3) and 2 (at -3)."""
    rng = np.random.default_rng(seed)
    d = np.concatenate([[7.0] * 3, [6.3] * 2, rng.uniform(-2, 5, n - 7), [-3.0] * 2])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return Q @ torch.diag(torch.tensor(d, dtype=F64)) @ Q.T


@pytest.mark.parametrize("which,k,b", [("LA", 5, 4), ("SA", 3, 3), ("both", 3, 3)])
def test_embedded_multiplicities_match_eigh(which, k, b):
    A = embedded()
    ev = np.linalg.eigvalsh(A.numpy())
    expected = {"LA": ev[::-1][:k], "SA": ev[:k], "both": np.concatenate([ev[::-1][:k], ev[:k]])}[which]
    res = block_lanczos(lambda X: A @ X, A.shape[0], k=k, block_size=b, which=which, tol=1e-10)
    check(res, A, expected, 1e-10)
    truth = dict(zip(np.round(ev, 9), clusters(ev)))
    assert res.multiplicities == [truth[round(x, 9)] for x in expected]
    assert res.n_matvec < A.shape[0] and res.n_matvec % b == 0
    assert res.multiplicity_limited == any(m >= b for m in res.multiplicities)


def test_multiplicity_above_block_size_is_flagged():
    A = embedded()
    res = block_lanczos(lambda X: A @ X, A.shape[0], k=2, block_size=2, tol=1e-10)
    assert res.eigenvalues.tolist() == pytest.approx([7.0, 7.0], abs=1e-9)
    assert res.multiplicity_limited  # 2 copies of a triple value found: "≥ 2" is all it can say


def test_invariant_subspaces_low_rank_and_full_space():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=F64))
    A = U @ torch.diag(torch.tensor([3.0, 2.0, 0.5, -1.0], dtype=F64)) @ U.T
    res = block_lanczos(lambda X: A @ X, 60, k=6, block_size=3, tol=1e-10)
    check(res, A, np.array([3, 2, 0.5, 0, 0, 0.0]), 1e-10)
    assert res.restarts >= 1  # the residual block lost rank: columns were replaced at random
    D = torch.diag(torch.tensor([4.0, 1.0, -3.0, 2.0, 2.0], dtype=F64))
    full = block_lanczos(lambda X: D @ X, 5, k=5, block_size=2, tol=1e-10)  # last block is narrower
    check(full, D, np.array([4, 2, 2, 1, -3.0]), 1e-10)
    assert full.n_matvec == 5


def symmetric_mlp(r=4, copies=3, din=5, dout=3, seed=0):
    """An MLP whose hidden units come in 3 identical groups: S_3 permuting the groups fixes the point,
    so the Hessian commutes with it and its 2-dimensional irrep makes eigenvalues exactly double."""
    g = torch.Generator().manual_seed(seed)
    model = MLP((din, copies * r, dout), activation="tanh").double()
    A, c = torch.randn(r, din, generator=g, dtype=F64), 0.3 * torch.randn(r, generator=g, dtype=F64)
    B = torch.randn(dout, r, generator=g, dtype=F64)
    with torch.no_grad():
        model.net[0].weight.copy_(A.repeat(copies, 1))
        model.net[0].bias.copy_(c.repeat(copies))
        model.net[2].weight.copy_(B.repeat(1, copies) / copies)
    X, y = torch.randn(64, din, generator=g, dtype=F64), torch.randint(0, dout, (64,), generator=g)
    return HessianOperator(model, torch.nn.functional.cross_entropy, (X, y), method="double_backward")


def test_symmetry_induced_degeneracy_on_a_real_model():
    op = symmetric_mlp()
    H = dense_hessian(op)
    ev = np.linalg.eigvalsh(H.numpy())[::-1]
    k = 8
    sizes = clusters(ev)[:k]
    assert sizes[6:8] == [2, 2] and sum(s == 2 for s in clusters(ev)) >= 40  # verified on dense first
    res = block_lanczos(op.matmat, op.dim, k=k, block_size=3, tol=1e-10)
    check(res, H, ev[:k], 1e-10)
    assert res.multiplicities == sizes
    # control: single-vector Lanczos without verification returns the double value only once
    single = lanczos(lambda v: H @ v, op.dim, k=k, tol=1e-10, verify=False)
    assert np.abs(single.eigenvalues.numpy()[7] - ev[7]) > 1e-3
    # with its verification block (an independent start) no pair it calls converged is wrong
    verified = lanczos(lambda v: H @ v, op.dim, k=k, tol=1e-10, warn=False)
    err = np.abs(verified.eigenvalues.numpy() - ev[:k])
    assert all(e <= b for e, b, c in zip(err, verified.errors, verified.converged) if c)


def test_local_backend_is_the_default_and_bad_arguments():
    A = embedded(60)
    a = block_lanczos(lambda X: A @ X, 60, k=3, block_size=2, tol=1e-10)
    b = block_lanczos(backend=LocalBackend(60, matmat=lambda X: A @ X), k=3, block_size=2, tol=1e-10)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    c = lanczos(None, 60, k=3, tol=1e-10, backend=LocalBackend(60, matvec=lambda v: A @ v))
    # a triple top eigenvalue: blocks of 2 see it twice (flagged multiplicity_limited); single-vector Lanczos
    # with its verification blocks finds all three copies (dense truth)
    assert a.multiplicity_limited
    exact = np.linalg.eigvalsh(A.numpy())[::-1][:3]
    assert np.allclose(c.eigenvalues.numpy(), exact, rtol=1e-9) and all(c.converged)
    with pytest.raises(ValueError):
        block_lanczos(lambda X: X, 5, k=6)
    with pytest.raises(ValueError):
        block_lanczos(lambda X: X, 5, block_size=0)
    with pytest.raises(ValueError):
        block_lanczos(lambda X: X, 5, which="LM")
