"""SLQ quadrature and trace estimators against dense float64 truth."""
import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.slq import gauss_quadrature, slq, tridiagonal, tridiagonals_lockstep
from eqlab.analyses.curvature.trace import hutchinson, hutchpp
from eqlab.models import build_task

F64 = torch.float64
torch.set_num_threads(1)  # tiny problems: extra threads only contend on the shared 2-core machine


@pytest.fixture(scope="module")
def gpt2():
    task = build_task("modadd_gpt2", {"p": 5, "n_embd": 8, "n_head": 2}, dtype=F64)
    op = HessianOperator(task.model, task.loss, task.train, method="double_backward")
    H = dense_hessian(op)
    return op, H, np.linalg.eigvalsh(H.numpy())


def test_gauss_rule_is_exact_for_low_degree_moments(gpt2):
    """Σ w θ^p = vᵀ H^p v / vᵀv for p ≤ 2m − 1: the defining property of the m-node Gauss rule."""
    _, H, evals = gpt2
    Hs = H / np.abs(evals).max()
    v = torch.randn(Hs.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    m = 4
    nodes, weights = gauss_quadrature(*tridiagonal(lambda x: Hs @ x, v, m))
    assert len(nodes) == m and weights.sum() == pytest.approx(1.0, abs=1e-14)
    u = v / v.norm()
    for p in range(2 * m):
        exact = float(u @ torch.linalg.matrix_power(Hs, p) @ u)
        assert np.sum(weights * nodes ** p) == pytest.approx(exact, abs=1e-12)
    # degree 2m is not integrated exactly (a negative control on the test itself)
    exact = float(u @ torch.linalg.matrix_power(Hs, 2 * m) @ u)
    assert abs(np.sum(weights * nodes ** (2 * m)) - exact) > 1e-8


def test_breakdown_gives_exact_rule_on_few_distinct_values():
    d = torch.tensor([2.0] * 5 + [-1.0] * 3 + [0.5] * 4, dtype=F64)
    v = torch.ones(12, dtype=F64)
    nodes, weights = gauss_quadrature(*tridiagonal(lambda x: d * x, v, 10))
    assert np.allclose(nodes, [-1.0, 0.5, 2.0], atol=1e-12)
    assert np.allclose(weights, [3 / 12, 4 / 12, 5 / 12], atol=1e-12)


def test_lockstep_probes_equal_sequential_probes(gpt2):
    """One matmat per step for all probes gives the same tridiagonals as probe after probe."""
    op, H, _ = gpt2
    seq = slq(op.matvec, op.dim, steps=25, probes=3, seed=4)
    calls = []
    lock = slq(None, op.dim, steps=25, probes=3, seed=4, matmat=lambda V: calls.append(V.shape[1]) or op.matmat(V))
    assert lock.n_matvec == seq.n_matvec == 75 and calls == [3] * 25
    for a, b, c, d in zip(seq.alphas, seq.betas, lock.alphas, lock.betas):
        assert np.allclose(a, c, rtol=1e-9, atol=1e-12 * abs(max(a, key=abs))) and np.allclose(b, d, rtol=1e-9)
    # probes that break down early leave the active set; the others go on
    d = torch.tensor([2.0] * 5 + [-1.0] * 3 + [0.5] * 4, dtype=F64)
    V = torch.stack([torch.ones(12, dtype=F64), torch.eye(12, dtype=F64)[0],
                     torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=F64)], dim=1)
    widths = []
    alphas, betas, n = tridiagonals_lockstep(lambda X: widths.append(X.shape[1]) or d[:, None] * X, V, 10)
    assert [len(a) for a in alphas] == [3, 1, 3] and widths == [3, 2, 2] and n == 7
    for p in range(3):
        ref = tridiagonal(lambda x: d * x, V[:, p], 10)
        assert np.allclose(alphas[p], ref[0], atol=1e-12) and np.allclose(betas[p], ref[1], atol=1e-12)


def test_slq_density_cdf_and_trace(gpt2):
    op, H, evals = gpt2
    res = slq(op.matvec, op.dim, steps=40, probes=8, seed=1)
    assert res.n_matvec == 8 * 40 and len(res.alphas) == 8
    lo, hi = evals[0], evals[-1]
    grid = np.linspace(lo - 1, hi + 1, 4001)
    exact_cdf = np.searchsorted(evals, grid, side="right") / len(evals)
    w1 = np.sum(np.abs(res.cdf(grid) - exact_cdf)) * (grid[1] - grid[0])
    assert w1 <= 0.005 * (hi - lo), w1 / (hi - lo)  # measured 5e-4
    dens = res.density(grid, sigma=0.05 * (hi - lo))
    assert np.sum(dens) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-3)
    tr = float(np.sum(evals))
    assert abs(res.trace() - tr) <= 0.2 * np.sqrt(np.sum(evals ** 2))  # MC error ~ ‖H‖_F·√(2/probes)


