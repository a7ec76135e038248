"""A small study end to end on the shared local Ray cluster: tables written, queryable, predictions
checked, and an interrupted study resumed without losing or duplicating rows."""
import subprocess
import sys

import pytest

from eqlab.pipeline import store
from eqlab.pipeline.query import run_query
from eqlab.pipeline.runner import run_study
from eqlab.pipeline.study import parse_study

STUDY = {
    "study": {"name": "e2e", "seed": 0},
    # all three runs in flight at once (each analysing while it trains): what a grid study does
    "ray": {"num_cpus": 2, "concurrent_runs": 3},
    "spectra": {"top_k": 3, "tol": 1e-6, "max_iter": 60, "workers": 2, "examples": 64, "microbatch": 32,
                "dtype": "float64", "density_probes": 2, "density_steps": 20},
    "identities": {"dtypes": ["float64", "float32"], "examples": 64, "probes": 1},
    "runs": [
        {"name": "cnn", "family": "digits_cnn", "model": {"channels": [2, 4], "hidden": 8, "bn_eps": 1e-20},
         "optimizer": "sgd", "lr": 0.1, "batch_size": 32, "steps": 12, "n_checkpoints": 3},
        {"name": "gpt2", "family": "modadd_gpt2", "model": {"p": 5, "n_embd": 8, "n_head": 2, "activation": "relu"},
         "optimizer": "adam", "lr": 1e-2, "batch_size": 8, "steps": 12, "n_checkpoints": 3},
    ],
}
# run "cnn" again at a third of its lr: an lr sweep (named "cnn"), the drift finding's input; test_report.py
# reuses this study's folder, which then holds rows of every finding
STUDY["runs"].append({**STUDY["runs"][0], "name": "cnn-lr0.03", "lr": 0.03})
RUNS = sorted(r["name"] for r in STUDY["runs"])
TABLES = ["runs", "checkpoints", "metrics", "spectra", "lanczos", "densities", "block_spectra", "identities", "conservation",
          "findings"]


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    results = tmp_path_factory.mktemp("e2e")
    study = parse_study(STUDY)
    summary = run_study(study, results, log=lambda *_: None)
    return study, results, summary


def test_all_tables_written_and_queryable(finished):
    study, results, summary = finished
    for t in TABLES:
        assert store.table_files(results, t), t
    steps = study.runs[0].checkpoint_steps
    _, rows = run_query(results, "select run_id, count(distinct step) from checkpoints group by run_id order by 1")
    assert rows == [(run, len(steps)) for run in RUNS]
    _, [(n,)] = run_query(results, "select count(*) from spectra")
    assert n == len(RUNS) * len(steps) * 3
    _, rows = run_query(results, "select min(hvps), bool_and(converged) from spectra")
    assert rows[0][0] > 0 and rows[0][1]
    # the products' method and the rule that chose it travel with every row (never a timing)
    _, rows = run_query(results, "select distinct hvp_method, hvp_method_reason from spectra")
    assert rows and all(m and "+conv=" in m and r.startswith(("auto:", "given")) for m, r in rows), rows
    assert [s.run_id for s in summary] == ["cnn", "gpt2", "cnn-lr0.03"]  # in the study's order
    assert len(summary[0].top_eigenvalues) == len(steps)
    # one top eigenvalue per layer block per checkpoint; a block's top is at most the full top (Cauchy)
    _, rows = run_query(results, """
        select b.run_id, b.step, max(b.eigenvalue), max(s.eigenvalue), count(distinct b.block)
        from block_spectra b join spectra s using (run_id, step) where s.rank = 0 group by all""")
    assert len(rows) == len(RUNS) * len(steps)
    for run, step, block_top, full_top, n_blocks in rows:
        assert n_blocks >= 5 and block_top <= full_top * (1 + 1e-6), (run, step)


def test_density_tridiagonals_stored_and_bounded_by_the_spectrum(finished):
    """Gauss nodes are Ritz values of H: all ≤ λ1 (interlacing), and the largest is close to λ1."""
    import numpy as np

    from eqlab.analyses.curvature.slq import SLQResult, gauss_quadrature

    study, results, _ = finished
    steps = study.runs[0].checkpoint_steps
    _, rows = run_query(results, """
        select d.run_id, d.step, d.dim, list(d.alphas order by d.probe), list(d.betas order by d.probe),
               max(s.eigenvalue), sum(d.hvps)
        from densities d join spectra s using (run_id, step) where s.rank = 0 group by all""")
    assert len(rows) == len(RUNS) * len(steps)
    for run, step, dim, alphas, betas, top, hvps in rows:
        assert len(alphas) == 2 and hvps == sum(len(a) for a in alphas) <= 2 * 20
        for a, b in zip(alphas, betas):
            nodes, weights = gauss_quadrature(a, b)
            assert abs(weights.sum() - 1) <= 1e-12
            assert nodes.max() <= top * (1 + 1e-8) + 1e-12 and nodes.max() >= 0.9 * top, (run, step)
        res = SLQResult(dim, alphas, betas, hvps)  # re-smoothed from the table alone, no HVPs
        grid = np.linspace(res.pooled()[0].min() - 1, top + 1, 2001)
        assert abs(res.density(grid, sigma=0.05 * top).sum() * (grid[1] - grid[0]) - 1) <= 1e-3


