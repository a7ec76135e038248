"""Conserved quantities under real torch.optim steps (float64): the exact discrete-time laws and controls."""
import copy

import pytest
import torch

from eqlab.analyses import conservation as C
from eqlab.analyses.discover import discover, negative_controls
from eqlab.analyses.transforms import ScaleFamily
from eqlab.models import build_task, hf_tiny
from eqlab.models.losses import cross_entropy
from eqlab.models.toy_mlp import MLP, toy_batch

torch.set_num_threads(1)


def _mlp():
    torch.manual_seed(0)
    model = MLP((8, 16, 16, 4), "relu").double()
    batch = toy_batch()
    fams = {t.family: t for t in discover(model, cross_entropy, batch).verified}
    return model, batch, fams


@pytest.fixture(scope="module")
def gpt2():
    model, loss, batch = hf_tiny.gpt2(layer_norm_epsilon=1e-12)
    model = model.double()
    fams = {}
    for t in discover(model, loss, batch).verified:
        fams.setdefault(t.family, t)
    return model, loss, batch, fams


def _steps(model, loss, batch, t, steps=3, **opt):
    m = copy.deepcopy(model)
    return C.run_steps(m, loss, batch, t, torch.optim.SGD(m.parameters(), **opt), steps)


@pytest.mark.parametrize("family", ["relu_rescale", "softmax_translation"])
def test_sgd_law_on_mlp(family):
    model, batch, fams = _mlp()
    t = fams[family]
    for s in _steps(model, cross_entropy, batch, t, lr=0.2):
        # within the rounding level of the compared terms (2·γ_n(u)·Σ|terms|, C.rounding_level), and a
        # generic first-order change of this step is far above it: the check can fail
        assert s.verdict == "holds" and s.error <= s.rounding < 1e-3 * s.scale, (s.error, s.rounding, s.scale)
        if family == "relu_rescale":   # ΔQ_i = η²(‖g_in‖² + g_b² − ‖g_out‖²), per unit
            assert float(torch.linalg.vector_norm(s.change - 0.2 ** 2 * s.grad_term)) <= s.rounding
        else:                          # column sums of the unembedding: exactly conserved
            assert float(torch.linalg.vector_norm(s.change)) <= s.rounding


@pytest.mark.parametrize("opt", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                 dict(momentum=0.5, dampening=0.3)])
def test_momentum_law_with_velocity(gpt2, opt):
    model, loss, batch, fams = gpt2
    for fam in ("qk_gl", "vo_gl", "ln_gain_rescale", "relu_rescale", "softmax_translation"):
        steps = _steps(model, loss, batch, fams[fam], lr=0.5, **opt)
        for k, s in enumerate(steps):
            assert s.verdict == "holds", (fam, k, s.error, s.rounding_reason)


def test_momentum_without_the_velocity_term_misses(gpt2):
    """Control: dropping the −2aημ·B(θ, b) term (the plain η² law) is off by that term, at steps ≥ 2."""
    model, loss, batch, fams = gpt2
    t = fams["vo_gl"]
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    s1, s2 = C.run_steps(m, loss, batch, t, opt, 2)
    assert s1.verdict == s2.verdict == "holds"
    naive_change = 0.5 ** 2 * s2.grad_term          # η² Q(g), as if there were no momentum
    miss = torch.linalg.vector_norm(s2.change - naive_change) / torch.linalg.vector_norm(s2.change)
    assert miss > 0.1                               # O(1): momentum's correction dominates


def test_qk_imbalance_matrix_per_head(gpt2):
    model, loss, batch, fams = gpt2
    t = fams["qk_gl"]
    D = C.block_matrices(t, C.quantity(t, dict(model.named_parameters())))
    assert len(D) == 2 and D[0].shape == (8, 8)
    W = dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"].detach()
    b = dict(model.named_parameters())["transformer.h.0.attn.c_attn.bias"].detach()
    Xq = torch.cat([W[:, 0:8], b[None, 0:8]])       # head 0 queries (bias as an extra row)
    Xk = torch.cat([W[:, 16:24], b[None, 16:24]])   # head 0 keys
    # each entry sums 2·rows products: error ≤ γ_rows(u)·(‖Xq‖_F² + ‖Xk‖_F²) per entry (Cauchy–Schwarz)
    from eqlab.analyses.identities import gamma, unit_roundoff
    bound = gamma(2 * Xq.shape[0], unit_roundoff(torch.float64)) * float(Xq.square().sum() + Xk.square().sum())
    assert float((D[0] - (Xq.T @ Xq - Xk.T @ Xk)).abs().max()) <= bound


def test_weight_decay_scales_by_one_minus_eta_lambda_squared():
    model, batch, fams = _mlp()
    t = fams["relu_rescale"]
    lr, lam = 0.2, 0.05
    for s in _steps(model, cross_entropy, batch, t, lr=lr, weight_decay=lam):
        assert s.verdict == "holds", s.rounding_reason  # Q' = (1−ηλ)² Q + η² Q(g + ...) exactly
        # control: the no-decay law Q' = Q + η² Q(g) misses by exactly (1 − (1−ηλ)²)·Q (+ O(η²λ))
        no_decay = s.before + lr ** 2 * s.grad_term
        miss = s.after - no_decay
        expected = ((1 - lr * lam) ** 2 - 1) * s.before
        rel = torch.linalg.vector_norm(miss - expected) / torch.linalg.vector_norm(expected)
        assert rel < 0.05, rel                       # the remainder is η²λ-size (g·θ cross terms)
        assert torch.linalg.vector_norm(expected) > 100 * torch.linalg.vector_norm(s.predicted - s.after)


