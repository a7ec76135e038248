"""Rows 17, 5c/R5-WD, 6c, 8, 9c, 11b: weight decay, critical points (reached by L-BFGS), interpolation."""
import copy

import torch

from eqlab.analyses.identities import chain_length, gamma, rounding_bound, unit_roundoff
from eqlab.analyses.predictions import dense_at, to_critical_point
from eqlab.analyses.predictions.critical import (gl_modes, gl_step_law, permutation_point, radial_sharpness, split_unit,
                                           wd_eigenvector, wd_radial)
from eqlab.analyses.transforms import GLFamily, ScaleFamily
from eqlab.models.losses import cross_entropy, squared_error
from eqlab.models.toy_mlp import MLP, toy_batch
from eqlab.models.toy_norm import Factorised, NormMLP, TinyAttention

GAMMA = 1e-2
U = unit_roundoff(torch.float64)


def _quad_err(model, loss, batch, gamma_=0.0):
    """float64: |Δ(vᵀHv/‖v‖²)| ≤ (4γ_n + 2γ_dim)‖H‖_F: H 4 passes of n-term sums, two dim-term products."""
    D = dense_at(model, loss, batch, gamma=gamma_)
    return (rounding_bound(chain_length(model, batch), passes=4) + 2 * gamma(D.H.shape[0] + 1, U)) * float(D.H.norm()), D
GL = GLFamily("gl", "deep_linear", [[["V.weight", 0, [0, 1, 2], "M"], ["U.weight", 1, [0, 1, 2], "-MT"]]])
# the ReLU-rescale generator of hidden unit 0 (diag(+1 on row 0 of V, −1 on column 0 of U)): symmetric A
RESCALE = ScaleFamily("rescale", "relu_rescale", [[["V.weight", 0, [0], 1.0], ["U.weight", 1, [0], -1.0]]])
WRONG = ScaleFamily("wrong", "relu_rescale", [[["V.weight", 0, [0], 1.0], ["U.weight", 1, [1], -1.0]]],
                    expected=False)


def test_row17_wd_radial_rayleigh_is_gamma_at_every_theta():
    torch.manual_seed(0)
    m, b = NormMLP(4, 6, 3, "ln", 0.0, "tanh").double(), toy_batch((4, 6, 3), n=16)
    err, _ = _quad_err(m, cross_entropy, b, GAMMA)
    # residual |ρ − γ|/γ: the Rayleigh quotient's rounding over γ
    assert wd_radial(m, cross_entropy, b, ["fc1.weight", "fc1.bias"], GAMMA).residual <= err / GAMMA
    # effect-size floors below (not rounding bounds): not invariant; eps > 0 breaks it by ~eps/Var
    assert wd_radial(m, cross_entropy, b, ["fc2.weight", "fc2.bias"], GAMMA).residual > 1.0   # not invariant
    torch.manual_seed(0)
    me = NormMLP(4, 6, 3, "ln", 1e-4, "tanh").double()                                         # eps > 0
    assert 1e-4 < wd_radial(me, cross_entropy, b, ["fc1.weight", "fc1.bias"], GAMMA).residual < 1e-1


def _linear_at_critical_point():
    torch.manual_seed(0)
    m, b = Factorised(4, 3, 2).double(), toy_batch((4, 3, 2), n=16, classes=False)
    early = copy.deepcopy(m)
    gn = to_critical_point(m, squared_error, b, gamma=GAMMA, max_iter=300)
    return m, early, b, gn