def test_symmetries_hold_and_negative_control_fails_at_every_checkpoint(finished):
    _, results, _ = finished
    # each row's verdict compares its residual with its own rounding-derived tolerance (analyses.identities)
    _, rows = run_query(results, """
        select run_id, symmetry, dtype, "order", control, list(distinct verdict), bool_and(residual <= tolerance)
        from identities where verdict != 'missing' group by all order by all""")
    families = {(r[0], r[1]) for r in rows}
    for run, fam in [("cnn", "softmax_translation"), ("cnn", "bn_scale"), ("cnn", "relu_rescale"),
                     ("gpt2", "softmax_translation"), ("gpt2", "relu_rescale")]:
        assert (run, fam) in families, (run, fam)
    for run, fam, dtype, order, control, verdicts, within in rows:
        if fam in ("softmax_translation", "bn_scale", "relu_rescale") and not control:
            assert verdicts == ["holds"] and within, (run, fam, dtype, order, verdicts)
        if control and order == 2:  # second order discriminates in both dtypes on these models
            assert verdicts == ["rejected"], (run, fam, dtype, verdicts)
    # every symmetry the families declare (models/symmetry_decls.py) was found and verified
    _, missing = run_query(results, "select run_id, tolerance_reason from identities where verdict = 'missing'")
    assert not missing, missing
    assert any(r[4] for r in rows), "no negative control was checked"


def test_every_training_step_has_one_metrics_row(finished):
    """Each step's minibatch loss, gradient norm and lr, stored under the checkpoint that follows it."""
    study, results, _ = finished
    for spec in study.runs:
        _, rows = run_query(results, f"""select step, train_step, loss, grad_norm, lr from metrics
                                         where run_id = '{spec.run_id}' order by train_step""")
        assert [r[1] for r in rows] == list(range(spec.steps)), spec.run_id   # once each, none lost
        ck = sorted(spec.checkpoint_steps)
        for step, t, loss, gn, lr in rows:  # the key is the first checkpoint after the step
            assert step == min(c for c in ck if c > t) and loss > 0 and gn > 0 and lr == spec.lr
    # the loss at a checkpoint's last step is of the order of that checkpoint's training loss
    _, [(ratio,)] = run_query(results, """
        select max(m.loss / c.train_loss) from metrics m join checkpoints c using (run_id, step)
        where m.train_step = c.step - 1 and c.step > 10""")
    assert 0.2 < ratio < 5, ratio


def test_conserved_quantities_follow_the_optimizer_law(finished):
    _, results, summary = finished
    # SGD (cnn): the replayed step changes each Q exactly as eta^2 Q(g) (no momentum here).
    # Each row's verdict compares the residual with its own rounding level (2·γ_n(u)·Σ|terms|).
    _, [(n, verdicts, within)] = run_query(results, """
        select count(*), list(distinct verdict), bool_and(residual <= tolerance)
        from conservation where run_id = 'cnn' and symmetry in ('bn_scale', 'relu_rescale')""")
    assert n > 0 and verdicts == ["holds"] and within
    # Adam (gpt2): no exact law, and the drift is first order in lr (far above SGD's eta^2 term).
    _, [(nan_all, drift, eta2)] = run_query(results, """
        select bool_and(isnan(predicted_change)), max(drift_per_lr), max(eta2_term / lr)
        from conservation where run_id = 'gpt2' and symmetry = 'relu_rescale'""")
    assert nan_all and drift > 100 * eta2
    _, [(adam_verdicts,)] = run_query(results, "select list(distinct verdict) from conservation where run_id = 'gpt2'")
    assert adam_verdicts == ["no_law"]
    # the summary counts the stored verdicts: no violated row for SGD, no law for Adam
    assert summary[0].conservation[4] == 0 and summary[1].conservation[2] is None


def test_rerun_resumes_without_duplicates(finished):
    study, results, _ = finished
    _, before = run_query(results, "select run_id, step, rank, eigenvalue from spectra order by all")
    lost = store.table_files(results, "spectra")[1]
    lost.unlink()  # as if the study had been interrupted before that checkpoint's spectra
    logs = []
    run_study(study, results, log=logs.append)
    assert any("[train] cnn: all" in line for line in logs)  # training was not redone
    _, after = run_query(results, "select run_id, step, rank, eigenvalue from spectra order by all")
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert a[:3] == b[:3] and abs(a[3] - b[3]) <= 1e-9 * abs(a[3])


def test_cli_query_csv_and_json(finished):
    _, results, _ = finished
    out = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "query", "--results", str(results), "--format",
                          "csv", "select count(*) as n from spectra"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "n" and int(out.stdout.splitlines()[1]) > 0
