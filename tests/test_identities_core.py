"""Identity checks (analyses.identities) on hand-declared transformations: positive and negative controls."""
import math

import pytest
import torch
import torch.nn.functional as F

from eqlab import models

from eqlab.analyses.identities import PASSES, check_all, gamma, rejected, unit_roundoff
from eqlab.analyses.transforms import (GroupElement, Permutation, ScaleFamily, Transformation, TranslationFamily)
from eqlab.models.losses import cross_entropy

N = 24  # examples: small enough that one HVP of the CNN is milliseconds


def _cnn(dtype=torch.float64, **opt):
    # bn_eps = 1e-20: BN scale invariance exact to float64 rounding (r2 ~ 3e-15). 1e-12 is NOT: it leaves a
    # measured r2 ~ 50·eps ~ 5e-11, above the float64 rounding bound (test_bn_eps_1e12_is_a_visible_violation)
    t = models.build_task("digits_cnn", {"bn_eps": 1e-20, **opt}, 0, dtype)
    X, y = t.train
    return t.model, t.loss, (X[:N], y[:N])


def softmax_translation():
    return TranslationFamily("softmax_translation[fc2]", "softmax_translation",
                             [["fc2.weight", 0, None, "broadcast"], ["fc2.bias", 0, None, "broadcast"]],
                             {"fc2.weight": [10, 32], "fc2.bias": [10]})


def relu_rescale(sign_out=-1.0, expected=True):
    return ScaleFamily("relu_rescale[fc1->fc2]", "relu_rescale",
                       [[["fc1.weight", 0, [i], 1], ["fc1.bias", 0, [i], 1], ["fc2.weight", 1, [i], sign_out]]
                        for i in range(32)], expected=expected)


def bn_scale():
    return ScaleFamily("bn_scale[conv1->bn1]", "bn_scale",
                       [[["conv1.weight", 0, [c], 1], ["conv1.bias", 0, [c], 1]] for c in range(8)])


def _by_order(checks):
    return {c.order: c for c in checks}


def _expected_tolerance(c, n, u):
    # p_order · γ_n(u) · R with R ≥ 1 the terms' magnitudes over the scale (analyses.identities)
    return PASSES[c.order] * gamma(n, u)


@pytest.mark.parametrize("make", [softmax_translation, relu_rescale, bn_scale])
def test_exact_symmetries_hold_in_float64(make):
    model, loss, batch = _cnn()
    checks = check_all(model, loss, batch, [make()], probes=2)
    assert [c.order for c in checks] == [0, 1, 2]
    n = 2 * sum(p.numel() for p in model.parameters()) + batch[0].numel() + N * 10   # 2d + inputs + logits
    for c in checks:
        assert c.holds and c.ok and c.verdict == "holds", c.as_row()
        assert c.dtype == "float64" and "(float64)" in c.tolerance_reason and f"n = {n} " in c.tolerance_reason
        # the tolerance is the rounding bound p·γ_n(u)·R, R in [1, 3] (order 0 adds M_f/|L| ≈ 1 here)
        lo = _expected_tolerance(c, n, unit_roundoff(torch.float64))
        assert lo <= c.tolerance <= 3 * lo, (c.tolerance, lo)
        # exact identities sit far under the worst-case bound (typical rounding is ~√n, not n, of it)
        assert c.residual <= 1e-2 * c.tolerance, c.as_row()
    assert checks[2].n_hvp >= 2  # two probes (plus the curvature scale)


def test_float32_uses_float32_tolerance():
    model, loss, batch = _cnn(torch.float32)
    m64, _, b64 = _cnn()
    t64 = {(c.transformation, c.order): c.tolerance for c in check_all(m64, loss, b64, [softmax_translation()])}
    for c in check_all(model, loss, batch, [softmax_translation(), relu_rescale(), bn_scale()]):
        assert c.dtype == "float32" and "(float32)" in c.tolerance_reason and c.verdict == "holds", c.as_row()
        assert c.residual <= 1e-2 * c.tolerance, c.as_row()   # as in float64: far under the bound
        if (c.transformation, c.order) in t64:                # same n and R: tolerance ∝ u (γ_n ≈ nu)
            ratio = c.tolerance / t64[c.transformation, c.order]
            u_ratio = unit_roundoff(torch.float32) / unit_roundoff(torch.float64)
            assert 0.5 * u_ratio < ratio < 2 * u_ratio, ratio


