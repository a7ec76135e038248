"""Study files: the default validates; every malformed field is named; the CLI exits cleanly."""
import subprocess
import sys
import tomllib
from importlib import resources

import pytest

from eqlab.pipeline.study import StudyError, load_study, log_spaced_steps, parse_study


def default_data():
    return tomllib.loads(resources.files("eqlab.pipeline.studies").joinpath("default.toml").read_text())


def test_default_study_loads_and_expands():
    study = load_study()
    assert study.name == "default"
    assert [r.family for r in study.runs] == ["digits_cnn", "modadd_gpt2"]
    assert [r.optimizer for r in study.runs] == ["sgd", "adam"]
    for r in study.runs:
        assert r.checkpoint_steps[0] == 0 and r.checkpoint_steps[-1] == r.steps
    assert len(study.hash) == 16 and study.hash == load_study().hash


def test_spectra_tolerance_defaults_to_the_dtype_row():
    """No tol given: sqrt(eps) of spectra.dtype (analyses/curvature/defaults.py), so a float32 study does
    not inherit float64's unreachable tolerance; a tol given is kept."""
    from eqlab.analyses.curvature.defaults import TABLE
    for dtype in ("float32", "float64"):
        data = default_data()
        data["spectra"].pop("tol", None)
        data["spectra"]["dtype"] = dtype
        assert parse_study(data).spectra.tol == TABLE[dtype].tol
    data = default_data()
    data["spectra"].update(dtype="float32", tol=1e-3)
    assert parse_study(data).spectra.tol == 1e-3


