"""Finding 3, SGD against Adam (study-level block-anisotropy comparison): which runs are compared, the rows
from a hand-built findings table of known spreads (means, t half-widths, step 0 left out, stale groups
removed, reruns not duplicating), and on real float64 training of a 3-head GPT-2 under SGD and Adam from
one init: the matrix-free log-sharpness spread against the dense block matrices' spread within the
Lanczos bounds, identical at step 0 (the control: no optimizer effect before a step), apart after."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.discover import discover
from eqlab.analyses.identities import rounding_model
from eqlab.analyses.predictions.block_anisotropy import block_findings
from eqlab.models import hf_tiny
from eqlab.pipeline import store
from eqlab.pipeline.findings_blocks import SETTINGS, block_rows
from eqlab.pipeline.findings_optimizers import (FINDING, SPREAD, checkpoint_statistics, comparison_groups,
                                                mean_and_halfwidth, optimizer_rows, write_optimizer_findings)
from eqlab.pipeline.study import RunSpec, parse_study

F64 = torch.float64
EPS = torch.finfo(F64).eps
torch.set_num_threads(1)

MODEL = {"p": 13, "n_embd": 32, "n_layer": 1, "n_head": 2, "activation": "relu"}
STUDY = {
    "study": {"name": "opt-test"},
    "runs": [
        {"name": "gpt", "family": "modadd_gpt2", "model": MODEL, "optimizer": "adam", "lr": 3e-3, "steps": 4,
         "checkpoint_steps": [0, 2, 4]},
        {"name": "gpt-sgd", "family": "modadd_gpt2", "model": MODEL, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
         "steps": 4, "checkpoint_steps": [0, 2, 4]},
        # another model: a comparison of its own only with a second optimizer, so none
        {"name": "cnn", "family": "digits_cnn", "optimizer": "sgd", "lr": 0.05, "steps": 4},
        # same model, other batch size: not "differs only in optimizer"
        {"name": "gpt-b8", "family": "modadd_gpt2", "model": MODEL, "optimizer": "sgd", "lr": 0.1, "batch_size": 8,
         "steps": 4, "checkpoint_steps": [0, 2, 4]},
    ],
}
# per (optimizer, step): ln lambda_max of four blocks; spread = sample std of these
LOGS = {("adam", 0): [0.0, 1.0, 2.0, 3.0], ("adam", 2): [0.0, 2.0, 4.0, 6.0], ("adam", 4): [0.0, 3.0, 6.0, 9.0],
        ("sgd", 0): [0.0, 1.0, 2.0, 3.0], ("sgd", 2): [0.0, 1.0, 2.0, 3.5], ("sgd", 4): [0.0, 1.0, 2.0, 4.0]}


def _sd(x):
    return float(np.std(x, ddof=1))


def _write_tables(results, study, status=None):
    status = status or {}
    for spec in study.runs:
        store.write_rows(results, "runs", spec.run_id, store.RUN_LEVEL,
                         [{"family": spec.family, "optimizer": spec.optimizer, "lr": spec.lr,
                           "status": status.get(spec.run_id, "ok")}], study=study.name, config_hash="h")
        for step in spec.checkpoint_steps:
            logs = LOGS.get((spec.optimizer, step), [0.0, 0.5])
            rows = [{"finding": "block_sharpness", "transformation": f"b{i}", "control": False,
                     "statistic": math.exp(v)} for i, v in enumerate(logs)]
            rows.append({"finding": "block_sharpness", "transformation": "dead", "control": False, "statistic": 0.0})
            rows.append({"finding": "block_sharpness_imbalance", "transformation": "qk_gl[h][across]",
                         "control": False, "statistic": 1.0 + step / 10})
            rows.append({"finding": "block_sharpness_imbalance", "transformation": "qk_gl[h][across]",
                         "control": True, "statistic": 99.0})  # a control's slope is not the statistic
            store.write_rows(results, "findings", spec.run_id, step, rows, study=study.name, config_hash="h")


def test_groups_are_runs_that_differ_only_in_optimizer_lr_momentum_and_seed():
    study = parse_study(STUDY, "test")
    groups = comparison_groups(study)
    assert {k: sorted(s.run_id for s in v) for k, v in groups.items()} == {"optimizers-gpt": ["gpt", "gpt-sgd"]}
    # a group never takes a run's own id
    clash = parse_study({**STUDY, "runs": STUDY["runs"][:2] + [{**STUDY["runs"][2], "name": "optimizers-gpt"}]}, "t")
    (name,) = comparison_groups(clash)
    assert name != "optimizers-gpt" and name.startswith("optimizers-")


def test_checkpoint_statistics_skip_nonpositive_blocks_and_controls():
    rows = [{"finding": "block_sharpness", "statistic": math.exp(v), "control": False, "transformation": "x"}
            for v in (1.0, 2.0, 4.0)]
    rows += [{"finding": "block_sharpness", "statistic": -1.0, "control": False, "transformation": "neg"},
             {"finding": "block_sharpness_imbalance", "statistic": 0.7, "control": False, "transformation": "f[across]"},
             {"finding": "block_sharpness_imbalance", "statistic": 5.0, "control": True, "transformation": "f[across]"},
             {"finding": "block_sharpness_imbalance", "statistic": 3.0, "control": False, "transformation": "f[orbit]"}]
    got = checkpoint_statistics(rows)
    # ln(exp(v)) = v to within a few ulps of v (log and exp each correctly rounded to 1 ulp): 4 EPS relative
    assert set(got) == {SPREAD, "imbalance_slope[f]"} and got["imbalance_slope[f]"] == 0.7
    assert abs(got[SPREAD] - _sd([1.0, 2.0, 4.0])) <= 16 * EPS * 4.0


def test_study_level_rows_from_a_hand_built_findings_table(tmp_path):
    study = parse_study(STUDY, "test")
    _write_tables(tmp_path, study)
    store.write_rows(tmp_path, "findings", "optimizers-gone", store.RUN_LEVEL, [{"finding": FINDING}], study="old")
    store.write_rows(tmp_path, "findings", "drift-sweep", store.RUN_LEVEL, [{"finding": "conservation_drift_slope"}],
                     study="x")
    lines = []
    write_optimizer_findings(tmp_path, study, lines.append)
    assert len(lines) == 1 and "optimizers-gpt" in lines[0]
    rows = [r for r in store.read_table(tmp_path, "findings").to_pylist() if r["finding"] == FINDING]
    assert {(r["run_id"], r["step"]) for r in rows} == {("optimizers-gpt", -1)}
    assert not (tmp_path / "findings" / "optimizers-gone" / "run.parquet").exists()
    assert (tmp_path / "findings" / "drift-sweep" / "run.parquet").exists()  # another finding's file stays
    got = {(r["transformation"], r["optimizer"]): r for r in rows}
    assert set(got) == {(SPREAD, "adam"), (SPREAD, "sgd"), (f"{SPREAD}[adam-sgd]", "adam-sgd"),
                        ("imbalance_slope[qk_gl[h]]", "adam"), ("imbalance_slope[qk_gl[h]]", "sgd"),
                        ("imbalance_slope[qk_gl[h]][adam-sgd]", "adam-sgd")}
    # each value is a std of 4 numbers <= 9 from logs of exps (a few ulps each): 64 EPS * 9 per value
    tol = 64 * EPS * 9
    for opt in ("adam", "sgd"):
        vals = [_sd(LOGS[(opt, s)]) for s in (2, 4)]  # step 0 left out
        r = got[(SPREAD, opt)]
        m, sd, half = mean_and_halfwidth(vals)
        assert abs(r["statistic"] - np.mean(vals)) <= tol and r["probes"] == 2
        assert abs(r["statistic_std"] - _sd(vals)) <= tol
        assert abs(r["tolerance"] - student_t.ppf(0.975, 1) * _sd(vals) / math.sqrt(2)) <= 16 * tol
        assert r["predicted"] is None and r["verdict"] is None and r["residual"] is None
        assert "step 0 left out" in r["tolerance_reason"] and "one trajectory" in r["tolerance_reason"]
    assert got[(SPREAD, "adam")]["lr"] == 3e-3 and got[(SPREAD, "sgd")]["lr"] == 0.1
    diff = got[(f"{SPREAD}[adam-sgd]", "adam-sgd")]
    d = [_sd(LOGS[("adam", s)]) - _sd(LOGS[("sgd", s)]) for s in (2, 4)]
    assert abs(diff["statistic"] - np.mean(d)) <= 2 * tol and diff["statistic"] > 0
    # step 0 is the common start: its value, equal for both optimizers, is in the reason
    assert f"at step 0: {_sd(LOGS[('adam', 0)]):.6g}" in got[(SPREAD, "sgd")]["tolerance_reason"]
    slope = got[("imbalance_slope[qk_gl[h]]", "sgd")]
    assert abs(slope["statistic"] - 1.3) <= 4 * EPS  # mean of 1.2 and 1.4; the control's 99 is not in it
    # rerunning replaces the rows
    write_optimizer_findings(tmp_path, study, lines.append)
    again = [r for r in store.read_table(tmp_path, "findings").to_pylist() if r["finding"] == FINDING]
    assert len(again) == len(rows)


def test_a_run_that_did_not_finish_ok_is_left_out_and_named(tmp_path):
    study = parse_study(STUDY, "test")
    _write_tables(tmp_path, study, status={"gpt-sgd": "diverged"})
    lines = []
    out = write_optimizer_findings(tmp_path, study, lines.append)
    # one optimizer left: no comparison rows at all, only adam's own, and the reason names the run
    rows = out["optimizers-gpt"]
    assert {r["optimizer"] for r in rows} == {"adam"}
    assert all("runs left out (not ok): gpt-sgd" in r["tolerance_reason"] for r in rows)


def test_no_block_rows_no_comparison_rows_and_the_log_says_why(tmp_path):
    study = parse_study(STUDY, "test")
    lines = []
    assert write_optimizer_findings(tmp_path, study, lines.append) == {}
    assert len(lines) == 1 and "no rows" in lines[0] and "block_anisotropy" in lines[0]
    assert store.read_table(tmp_path, "findings").num_rows == 0


# ---------------------------------------------------------------- real training, dense float64 oracle
def _gpt2():
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=3, n_embd=6, vocab=7, seq=4, n=8, activation="relu",
                                      layer_norm_epsilon=1e-12)
    return model.to(F64), loss, batch


def _trained(optimizer: str, steps: int):
    torch.manual_seed(0)
    model, loss, batch = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(batch[0]), batch[1]).backward()
        opt.step()
    return model, loss, batch


def _spec(optimizer):
    return RunSpec(run_id=f"g-{optimizer}", family="gpt2", model={}, optimizer=optimizer, lr=0.1, momentum=0.0,
                   weight_decay=0.0, batch_size=8, steps=4, checkpoint_steps=(0, 4), train_workers=1, seed=1)


@pytest.fixture(scope="module")
def trained_rows():
    """block_rows (the pipeline's finding 3) at steps 0 and 4 of SGD and Adam from one init, and per
    (optimizer, step) the dense block matrices' spread with its allowed difference."""
    out, oracle = [], {}
    for opt in ("sgd", "adam"):
        spec = _spec(opt)
        for step in (0, 4):
            model, loss, batch = _trained(opt, step)
            ts = [f.transformation for f in discover(model, loss, batch).found if f.verified]
            rows = block_rows(spec, model, loss, batch, ts, {})
            out += [{**r, "run_id": spec.run_id, "step": step} for r in rows]
            S = SETTINGS  # the settings block_rows uses by default, so the same blocks
            r = block_findings(model, loss, batch, ts, unit_groups=S["unit_groups"], tol=S["block_tol"],
                               max_iter=S["block_max_iter"], after_iter=S["after_iter"], move_groups=S["move_groups"],
                               families=tuple(S["block_families"]), seed=spec.seed, keep=True)
            assert [x.block for x in r.sharpness] == [x["transformation"] for x in rows
                                                       if x["finding"] == "block_sharpness"]
            names = list(dict.fromkeys(p for m in r.masks.values() for p in m))
            op = HessianOperator(model, loss, batch, names=names, method="double_backward", dtype=F64)
            space = ParamSpace(model, names)
            H = dense_hessian(op)
            gam = 4 * rounding_model(model, loss, batch).gamma()
            logs, dlog = [], []
            for s in r.sharpness:
                m = r.masks[s.block]
                i = torch.cat([space.offsets[p] + torch.nonzero(x.reshape(-1)).reshape(-1) for p, x in m.items()])
                Hb = H[i][:, i]
                lam = float(torch.linalg.eigvalsh(Hb).max())
                if lam <= 0:
                    continue
                logs.append(math.log(lam))
                # |lam_hat - lam| <= residual + the two HVP chains' rounding (test_findings_blocks' bound); the log
                # moves by at most that over the smaller of the two values
                err = s.residual + gam * float(Hb.abs().sum(1).max())
                dlog.append(err / max(min(lam, s.lam) - err, 1e-300))
            # the sample std is Lipschitz: |sd(x) - sd(y)| <= ||x - y||_2 / sqrt(n - 1)
            oracle[(opt, step)] = (_sd(logs), math.sqrt(sum(d * d for d in dlog)) / math.sqrt(len(logs) - 1))
    return out, oracle


def test_matrix_free_spread_agrees_with_the_dense_block_matrices(trained_rows):
    rows, oracle = trained_rows
    for (opt, step), (dense, allowed) in oracle.items():
        mine = [r for r in rows if r["run_id"] == f"g-{opt}" and r["step"] == step]
        got = checkpoint_statistics(mine)[SPREAD]
        assert abs(got - dense) <= allowed, (opt, step, got, dense, allowed)


def test_same_init_gives_the_same_spread_and_training_separates_the_optimizers(trained_rows):
    """Control: at step 0 both runs hold the same weights and the same Lanczos seed, so the statistic is
    bitwise equal -- any difference the comparison reports later comes from the optimizer; after four steps
    the two spreads differ by more than both dense-oracle allowances together."""
    rows, oracle = trained_rows
    stat = {(o, s): checkpoint_statistics([r for r in rows if r["run_id"] == f"g-{o}" and r["step"] == s])[SPREAD]
            for o in ("sgd", "adam") for s in (0, 4)}
    assert stat[("sgd", 0)] == stat[("adam", 0)]
    gap = abs(stat[("sgd", 4)] - stat[("adam", 4)])
    assert gap > 10 * (oracle[("sgd", 4)][1] + oracle[("adam", 4)][1]), (stat, oracle)
    specs = [_spec("sgd"), _spec("adam")]
    out = optimizer_rows(specs, rows, {})
    diff = next(r for r in out if r["transformation"] == f"{SPREAD}[adam-sgd]")
    # one matched cell after step 0: its difference, no spread to give an uncertainty from
    assert diff["probes"] == 1 and diff["statistic_std"] is None and diff["tolerance"] is None
    assert abs(diff["statistic"] - (stat[("adam", 4)] - stat[("sgd", 4)])) <= 4 * EPS * max(stat.values())
