"""Rows 12, 13, 15, 16: exact spectral consequences at every θ, each with a control that must fail."""
import torch

from eqlab.analyses.discover import discover, negative_controls
from eqlab.analyses.identities import chain_length, gamma, rounding_bound, unit_roundoff
from eqlab.analyses.predictions import dense_at
from eqlab.analyses.predictions._common import generator, grad_dict, with_params
from eqlab.analyses.predictions.spectral import (_matrix_of, alignment, discrete_spectrum, indefiniteness,
                                           scale_invariant_sums, zero_modes)
from eqlab.analyses.transforms import GroupElement, Permutation, ScaleFamily
from eqlab.models.losses import cross_entropy
from eqlab.models.toy_mlp import MLP, toy_batch
from eqlab.models.toy_norm import NormMLP

S = ["fc1.weight", "fc1.bias"]
U = unit_roundoff(torch.float64)


class _Sizes:
    """The rounding model's sizes at one θ (float64): n, dim, the dense H's ‖H‖_F and λ_max = max|λ|, and
    e_H = (4γ_n + dim·u)‖H‖_F: how far the computed H (4 passes of n-term sums) and its eigh (backward stable:
    the exact decomposition of a matrix within dim·u‖H‖_F) can be from the exact H, in spectral norm."""

    def __init__(self, model, loss, batch):
        self.D = dense_at(model, loss, batch)
        self.n, self.dim = chain_length(model, batch), self.D.H.shape[0]
        self.hf, self.lmax = float(self.D.H.norm()), self.D.lam_max
        self.g_dim = gamma(self.dim + 3, U)       # a dim-term dot / product with U, plus a square or two
        self.e_H = (rounding_bound(self.n, passes=4) + self.dim * U) * self.hf

    def alignment_bound(self, model, loss, batch, t, c, p):
        """‖a − b‖ ≤ (2γ_n + γ_dim)‖Aᵀg‖ (the VJP, then Uᵀ) + e_H‖Aθ‖ (λ_i u_i exact for H + ΔH) + γ_dim‖b‖."""
        theta = {k: v.detach().double() for k, v in model.named_parameters()}
        xi, atg = generator(t, theta, grad_dict(model, loss, batch), c)
        nxi, natg = float(self.D.flat(xi).norm()), float(self.D.flat(atg).norm())
        err = (rounding_bound(self.n, passes=2) + self.g_dim) * natg + self.e_H * nxi + self.g_dim * p.predicted
        return err / max(p.measured, p.predicted)

    def mass_bound(self, model, S_):
        """|Σλ_i w_i| (exactly θ_SᵀHθ_S = 0) ≤ e_H‖θ_S‖² + γ_dim·Σ|λ_i|w_i, over Σ|λ_i|w_i."""
        th = self.D.flat({k: v.detach().double() for k, v in model.named_parameters() if k in S_})
        return lambda abs_mass: self.e_H * float(th @ th) / abs_mass + self.g_dim, float(th.norm())


def _ln(eps=0.0):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, "ln", eps, "tanh").double(), toy_batch((4, 6, 3), n=16)


def _scale(names, expected=True):
    return ScaleFamily("scale", "ln_scale", [[[n, None, None, 1.0] for n in names]], expected=expected)


