"""Findings 4 (indefiniteness of normalised networks): the matrix-free λ_min/λ_max of each scale-invariant
block and the Ritz bound against dense float64 eigh on a BatchNorm CNN (after some SGD) and a pre-LN GPT-2;
the convex-head negative control violated by exactly |bound|; an unconverged Lanczos widening the
tolerance instead of faking a verdict; the pipeline rows fitting the findings schema."""
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.discover import discover
from eqlab.analyses.identities import unit_roundoff
from eqlab.analyses.curvature.slq import rademacher_probes
from eqlab.analyses.identities import PASSES, rounding_model
from eqlab.analyses.predictions.indefiniteness import (block_indefiniteness, cms_bracket, hessian_indefiniteness,
                                                       indefiniteness_findings, negative_part_bracket,
                                                       projection_generators, ritz_bound, slq_negative_mass)
from eqlab.models import build_task, hf_tiny
from eqlab.pipeline.findings_indefinite import (FINDING, HESSIAN_MIN, NEGATIVE_SHARE, ROW_FINDINGS, SETTINGS,
                                                indefinite_rows)
from eqlab.pipeline.schema import TABLES

F64 = torch.float64
U = unit_roundoff(F64)
torch.set_num_threads(1)
CNN = {"channels": [2, 4], "hidden": 8, "bn_eps": 1e-20}


@functools.lru_cache(maxsize=None)
def _cnn_state(steps):
    task = build_task("digits_cnn", CNN, dtype=F64)
    model, loss = task.model, task.loss
    model.train()
    X, y = task.train
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        loss(model(X[i]), y[i]).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _cnn_trained(steps=20):
    """BN CNN (eps 1e-20: the exact-symmetry limit) after a few SGD steps, so g is a mid-training one
    (a fresh model each call: tests change its eps)."""
    task = build_task("digits_cnn", CNN, dtype=F64)
    task.model.load_state_dict(_cnn_state(steps))
    task.model.train()
    X, y = task.train
    return task.model, task.loss, (X[:32], y[:32])


def _gpt2():
    """Pre-LN GPT-2 with LayerNorm eps = 0, so the residual-stream scale is exact (verified)."""
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=2, n_embd=8, vocab=7, seq=4, n=8, layer_norm_epsilon=0.0)
    return model.to(F64), loss, batch


def _verified(model, loss, batch):
    return [f.transformation for f in discover(model, loss, batch).found if f.verified]


class _Dense:
    """Dense float64 H_PP, g_P, θ_P of one block by a plain double-backward operator (the oracle)."""

    def __init__(self, model, loss, batch, names):
        op = HessianOperator(model, loss, batch, names=names, method="double_backward", dtype=F64, conv="native")
        self.space = op.space
        self.H = dense_hessian(op)
        self.theta = op.space.values(op.model).double()
        self.grad = op.gradient().double()
        self.evals = torch.linalg.eigvalsh(self.H)
        self.norm = float(self.evals.abs().max())
        # eigh's backward error is O(dim·u·‖H‖) (Householder tridiagonalisation + QR, Higham §8):
        self.eig_rounding = self.H.shape[0] * U * self.norm

    def mask(self, t, k):
        zeros = {n: torch.zeros(self.space.shapes[n], dtype=F64) for n in self.space.names}
        return self.space.flatten(t.field(zeros, torch.eye(t.n_generators, dtype=F64)[k])).double()

    def ritz_2d(self, v, w):
        """Smallest Rayleigh–Ritz value of the dense H on span{v, w} (no premise used: Gram-orthonormalised)."""
        Q, _ = torch.linalg.qr(torch.stack([v, w], 1))
        return float(torch.linalg.eigvalsh(Q.T @ self.H @ Q)[0])


