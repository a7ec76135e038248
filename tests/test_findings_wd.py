"""Finding 1 under weight decay (`analyses.predictions.wd_stationary`): at a stationary point of
L + γ/2‖θ‖² a symmetric symmetry generator's Rayleigh quotient is 2γ. Checked against a dense float64
Hessian at the relaxed point, with three negative controls: random directions (the stage's own), the
checkpoint before relaxation (misses 2γ by exactly the remainder), and a broken generator (misses it by
⟨ξ, ∇⟨g, Aθ⟩⟩/‖ξ‖², computed without H)."""
import math

import pytest
import torch

from eqlab.analyses.curvature.functional import dot, forward, named_params
from eqlab.analyses.discover import discover
from eqlab.analyses.identities import unit_roundoff
from eqlab.analyses.predictions import dense_at
from eqlab.analyses.predictions.wd_stationary import (STATIONARY_SHARE, eligible, relaxed_copy,
                                                      wd_stationary_findings)
from eqlab.analyses.transforms.continuous import ScaleFamily
from eqlab.models import build_task

GAMMA = 0.05


@pytest.fixture(scope="module")
def setup():
    task = build_task("modadd_gpt2", {"p": 5, "n_embd": 8, "n_head": 2, "activation": "relu"}, seed=0,
                      dtype=torch.float64)
    X, y = task.train
    batch = (X[:32], y[:32])
    verified = [f.transformation for f in discover(task.model, task.loss, batch).found if f.verified]
    return task.model, task.loss, batch, verified


def _head_family(verified):
    (t,) = [t for t in verified if t.name.startswith("ln_gain_rescale[transformer.ln_f")]
    return t


def _flat(model, d):
    return torch.cat([d[n].reshape(-1) if n in d else torch.zeros_like(p).reshape(-1)
                      for n, p in model.named_parameters()])


def test_quotient_is_2gamma_at_the_relaxed_point_and_matches_the_dense_hessian(setup):
    model, loss, batch, verified = setup
    pred, ctrl = wd_stationary_findings(model, loss, batch, verified, GAMMA, probes=2, seed=0)
    t = _head_family(verified)
    assert pred.transformation == ctrl.transformation == t.name  # the head family goes first
    assert pred.verdict == "holds" and pred.stationary, pred.tolerance_reason
    assert ctrl.verdict == "violated"
    # the control misses 2γ by far more than its tolerance: a generic direction's curvature
    assert min(abs(p.rayleigh - p.predicted) / p.tolerance for p in ctrl.probes) > 1e3
    assert all(abs(p.predicted - 2 * GAMMA) <= STATIONARY_SHARE * 2 * GAMMA for p in pred.probes)
    # dense oracle at the same relaxed point (the relaxation is deterministic)
    relaxed, gn = relaxed_copy(model, loss, batch, t.params, GAMMA, 100, 1e-6 * 2 * GAMMA)
    assert math.isclose(gn, pred.grad_norm, rel_tol=0, abs_tol=0)
    D = dense_at(relaxed, loss, batch, gamma=GAMMA)  # H_γ = H + γI, g_γ = g + γθ over every parameter
    theta = named_params(relaxed)
    u = unit_roundoff(torch.float64)
    for p in pred.probes:
        xi = _flat(relaxed, t.xi(theta, p.coeffs))
        hxi = D.H @ xi
        rho = float(xi @ hxi / (xi @ xi))
        assert abs(rho - p.rayleigh) <= p.tolerance, (rho, p.rayleigh, p.tolerance)
        # the vector form: H_γAθ = 2γAθ − A g_γ (symmetric A), to the dense product's rounding
        a_g = _flat(relaxed, t.xi(D.space.unflatten(D.grad), p.coeffs))
        # (dim·u per entry of the dense product, plus the three-term sum's own rounding)
        bound = (D.H.shape[0] * u * float((D.H.abs() @ xi.abs()).norm())
                 + 4 * u * float(a_g.norm() + 2 * GAMMA * xi.norm()))
        assert float((hxi - 2 * GAMMA * xi + a_g).norm()) <= bound
        # and Aθ is then an eigenvector of H_γ for 2γ up to ‖A g_γ‖/‖Aθ‖, which stationarity made small
        assert float(a_g.norm() / xi.norm()) <= STATIONARY_SHARE * 2 * GAMMA


def test_before_relaxation_it_misses_2gamma_by_exactly_the_remainder(setup):
    model, loss, batch, verified = setup
    pred, _ = wd_stationary_findings(model, loss, batch, verified, GAMMA, probes=1, seed=0, relax=False)
    (p,) = pred.probes
    assert pred.verdict == "inconclusive" and not pred.stationary
    assert pred.remainder > STATIONARY_SHARE * 2 * GAMMA  # the checkpoint is not stationary for L_γ
    # ρ = 2γ − ⟨A²θ, g_γ⟩/‖ξ‖² exactly (the prediction), up to rounding: it misses 2γ by the remainder
    assert abs(p.rayleigh - p.predicted) <= p.tolerance
    assert abs(abs(p.rayleigh - 2 * GAMMA) - pred.remainder) <= p.tolerance
    assert abs(p.rayleigh - 2 * GAMMA) > 100 * p.tolerance


def test_a_broken_generator_is_violated_by_its_first_order_term(setup):
    """Scale the final LayerNorm by c and the head's columns by 1/c² (the logits then scale by 1/c): no
    longer a symmetry. Then Hξ + Aᵀg = ∇φ with φ = ⟨g, Aθ⟩ ≠ 0, so at a stationary point ρ − 2γ = ⟨ξ, ∇φ⟩/‖ξ‖²."""
    model, loss, batch, verified = setup
    t = _head_family(verified)
    broken = ScaleFamily("broken[ln_f c, head 1/c^2]", "ln_gain_rescale",
                         [[[p, d, i, 2 * k if p == "lm_head.weight" else k] for p, d, i, k in g] for g in t.generators])
    assert eligible(broken, verified)
    pred, _ = wd_stationary_findings(model, loss, batch, [broken], GAMMA, probes=1, seed=0)
    (p,) = pred.probes
    assert pred.stationary and pred.verdict == "violated"
    relaxed, _ = relaxed_copy(model, loss, batch, broken.params, GAMMA, 100, 1e-6 * 2 * GAMMA)
    theta = {n: x.detach().requires_grad_(True) for n, x in named_params(relaxed).items()}
    value = loss(forward(relaxed, theta, batch[0]), batch[1])
    g = dict(zip(theta, torch.autograd.grad(value, list(theta.values()), create_graph=True)))
    xi = broken.xi(theta, p.coeffs)
    phi = dot({n: g[n] for n in xi}, xi)
    grad_phi = dict(zip(theta, torch.autograd.grad(phi, list(theta.values()), allow_unused=True)))
    xi = {n: x.detach() for n, x in xi.items()}
    expected = float(dot(xi, {n: grad_phi[n] for n in xi})) / float(dot(xi, xi))
    miss = p.rayleigh - p.predicted
    assert abs(expected) > 1e6 * p.tolerance        # it fails by far more than the tolerance ...
    # ... and by the amount the first-order term predicts: ∇φ is one more double backward, with the same
    # rounding model as the HVP, so its error is within another tolerance of the same size
    assert abs(miss - expected) <= 2 * p.tolerance


def test_gamma_must_be_positive(setup):
    model, loss, batch, verified = setup
    with pytest.raises(ValueError, match="gamma must be > 0"):
        wd_stationary_findings(model, loss, batch, verified, 0.0)
