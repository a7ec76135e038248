"""Finding 3 (curvature anisotropy across blocks and along orbits): block λ_max by Lanczos on the block
operator against dense float64 block matrices, the orbit congruence c^{∓2} against the dense ratio at the
moved point, the negative controls (one-sided moves; a GELU unit's 'rescale') missing the prediction by the
amount the dense oracle says, the across-group slope on units that lie on one orbit (slope exactly 1), and
the rows fitting the findings schema."""
import math

import pyarrow as pa
import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.discover import discover
from eqlab.analyses.identities import rounding_model
from eqlab.analyses.predictions._common import with_params
from eqlab.analyses.predictions.block_anisotropy import across_verdict, block_findings, control_of_fit, ols_slope
from eqlab.analyses.transforms import ScaleFamily
from eqlab.models import build_task, hf_tiny
from eqlab.models.toy_mlp import MLP, toy_batch
from eqlab.pipeline.findings_blocks import ROW_FINDINGS, block_rows
from eqlab.pipeline.schema import TABLES
from eqlab.pipeline.study import RunSpec

F64 = torch.float64
EPS = torch.finfo(F64).eps
torch.set_num_threads(1)  # small problems: extra threads only contend on the shared machine


def _cnn():
    task = build_task("digits_cnn", {"channels": [2, 4], "hidden": 8, "bn_eps": 1e-20}, dtype=F64)
    task.model.train()  # batch statistics: the objective BatchNorm's scale symmetry belongs to
    X, y = task.train
    return task.model, task.loss, (X[:16], y[:16])


def _gpt2(activation="relu"):
    # 3 heads: a cross-head fit with one degree of freedom; eps 1e-12: LN scale-type symmetries verified
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=3, n_embd=6, vocab=7, seq=4, n=8, activation=activation,
                                      layer_norm_epsilon=1e-12)
    return model.to(F64), loss, batch


def _verified(model, loss, batch):
    return [f.transformation for f in discover(model, loss, batch).found if f.verified]


def _dense_blocks(model, loss, batch, names):
    """Dense float64 Hessian over ``names`` by plain double backward (an operator apart from the code under
    test) and the function taking a block's masks to its coordinates in that space."""
    op = HessianOperator(model, loss, batch, names=names, method="double_backward", dtype=F64)
    space = ParamSpace(model, names)
    H = dense_hessian(op)

    def coords(masks):
        return torch.cat([space.offsets[p] + torch.nonzero(m.reshape(-1)).reshape(-1) for p, m in masks.items()])
    return H, coords


def _dense_block(model, loss, batch, masks):
    """The dense float64 block matrix H_BB alone: H applied to the block's unit vectors (dim_B products of a
    plain double-backward operator over the block's parameters)."""
    names = list(masks)
    op = HessianOperator(model, loss, batch, names=names, method="double_backward", dtype=F64)
    space = ParamSpace(model, names)
    i = torch.cat([space.offsets[p] + torch.nonzero(m.reshape(-1)).reshape(-1) for p, m in masks.items()])
    E = torch.zeros(space.dim, len(i), dtype=F64)
    E[i, torch.arange(len(i))] = 1.0
    return op.matmat(E)[i]


def _smallest(rows, masks, k):
    """The k rows whose blocks have the fewest coordinates (dense oracles cost dim_B products each)."""
    return sorted(rows, key=lambda c: sum(int(m.sum()) for m in masks[c.block].values()))[:k]


def _moved(model, factors):
    params = dict(model.named_parameters())
    return with_params(model, {n: params[n].detach() * f for n, f in factors.items()})


@pytest.fixture(scope="module", params=["digits_cnn", "gpt2"])
def case(request):
    model, loss, batch = _cnn() if request.param == "digits_cnn" else _gpt2()
    ts = _verified(model, loss, batch)
    r = block_findings(model, loss, batch, ts, unit_groups=3, keep=True, seed=1)
    names = list(dict.fromkeys(p for m in r.masks.values() for p in m))
    H, coords = _dense_blocks(model, loss, batch, names)
    # both sides are float64 HVP chains (forward, backward, double backward): 4·γ_n(u) relative to |H||v|
    gam = 4 * rounding_model(model, loss, batch).gamma()
    return request.param, model, loss, batch, r, H, coords, names, gam


def test_block_lambda_max_matches_the_dense_block_matrix(case):
    name, model, loss, batch, r, H, coords, _, gam = case
    families = {s.family for s in r.sharpness}
    assert {"relu_rescale"} <= families and ({"bn_scale"} if name == "digits_cnn" else {"qk_gl", "vo_gl"}) <= families
    for s in r.sharpness:
        i = coords(r.masks[s.block])
        dense = float(torch.linalg.eigvalsh(H[i][:, i]).max())
        # a certified Ritz value lies within its true residual of λ_max; the two HVP chains differ by their
        # rounding, ≤ 4·γ_n·‖H_BB‖_∞ per product (eigvalsh's dim·eps is far below that)
        bound = s.residual + gam * float(H[i][:, i].abs().sum(1).max())
        assert s.converged, s.block
        assert abs(s.lam - dense) <= bound, (name, s.block, s.lam, dense, bound)