def test_wrong_sign_rescale_is_not_conserved():
    """Control: for a non-symmetry B(θ, g) + B(g, θ) ≠ 0 and the law misses at first order in η."""
    model, batch, _ = _mlp()
    (bad,) = [c for c in negative_controls(model, cross_entropy, batch) if isinstance(c, ScaleFamily)][:1]
    (s,) = _steps(model, cross_entropy, batch, bad, steps=1, lr=0.01)
    assert s.relative > 1.0                          # first-order term ≫ the η² term at small η
    assert s.verdict == "violated" and s.error > 1e6 * s.rounding


def _bn(eps):
    task = build_task("digits_cnn", {"bn_eps": eps}, 0, torch.float64)
    X, y = task.train
    return task, (X[:16], y[:16])


def test_bn_scale_norm_grows_by_eta_squared_grad_norm():
    task, batch = _bn(1e-20)  # the exact limit: eps/Var ~ 1e-18, below float64 rounding
    t = next(t for t in discover(task.model, task.loss, batch).verified if t.family == "bn_scale")
    for s in _steps(task.model, task.loss, batch, t, steps=2, lr=0.1):
        assert s.verdict == "holds", s.rounding_reason
        assert bool((s.change > 0).all())            # ‖θ_c‖² only grows under SGD


def test_bn_epsilon_breaks_the_law_by_the_dropped_cross_term():
    """Control: BatchNorm's ε breaks the channel scale symmetry, so ⟨g_c, θ_c⟩ ≠ 0 and the law (which drops
    the cross term −2η⟨g_c, θ_c⟩ of ‖θ_c − ηg_c‖²) misses by exactly that term. ε = 1e-8 is caught;
    ε = 1e-12 (a ~1e-13 miss here) is below this check's worst-case rounding level (~1e-11), so this check
    cannot discriminate it — the order-2 identity check in `analyses.identities` does."""
    exact, batch = _bn(1e-20)
    t = next(t for t in discover(exact.model, exact.loss, batch).verified if t.family == "bn_scale")
    task, _ = _bn(1e-8)
    lr = 0.1
    (s,) = _steps(task.model, task.loss, batch, t, steps=1, lr=lr)
    assert s.verdict == "violated", (s.error, s.rounding)
    g = C._grads(copy.deepcopy(task.model), task.loss, batch)
    th = {n: p.detach() for n, p in task.model.named_parameters()}
    cross = -lr * (C.bilinear(t, th, g) + C.bilinear(t, g, th))   # the term the symmetry would zero
    miss = s.change - (s.predicted - s.before)
    # the miss is that term, up to the law's own rounding level
    assert float(torch.linalg.vector_norm(miss - cross)) <= s.rounding < 0.1 * float(torch.linalg.vector_norm(cross))


def test_adam_drift_is_first_order_sgd_second_order():
    model, batch, fams = _mlp()
    t = fams["relu_rescale"]
    adam = lambda ps, lr: torch.optim.Adam(ps, lr=lr)  # noqa: E731
    sgd = lambda ps, lr: torch.optim.SGD(ps, lr=lr)    # noqa: E731
    lrs = (2e-3, 1e-3)
    da = [C.drift_per_step(model, cross_entropy, batch, t, adam, lr) for lr in lrs]
    ds = [C.drift_per_step(model, cross_entropy, batch, t, sgd, lr) for lr in lrs]
    (sa,) = _steps(model, cross_entropy, batch, t, steps=1, lr=lrs[0])
    assert sa.verdict == "holds"
    (adam_step,) = C.run_steps(copy.deepcopy(model), cross_entropy, batch, t,
                               torch.optim.Adam(copy.deepcopy(model).parameters(), lr=lrs[0]), 1)
    assert adam_step.verdict == "no_law" and adam_step.predicted is None
    # Adam: drift/η is O(1) and the same at both step sizes (ratio of drifts = ratio of η)
    ra = torch.linalg.vector_norm(da[0]) / torch.linalg.vector_norm(da[1])
    assert abs(float(ra) - 2.0) < 0.05
    # SGD: drift/η² equals Q(g) at both step sizes (ratio of drifts = ratio of η²)
    gq = C.bilinear(t, *[{n: p for n, p in _grad(model, batch).items()}] * 2)
    # ΔQ ~ 1e-10 against Q ~ 1: Q(θ') − Q(θ) cancels, so the comparison is at the law's rounding level
    for lr, dd in zip(lrs, ds):
        (s,) = _steps(model, cross_entropy, batch, t, steps=1, lr=lr)
        assert float(torch.linalg.vector_norm(dd - lr ** 2 * gq)) <= s.rounding < 1e-2 * float(torch.linalg.vector_norm(dd))
    # and at equal η Adam's drift is orders of magnitude larger than SGD's
    assert torch.linalg.vector_norm(da[1]) > 30 * torch.linalg.vector_norm(ds[1])


def _grad(model, batch):
    model.zero_grad(set_to_none=True)
    cross_entropy(model(batch[0]), batch[1]).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}