def test_hutchinson_exact_on_diagonal_and_hutchpp_exact_on_low_rank():
    d = torch.linspace(-2, 7, 50, dtype=F64)
    assert hutchinson(lambda v: d * v, 50, n_matvec=3).estimate == pytest.approx(float(d.sum()), abs=1e-12)
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=F64))
    A = U @ torch.diag(torch.tensor([9.0, 4.0, -3.0, 1.0], dtype=F64)) @ U.T
    est = hutchpp(lambda v: A @ v, 60, n_matvec=15, matmat=lambda X: A @ X)
    assert est.estimate == pytest.approx(11.0, abs=1e-10) and est.n_matvec == 15


def test_trace_estimators_on_a_hessian(gpt2):
    op, H, evals = gpt2
    tr, fro = float(np.sum(evals)), float(np.sqrt(np.sum(evals ** 2)))
    h = hutchinson(op.matvec, op.dim, n_matvec=60, seed=2)
    hp = hutchpp(op.matvec, op.dim, n_matvec=60, seed=2, matmat=op.matmat)
    offdiag = float(np.sqrt(2 * (fro ** 2 - float((torch.diag(H) ** 2).sum())) / 60))  # Hutchinson's std
    assert abs(h.estimate - tr) <= 4 * offdiag
    assert abs(hp.estimate - tr) <= 4 * offdiag
    assert h.std_error == pytest.approx(offdiag, rel=0.5)


def test_probe_path_is_a_rule_on_the_operator_and_both_paths_agree(gpt2):
    """In one process the probes run one after another even when a matmat is offered (the matmat is
    never called); only a multi-column product, or an explicit lockstep=True, runs them in lockstep.
    The rule decides the path, never the result: same probes, same tridiagonals to rounding."""
    op, _, _ = gpt2
    widths = []

    def matmat(V):
        widths.append(V.shape[1])
        return op.matmat(V)

    seq = slq(op.matvec, op.dim, steps=10, probes=3, seed=7, matmat=matmat)
    assert seq.path == "sequential" and "this process" in seq.path_reason and widths == []
    forced = slq(op.matvec, op.dim, steps=10, probes=3, seed=7, matmat=matmat, lockstep=True)
    assert forced.path == "lockstep" and forced.path_reason == "given" and widths == [3] * 10
    only = slq(None, op.dim, steps=10, probes=3, seed=7, matmat=op.matmat)
    assert only.path == "lockstep" and "only a multi-column" in only.path_reason
    assert seq.n_matvec == forced.n_matvec == only.n_matvec == 30
    for res in (forced, only):
        for a, b, c, d in zip(seq.alphas, seq.betas, res.alphas, res.betas):
            # same Krylov recurrence in float64: agreement to ≈ steps·dim·eps relative to the largest |α|
            scale = max(abs(x) for x in a)
            assert np.allclose(a, c, rtol=0, atol=10 * op.dim * 2.0 ** -52 * scale)
            assert np.allclose(b, d, rtol=0, atol=10 * op.dim * 2.0 ** -52 * scale)
    with pytest.raises(ValueError, match="lockstep=True needs a matmat"):
        slq(op.matvec, op.dim, steps=2, probes=1, lockstep=True)
    with pytest.raises(ValueError, match="lockstep=False needs a matvec"):
        slq(None, op.dim, steps=2, probes=1, matmat=op.matmat, lockstep=False)


def test_trace_columns_follow_the_same_rule_and_the_estimate_does_not_depend_on_it(gpt2):
    op, H, _ = gpt2
    widths = []

    def matmat(V):
        widths.append(V.shape[1])
        return op.matmat(V)

    one_by_one = hutchpp(op.matvec, op.dim, n_matvec=12, seed=3, matmat=matmat)
    assert one_by_one.path == "sequential" and widths == []
    together = hutchpp(op.matvec, op.dim, n_matvec=12, seed=3, matmat=matmat, lockstep=True)
    assert together.path == "lockstep" and widths == [4, 4, 4]
    only = hutchinson(None, op.dim, n_matvec=5, seed=3, matmat=op.matmat)
    assert only.path == "lockstep" and only.n_matvec == 5
    # the same random vectors, so only product rounding differs: ‖ΔHz‖ ≤ dim·eps·‖H‖_F·‖z‖ (γ_dim), and
    # ‖z‖² = dim for a Rademacher sample (≤ dim·eps·‖H‖_F·dim each), 1 for the 4 sketch columns
    fro = float(torch.linalg.matrix_norm(H))
    tol = op.dim * 2.0 ** -52 * fro * (op.dim + 4)
    assert abs(one_by_one.estimate - together.estimate) <= tol