def test_row15_alignment_per_eigenpair_and_scale_invariant_sums():
    m, b = _ln()
    z = _Sizes(m, cross_entropy, b)
    t = _scale(S)
    a = alignment(m, cross_entropy, b, t)
    tol = z.alignment_bound(m, cross_entropy, b, t, torch.ones(t.n_generators, dtype=torch.float64), a)
    # worst_pair: each kept pair's scale is ≥ 1e-6·max_i scale_i ≥ 1e-6·max(‖a‖, ‖b‖)/√dim
    assert a.residual <= tol and a.details["worst_pair"] <= tol * 1e6 * z.dim ** 0.5, (a, tol)
    s1, s2 = scale_invariant_sums(m, cross_entropy, b, S)
    b1, th_norm = z.mass_bound(m, S)
    # Σλ²w = ‖Hθ_S‖² (2 e_H‖θ_S‖ relative to its root) vs ‖g_S‖² (2·2γ_n, a square and a dim-term sum)
    b2 = 2 * z.e_H * th_norm / max(s2.measured, s2.predicted) ** 0.5 + 2 * rounding_bound(z.n, passes=2) + 2 * z.g_dim
    assert s1.residual <= b1(s1.details["abs_mass"]) and s2.residual <= b2 and s2.predicted > 1e-2, (s1, s2)
    # control: the output layer is homogeneous, not invariant — the relation fails by O(1) (effect-size floors)
    bad = alignment(m, cross_entropy, b, _scale(["fc2.weight", "fc2.bias"], expected=False))
    assert bad.residual > 0.3, bad
    c1, c2 = scale_invariant_sums(m, cross_entropy, b, ["fc2.weight", "fc2.bias"])
    assert c1.residual > 0.1 and c2.residual > 1e-3, (c1, c2)   # (c2 happens to be only ~6e-3 here)