def _weak_wrong_rescale():
    """The wrong-sign rescale of one ReLU unit (15) that barely moves the loss on this batch: a control
    whose order-0/1 effect (~1e-5) is real but under the float32 rounding bound (~3e-3)."""
    return ScaleFamily("wrong_rescale[15]", "negative_control",
                       [[["fc1.weight", 0, [15], 1], ["fc1.bias", 0, [15], 1], ["fc2.weight", 1, [15], 1.0]]],
                       expected=False)


def test_float32_control_below_the_rounding_bound_is_not_discriminating():
    model, loss, batch = _cnn(torch.float32)
    by = _by_order(check_all(model, loss, batch, [_weak_wrong_rescale()], probes=1))
    for k in (0, 1):   # the check cannot tell this control from a symmetry at float32, and says so
        assert by[k].residual <= by[k].tolerance and by[k].verdict == "not_discriminating", by[k].as_row()
        assert by[k].holds and not by[k].ok
    assert by[2].verdict == "rejected" and by[2].residual > 10 * by[2].tolerance   # the Hessian sees it
    assert rejected(list(by.values())) == {"wrong_rescale[15]": False}


def test_float64_control_is_rejected_at_every_order():
    model, loss, batch = _cnn()
    for c in check_all(model, loss, batch, [_weak_wrong_rescale(), relu_rescale(sign_out=+1.0, expected=False)],
                       probes=1):
        assert c.verdict == "rejected" and c.ok and not c.holds, c.as_row()
        assert c.residual > 100 * c.tolerance, c.as_row()   # far out of the float64 rounding bound


def test_gelu_for_relu_is_violated_at_every_order():
    model, loss, batch = _cnn(activation="gelu")
    by = _by_order(check_all(model, loss, batch, [relu_rescale()]))
    assert all(c.verdict == "violated" and not c.ok for c in by.values()), [c.as_row() for c in by.values()]
    # GELU is not homogeneous: an O(1) effect at second order (≥ 1e-2) and a visible one at first
    assert by[2].residual > 1e-2 and by[1].residual > 1e-5


def test_bn_eps_violation_is_violated_by_eps_over_variance():
    for eps in (1e-6, 1e-12):
        model, loss, batch = _cnn(bn_eps=eps)
        by = _by_order(check_all(model, loss, batch, [bn_scale()], probes=1))
        # first-order violation ≈ eps/Var(pre-activation), Var = O(1) for this init: measured 0.78·eps
        assert 0.1 < by[1].residual / eps < 10, by[1].as_row()
        # r2 ~ 50·eps: at eps = 1e-12 that is ~5e-11, still above the float64 rounding bound (~1e-11)
        assert by[2].verdict == "violated" and by[2].residual > 2 * by[2].tolerance, by[2].as_row()
    assert by[1].verdict == "holds"   # at eps = 1e-12 the first-order effect (~8e-13) is under its bound


def test_generator_counts_and_json_round_trip():
    for t in [softmax_translation(), relu_rescale(), bn_scale()]:
        d = t.to_json()
        assert Transformation.from_json(d).to_json() == d
        import json
        json.dumps(d)
    assert softmax_translation().n_generators == 33  # d + 1
    assert relu_rescale().n_generators == 32 and bn_scale().n_generators == 8


def test_wrong_sign_rescale_is_rejected():
    model, loss, batch = _cnn()
    checks = check_all(model, loss, batch, [relu_rescale(sign_out=+1.0, expected=False)])
    by = _by_order(checks)
    assert all(not c.holds and c.ok for c in checks)
    assert by[2].residual > 0.1  # the Hessian identity fails by O(1)
    assert rejected(checks) == {"relu_rescale[fc1->fc2]": True}