@pytest.fixture(scope="module", params=["digits_cnn", "gpt2"])
def case(request):
    model, loss, batch = _cnn_trained() if request.param == "digits_cnn" else _gpt2()
    ts = _verified(model, loss, batch)
    findings = indefiniteness_findings(model, loss, batch, ts, seed=1)
    dense = {f.transformation: _Dense(model, loss, batch, f.params) for f in findings}
    return request.param, {t.name: t for t in ts}, findings, dense


def test_ritz_bound_is_the_2x2_eigenvalue_and_sharper_than_the_lambda_max_form():
    gen = np.random.default_rng(0)
    for _ in range(200):
        b2, rho = 10.0 ** gen.uniform(-8, 2), gen.choice([-1, 1]) * 10.0 ** gen.uniform(-8, 4)
        lo, hi = ritz_bound(b2, rho)
        b = math.sqrt(b2)
        ref = np.linalg.eigvalsh(np.array([[0.0, -b], [-b, rho]]))
        # eigvalsh is backward stable: each eigenvalue within a few u·‖R‖ of the truth; ritz_bound's
        # cancellation-free form is accurate to a few u relative, so compare in units of u·‖R‖
        scale = max(abs(rho), b)
        assert abs(lo - ref[0]) <= 8 * U * scale and abs(hi - ref[1]) <= 8 * U * scale, (b2, rho, lo, hi, ref)
        assert lo < 0 < hi
        # μ₋ = −b²/μ₊ and μ₊ ≤ λ_max: every λ_max ≥ μ₊ gives a weaker (larger) bound −b²/λ_max
        assert lo <= -b2 / (hi * (1 + gen.uniform(0, 10))) * (1 - 4 * U)
    assert ritz_bound(0.0, 2.0) == (0.0, 2.0)


def test_matrix_free_extremes_agree_with_dense_eigh(case):
    name, _, findings, dense = case
    assert any(not f.control for f in findings) and any(f.control for f in findings), name
    for f in findings:
        D = dense[f.transformation]
        assert f.converged, (name, f.transformation)
        # a verified Lanczos pair: |λ̂ − λ| ≤ its eigenvalue bound, plus eigh's own rounding
        assert abs(f.lambda_min - float(D.evals[0])) <= f.lambda_min_error + D.eig_rounding, \
            (name, f.transformation, f.lambda_min, float(D.evals[0]))
        assert abs(f.lambda_max - float(D.evals[-1])) <= f.lambda_max_error + D.eig_rounding, \
            (name, f.transformation, f.lambda_max, float(D.evals[-1]))
        # a Ritz value never lies below λ_min (up to rounding)
        assert f.lambda_min >= float(D.evals[0]) - D.eig_rounding


def test_predicted_bound_is_the_dense_rayleigh_ritz_value_and_the_dense_spectrum_obeys_it(case):
    name, ts, findings, dense = case
    preds = [f for f in findings if not f.control]
    families = {f.family for f in preds}
    assert families == ({"bn_scale"} if name == "digits_cnn" else {"ln_residual_scale"}), families
    for f in preds:
        D, t = dense[f.transformation], ts[f.transformation]
        m = D.mask(t, f.generator)
        th, g = m * D.theta, m * D.grad
        assert float(th @ th) == pytest.approx(f.theta_sq, rel=8 * U) and float(g @ g) == pytest.approx(f.grad_sq, rel=8 * U)
        # S is the generator with the largest ‖g_k‖²/‖θ_k‖² (the sharpest single block)
        ratios = []
        for k in projection_generators(t):
            mk = D.mask(t, k)
            if float((mk * D.theta).norm()) > 0:
                ratios.append(float((mk * D.grad).pow(2).sum() / (mk * D.theta).pow(2).sum()))
        assert f.grad_sq / f.theta_sq >= max(ratios) * (1 - 8 * U)
        # the prediction uses the premise (θᵀHθ = 0, θᵀHg = −‖g‖²); the dense 2-D Rayleigh–Ritz value does
        # not: their agreement within the row's tolerance is the premise (rows 2a/4a) at this θ
        assert abs(D.ritz_2d(th, g) - f.bound) <= f.bound_rounding, (name, D.ritz_2d(th, g), f.bound)
        assert f.bound < 0 and f.bound <= f.bound_lambda_max
        assert float(D.evals[0]) <= f.bound + D.eig_rounding      # Courant–Fischer on the dense truth
        assert f.verdict == "holds" and f.residual <= 0, (name, f.transformation, f.lambda_min, f.bound)
        # it discriminates: the bound is not trivially loose, it sits inside the block's spectrum
        assert float(D.evals[0]) < f.bound < float(D.evals[-1])