def test_orbit_moves_scale_block_sharpness_by_c_to_the_minus_two_e(case):
    name, model, loss, batch, r, H, coords, names, gam = case
    preds = [c for c in r.congruence if not c.control]
    assert preds and {c.verdict for c in preds} == {"holds"}, [(c.block, c.move, c.residual, c.tolerance) for c in preds]
    assert {c.move for c in preds} >= {"c=2"} and any(c.move.startswith("balanced") for c in preds)
    for c in _smallest(preds, r.masks, 4):
        i = coords(r.masks[c.block])
        Hb, Hm = H[i][:, i], _dense_block(_moved(model, c.factors), loss, batch, r.masks[c.block])
        lam0, lam1 = float(torch.linalg.eigvalsh(Hb).max()), float(torch.linalg.eigvalsh(Hm).max())
        # the dense ratio is the congruence itself, up to the rounding of the two dense Hessians (4·γ_n·‖H_BB‖_∞
        # each, relative to λ)
        rel = 2 * gam * float(Hb.abs().sum(1).max()) / lam0
        assert abs(lam1 / lam0 - c.predicted) <= c.predicted * rel, (c.block, c.move, lam1 / lam0, c.predicted)
        # and the warm-started Lanczos after the move found that same λ_max
        assert abs(c.lam_after - lam1) <= c.lam_after_residual + gam * float(Hm.abs().sum(1).max())


def test_one_sided_controls_miss_the_prediction_by_the_dense_amount(case):
    name, model, loss, batch, r, H, coords, names, gam = case
    controls = [c for c in r.congruence if c.control]
    assert controls and {c.verdict for c in controls} == {"violated"}, [(c.block, c.verdict) for c in controls]
    for c in _smallest(controls, r.masks, 3):
        i = coords(r.masks[c.block])
        Hb, Hm = H[i][:, i], _dense_block(_moved(model, c.factors), loss, batch, r.masks[c.block])
        y = c.vec
        rho0, rho1 = float(y @ Hb @ y), float(y @ Hm @ y)
        # the measured ratio is the dense Rayleigh-quotient ratio: the same contraction along y, each side
        # within its HVP chain's rounding (4·γ_n·‖H_BB‖_∞ per product, relative to ρ)
        scale = float(Hb.abs().sum(1).max()) + float(Hm.abs().sum(1).max())
        assert abs(c.statistic - rho1 / rho0) <= c.tolerance + 2 * gam * scale / abs(rho0) * max(1, abs(rho1 / rho0)), \
            (c.block, c.statistic, rho1 / rho0)
        # and the miss is an O(1) fraction of the predicted change, far beyond the rounding tolerance
        assert c.residual > 1e6 * c.tolerance and c.residual > 1e-3 * abs(1 - c.predicted), (c.block, c.residual)
    slopes = [s for s in r.slopes if s.kind == "orbit"]
    assert {s.verdict for s in slopes if not s.control} == {"holds"}
    assert {s.verdict for s in slopes if s.control} == {"violated"}


def test_gelu_units_are_no_orbit_the_same_move_is_violated():
    """Negative control 5f: the ReLU twin's rescale family on a GELU MLP (not homogeneous) is not a symmetry."""
    relu, loss, batch = _gpt2("relu")
    family = next(t for t in _verified(relu, loss, batch) if t.family == "relu_rescale")
    gelu, loss, batch = _gpt2("gelu_new")
    assert "relu_rescale" not in {t.family for t in _verified(gelu, loss, batch)}
    fake = ScaleFamily(family.name, family.family, family.generators, expected=False)
    r = block_findings(gelu, loss, batch, [fake], unit_groups=2, keep=True, seed=1)
    moved = [c for c in r.congruence if not c.control]
    assert moved and {c.verdict for c in moved} == {"violated"}
    gam = 4 * rounding_model(gelu, loss, batch).gamma()
    for c in moved:
        Hb = _dense_block(gelu, loss, batch, r.masks[c.block])
        Hm = _dense_block(_moved(gelu, c.factors), loss, batch, r.masks[c.block])
        rho0 = float(c.vec @ Hb @ c.vec)
        dense = float(c.vec @ Hm @ c.vec) / rho0
        # measured and dense Rayleigh quotients: the same contraction along y, each within its HVP rounding
        scale = float(Hb.abs().sum(1).max()) + float(Hm.abs().sum(1).max())
        assert abs(c.statistic - dense) <= c.tolerance + 2 * gam * scale / abs(rho0) * max(1, abs(dense)), \
            (c.block, c.statistic, dense)
        assert c.residual > 1e6 * c.tolerance, (c.block, c.residual, c.tolerance)


