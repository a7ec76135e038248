"""Finding 5 (conservation drift against the learning rate): the log–log slope fit on synthetic data of
known slope, its negative controls, real optimizer steps on a toy MLP, and the study-level rows written
from a hand-built conservation table."""
import copy
import math

import numpy as np
import pytest
import torch

from eqlab.analyses import conservation as C
from eqlab.analyses.discover import discover
from eqlab.analyses.drift import drift_verdict, fit_drift_slope, predicted_slope
from eqlab.models.losses import cross_entropy
from eqlab.models.toy_mlp import MLP, toy_batch
from eqlab.pipeline import store
from eqlab.pipeline.findings_drift import FINDING, rounding_level, sweeps, write_drift_findings
from eqlab.pipeline.study import parse_study

LRS = [1e-3, 3e-3, 1e-2]


def _cells(law, n_cells=4, noise=0.01, seed=0):
    """Points of ‖ΔQ‖ = A_cell · law(η) · e^{noise}: per-checkpoint prefactors, the law shared."""
    rng = np.random.default_rng(seed)
    lr, ch, cell = [], [], []
    for c in range(n_cells):
        a = rng.uniform(0.5, 2.0)
        for eta in LRS:
            lr.append(eta)
            ch.append(a * law(eta) * math.exp(rng.normal(0, noise)))
            cell.append(c)
    return lr, ch, cell


def test_fit_recovers_slope_two_and_the_control_against_one_is_violated():
    fit = fit_drift_slope(*_cells(lambda e: e ** 2))
    assert abs(fit.slope - 2) < 5 * fit.se  # the noise is 1 % in each point: SE ~ 2e-3
    assert fit.n_cells == 4 and fit.n_points == 12 and math.isfinite(fit.margin)
    assert drift_verdict(fit, 2, 1).verdict == "holds"
    control = drift_verdict(fit, 1, 2)
    assert control.verdict == "violated" and control.residual > 0.9


def test_fit_recovers_slope_one_with_an_eta_squared_correction_inside_the_margin():
    """Adam's first step: ΔQ = −η·a + η²·b. The fitted slope is off 1 by the η² term; the margin
    |k|·η_max (the local slope's change over the sweep) covers it, the 3·SE band alone would not."""
    eta = np.array(LRS)
    fit = fit_drift_slope(eta, np.abs(-eta + 5.0 * eta ** 2))
    assert 0.95 < fit.slope < 0.99 and fit.margin > abs(fit.slope - 1) > 3 * fit.se
    assert drift_verdict(fit, 1, 2).verdict == "holds"
    assert drift_verdict(fit, 2, 1).verdict == "violated"


def test_weight_decay_sweep_breaks_the_eta_squared_law():
    """SGD with weight decay λ: ΔQ = ((1 − ηλ)² − 1)Q + η²Q(g): the O(η) term makes the slope 1, so the
    η² prediction (2) is violated and the decay's own prediction (1) holds."""
    lam, q, qg = 0.1, 3.0, 2.0
    fit = fit_drift_slope(*_cells(lambda e: abs(((1 - e * lam) ** 2 - 1) * q + e * e * qg), noise=1e-3))
    assert predicted_slope("sgd", lam)[0] == 1 and predicted_slope("sgd", 0.0)[0] == 2
    assert drift_verdict(fit, 2, 1).verdict == "violated"
    assert drift_verdict(fit, 1, 2).verdict == "holds"


def test_a_slope_between_the_orders_is_violated_for_both():
    fit = fit_drift_slope(*_cells(lambda e: e ** 1.5, noise=1e-3))
    assert abs(fit.slope - 1.5) < 0.01
    assert drift_verdict(fit, 2, 1).verdict == "violated" and drift_verdict(fit, 1, 2).verdict == "violated"


def test_too_little_data_is_inconclusive():
    # two learning rates in one checkpoint: the slope is exact, with no uncertainty and no margin
    fit = fit_drift_slope([0.01, 0.1], [1e-4, 1e-2])
    assert fit.slope == pytest.approx(2) and math.isnan(fit.se)
    assert drift_verdict(fit, 2, 1).verdict == "inconclusive"
    # so much scatter that the tolerance reaches half the distance between the orders
    noisy = fit_drift_slope(*_cells(lambda e: e ** 2, noise=1.0, n_cells=3))
    assert drift_verdict(noisy, 2, 1).verdict == "inconclusive"