def test_convex_head_control_is_violated_by_exactly_the_bound(case):
    name, _, findings, dense = case
    controls = [f for f in findings if f.control]
    assert [f.family for f in controls] == ["softmax_translation"]
    for f in controls:
        D = dense[f.transformation]
        # the head block is PSD with exact null vectors: dense λ_min = 0 to eigh's rounding
        assert abs(float(D.evals[0])) <= D.eig_rounding, (name, float(D.evals[0]))
        assert f.bound < -10 * f.tolerance  # a clearly negative prediction the head cannot meet
        assert f.verdict == "violated"
        # by the expected amount: λ_min − bound = |bound| (λ_min = 0), to the row's tolerance
        assert abs(f.residual - abs(f.bound)) <= f.tolerance, (name, f.residual, f.bound, f.tolerance)


def test_unconverged_lanczos_widens_the_tolerance_instead_of_faking_a_violation():
    model, loss, batch = _cnn_trained()
    t = next(t for t in _verified(model, loss, batch) if t.name == "bn_scale[conv1->bn1]")
    full = block_indefiniteness(model, loss, batch, t, False, max_iter=40, seed=1)
    short = block_indefiniteness(model, loss, batch, t, False, max_iter=3, seed=1)
    assert full.converged and not short.converged
    assert short.lambda_min_error == short.lambda_min_residual and short.tolerance >= short.lambda_min_residual
    assert "NOT converged" in short.tolerance_reason
    # three steps leave the Ritz value above the bound; the residual-widened tolerance keeps the verdict
    assert short.lambda_min > short.bound and short.verdict == "holds"
    # the bound does not depend on Lanczos: the same gradient and HVP in both calls, so equal up to the rounding
    # of the 2x2 Rayleigh-Ritz solve (a few operations, each <= u relative): 16 u
    assert short.bound == pytest.approx(full.bound, rel=16 * torch.finfo(torch.float64).eps)


def test_rows_fit_the_findings_schema_and_a_model_without_scale_invariance_has_none():
    model, loss, batch = _cnn_trained(steps=0)
    spec = SimpleNamespace(seed=0)
    verified = _verified(model, loss, batch)
    rows = indefinite_rows(spec, model, loss, batch, verified, {})
    columns = set(TABLES["findings"].names)
    assert rows and all(set(r) <= columns for r in rows)
    assert {r["finding"] for r in rows} == set(ROW_FINDINGS)
    blocks = [r for r in rows if r["finding"] == FINDING]
    assert sorted((r["symmetry"], r["control"], r["verdict"]) for r in blocks) == [
        ("bn_scale", False, "holds"), ("bn_scale", False, "holds"), ("softmax_translation", True, "violated")]
    assert all(r["hvps"] <= SETTINGS["indefinite_max_iter"] + 1 for r in rows)
    (hmin,) = [r for r in rows if r["finding"] == HESSIAN_MIN]
    (share,) = [r for r in rows if r["finding"] == NEGATIVE_SHARE]
    assert hmin["verdict"] == "holds" and hmin["predicted"] == min(r["predicted"] for r in blocks if not r["control"])
    # a measurement: no prediction, no verdict; its enclosure as tolerance, ||g_S|| as scale
    assert share["predicted"] is None and share["verdict"] is None and share["residual"] is None
    assert 0 < share["statistic"] < 1 and share["tolerance"] > 0 and share["scale"] > 0
    assert share["probes"] == 2 and share["hvps"] == 2 * SETTINGS["indefinite_slq_steps"]
    # no scale-invariant family (LayerNorm eps = 1e-5 makes the residual scale only approximate): no rows,
    # and no Lanczos spent on a lone control
    m2, l2, b2 = hf_tiny.gpt2(n_layer=1, n_head=2, n_embd=8, vocab=7, seq=4, n=8, layer_norm_epsilon=1e-5)
    m2 = m2.to(F64)
    assert indefinite_rows(spec, m2, l2, b2, _verified(m2, l2, b2), {}) == []


