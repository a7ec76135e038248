"""Rows 2c, 6d/R11 (block sharpness along a symmetry orbit) and 3a/3b (Linear→LN), with controls."""
import torch

from analyses.predictions.congruence import block_congruence, linear_ln_checks
from models.losses import cross_entropy, squared_error
from models.toy_mlp import toy_batch
from models.toy_norm import NormMLP, TinyAttention

torch.set_num_threads(1)
S = ["fc1.weight", "fc1.bias"]


def _bn(eps):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, "bn", eps, "relu").double(), toy_batch((4, 6, 3), n=16)


def test_row2c_bn_block_sharpness_scales_as_inverse_square():
    m, b = _bn(0.0)
    r = block_congruence(m, cross_entropy, b, {n: 2.0 for n in S}, {"S": S, "out": ["fc2.weight", "fc2.bias"]})
    assert r["loss"].residual < 1e-14
    dense, lz, mat, grad = r["S"]
    assert dense.predicted == 0.25 and dense.residual < 1e-12 and lz.residual < 1e-10, (dense, lz)
    assert mat.residual < 1e-12 and grad.residual < 1e-12          # whole block H_SS/4, g_S/2
    assert all(p.residual < 1e-12 for p in r["out"][:1] + r["out"][2:])  # the rest is unchanged
    # control: BN eps > 0 breaks the invariance; the ratio misses 1/4 by ~eps/Var, linear in eps
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
    assert r["loss"].residual < 1e-14
    assert abs(r["Q"][0].predicted - 1 / 9) < 1e-15 and abs(r["K"][0].predicted - 9) < 1e-12
    for label in ("Q", "K"):
        assert all(p.residual < 1e-10 for p in r[label]), r[label]
    # control: (cW_Q, W_V/c) is not a symmetry — loss changes and the ratios miss 1/c², 1
    bad = block_congruence(m, squared_error, b, {"wq": 3.0, "wv": 1 / 3}, {"Q": ["wq"], "K": ["wk"]})
    assert bad["loss"].residual > 1e-3 and bad["Q"][0].residual > 0.5 and bad["K"][0].residual > 0.05, bad


def _ln(norm="ln", eps=0.0):
    torch.manual_seed(0)
    return NormMLP(4, 6, 3, norm, eps, "tanh").double(), toy_batch((4, 6, 3), n=16)


def test_row3a_3b_linear_to_layernorm():
    r = linear_ln_checks(*_ln()[:1], cross_entropy, _ln()[1], "fc1")
    assert r["3a"].residual < 1e-12 and r["3b"].residual < 1e-12, r
    # eps > 0: the joint scale breaks ∝ eps (order 2 residual ~2e-4 at eps=1e-4); the shift stays exact
    viol = {}
    for eps in (1e-5, 1e-4):
        m, b = _ln("ln", eps)
        re = linear_ln_checks(m, cross_entropy, b, "fc1")
        assert re["3b"].residual < 1e-12, re["3b"]
        viol[eps] = re["3a"].residual
    assert 1e-6 < viol[1e-5] < 1e-4 and 7 < viol[1e-4] / viol[1e-5] < 13, viol
    # RMSNorm: still scale-invariant, but without mean subtraction the shift is not a symmetry
    m, b = _ln("rms")
    rr = linear_ln_checks(m, cross_entropy, b, "fc1")
    assert rr["3a"].residual < 1e-12 and rr["3b"].residual > 0.1, rr
