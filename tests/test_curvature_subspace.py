"""Hessian restricted to the ± eigenspaces of a neuron swap, against dense float64 truth."""
import numpy as np
import torch
from torch import nn

from analyses.curvature.dense import dense_hessian
from analyses.curvature.lanczos import lanczos
from analyses.curvature.operator import HessianOperator
from analyses.curvature.subspace import EigenspaceOperator, signed_permutation
from analyses.transforms import Permutation

torch.set_num_threads(1)
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
    parts = []
    for which in ("symmetric", "antisymmetric"):
        sub = EigenspaceOperator(op, SWAP, which)
        E = basis(sub)
        assert torch.allclose(E.T @ E, torch.eye(sub.dim, dtype=torch.float64), atol=1e-14)
        exact = np.linalg.eigvalsh((E.T @ H @ E).numpy())
        res = lanczos(sub.matvec, sub.dim, k=3, which="LA", tol=1e-10, max_iter=sub.dim)
        assert np.allclose(res.eigenvalues.numpy(), exact[::-1][:3], rtol=1e-8, atol=1e-12)
        parts.append(exact)
    # At the fixed point H commutes with T: the two restricted spectra together are all of H's.
    assert np.allclose(np.sort(np.concatenate(parts)), np.linalg.eigvalsh(H.numpy()), atol=1e-10)


def test_off_the_fixed_point_the_restricted_spectra_do_not_split_h():
    model, batch = model_and_batch(coincident=False)
    op = HessianOperator(model, nn.functional.cross_entropy, batch, method="double_backward")
    H = dense_hessian(op)
    both = np.sort(np.concatenate([np.linalg.eigvalsh((basis(s).T @ H @ basis(s)).numpy())
                                   for s in (EigenspaceOperator(op, SWAP, w) for w in ("symmetric", "antisymmetric"))]))
    assert np.max(np.abs(both - np.linalg.eigvalsh(H.numpy()))) > 1e-4  # the coupling block is not zero


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