def test_a_batchnorm_epsilon_breaks_the_premise_linearly_and_a_large_one_violates_the_bound():
    """The same block and generator with the BN eps raised (weights unchanged): the predicted Ritz matrix
    [[0, -b], [-b, rho]] departs from the dense Rayleigh-Ritz matrix by O(eps) (first order in eps/Var), which
    the slack of lambda_min below the bound absorbs at small eps (as a control it would be inconclusive:
    why the convex head is the row's control); at eps = 1 the block is nearly linear and the bound fails."""
    model, loss, batch = _cnn_trained()
    t = next(t for t in _verified(model, loss, batch) if t.name == "bn_scale[conv2->bn2]")
    dev, verdicts = {}, {}
    for eps in (1e-6, 1e-3, 1.0):
        model.bn1.eps = model.bn2.eps = eps
        f = block_indefiniteness(model, loss, batch, t, False, seed=1)
        D = _Dense(model, loss, batch, f.params)
        m = D.mask(t, f.generator)
        dev[eps] = D.ritz_2d(m * D.theta, m * D.grad) - f.bound
        verdicts[eps] = f.verdict
        assert abs(dev[eps]) > 1e3 * f.bound_rounding  # far above rounding: the premise is measurably broken
    assert 0.8e3 <= dev[1e-3] / dev[1e-6] <= 1.25e3, dev  # linear in eps
    assert verdicts == {1e-6: "holds", 1e-3: "holds", 1.0: "violated"}, verdicts


def test_max_blocks_keeps_the_most_stringent_families():
    model, loss, batch = _cnn_trained()
    ts = _verified(model, loss, batch)
    every = [f for f in indefiniteness_findings(model, loss, batch, ts, seed=1) if not f.control]
    kept = [f for f in indefiniteness_findings(model, loss, batch, ts, seed=1, max_blocks=1) if not f.control]
    assert len(every) == 2 and len(kept) == 1
    best = max(every, key=lambda f: f.grad_sq / f.theta_sq)
    assert kept[0].transformation == best.transformation


# ---- the whole Hessian: bottom Lanczos eigenvalue against the block bound, SLQ negative share ----------------
PROBES, STEPS = 3, 20


@pytest.fixture(scope="module", params=["digits_cnn", "gpt2"])
def whole(request):
    """The full-model rows and the dense float64 full Hessian they are checked against."""
    model, loss, batch = _cnn_trained() if request.param == "digits_cnn" else _gpt2()
    ts = _verified(model, loss, batch)
    blocks = indefiniteness_findings(model, loss, batch, ts, seed=1)
    h = hessian_indefiniteness(model, loss, batch, ts, blocks, probes=PROBES, steps=STEPS, seed=1)
    D = _Dense(model, loss, batch, None)
    return request.param, blocks, h, D


def test_full_hessian_lambda_min_agrees_with_eigh_and_obeys_the_sharpest_block_bound(whole):
    name, blocks, h, D = whole
    assert h.dim == D.H.shape[0] and h.converged, name
    assert abs(h.lambda_min - float(D.evals[0])) <= h.lambda_min_error + D.eig_rounding, (name, h.lambda_min)
    preds = [b for b in blocks if not b.control]
    assert h.bound == min(b.bound for b in preds)
    # interlacing: the full lambda_min lies below every block's, which lies below its bound
    for b in preds:
        assert float(D.evals[0]) <= b.lambda_min + b.lambda_min_error + D.eig_rounding
    assert h.verdict == "holds" and h.residual < 0, (name, h.lambda_min, h.bound)
    # the bound is not trivially loose: it sits inside the full spectrum
    assert float(D.evals[0]) < h.bound < 0 < float(D.evals[-1])


