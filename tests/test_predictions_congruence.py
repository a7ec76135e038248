"""Rows 2c, 6d/R11 (block sharpness along a symmetry orbit) and 3a/3b (Linear→LN), with controls."""
import copy

import torch

from eqlab.analyses.identities import chain_length, gamma, rounding_bound, unit_roundoff
from eqlab.analyses.predictions import dense_at
from eqlab.analyses.predictions.congruence import block_congruence, linear_ln_checks
from eqlab.models.losses import cross_entropy, squared_error
from eqlab.models.toy_mlp import toy_batch
from eqlab.models.toy_norm import NormMLP, TinyAttention

S = ["fc1.weight", "fc1.bias"]
U = unit_roundoff(torch.float64)


def _sizes(model, loss, batch, names):
    """n (+1: Tθ = cθ is rounded entrywise, one more relative rounding on the chain), the loss's relative
    magnitude (|L| + M_f)/|L| with M_f = Σ|∂L/∂f|·|f|, and ‖H_BB‖_F/λ_max of the block (dense, float64)."""
    m = copy.deepcopy(model)                       # BN running statistics stay untouched
    f = m(batch[0])
    L = loss(f, batch[1])
    (gf,) = torch.autograd.grad(L, f)
    L, f, gf = float(L.detach()), f.detach(), gf.detach()
    D = dense_at(model, loss, batch, names)
    return (chain_length(model, batch) + 1, (abs(L) + float((gf.abs() * f.abs()).sum())) / abs(L),
            float(D.H.norm()) / float(D.evals.max()))


def _bounds(n, loss_ratio, h_ratio):
    """Rounding bounds of the block_congruence residuals (float64), from the sizes of the compared terms."""
    return dict(
        # two forwards, each ≤ γ_n·(|L| + M_f) (a relative rounding of every output entry), over |L|
        loss=2 * rounding_bound(n) * loss_ratio,
        # each λ_max: H within 4γ_n‖H‖_F (double backward), eigh backward stable (≤ dim·u‖H‖_F, dim ≤ n): Weyl,
        # relative to λ_max, on both sides of the ratio
        dense=2 * (rounding_bound(n, passes=4) + n * U) * h_ratio,
        # Lanczos rule tol = 1e-12: |θ − λ| ≤ 1e-12·max|θ| ≤ 1e-12·‖H‖_F, plus the HVPs' 4γ_n‖H‖_F, both sides
        lanczos=2 * (1e-12 + rounding_bound(n, passes=4)) * h_ratio,
        # rel(c²H', H), rel(c·g', g): each side within 4γ_n (2γ_n) of its norm, the product by c adds ≤ 2u
        mat=2 * rounding_bound(n, passes=4) + 2 * U,
        grad=2 * rounding_bound(n, passes=2) + 2 * U)


def _bn(eps):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, "bn", eps, "relu").double(), toy_batch((4, 6, 3), n=16)


def test_row2c_bn_block_sharpness_scales_as_inverse_square():
    m, b = _bn(0.0)
    out = ["fc2.weight", "fc2.bias"]
    r = block_congruence(m, cross_entropy, b, {n: 2.0 for n in S}, {"S": S, "out": out})
    n, lr_, hs = _sizes(m, cross_entropy, b, S)
    bs, bo = _bounds(n, lr_, hs), _bounds(n, lr_, _sizes(m, cross_entropy, b, out)[2])
    assert r["loss"].residual <= bs["loss"], (r["loss"], bs)
    dense, lz, mat, grad = r["S"]
    # 0.25 = 2.0**-2 is exact in binary floating point
    assert dense.predicted == 0.25 and dense.residual <= bs["dense"] and lz.residual <= bs["lanczos"], (dense, lz, bs)
    assert mat.residual <= bs["mat"] and grad.residual <= bs["grad"], (mat, grad, bs)  # whole block H_SS/4, g_S/2
    o_dense, _, o_mat, o_grad = r["out"]                           # the rest is unchanged
    assert o_dense.residual <= bo["dense"] and o_mat.residual <= bo["mat"] and o_grad.residual <= bo["grad"], r["out"]
    # control: BN eps > 0 breaks the invariance; the ratio misses 1/4 by ~eps/Var, linear in eps
    # (effect-size window and slope, not rounding bounds; 1e-5 is > 1e5× the dense bound above)
    viol = {eps: block_congruence(*_bn(eps)[:1], cross_entropy, b, {n: 2.0 for n in S}, {"S": S})["S"][0].residual
            for eps in (1e-4, 1e-3)}
    assert 1e-5 < viol[1e-4] < 1e-2 and 5 < viol[1e-3] / viol[1e-4] < 15, viol