def test_log_spaced_schedule():
    assert log_spaced_steps(300, 6) == (0, 2, 9, 30, 95, 300)
    s = log_spaced_steps(10**5, 12)
    ratios = [b / a for a, b in zip(s[2:], s[3:])]
    assert max(ratios) / min(ratios) < 1.2  # geometric spacing


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["runs"][0].update(lr="fast"), "runs[0].lr"),
    (lambda d: d["runs"][1].update(optimizer="lion"), "runs[1].optimizer"),
    (lambda d: d["runs"][0].update(family="resnet9000"), "runs[0].family"),
    (lambda d: d["runs"][0]["model"].update(width=3), "runs[0].model.width"),
    (lambda d: d["runs"][0].pop("steps"), "runs[0].steps"),
    (lambda d: d["runs"][0].update(stpes=3), "runs[0].stpes"),
    (lambda d: d["spectra"].update(top_k=0), "spectra.top_k"),
    (lambda d: d["spectra"].update(dtype="float16"), "spectra.dtype"),
    (lambda d: d["identities"].update(dtypes=[]), "identities.dtypes"),
    (lambda d: d["ray"].update(num_cpus=-1), "ray.num_cpus"),
    (lambda d: d["runs"][1].update(name="cnn"), "runs[1].name"),
    (lambda d: d.pop("runs"), "runs"),
    # values, not only names, are checked per family (plain Python, before torch or Ray)
    (lambda d: d["runs"][0]["model"].update(activation="softplus"), "runs[0].model.activation"),
    (lambda d: d["runs"][0]["model"].update(channels=[4]), "runs[0].model.channels"),
    (lambda d: d["runs"][0]["model"].update(hidden=-4), "runs[0].model.hidden"),
    (lambda d: d["runs"][0]["model"].update(bn_eps=0.0), "runs[0].model.bn_eps"),
    (lambda d: d["runs"][1]["model"].update(n_head=5), "runs[1].model.n_head"),
    (lambda d: d["study"].update(seed=2**63 - 1), "study.seed"),
    (lambda d: d["runs"][0].update(checkpoint_steps=[True, 5]), "runs[0].checkpoint_steps[0]"),
    (lambda d: d["runs"][0].update(name="réseau"), "runs[0].name"),
    (lambda d: d["study"].update(name="../../x"), "study.name"),
    (lambda d: d["identities"].update(dtypes=["float64", "float64"]), "identities.dtypes"),
    (lambda d: d["ray"].update(num_cpus=1e9), "ray.num_cpus"),
    (lambda d: (d["runs"][0].update(model={"channels": [1, 1], "hidden": 1}),
                d["spectra"].update(top_k=62, max_iter=100)), "spectra.top_k"),
    # 1e-8 is reachable in float64 products, not in float32 ones (below 4·eps = 4.8e-7)
    (lambda d: d["spectra"].update(dtype="float32", tol=1e-8), "spectra.tol"),
])
def test_malformed_field_is_named(mutate, field):
    data = default_data()
    mutate(data)
    with pytest.raises(StudyError) as err:
        parse_study(data)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_cli_rejects_bad_study_without_traceback_or_output(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(resources.files("eqlab.pipeline.studies").joinpath("default.toml").read_text()
                   .replace('optimizer = "sgd"', 'optimizer = "sgdd"'))
    out_dir = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "run", str(bad), "--results", str(out_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["eqlab: error: runs[0].optimizer: must be one of sgd, adam, adamw (got 'sgdd')"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out_dir.exists()


def test_derived_seeds_stay_in_range():
    from eqlab.pipeline.study import MAX_STEPS, SEED_LIMIT

    data = default_data()
    data["study"]["seed"] = SEED_LIMIT - 1
    study = parse_study(data)
    assert all(r.seed == SEED_LIMIT - 1 for r in study.runs)
    # the training minibatch generator's seed (pipeline.train) at the largest step
    assert (SEED_LIMIT - 1) * 1_000_003 + MAX_STEPS < 2**63


def test_cli_rejects_invalid_toml(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[study\nname = 1\n")
    proc = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "run", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unreachable_cluster_is_one_line_and_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "run", "--address", f"127.0.0.1:{port}",
                           "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no Ray cluster answers at 127.0.0.1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def _grid_data(**axes):
    data = default_data()
    cnn = next(r for r in data.pop("runs") if r["name"] == "cnn")
    base = {k: v for k, v in cnn.items() if k not in axes}
    data["grid"] = {**axes, "runs": [base]}
    return data


def test_grid_expands_bases_times_axes_with_readable_names():
    from eqlab.pipeline.study import load_study
    study = parse_study(_grid_data(lr=[0.05, 0.01], seed=[0, 1], optimizer=["sgd", "adamw"]))
    names = [r.run_id for r in study.runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert "cnn-sgd-lr0.05-s0" in names and "cnn-adamw-lr0.01-s1" in names
    r = next(r for r in study.runs if r.run_id == "cnn-adamw-lr0.01-s1")
    assert (r.optimizer, r.lr, r.seed, r.family) == ("adamw", 0.01, 1, "digits_cnn")
    shipped = load_study(str(resources.files("eqlab.pipeline.studies").joinpath("grid.toml")))
    assert len(shipped.runs) == 8 and {r.family for r in shipped.runs} == {"digits_cnn", "modadd_gpt2"}


@pytest.mark.parametrize("axes, mutate, field", [
    ({"lr": [0.05, -1.0]}, None, "grid.lr[1]"),
    ({"lr": []}, None, "grid.lr"),
    ({"seed": [0, 0]}, None, "grid.seed"),
    ({"optimizer": ["sgd", "rmsprop"]}, None, "grid.optimizer[1]"),
    ({"lr": [0.1]}, lambda d: d["grid"]["runs"][0].update(lr=0.2), "grid.runs[0].lr"),
    ({"lr": [0.1]}, lambda d: d["grid"].update(colour=["red"]), "grid.colour"),
    ({"lr": [0.1]}, lambda d: d["grid"]["runs"][0].pop("name"), "grid.runs[0].name"),
    ({"lr": [0.1]}, lambda d: d["grid"]["runs"][0].update(momentum=-1.0), "grid.runs[0] (cnn-lr0.1).momentum"),
    ({}, None, "grid"),
])
def test_grid_errors_name_the_field(axes, mutate, field):
    data = _grid_data(**axes)
    if mutate:
        mutate(data)
    with pytest.raises(StudyError) as err:
        parse_study(data)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_dry_run_lists_runs_and_costs_without_torch_or_ray(tmp_path):
    grid = str(resources.files("eqlab.pipeline.studies").joinpath("grid.toml"))
    code = ("import sys, json, io, contextlib; from eqlab.pipeline.cli import main; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = main(['run', sys.argv[1], '--dry-run', '--json'])\n"
            "rows = json.loads(buf.getvalue())\n"
            "print(rc, len(rows), sorted(m for m in ('torch', 'ray') if m in sys.modules), rows[0]['parameters'])")
    out = subprocess.run([sys.executable, "-c", code, grid], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    rc, n, loaded, params = out.stdout.split(maxsplit=3)
    assert (rc, n, loaded) == ("0", "8", "[]"), out.stdout + out.stderr
    assert int(params) > 0 and not list(tmp_path.iterdir())  # nothing written
