"""Findings 1 (flat and sharp symmetry directions): the HVP Rayleigh quotients against a dense float64
Hessian, the identity's prediction against that truth, the negative controls (random directions; a
BatchNorm epsilon that breaks scale flatness by exactly the orbit's second derivative), and the stage
writing `findings` rows in a real study that read back through SQL."""
import math

import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.functional import forward, named_params
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.discover import discover
from eqlab.analyses.predictions.flat_directions import flat_direction_findings
from eqlab.analyses.predictions.gradient_alignment import alignment_findings
from eqlab.models import build_task, hf_tiny
from eqlab.pipeline.findings_align import top_eigenpairs

F64 = torch.float64
torch.set_num_threads(1)  # small problems: extra threads only contend on the shared machine
CNN = {"channels": [2, 4], "hidden": 8}


def _cnn(bn_eps, n=32):
    task = build_task("digits_cnn", {**CNN, "bn_eps": bn_eps}, dtype=F64)
    task.model.train()  # batch statistics: the objective BatchNorm's scale symmetry belongs to
    X, y = task.train
    return task.model, task.loss, (X[:n], y[:n])


def _gpt2():
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=2, n_embd=8, vocab=7, seq=4, n=8, layer_norm_epsilon=1e-12)
    return model.to(F64), loss, batch


def _verified(model, loss, batch):
    return [f.transformation for f in discover(model, loss, batch).found if f.verified]


def _dense(model, loss, batch):
    """Dense float64 Hessian by an operator built apart from the code under test (plain double backward)."""
    op = HessianOperator(model, loss, batch, method="double_backward", dtype=F64)
    return dense_hessian(op), op.space


def _flat(space: ParamSpace, v: dict) -> torch.Tensor:
    theta = named_params_like(space, v)
    return space.flatten(theta)


def named_params_like(space, v):
    return {n: v[n] if n in v else torch.zeros(space.shapes[n], dtype=F64) for n in space.names}


@pytest.fixture(scope="module", params=["digits_cnn", "gpt2"])
def case(request):
    model, loss, batch = _cnn(1e-20) if request.param == "digits_cnn" else _gpt2()
    ts = _verified(model, loss, batch)
    findings = flat_direction_findings(model, loss, batch, ts, probes=2, seed=3, keep_directions=True)
    H, space = _dense(model, loss, batch)
    return request.param, findings, H, space


def test_rayleigh_quotients_match_the_dense_hessian(case):
    name, findings, H, space = case
    assert findings, name
    for f in findings:
        for p in f.probes:
            v = _flat(space, p.direction)
            dense = float(v @ H @ v) / float(v @ v)
            # both are exact float64 contractions of the same H: they differ by rounding, which the
            # probe's tolerance bounds (it is the I2 rounding bound contracted with v)
            assert abs(dense - p.rayleigh) <= p.tolerance, (name, f.transformation, f.control, dense, p.rayleigh)


def test_generators_hold_their_prediction_and_controls_are_told_apart(case):
    name, findings, H, space = case
    gens = [f for f in findings if not f.control]
    assert {f.verdict for f in gens} == {"holds"}, [(f.transformation, f.verdict) for f in gens]
    for f in gens:
        for p in f.probes:
            v = _flat(space, p.direction)
            dense = float(v @ H @ v) / float(v @ v)
            assert abs(dense - p.predicted) <= p.tolerance, (name, f.transformation)  # prediction vs truth
    # the prediction is not trivially zero everywhere: rescalings carry the -<g, J xi> term
    nonzero = [f for f in gens if max(abs(p.predicted) for p in f.probes) > 1e3 * f.worst.tolerance]
    assert nonzero, [(f.transformation, f.prediction) for f in gens]
    controls = {f.transformation: f for f in findings if f.control}
    for f in controls.values():
        ps = [space.slice(n) for n in f_params(f, space)]
        rows = torch.cat([H[s] for s in ps])
        if f.verdict == "inconclusive":
            # only where the family's parameters are flat in every direction (a bias feeding a BatchNorm):
            # the dense rows' spectral norm, a curvature like ρ, is under the control's own rounding bound
            assert float(torch.linalg.matrix_norm(rows, 2)) <= f.worst.tolerance, f.transformation
        else:
            assert f.verdict == "violated"
            w = f.worst
            # a random direction misses by a generic curvature: many tolerances, and a visible share of κ
            assert abs(w.rayleigh - w.predicted) > 1e6 * w.tolerance, f.transformation
    assert sum(f.verdict == "violated" for f in controls.values()) >= 2, name


def f_params(f, space):
    """The parameters a finding's directions live on (where its control's random vector is nonzero)."""
    d = f.probes[0].direction
    return [n for n in space.names if n in d]


def _orbit_second_derivative(model, loss, batch, t, c) -> float:
    """d²/ds² L(exp(s ξ_c) θ) at s = 0 by double autograd through s alone (no HVP on θ)."""
    theta = named_params(model)
    s = torch.zeros((), dtype=F64, requires_grad=True)
    moved = dict(theta)
    moved.update(t.exp({n: theta[n] for n in t.params}, c, s))
    L = loss(forward(model, moved, batch[0]), batch[1])
    (d1,) = torch.autograd.grad(L, s, create_graph=True)
    (d2,) = torch.autograd.grad(d1, s)
    return float(d2)