def test_bn_violation_grows_linearly_in_eps():
    res = {}
    for eps in (1e-6, 1e-5, 1e-4):
        model, loss, batch = _cnn(bn_eps=eps)
        res[eps] = _by_order(check_all(model, loss, batch, [bn_scale()], probes=1))[1].residual
    assert res[1e-6] > 1e-8  # clearly visible above the exact-symmetry level (~1e-17 at bn_eps = 1e-20)
    for lo, hi in ((1e-6, 1e-5), (1e-5, 1e-4)):
        ratio = res[hi] / res[lo]
        assert 5 < ratio < 20, res  # first-order violation ∝ eps/Var(pre-activation)


def test_z_loss_breaks_softmax_translation_in_proportion():
    model, _, batch = _cnn()

    def z_loss(weight):
        return lambda out, y: F.cross_entropy(out, y) + weight * torch.logsumexp(out, -1).pow(2).mean()

    r = {w: _by_order(check_all(model, z_loss(w), batch, [softmax_translation()], probes=1))[1].residual
         for w in (1e-4, 1e-3)}
    assert r[1e-4] > 1e-6 and 5 < r[1e-3] / r[1e-4] < 20


def test_one_class_shift_is_rejected():
    model, loss, batch = _cnn()
    t = TranslationFamily("one_class", "negative_control",
                          [["fc2.weight", 0, [3], "broadcast"], ["fc2.bias", 0, [3], "broadcast"]],
                          {"fc2.weight": [10, 32], "fc2.bias": [10]}, expected=False)
    checks = check_all(model, loss, batch, [t])
    assert rejected(checks)["one_class"]


def test_discrete_permutation_and_group_element_congruence():
    model, loss, batch = _cnn()
    perm = list(range(32))
    perm[0], perm[2] = 2, 0  # two units active on this batch (4 and 9 are dead: swapping those is exact)
    P = Permutation("swap", "permutation", [["fc1.weight", 0, perm], ["fc1.bias", 0, perm], ["fc2.weight", 1, perm]])
    G = GroupElement(relu_rescale(), torch.linspace(-1, 1, 32), s=0.8)  # a rescale by up to e^{±0.8}
    checks = check_all(model, loss, batch, [P, G, Transformation.from_json(G.to_json())])
    assert sorted({c.order for c in checks}) == [0, 1, 2]
    for c in checks:
        assert c.kind == "discrete" and c.verdict == "holds", c.as_row()
        assert c.residual <= 1e-2 * c.tolerance, c.as_row()   # exact: far under the float64 rounding bound
    # a permutation that does not move the outgoing weights along with the incoming ones is not a symmetry
    bad = Permutation("bad_swap", "negative_control", [["fc1.weight", 0, perm], ["fc1.bias", 0, perm]], expected=False)
    assert rejected(check_all(model, loss, batch, [bad]))["bad_swap"]


class _WithWeightDecay(torch.nn.Module):
    """Returns (logits, γ/2‖θ‖²) so that the L2 term is a function of the substituted parameters."""

    def __init__(self, model, gamma):
        super().__init__()
        self.m, self.gamma = model, gamma

    def forward(self, x):
        return self.m(x), 0.5 * self.gamma * sum((p ** 2).sum() for p in self.m.parameters())


def _wd_loss(out, y):
    logits, l2 = out
    return cross_entropy(logits, y) + l2


def _prefixed(t):
    d = t.to_json()
    d["generators"] = [[["m." + p, *rest] for p, *rest in g] for g in d["generators"]]
    return Transformation.from_json(d)


def test_weight_decay_breaks_rescale_linearly():
    model, _, batch = _cnn()
    r = {}
    for gamma in (0.0, 1e-4, 1e-3):
        checks = check_all(_WithWeightDecay(model, gamma), _wd_loss, batch, [_prefixed(relu_rescale())], probes=1)
        r[gamma] = _by_order(checks)[1]
    assert r[0.0].verdict == "holds", r[0.0].as_row()  # the wrapper itself changes nothing (within rounding)
    r = {k: c.residual for k, c in r.items()}
    assert r[1e-4] > 1e-6 and 5 < r[1e-3] / r[1e-4] < 20, r  # ⟨g_γ, Aθ⟩ = γ θᵀAθ