def test_row15_relu_rescale_alignment():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    rescale = next(t for t in discover(m, cross_entropy, b).verified if t.family == "relu_rescale")
    c = torch.randn(rescale.n_generators, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = alignment(m, cross_entropy, b, rescale, c)
    assert a.residual <= _Sizes(m, cross_entropy, b).alignment_bound(m, cross_entropy, b, rescale, c, a), a
    torch.manual_seed(0)
    g = MLP((4, 5, 3), "gelu").double()             # the same "rescale" on GELU: not a symmetry
    assert alignment(g, cross_entropy, b, rescale, c).residual > 1e-2    # effect-size floor


def test_row16_indefinite_with_balanced_theta_S_mass():
    m, b = _ln()
    bal, lmin = indefiniteness(m, cross_entropy, b, S)
    b1, _ = _Sizes(m, cross_entropy, b).mass_bound(m, S)
    # |neg − pos| = |Σλw| (the mass bound) and max(neg, pos) ≥ Σ|λ|w/2
    assert bal.residual <= 2 * b1(bal.measured + bal.predicted) and bal.details["grad_S_sq"] > 1e-2, bal
    # residual is max(0, ·): exactly 0 once λ_min ≤ −‖g_S‖²/(λ_max‖θ_S‖²), which here holds by a wide margin
    assert lmin.measured < lmin.predicted < 0 and lmin.residual == 0, lmin
    # controls: eps > 0 breaks the balance by ~eps/Var (linear in eps); a non-invariant block by O(1)
    viol = {}
    for eps in (1e-5, 1e-4):
        me, _ = _ln(eps)
        viol[eps] = indefiniteness(me, cross_entropy, b, S)[0].residual
    assert 1e-6 < viol[1e-5] < 1e-4 and 9 < viol[1e-4] / viol[1e-5] < 11, viol   # effect ≈ 1.19·eps, not rounding
    assert indefiniteness(m, cross_entropy, b, ["fc2.weight", "fc2.bias"])[0].residual > 0.1


def test_row13_zero_modes_explicit_vectors():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    d = discover(m, cross_entropy, b)
    fams = [t for t in d.verified if t.kind == "continuous"]
    z = zero_modes(m, cross_entropy, b, fams + negative_controls(m, cross_entropy, b))
    sz = _Sizes(m, cross_entropy, b)
    hr = sz.hf / sz.lmax
    # Rayleigh quotients of every symmetry vector equal −⟨Aθ, Aᵀg⟩/‖Aθ‖² exactly (here: not a critical point);
    # float64: vᵀHv within (4γ_n + 2γ_dim)‖H‖_F‖v‖², vᵀAᵀg within (2γ_n + γ_dim)‖v‖‖Aᵀg‖, ‖Aᵀg‖ = ‖Hv‖ ≤ λ_max‖v‖
    ray_tol = (rounding_bound(sz.n, passes=4) + 2 * sz.g_dim) * hr + rounding_bound(sz.n, passes=2) + sz.g_dim
    assert z["rayleigh"].residual <= ray_tol, (z, ray_tol)
    # softmax translation: 5 weight columns + bias = 6 independent exact null vectors at this θ;
    # float64: Hv = 0 exactly, the computed one ≤ (4γ_n + γ_dim)‖H‖_F‖v‖
    assert z["rank_translations"] == 6 and z["translation_null"].residual <= (rounding_bound(sz.n, passes=4)
                                                                               + sz.g_dim) * hr, z
    # integer counts: exact comparisons
    assert z["n_zero_dense"] >= z["rank_translations"] and z["count"].residual == 0
    assert z["rank_all"] == 6 + 5                  # + one rescale per hidden unit, independent of the shifts
    assert z["control_rayleigh"] > 1e-2, z         # declared non-symmetries fail (effect-size floor)


def test_row12_orthogonal_symmetry_preserves_the_spectrum():
    torch.manual_seed(0)
    m, b = MLP((4, 5, 3)).double(), toy_batch((4, 5, 3), n=16)
    d = discover(m, cross_entropy, b)
    perm = next(t for t in d.verified if isinstance(t, Permutation))
    dense, top, cong = discrete_spectrum(m, cross_entropy, b, perm)
    sz = _Sizes(m, cross_entropy, b)
    # float64: both spectra within e_H of exact (Weyl), in units of λ_max; Lanczos (tol = 1e-12 on the dense H)
    # adds ≤ 1e-12·max|θ| ≤ 1e-12·λ_max per side; Tθ is a bitwise copy (a permutation)
    spec_tol = 2 * sz.e_H / sz.lmax
    assert dense.residual <= spec_tol and top.residual <= spec_tol + 2e-12, (dense, top, spec_tol)
    assert cong.residual <= _congruence_bound(sz, perm, m, cross_entropy, b), cong
    assert dense.details["orthogonality"] == 0     # a 0/1 permutation matrix: MᵀM is computed exactly
    # control: a finite ReLU rescale is a symmetry and a congruence, but not orthogonal — spectrum moves
    rs = next(t for t in d.verified if t.family == "relu_rescale")
    el = GroupElement(rs, torch.ones(rs.n_generators), 0.7)
    d2, t2, c2 = discrete_spectrum(m, cross_entropy, b, el)
    assert c2.residual <= _congruence_bound(sz, el, m, cross_entropy, b), c2
    assert d2.residual > 0.1 and t2.residual > 0.1, (d2, t2)      # effect-size floors
    # control: permuting only the incoming rows is not a symmetry at all (no congruence either)
    half = Permutation("rows_only", "permutation", [["net.0.weight", 0, [1, 0, 2, 3, 4]],
                                                    ["net.0.bias", 0, [1, 0, 2, 3, 4]]], expected=False)
    d3, _, c3 = discrete_spectrum(m, cross_entropy, b, half)
    assert c3.residual > 1e-2 and d3.residual > 1e-3, (d3, c3)    # effect-size floors


def _congruence_bound(sz, T, model, loss, batch):
    """rel(H(Tθ), M^{-T}H(θ)M^{-1}): each H within 4γ_n‖H‖_F (+u: Tθ rounded), mapped through M^{-1} (‖M^{-1}‖²),
    two dim-term products (2γ_dim) and inv (≤ dim·u·κ(M)), relative to ‖H(Tθ)‖_F."""
    M = _matrix_of(T, sz.D)
    s = torch.linalg.svdvals(M)
    kappa, minv2 = float(s.max() / s.min()), float(1 / s.min()) ** 2
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    hb = float(dense_at(with_params(model, T.apply({n: theta[n] for n in T.params})), loss, batch).H.norm())
    rb = rounding_bound(sz.n + 1, passes=4)
    return (rb + 2 * sz.g_dim + sz.dim * U * kappa) * minv2 * sz.hf / hb + rb