def test_bn_epsilon_breaks_scale_flatness_by_the_orbit_curvature():
    """Negative control by a broken symmetry: with ε = 1e-3 the BatchNorm scale generator is no longer a
    symmetry. Along its orbit γ(s) = exp(sD)θ, L'' = ⟨∇⟨g, ξ⟩, ξ⟩ = ξᵀHξ + ξᵀJ_ξᵀg, so the Rayleigh quotient
    must miss the prediction by exactly L''(0)/‖ξ‖²: measured by autograd through s, independently."""
    exact = _cnn(1e-20)
    (bn,) = [t for t in _verified(*exact) if t.name == "bn_scale[conv1->bn1]"]
    broken = _cnn(1e-3)
    broken[0].load_state_dict(exact[0].state_dict())
    for model, eps in ((exact[0], 1e-20), (broken[0], 1e-3)):
        (f, _) = flat_direction_findings(model, exact[1], exact[2], [bn], probes=2, seed=1, keep_directions=True)
        for p in f.probes:
            xn2 = sum(float((x * x).sum()) for x in p.direction.values())
            miss = _orbit_second_derivative(model, exact[1], exact[2], bn, p.coeffs) / xn2
            # the orbit's L'' is a forward + two backwards through s: within the same rounding bound
            assert abs((p.rayleigh - p.predicted) - miss) <= 2 * p.tolerance, (eps, p.rayleigh, p.predicted, miss)
        if eps == 1e-3:
            assert f.verdict == "violated" and abs(miss) > 1e3 * p.tolerance, (miss, p.tolerance)
        else:
            assert f.verdict == "holds"


@pytest.fixture(scope="module", params=["digits_cnn", "gpt2"])
def dense_case(request):
    model, loss, batch = _cnn(1e-20) if request.param == "digits_cnn" else _gpt2()
    H, space = _dense(model, loss, batch)
    evals, evecs = torch.linalg.eigh(H)
    return request.param, model, loss, batch, _verified(model, loss, batch), H, space, evals, evecs


def test_alignment_holds_on_dense_eigenpairs_and_controls_are_told_apart(dense_case):
    name, model, loss, batch, ts, H, space, evals, evecs = dense_case
    top = torch.argsort(evals, descending=True)[:3]
    lams = [float(evals[i]) for i in top]
    vecs = [space.unflatten(evecs[:, i]) for i in top]
    residuals = [float(torch.linalg.vector_norm(H @ evecs[:, i] - evals[i] * evecs[:, i])) for i in top]
    found = alignment_findings(model, loss, batch, ts, lams, vecs, residuals, probes=2, seed=5)
    gens = [f for f in found if not f.control]
    assert gens and {f.verdict for f in gens} == {"holds"}, [(f.transformation, f.rank, f.verdict) for f in gens]
    # not trivially 0 = 0: the gradient's component along what the generator does to u_1 is resolved
    assert any(abs(f.prediction) > 1e3 * f.worst.tolerance for f in gens), name
    ctrls = [f for f in found if f.control]
    assert sum(f.verdict == "violated" for f in ctrls) >= 2, name
    for f in ctrls:
        w = f.worst
        assert f.verdict == "violated" or abs(w.measured) <= w.tolerance, (f.transformation, f.rank)
    # the wrong eigenvalue (the pair's own vector, the next pair's value) breaks the identity
    wrong = alignment_findings(model, loss, batch, ts, [lams[1], lams[0]], vecs[:2], residuals[:2], probes=2, seed=5)
    assert any(f.verdict == "violated" for f in wrong if not f.control), name


def test_lanczos_eigenpairs_agree_with_the_dense_oracle(dense_case):
    name, model, loss, batch, ts, H, space, evals, evecs = dense_case
    lams, vecs, residuals, hvps = top_eigenpairs(model, loss, batch, k=3, max_iter=60, seed=0)
    top = torch.sort(evals, descending=True).values[:3]
    for lam, r, exact in zip(lams, residuals, top):
        # a unit vector with residual r has an eigenvalue within r of its Ritz value (Weyl); 2 u |λ| covers the
        # rounding of the dense eigh itself
        assert abs(lam - float(exact)) <= r + 8 * torch.finfo(F64).eps * float(evals.abs().max()), (name, lam, exact, r)
    assert 0 < hvps <= 60


def test_stage_writes_findings_rows_in_a_real_study(ray_cluster, tmp_path):
    import tomllib

    from eqlab.pipeline.query import run_query
    from eqlab.pipeline.runner import run_study
    from eqlab.pipeline.study import parse_study
    from tiny_study import tiny_study

    study = parse_study(tomllib.loads(tiny_study("findings_flat")))
    run_study(study, tmp_path, log=lambda *_: None)
    _, rows = run_query(tmp_path, """
        select step, symmetry, control, verdict, optimizer, lr, weight_decay, dtype, statistic, predicted,
               residual, tolerance, tolerance_reason from findings where finding = 'flat_symmetry_direction'
        order by step, transformation, control""")
    steps = sorted({r[0] for r in rows})
    assert steps == list(study.runs[0].checkpoint_steps), steps
    spec = study.runs[0]
    for step, sym, control, verdict, opt, lr, wd, dtype, stat, pred, res, tol, reason in rows:
        assert (opt, lr, wd, dtype) == (spec.optimizer, spec.lr, spec.weight_decay, "float64")
        assert math.isfinite(stat) and math.isfinite(pred) and tol > 0 and "gamma_n" in reason
        if not control:
            assert verdict == "holds" and res <= tol, (step, sym, res, tol)
        elif sym in ("bn_scale", "relu_rescale", "softmax_translation"):
            assert verdict == "violated" and res > tol, (step, sym)
    assert {"bn_scale", "relu_rescale", "softmax_translation"} <= {r[1] for r in rows}
    _, rows = run_query(tmp_path, """
        select finding, control, verdict, count(*) from findings group by all order by all""")
    got = {(f, c, v): n for f, c, v, n in rows}
    assert got.get(("gradient_hessian_alignment", False, "holds"), 0) > 0, got
    assert ("gradient_hessian_alignment", False, "violated") not in got, got
    assert got.get(("gradient_hessian_alignment", True, "violated"), 0) > 0, got