def test_row5c_and_r5_wd_eigenvalues_2gamma_and_0_at_a_critical_point():
    m, early, b, gn = _linear_at_critical_point()
    assert gn < 1e-7                    # L-BFGS convergence target (how critical the point is), not rounding
    c = torch.ones(1, dtype=torch.float64)
    p = wd_eigenvector(m, squared_error, b, RESCALE, c, GAMMA)
    # error is exactly ‖Aᵀg_γ‖/(γ‖Aθ‖) = O(‖g_γ‖): here ~7e-7 relative to γ (< 1e-5: the critical-point
    # approximation's size at ‖g_γ‖ < 1e-7, not rounding); residual vs bound agree to a relative 1e-3
    assert p.predicted == 2 * GAMMA and p.residual < 1e-5 and abs(p.residual - p.bound) <= 1e-3 * p.bound, p
    modes = gl_modes(m, squared_error, b, GL, GAMMA)
    assert len(modes) == 9 and {q.predicted for q in modes} == {0.0, 2 * GAMMA}
    assert sum(q.predicted == 0.0 for q in modes) == 3                      # antisymmetric M: rotations
    assert all(q.residual < 1e-5 and q.residual <= 1.001 * q.bound for q in modes), modes  # (as above)
    # controls: off the critical point the error is the (large) ‖Aᵀg_γ‖ term; a wrong pairing is not a symmetry
    off = wd_eigenvector(early, squared_error, b, RESCALE, c, GAMMA)
    # off the critical point residual = bound exactly (H_γv − μv = −Aᵀg_γ); float64: H_γv within err·‖v‖
    # (err/γ in these units), Aᵀg_γ within 2γ_n of its norm
    err, _ = _quad_err(early, squared_error, b, GAMMA)
    assert off.residual > 1.0 and abs(off.residual - off.bound) <= err / GAMMA + \
        rounding_bound(chain_length(early, b), passes=2) * off.bound, off
    bad = wd_eigenvector(m, squared_error, b, WRONG, c, GAMMA)
    assert bad.residual > 1.0 and bad.details["identity"] > 0.1, bad


def test_row6c_qk_zero_modes_with_weight_decay():
    torch.manual_seed(0)
    a = TinyAttention(3, 2, 2).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, 3, generator=g, dtype=torch.float64)
    b = (X, torch.randn(16, 2, generator=g, dtype=torch.float64))
    early = copy.deepcopy(a)
    assert to_critical_point(a, squared_error, b, gamma=GAMMA, max_iter=300) < 1e-7   # convergence target
    qk = GLFamily("qk", "attention_qk", [[["wq", 0, [0, 1], "M"], ["wk", 0, [0, 1], "-MT"]]])
    modes = gl_modes(a, squared_error, b, qk, GAMMA)
    assert len(modes) == 4 and sum(q.predicted == 0.0 for q in modes) == 1   # d_h² = 4: 3 sym, 1 antisym
    # < 1e-5: the critical-point approximation's size (‖g_γ‖ < 1e-7), not rounding
    assert all(q.residual < 1e-5 and q.residual <= 1.001 * q.bound for q in modes), modes
    far = gl_modes(early, squared_error, b, qk, GAMMA)
    assert min(q.residual for q in far) > 1e-2, far                         # control: off the critical point


def test_row8_factorisation_conserved_imbalance_eta_squared_law():
    torch.manual_seed(0)
    m, b = Factorised(4, 3, 2).double(), toy_batch((4, 3, 2), n=16, classes=False)
    laws = {lr: gl_step_law(m, squared_error, b, GL, lr) for lr in (1e-2, 1e-3)}
    th = dict(m.named_parameters())
    tp2 = sum(float((th[k].detach() ** 2).sum()) for k in GL.params)
    n = chain_length(m, b)
    for lr, p in laws.items():
        # ΔQ = η²(G_VG_Vᵀ − G_UᵀG_U); float64: Q(θ') − Q(θ) cancels: each Q entry a ≤ d-term sum of θ_iθ_j
        # (γ_n·‖θ_P‖², θ' one more rounding each: 2u), k entries (√k in norm), over η²‖Q(g)‖; Q(g) 2γ_n
        k = 9                                                                 # Q is 3×3
        tol = (3 * gamma(n, U) + 2 * U) * k ** 0.5 * tp2 / (lr ** 2 * max(p.measured, p.predicted)) \
            + 2 * rounding_bound(n, passes=2)
        # the exact law, each step within its rounding level (2·γ_n(u)·Σ|terms|, analyses.conservation)
        assert p.details["law_verdicts"] == ["holds"] * 3 and p.residual <= tol, (p, tol)
        assert p.details["law_residual"] <= p.details["law_tolerance"], p
    # controls: Adam drifts O(η) (ΔQ/η is η-independent), tanh between the factors breaks GL at first order
    adam = {lr: gl_step_law(m, squared_error, b, GL, lr, optimizer="adam") for lr in (1e-2, 1e-3)}
    d = [adam[lr].details["drift_over_eta"] for lr in (1e-2, 1e-3)]
    assert all(p.residual > 0.9 for p in adam.values()) and 0.8 < d[0] / d[1] < 1.25, d
    torch.manual_seed(0)
    t = Factorised(4, 3, 2, "tanh").double()
    tl = gl_step_law(t, squared_error, b, GL, 1e-3)
    assert tl.details["law_residual"] > 1e-2 and tl.residual > 0.9, tl
    assert set(tl.details["law_verdicts"]) == {"violated"}, tl


