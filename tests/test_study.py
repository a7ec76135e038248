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
    (lambda d: d["runs"][1].update(optimizer="adamw"), "runs[1].optimizer"),
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
    assert proc.stderr.strip().splitlines() == ["eqlab: error: runs[0].optimizer: must be one of sgd, adam (got 'sgdd')"]
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
