"""Rows 12, 13, 15, 16: exact spectral consequences at every θ, each with a control that must fail."""
import torch

from analyses.discover import discover, negative_controls
from analyses.predictions.spectral import (alignment, discrete_spectrum, indefiniteness, scale_invariant_sums,
                                           zero_modes)
from analyses.transforms import GroupElement, Permutation, ScaleFamily
from models.losses import cross_entropy
from models.toy_mlp import MLP, toy_batch
from models.toy_norm import NormMLP

torch.set_num_threads(1)
S = ["fc1.weight", "fc1.bias"]


def _ln(eps=0.0):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, "ln", eps, "tanh").double(), toy_batch((4, 6, 3), n=16)


def _scale(names, expected=True):
    return ScaleFamily("scale", "ln_scale", [[[n, None, None, 1.0] for n in names]], expected=expected)


def test_row15_alignment_per_eigenpair_and_scale_invariant_sums():
    m, b = _ln()
    a = alignment(m, cross_entropy, b, _scale(S))
    assert a.residual < 1e-12 and a.details["worst_pair"] < 1e-10, a
    s1, s2 = scale_invariant_sums(m, cross_entropy, b, S)
    assert s1.residual < 1e-12 and s2.residual < 1e-12 and s2.predicted > 1e-2, (s1, s2)
    # control: the output layer is homogeneous, not invariant — the relation fails by O(1)
    bad = alignment(m, cross_entropy, b, _scale(["fc2.weight", "fc2.bias"], expected=False))
    assert bad.residual > 0.3, bad
    c1, c2 = scale_invariant_sums(m, cross_entropy, b, ["fc2.weight", "fc2.bias"])
    assert c1.residual > 0.1 and c2.residual > 1e-3, (c1, c2)   # (c2 happens to be only ~6e-3 here)


def test_row15_relu_rescale_alignment():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    rescale = next(t for t in discover(m, cross_entropy, b).verified if t.family == "relu_rescale")
    c = torch.randn(rescale.n_generators, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert alignment(m, cross_entropy, b, rescale, c).residual < 1e-12
    torch.manual_seed(0)
    g = MLP((4, 5, 3), "gelu").double()             # the same "rescale" on GELU: not a symmetry
    assert alignment(g, cross_entropy, b, rescale, c).residual > 1e-2


def test_row16_indefinite_with_balanced_theta_S_mass():
    m, b = _ln()
    bal, lmin = indefiniteness(m, cross_entropy, b, S)
    assert bal.residual < 1e-12 and bal.details["grad_S_sq"] > 1e-2, bal
    assert lmin.measured < lmin.predicted < 0 and lmin.residual == 0, lmin     # λ_min ≤ −‖g_S‖²/(λ_max‖θ_S‖²)
    # controls: eps > 0 breaks the balance by ~eps/Var (linear in eps); a non-invariant block by O(1)
    viol = {}
    for eps in (1e-5, 1e-4):
        me, _ = _ln(eps)
        viol[eps] = indefiniteness(me, cross_entropy, b, S)[0].residual
    assert 1e-6 < viol[1e-5] < 1e-4 and 9 < viol[1e-4] / viol[1e-5] < 11, viol   # measured ≈ 1.19·eps
    assert indefiniteness(m, cross_entropy, b, ["fc2.weight", "fc2.bias"])[0].residual > 0.1


def test_row13_zero_modes_explicit_vectors():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    d = discover(m, cross_entropy, b)
    fams = [t for t in d.verified if t.kind == "continuous"]
    z = zero_modes(m, cross_entropy, b, fams + negative_controls(m, cross_entropy, b))
    # Rayleigh quotients of every symmetry vector equal −⟨Aθ, Aᵀg⟩/‖Aθ‖² exactly (here: not a critical point)
    assert z["rayleigh"].residual < 1e-12, z
    # softmax translation: 5 weight columns + bias = 6 independent exact null vectors at this θ
    assert z["rank_translations"] == 6 and z["translation_null"].residual < 1e-14, z
    assert z["n_zero_dense"] >= z["rank_translations"] and z["count"].residual == 0
    assert z["rank_all"] == 6 + 5                  # + one rescale per hidden unit, independent of the shifts
    assert z["control_rayleigh"] > 1e-2, z         # declared non-symmetries: the prediction fails


def test_row12_orthogonal_symmetry_preserves_the_spectrum():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    d = discover(m, cross_entropy, b)
    perm = next(t for t in d.verified if isinstance(t, Permutation))
    dense, top, cong = discrete_spectrum(m, cross_entropy, b, perm)
    assert dense.residual < 1e-13 and top.residual < 1e-12 and cong.residual < 1e-13, (dense, top)
    assert dense.details["orthogonality"] == 0
    # control: a finite ReLU rescale is a symmetry and a congruence, but not orthogonal — spectrum moves
    rs = next(t for t in d.verified if t.family == "relu_rescale")
    d2, t2, c2 = discrete_spectrum(m, cross_entropy, b, GroupElement(rs, torch.ones(rs.n_generators), 0.7))
    assert c2.residual < 1e-13 and d2.residual > 0.1 and t2.residual > 0.1, (d2, t2)
    # control: permuting only the incoming rows is not a symmetry at all (no congruence either)
    half = Permutation("rows_only", "permutation", [["net.0.weight", 0, [1, 0, 2, 3, 4]],
                                                    ["net.0.bias", 0, [1, 0, 2, 3, 4]]], expected=False)
    d3, _, c3 = discrete_spectrum(m, cross_entropy, b, half)
    assert c3.residual > 1e-2 and d3.residual > 1e-3, (d3, c3)