def _teacher(act):
    torch.manual_seed(0)
    teacher = MLP((3, 5, 4, 2), act, bias=False).double()
    X, _ = toy_batch((3, 5, 4, 2), n=16, classes=False)
    with torch.no_grad():
        return teacher, (X, teacher(X))


def test_row9c_radial_sharpness_at_interpolation():
    m, b = _teacher("relu")             # student = teacher: an exactly interpolating, 3-homogeneous point
    layers = ["net.0.weight", "net.2.weight", "net.4.weight"]
    ps = radial_sharpness(m, squared_error, b, 3, layers)
    # |ρ − pred|/pred: the Rayleigh rounding over pred, plus pred's own (a 2·numel(y)-term mean of squares)
    err, _ = _quad_err(m, squared_error, b)
    assert all(p.residual <= err / p.predicted + gamma(2 * b[1].numel() + 2, U) for p in ps), ps
    # interpolation is exactly 0: the targets are this very model's outputs on the same inputs (same forward)
    assert ps[0].details["interpolation"] == 0 and ps[0].details["below_lambda_max"]
    # controls: GELU is not homogeneous; noisy targets are not interpolated
    g, bg = _teacher("gelu")
    assert radial_sharpness(g, squared_error, bg, 3)[0].residual > 0.05
    noise = 0.1 * torch.randn(b[1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert radial_sharpness(m, squared_error, (b[0], b[1] + noise), 3)[0].residual > 0.1


def _narrow(C):
    torch.manual_seed(0)
    teacher = MLP((2, 3, C), "tanh").double()
    X, _ = toy_batch((2, 3, C), n=32, classes=False)
    noise = torch.randn(32, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        b = (X, teacher(X) + 0.1 * noise)
    narrow = copy.deepcopy(teacher)
    gn = to_critical_point(narrow, squared_error, b, max_iter=300, tol=1e-11)
    return teacher, narrow, b, gn


def test_row11b_split_unit_gives_flat_plateau_and_a_null_line():
    teacher, narrow, b, gn = _narrow(1)
    wide = split_unit(narrow, "net.0", "net.2", 1, 0.3)       # unit 1 and its copy (index 3)
    r = permutation_point(wide, squared_error, b, "net.2", 1, 3)
    err, D = _quad_err(wide, squared_error, b)
    # the plateau is exactly flat (any θ): |vᵀHv|/(‖v‖²λ_max) is pure rounding, err/λ_max
    assert r["rayleigh"].residual <= err / D.lam_max, (r["rayleigh"], err / D.lam_max)
    # ≤ ‖g‖/λ_max (the stated critical-point bound) and < 1e-7: the size of that approximation, not rounding
    assert r["line_null"].residual <= r["line_null"].bound and r["line_null"].residual < 1e-7, r["line_null"]
    assert r["count"].measured >= r["count"].predicted == 1    # n_{k+1} = 1 zero eigenvalue
    # control: split a non-critical net (the teacher, before fitting the noisy targets): no null line
    off = permutation_point(split_unit(teacher, "net.0", "net.2", 1, 0.3), squared_error, b, "net.2", 1, 3)
    wide_off = split_unit(teacher, "net.0", "net.2", 1, 0.3)
    err, D = _quad_err(wide_off, squared_error, b)
    # line_null > 1e-3: effect-size floor; count: an integer; the plateau stays flat to rounding (err/λ_max)
    assert off["line_null"].residual > 1e-3 and off["count"].measured == 0 and off["rayleigh"].residual <= err / D.lam_max
