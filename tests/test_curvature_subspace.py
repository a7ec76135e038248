"""Hessian restricted to the ± eigenspaces of a neuron swap, against dense float64 truth."""
import numpy as np
import torch
from torch import nn

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.subspace import EigenspaceOperator, signed_permutation
from eqlab.analyses.identities import chain_length, gamma, rounding_bound, unit_roundoff
from eqlab.analyses.transforms import Permutation

U64 = unit_roundoff(torch.float64)
TOL = 1e-10
SWAP = Permutation("swap[0<->1]", "permutation", [["0.weight", 0, [1, 0, 2, 3, 4]], ["0.bias", 0, [1, 0, 2, 3, 4]],
                                                  ["2.weight", 1, [1, 0, 2, 3, 4]]])


def model_and_batch(coincident: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    if coincident:  # hidden units 0 and 1 identical: a fixed point of the swap
        with torch.no_grad():
            model[0].weight[1] = model[0].weight[0]
            model[0].bias[1] = model[0].bias[0]
            model[2].weight[:, 1] = model[2].weight[:, 0]
    X, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 2, (24,))
    return model, (X, y)


def basis(sub):
    return torch.stack([sub.embed(e) for e in torch.eye(sub.dim, dtype=torch.float64)], dim=1)


def test_restricted_spectra_match_dense_and_split_the_spectrum_at_a_fixed_point():
    model, batch = model_and_batch(coincident=True)
    op = HessianOperator(model, nn.functional.cross_entropy, batch, method="double_backward")
    H = dense_hessian(op)
    n, hf = chain_length(model, batch), float(H.norm())
    parts = []
    for which in ("symmetric", "antisymmetric"):
        sub = EigenspaceOperator(op, SWAP, which)
        E = basis(sub)
        # float64: E's entries are 0, ±1 or a rounded ±1/√2 (≤ u each), each EᵀE entry a dim-term dot
        gram_err = (E.T @ E - torch.eye(sub.dim, dtype=torch.float64)).abs()
        assert bool((gram_err <= gamma(op.dim + 2, U64) * (E.abs().T @ E.abs())).all()), gram_err.max()
        exact = np.linalg.eigvalsh((E.T @ H @ E).numpy())
        res = lanczos(sub.matvec, sub.dim, k=3, which="LA", tol=TOL, max_iter=sub.dim)
        # Lanczos rule ‖Hv − θv‖ ≤ TOL·max|θ| ≤ TOL·‖H‖_F bounds |θ − λ| (Bauer–Fike); float64: the HVPs and the
        # dense H each ≤ 4γ_n‖H‖_F from exact, EᵀHE two dim-term products (2γ_dim), eigvalsh ≤ dim·u‖H‖_F
        bound = (TOL + 2 * rounding_bound(n, passes=4) + 2 * gamma(op.dim, U64) + op.dim * U64) * hf
        assert np.abs(res.eigenvalues.numpy() - exact[::-1][:3]).max() <= bound, (res.eigenvalues, exact, bound)
        parts.append(exact)
    # At the fixed point H commutes with T: the two restricted spectra together are all of H's.
    # float64: the computed H is T-symmetric to ≤ 4γ_n‖H‖_F (double backward), so the coupling block is that
    # small (Weyl); plus 2γ_dim per EᵀHE and dim·u‖H‖_F per eigvalsh (three of them)
    split = np.abs(np.sort(np.concatenate(parts)) - np.linalg.eigvalsh(H.numpy())).max()
    assert split <= (rounding_bound(n, passes=4) + 2 * gamma(op.dim, U64) + 3 * op.dim * U64) * hf, split


def test_off_the_fixed_point_the_restricted_spectra_do_not_split_h():
    model, batch = model_and_batch(coincident=False)
    op = HessianOperator(model, nn.functional.cross_entropy, batch, method="double_backward")
    H = dense_hessian(op)
    both = np.sort(np.concatenate([np.linalg.eigvalsh((basis(s).T @ H @ basis(s)).numpy())
                                   for s in (EigenspaceOperator(op, SWAP, w) for w in ("symmetric", "antisymmetric"))]))
    # effect-size floor (not a rounding bound): the coupling block is not zero, the spectra move by > 1e-4
    assert np.max(np.abs(both - np.linalg.eigvalsh(H.numpy()))) > 1e-4


def test_non_involutions_are_refused():
    model, batch = model_and_batch(coincident=True)
    op = HessianOperator(model, nn.functional.cross_entropy, batch, method="double_backward")
    cycle = Permutation("cycle", "permutation", [["0.bias", 0, [1, 2, 0, 3, 4]]])
    try:
        signed_permutation(op.space, cycle)
    except ValueError as e:
        assert "involution" in str(e)
    else:
        raise AssertionError("a 3-cycle was accepted as an involution")