def test_units_on_one_orbit_give_an_across_slope_of_exactly_one():
    """Identical hidden units, each moved along its own orbit by c_j (a symmetry): every unit's block Hessian is
    the common one congruently scaled, so log(λ_in/λ_out) against log(‖w_out‖²/‖w_in‖²) is exactly slope 1."""
    torch.manual_seed(0)
    widths = (5, 6, 3)
    model = MLP(widths).to(F64)
    X, y = toy_batch(widths, n=24)
    cs = [1.0, 3.0, 0.5, 2.0, 0.7, 1.5]  # an order in which the shifted pairing breaks the relation
    with torch.no_grad():
        first, last = model.net[0], model.net[2]
        first.weight[:] = first.weight[0]
        first.bias[:] = first.bias[0]
        last.weight[:] = last.weight[:, :1]
        for j, c in enumerate(cs):
            first.weight[j] *= c
            first.bias[j] *= c
            last.weight[:, j] /= c
    loss = torch.nn.functional.cross_entropy
    ts = [t for t in _verified(model, loss, (X, y)) if t.family == "relu_rescale"]
    r = block_findings(model, loss, (X, y), ts, unit_groups=len(cs), tol=1e-6, max_iter=40, seed=2)
    fit = next(s for s in r.slopes if s.kind == "across" and not s.control)
    shuffled = next(s for s in r.slopes if s.kind == "across" and s.control)
    assert fit.n == len(cs)
    # each log λ carries its Lanczos error (residual ≤ 1e-6·λ, eigenvalue error ≤ r²/gap ≪ r): the slope's
    # error is ≲ 2·1e-6 over the spread of x, 4·log(3/0.5) ≈ 7
    assert abs(fit.statistic - 1.0) <= 1e-6 and fit.verdict == "holds", (fit.statistic, fit.std, fit.verdict)
    # the control is the same fit with x shifted by one group: exactly that slope, and it misses 1
    xs, ys = zip(*fit.points)
    assert shuffled.statistic == ols_slope(list(xs[1:]) + [xs[0]], list(ys))[0]
    assert shuffled.verdict == "violated", (shuffled.statistic, shuffled.tolerance)


def test_slope_fit_and_its_verdicts():
    x = [0.0, 1.0, 2.0, 3.0, 4.0]
    b, se, n = ols_slope(x, [2 * v + 1 for v in x])
    # exact line: rounding of the sums over 5 points; each residual <= 4·EPS·max|y| (9), so
    # se <= sqrt(n/(n-2))·max|r|/sqrt(Sxx) = sqrt(5/3)·4·EPS·9/sqrt(10) < 4·EPS·9
    assert abs(b - 2) <= 8 * EPS * 4 and se <= 4 * EPS * 9 and n == 5
    assert across_verdict(1.0, 0.1, 5, 1.0, control=False)[0] == "holds"
    assert across_verdict(0.2, 0.1, 5, 1.0, control=False)[0] == "violated"
    assert across_verdict(0.5, 1.0, 5, 1.0, control=False)[0] == "inconclusive"  # contains 0 and 1
    assert across_verdict(1.0, 0.1, 5, 1.0, control=True)[0] == "inconclusive"   # a control that passes
    assert across_verdict(1.0, math.nan, 2, 1.0, control=False)[0] == "inconclusive"
    # a control discriminates only a fit that can tell
    assert control_of_fit("holds", "violated", "")[0] == "violated"
    assert control_of_fit("inconclusive", "violated", "")[0] == "inconclusive"
    assert control_of_fit("violated", "inconclusive", "")[0] == "inconclusive"


def test_rows_fit_the_findings_schema():
    model, loss, batch = _cnn()
    spec = RunSpec(run_id="cnn", family="digits_cnn", model={}, optimizer="sgd", lr=0.05, momentum=0.0,
                   weight_decay=0.0, batch_size=32, steps=1, checkpoint_steps=(0,), train_workers=1, seed=0)
    rows = block_rows(spec, model, loss, batch, _verified(model, loss, batch), {"unit_groups": 2})
    assert {r["finding"] for r in rows} == set(ROW_FINDINGS)
    cols = {f.name for f in TABLES["findings"]}
    assert all(set(r) <= cols for r in rows)
    pa.Table.from_pylist(rows, schema=TABLES["findings"])  # types and nulls as the table stores them
    verdicts = {r["verdict"] for r in rows if r["finding"] != "block_sharpness"}
    assert verdicts <= {"holds", "violated", "inconclusive"}
    assert all(r["verdict"] is None and r["predicted"] is None for r in rows if r["finding"] == "block_sharpness")