def test_changes_at_rounding_level_carry_no_drift():
    """A translation's Q under SGD is conserved exactly: its changes are rounding noise, left out."""
    lr, ch, cell = _cells(lambda e: 1e-16 + 0 * e)
    fit = fit_drift_slope(lr, ch, cell, levels=[1e-12] * len(lr))
    assert not fit.ok and fit.excluded == len(lr)
    assert drift_verdict(fit, 2, 1).verdict == "inconclusive"
    # a kept point's rounding widens the tolerance by its shift of the slope
    lr, ch, cell = _cells(lambda e: e ** 2)
    fit = fit_drift_slope(lr, ch, cell, levels=[c * 1e-3 for c in ch])
    xt = np.log(LRS) - np.log(LRS).mean()
    assert fit.rounding == pytest.approx(1e-3 * np.abs(xt).sum() / (xt @ xt))  # δ·Σ|x̃|/Σx̃², every cell alike


def test_rounding_level_is_read_from_the_conservation_reason():
    # the typical level: the worst case over √n (errors of n-term sums grow like √n·u)
    assert rounding_level("2·γ_n(u)·R = 6.5e-12: n = 100 (2d + inputs + outputs), u = 1.1e-16") == pytest.approx(6.5e-13)
    assert rounding_level("2·γ_n(u)·R = 6.5e-12: no length") == 6.5e-12
    assert rounding_level("") == 0.0


def _replayed(opt_of, lrs):
    """‖ΔQ‖ of one real optimizer step per lr from the same θ and batch (a toy ReLU MLP, float64)."""
    torch.manual_seed(0)
    model = MLP((8, 16, 16, 4), "relu").double()
    batch = toy_batch()
    t = next(t for t in discover(model, cross_entropy, batch).verified if t.family == "relu_rescale")
    out = []
    for lr in lrs:
        m = copy.deepcopy(model)
        (s,) = C.run_steps(m, cross_entropy, batch, t, opt_of(m.parameters(), lr), steps=1)
        out.append((float(torch.linalg.vector_norm(s.change)), s.rounding))
    return out


def test_real_sgd_and_adam_steps_give_slopes_two_and_one():
    sgd = _replayed(lambda p, lr: torch.optim.SGD(p, lr=lr), [0.01, 0.03, 0.1])
    ch, lv = zip(*sgd)
    fit = fit_drift_slope([0.01, 0.03, 0.1], ch, levels=lv)
    assert abs(fit.slope - 2) < 1e-6 and drift_verdict(fit, 2, 1).verdict == "holds"
    assert drift_verdict(fit, 1, 2).verdict == "violated"
    adam_lrs = [1e-4, 3e-4, 1e-3]
    adam = _replayed(lambda p, lr: torch.optim.Adam(p, lr=lr), adam_lrs)
    ch, lv = zip(*adam)
    fit = fit_drift_slope(adam_lrs, ch, levels=lv)
    assert drift_verdict(fit, 1, 2).verdict == "holds" and drift_verdict(fit, 2, 1).verdict == "violated"


# ------------------------------------------------------------------------- the pipeline piece
STUDY = {
    "study": {"name": "drift-test"},
    "grid": {"lr": [0.01, 0.03, 0.1], "runs": [
        {"name": "cnn", "family": "digits_cnn", "model": {"channels": [2, 4], "hidden": 8},
         "optimizer": "sgd", "batch_size": 16, "steps": 4, "checkpoint_steps": [0, 1, 2]},
        {"name": "cnnwd", "family": "digits_cnn", "model": {"channels": [2, 4], "hidden": 8},
         "optimizer": "sgd", "weight_decay": 0.1, "batch_size": 16, "steps": 4, "checkpoint_steps": [0, 1, 2]}]},
    "runs": [{"name": "single", "family": "digits_cnn", "lr": 0.05, "steps": 2}],
}


