"""Fixed points of discrete symmetries (R10): dead tanh units and coincident units, with perturbation controls."""
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.fixed_points import dead_unit_spectrum, involution_check, to_fixed_point
from eqlab.analyses.identities import chain_length, rounding_bound, unit_roundoff
from eqlab.models.losses import cross_entropy
from eqlab.models.toy_mlp import MLP, toy_batch


def _tanh_mlp():
    torch.manual_seed(0)
    model = MLP((8, 16, 16, 4), "tanh").double()
    batch = toy_batch()
    d = discover(model, cross_entropy, batch)
    return model, batch, d


def _perturb(model, T, eps, seed=1):
    """Move θ off Fix(T) by eps along the antisymmetric subspace (T's parameters only)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    v = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in T.params}
    tv = T.tangent(v)
    with torch.no_grad():
        for n in T.params:
            params[n].add_(0.5 * eps * (v[n] - tv[n]))


def _sign_flip_on_first_layer(d):
    return next(t for t in d.verified if t.family == "sign_flip" and "net.0" in t.name)


def test_dead_tanh_unit_is_a_saddle_with_plus_minus_singular_values():
    model, batch, d = _tanh_mlp()
    T = _sign_flip_on_first_layer(d)               # unit 0 of net.0 -> tanh -> net.2
    assert to_fixed_point(model, T) > 0
    r = dead_unit_spectrum(model, cross_entropy, batch, "net.0", "net.2", 0)
    n = chain_length(model, batch)                # 2d + input + output entries: the longest n-term chain
    # float64: g_i is a sum of exact zeros (tanh(0) = 0, W_out[:, i] = 0); allow 2 passes of n-term rounding
    assert r.grad <= rounding_bound(n, passes=2)
    # float64: each H_{rest,i} entry is 4 passes (double backward) of n-term sums, error ≤ 4γ_n·‖H_{:,i}‖
    assert r.cross <= rounding_bound(n, passes=4), r.cross
    # float64: Weyl, |Δλ| ≤ ‖ΔH_ii‖_F ≤ 4γ_n‖H_{:,i}‖_F, B (batch sums) ≤ 2γ_n‖B‖_F, eigvalsh/svdvals
    # backward stable ≤ 2·25·u·σ_max (25×25); relative to σ_max(B)
    s_max = float(r.predicted.max())
    bound = (rounding_bound(n, passes=4) * r.column_norm + rounding_bound(n, passes=2) * float(r.B.norm())) / s_max \
        + 2 * 25 * unit_roundoff(torch.float64)
    assert r.spectrum <= bound, (r.spectrum, bound, r.eigenvalues, r.predicted)
    assert r.eigenvalues.min() < -1e-3            # strict saddle (B ≠ 0)
    # 8 inputs + bias = 9 columns, 16 outputs: 9 pairs ±σ_j and 16 - 9 = 7 zeros (constructed as exact
    # zeros; σ_j(B) > 0 for this generic B, so == 0 counts them exactly)
    assert r.B.shape == (16, 9) and int((r.predicted == 0).sum()) == 25 - 18
    fc = involution_check(model, cross_entropy, batch, T)
    # distance: exactly 0 by construction (to_fixed_point writes ½(θ + Tθ), bitwise T-invariant);
    # float64: P₋g is a difference of two n-term backward results (2γ_n), P₊HP₋v of HVPs (4γ_n), each
    # relative to the norm it is divided by
    assert fc.distance == 0 and fc.grad <= rounding_bound(n, passes=2) and fc.block <= rounding_bound(n, passes=4)


def test_dead_unit_structure_breaks_in_proportion_to_the_perturbation():
    res = {}
    for eps in (1e-4, 1e-3):
        model, batch, d = _tanh_mlp()
        T = _sign_flip_on_first_layer(d)
        to_fixed_point(model, T)
        _perturb(model, T, eps)
        res[eps] = (dead_unit_spectrum(model, cross_entropy, batch, "net.0", "net.2", 0),
                    involution_check(model, cross_entropy, batch, T))
    for attr in ("grad", "cross"):
        lo, hi = getattr(res[1e-4][0], attr), getattr(res[1e-3][0], attr)
        assert lo > 1e-8 and 7 < hi / lo < 13, (attr, lo, hi)    # first order in the distance
    lo, hi = res[1e-4][1].block, res[1e-3][1].block
    assert lo > 1e-8 and 7 < hi / lo < 13
    # the ±σ_j(B) spectrum moves only at second order (the ± pairing cancels the first-order shift)
    lo, hi = res[1e-4][0].spectrum, res[1e-3][0].spectrum
    assert hi > 1e-6 and 70 < hi / lo < 130, (lo, hi)


def test_coincident_units_gradient_and_antisymmetric_block():
    model, batch, d = _tanh_mlp()
    T = next(t for t in d.verified if t.name.startswith("permutation[net.2->net.4]"))  # units 0, 1 of net.2
    before = involution_check(model, cross_entropy, batch, T)
    assert before.grad > 1e-3 and before.block > 1e-3           # generic θ: no structure
    to_fixed_point(model, T)                                    # make the two units identical
    w, w_out = dict(model.named_parameters())["net.2.weight"], dict(model.named_parameters())["net.4.weight"]
    assert torch.equal(w[0], w[1]) and torch.equal(w_out[:, 0], w_out[:, 1])
    fc = involution_check(model, cross_entropy, batch, T, probes=3)
    n = chain_length(model, batch)
    # distance: exactly 0 (½(θ_i + θ_j) = ½(θ_j + θ_i) bitwise); float64: g_i − g_j and P₊HP₋v are
    # differences of n-term sums computed in different BLAS positions: ≤ 2γ_n resp. 4γ_n relative
    assert fc.distance == 0 and fc.grad <= rounding_bound(n, passes=2) and fc.block <= rounding_bound(n, passes=4)
    # control: off the fixed point by eps the violation is first order in eps
    out = {}
    for eps in (1e-4, 1e-3):
        m = MLP((8, 16, 16, 4), "tanh").double()
        m.load_state_dict(model.state_dict())
        _perturb(m, T, eps)
        out[eps] = involution_check(m, cross_entropy, batch, T)
    assert 7 < out[1e-3].grad / out[1e-4].grad < 13
    assert 7 < out[1e-3].block / out[1e-4].block < 13