def _probe_measures(h, D):
    """eigh's exact spectral measure of each SLQ probe: weights (u_i^T v)^2/dim on the eigenvalues."""
    V = rademacher_probes(h.dim, h.probes, 1)
    _, U = torch.linalg.eigh(D.H)
    return [(U.T @ V[:, p]) ** 2 / h.dim for p in range(h.probes)]


def test_each_probe_brackets_enclose_its_exact_spectral_measure(whole):
    """The Chebyshev-Markov-Stieltjes enclosures are deterministic statements about each probe's own measure
    nu_v: they must contain eigh's exact integral of lambda_- and mass below -tau, probe by probe."""
    name, _, h, D = whole
    ev = D.evals
    neg = (-ev).clamp(min=0)
    # slack: the Gauss rule is of the HVP operator, within tau of H (Weyl, lambda_- 1-Lipschitz: tau); eigh's
    # eigenvalues are within eig_rounding and its weights (sums of dim products of unit vectors) within dim*u
    slack_neg = h.tau + D.eig_rounding + h.dim * U * D.norm
    slack_frac = h.dim * U
    # the fraction below -tau is a well-posed count if no eigenvalue of H sits in (-2 tau, 0) beyond eigh's
    # rounding: H's products are within tau (Weyl), so the exact null atom (|eigh value| <= eig_rounding) is
    # never counted and everything below -2 tau always is
    e = D.eig_rounding
    assert not bool(((ev > -2 * h.tau - e) & (ev < -e)).any()), name
    for c, pm in zip(_probe_measures(h, D), h.probe_masses):
        exact_neg = float(c @ neg)
        exact_frac = float(c[ev < -h.tau].sum())
        assert pm.neg_lower - slack_neg <= exact_neg <= pm.neg_upper + slack_neg, (name, exact_neg, pm)
        assert pm.frac_lower - slack_frac <= exact_frac <= pm.frac_upper + slack_frac, (name, exact_frac, pm)
        # the Gauss values themselves lie inside their enclosures, and the first moment is exact
        assert pm.neg_lower <= pm.neg <= pm.neg_upper and pm.frac_lower <= pm.frac <= pm.frac_upper
        assert abs(pm.mean - float(c @ ev)) <= slack_neg, (name, pm.mean, float(c @ ev))
    # the pooled share encloses the share of the probes' exact measures (same monotone map of the mean)
    exact = [(float(c @ neg), float(c @ ev)) for c in _probe_measures(h, D)]
    n, m = sum(e[0] for e in exact) / len(exact), sum(e[1] for e in exact) / len(exact)
    share, lo, hi = h.share
    rel = slack_neg / max(m + 2 * n, 1e-300)  # the share's slack: slack_neg over tr|H|/dim, to first order
    assert lo - rel <= n / (m + 2 * n) <= hi + rel, (name, n / (m + 2 * n), h.share)


def test_slq_negative_part_and_share_agree_with_eigh_within_enclosure_plus_monte_carlo(whole):
    name, _, h, D = whole
    ev = D.evals
    w, U_ = torch.linalg.eigh(D.H)
    negH = (U_ * (-w).clamp(min=0)) @ U_.T  # H_- = U max(-Lambda, 0) U^T
    true_neg = float((-ev).clamp(min=0).mean())
    # Rademacher: Var(v^T A v)/dim^2 = 2 (||A||_F^2 - sum A_ii^2)/dim^2, and the mean of PROBES probes
    sigma = math.sqrt(2 * (float((negH ** 2).sum()) - float((negH.diagonal() ** 2).sum()))) / h.dim / math.sqrt(h.probes)
    est, lo, hi = h.negative_part
    assert est - (hi - lo) - 4 * sigma <= true_neg <= est + (hi - lo) + 4 * sigma, (name, est, lo, hi, true_neg, sigma)
    # and the statistic is not trivially compatible with PSD: the enclosure's lower end is clearly above 0
    assert h.share[1] > 0.1, (name, h.share)
    assert h.grad_s_norm > 0 and 0 < h.share[0] < 1