def _attention():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, 3, generator=g, dtype=torch.float64)
    return TinyAttention(3, 2, 2).double(), (X, torch.randn(16, 2, generator=g, dtype=torch.float64))


def test_row6d_qk_rescale_is_a_block_congruence():
    m, b = _attention()
    r = block_congruence(m, squared_error, b, {"wq": 3.0, "wk": 1 / 3}, {"Q": ["wq"], "K": ["wk"]})
    n, lr_, _ = _sizes(m, squared_error, b, ["wq"])
    assert r["loss"].residual <= _bounds(n, lr_, 1.0)["loss"], r["loss"]
    # float64: 3.0**-2 and 1/9 are each within u of 1/9; (1/3 rounded)**-2 is ≤ 3 roundings from 9
    assert abs(r["Q"][0].predicted - 1 / 9) <= 2 * U / 9 and abs(r["K"][0].predicted - 9) <= gamma(3, U) * 9
    for label, names in (("Q", ["wq"]), ("K", ["wk"])):
        bd = _bounds(n, lr_, _sizes(m, squared_error, b, names)[2])
        assert [p.residual <= bd[k] for p, k in zip(r[label], ("dense", "lanczos", "mat", "grad"))] == [True] * 4, \
            (r[label], bd)
    # control: (cW_Q, W_V/c) is not a symmetry — loss changes and the ratios miss 1/c², 1 (effect-size floors)
    bad = block_congruence(m, squared_error, b, {"wq": 3.0, "wv": 1 / 3}, {"Q": ["wq"], "K": ["wk"]})
    assert bad["loss"].residual > 1e-3 and bad["Q"][0].residual > 0.5 and bad["K"][0].residual > 0.05, bad


def _ln(norm="ln", eps=0.0):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, norm, eps, "tanh").double(), toy_batch((4, 6, 3), n=16)


def _ln_bound(model, batch):
    """The worst of the order 0-2 identity residuals (analyses.identities): orders 1, 2 are normalised by scales
    containing their terms (4 passes at most, R = 1), order 0 by |L| (1 pass, R = (|L| + M_f)/|L|)."""
    n, loss_ratio, _ = _sizes(model, cross_entropy, batch, S)
    return max(rounding_bound(n, passes=4), rounding_bound(n) * loss_ratio)


def test_row3a_3b_linear_to_layernorm():
    m, b = _ln()
    r = linear_ln_checks(m, cross_entropy, b, "fc1")
    tol = _ln_bound(m, b)
    assert r["3a"].residual <= tol and r["3b"].residual <= tol, (r, tol)
    # eps > 0: the joint scale breaks ∝ eps (order 2 residual ~2e-4 at eps=1e-4); the shift stays exact
    viol = {}
    for eps in (1e-5, 1e-4):
        m, b = _ln("ln", eps)
        re = linear_ln_checks(m, cross_entropy, b, "fc1")
        assert re["3b"].residual <= _ln_bound(m, b), re["3b"]
        viol[eps] = re["3a"].residual
    assert 1e-6 < viol[1e-5] < 1e-4 and 7 < viol[1e-4] / viol[1e-5] < 13, viol   # effect size ∝ eps, not rounding
    # RMSNorm: still scale-invariant, but without mean subtraction the shift is not a symmetry
    m, b = _ln("rms")
    rr = linear_ln_checks(m, cross_entropy, b, "fc1")
    assert rr["3a"].residual <= _ln_bound(m, b) and rr["3b"].residual > 0.1, rr   # 0.1: effect-size floor