def _write_tables(results, study):
    rng = np.random.default_rng(0)
    for spec in study.runs:
        store.write_rows(results, "runs", spec.run_id, store.RUN_LEVEL,
                         [{"family": spec.family, "optimizer": spec.optimizer, "lr": spec.lr, "status": "ok"}],
                         study=study.name, config_hash="h")
        for step in spec.checkpoint_steps:
            rows = []
            for fam, q in (("relu_rescale[a->b]", 2.0), ("bn_scale[c->d]", 0.5)):
                law = (abs(((1 - spec.lr * spec.weight_decay) ** 2 - 1) * q - spec.lr ** 2 * q * (1 + step) / 10)
                       * math.exp(rng.normal(0, 1e-3)))
                rows.append({"transformation": fam, "symmetry": fam.split("[")[0], "optimizer": spec.optimizer,
                             "lr": spec.lr, "change": law, "tolerance_reason": "2·γ_n(u)·R = 1e-14: n = 3"})
            rows.append({"transformation": "softmax_translation[fc2]", "symmetry": "softmax_translation",
                         "optimizer": spec.optimizer, "lr": spec.lr, "change": 1e-16,
                         "tolerance_reason": "2·γ_n(u)·R = 4e-10: n = 3"})
            store.write_rows(results, "conservation", spec.run_id, step, rows, study=study.name, config_hash="h")


def test_study_level_rows_from_a_hand_built_conservation_table(tmp_path):
    study = parse_study(STUDY, "test")
    assert sorted(sweeps(study)) == ["cnn", "cnnwd"]  # the single-lr run is no sweep
    _write_tables(tmp_path, study)
    store.write_rows(tmp_path, "findings", "gone", store.RUN_LEVEL, [{"finding": FINDING}], study="old")
    store.write_rows(tmp_path, "findings", "cnn-lr0.01", 0, [{"finding": "flat_symmetry_direction"}], study="x")
    lines = []
    write_drift_findings(tmp_path, study, lines.append)
    assert len(lines) == 2
    rows = store.read_table(tmp_path, "findings").to_pylist()
    mine = [r for r in rows if r["finding"] == FINDING]
    assert {(r["run_id"], r["step"]) for r in mine} == {("cnn", -1), ("cnnwd", -1)}
    assert any(r["finding"] == "flat_symmetry_direction" for r in rows)  # per-run findings left alone
    assert not (tmp_path / "findings" / "gone").exists() or not list((tmp_path / "findings" / "gone").iterdir())
    got = {(r["run_id"], r["symmetry"], r["control"]): r for r in mine}
    for sym in ("relu_rescale", "bn_scale"):
        plain, plain_c = got[("cnn", sym, False)], got[("cnn", sym, True)]
        assert plain["predicted"] == 2 and plain["verdict"] == "holds", plain["tolerance_reason"]
        assert plain_c["predicted"] == 1 and plain_c["verdict"] == "violated"
        wd, wd_c = got[("cnnwd", sym, False)], got[("cnnwd", sym, True)]
        assert wd["predicted"] == 1 and wd["verdict"] == "holds", wd["tolerance_reason"]
        assert wd_c["predicted"] == 2 and wd_c["verdict"] == "violated"
        assert plain["probes"] == 9 and plain["lr"] is None and plain["weight_decay"] == 0
        assert "3·SE" in plain["tolerance_reason"] and "margin" in plain["tolerance_reason"]
    # the translation is conserved exactly (every change at rounding level): no drift, no row, and the log says so
    assert not any(r["symmetry"] == "softmax_translation" for r in mine)
    assert all("no drift to fit: softmax_translation[fc2]" in line for line in lines)
    # rerunning replaces the rows, never duplicates them
    write_drift_findings(tmp_path, study, lines.append)
    assert len([r for r in store.read_table(tmp_path, "findings").to_pylist() if r["finding"] == FINDING]) == len(mine)


def test_a_diverged_run_is_left_out_of_its_sweep_and_named(tmp_path):
    study = parse_study(STUDY, "test")
    _write_tables(tmp_path, study)
    store.write_rows(tmp_path, "runs", "cnn-lr0.1", store.RUN_LEVEL,
                     [{"family": "digits_cnn", "optimizer": "sgd", "lr": 0.1, "status": "diverged",
                       "diverged_at_step": 3}], study=study.name, config_hash="h")
    out = write_drift_findings(tmp_path, study, lambda *_: None)
    row = next(r for r in out["cnn"] if r["symmetry"] == "relu_rescale" and not r["control"])
    assert row["probes"] == 6 and "lr 0.01, 0.03 " in row["tolerance_reason"]
    assert "diverged runs left out: cnn-lr0.1" in row["tolerance_reason"]
    assert "two learning rates: not measurable" in row["tolerance_reason"]