def test_convex_head_control_has_no_negative_mass_where_the_bn_model_has_plenty():
    """Negative control: the classifier head's own block is PSD (convex in the logits), so every Gauss node
    lies above its lambda_min = 0 up to rounding: the same SLQ statistic is 0 to rounding there, while the
    scale-invariant model's enclosure sits far above it."""
    model, loss, batch = _cnn_trained()
    ts = _verified(model, loss, batch)
    head = next(t for t in ts if t.family == "softmax_translation")
    op = HessianOperator(model, loss, batch, names=head.params, method="double_backward", dtype=F64)
    D = _Dense(model, loss, batch, head.params)
    tau = 2 * PASSES[2] * rounding_model(model, loss, batch, 1).gamma() * D.norm
    per, smallest, _ = slq_negative_mass(op, PROBES, STEPS, 1, -tau, tau)
    assert smallest >= -tau, smallest  # a Ritz value of a PSD operator, up to the products' rounding
    for pm in per:
        # the only interval below 0 is [-tau, 0]: lambda_- of a node there is <= tau
        assert pm.neg <= tau and pm.neg_upper <= tau and pm.frac == 0.0, pm
    blocks = indefiniteness_findings(model, loss, batch, ts, seed=1)
    h = hessian_indefiniteness(model, loss, batch, ts, blocks, probes=PROBES, steps=STEPS, seed=1)
    assert h.negative_part[1] > 1e6 * tau, (h.negative_part, tau)


def test_cms_and_layer_cake_brackets_on_a_known_discrete_measure():
    """On a measure with more atoms than nodes: a 3-node Gauss rule of a 12-atom measure (built from its
    Jacobi matrix by plain Lanczos in float64) brackets F at every t and encloses the integral of lambda_-."""
    gen = np.random.default_rng(3)
    x = np.sort(gen.uniform(-2, 3, 12))
    w = gen.uniform(0.1, 1, 12)
    w /= w.sum()
    # Lanczos on diag(x) from sqrt(w): the Jacobi matrix of the measure
    A = np.diag(x)
    q, qp, b = np.sqrt(w), np.zeros(12), 0.0
    alphas, betas = [], []
    for j in range(3):
        r = A @ q - b * qp
        a = float(q @ r)
        alphas.append(a)
        r -= a * q
        b = float(np.linalg.norm(r))
        if j < 2:
            betas.append(b)
            qp, q = q, r / b
    T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    nodes, S = np.linalg.eigh(T)
    weights = S[0] ** 2
    # the moments 0..5 are exact (Gauss, m = 3): a check on the construction, rounding ~ 12 * u * 3^5
    for p in range(6):
        assert abs(float(weights @ nodes ** p) - float(w @ x ** p)) <= 64 * 12 * U * 3.0 ** p
    for t in np.linspace(-2.5, 3.5, 61):
        _, lo, hi = cms_bracket(nodes, weights, t)
        F = float(w[x < t].sum())
        assert lo - 64 * U <= F <= hi + 64 * U, (t, lo, F, hi)
    g, lo, hi = negative_part_bracket(nodes, weights, x[0] - 0.5)
    exact = float(w @ np.maximum(-x, 0))
    assert lo - 64 * U * 3 <= exact <= hi + 64 * U * 3 and lo <= g <= hi, (lo, exact, hi)
    assert hi - lo < 0.8 * 2  # informative: narrower than the support below 0 (width 2) times the mass 0.8
