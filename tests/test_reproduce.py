"""`eqlab reproduce`: --list, bad input, and the shipped presets (parsed, sized, packaged); nothing is run."""
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from eqlab.models.registry import validate_options
from eqlab.pipeline import reproduce as rp
from eqlab.pipeline.cli import main
from eqlab.pipeline.findings_drift import sweeps
from eqlab.pipeline.study import local_cpus, parse_study

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = {"modadd_gpt2", "gpt2_text", "llama_text", "minilm_cls", "hf_text_cls", "vit_images"}


def _preset(preset, scale):
    text, where = rp.preset_text(preset, scale)
    return parse_study(tomllib.loads(text), where)


def test_list_names_every_finding_in_one_line_each(capsys):
    assert main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["flat", "align", "blocks", "indefinite", "drift", "saddles"]
    for line, f in zip(lines, rp.FINDINGS):
        assert f.finding in line and "control" in line


@pytest.mark.parametrize("argv, says", [
    (["reproduce", "nope"], "unknown finding 'nope'"),
    (["reproduce", "drift", "--scale", "huge"], "argument --scale: invalid choice"),
    (["reproduce", "drift", "--scale", "full"], "eqlab submit"),  # 64 CPUs: a cluster's study
])
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys, tmp_path):
    if "full" in argv and local_cpus() >= 64:
        pytest.skip("this machine could run the full preset")
    assert main(argv + ["--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eqlab: error: ") and "\n" not in err and says in err
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize("preset", sorted({f.preset for f in rp.FINDINGS}))
def test_presets_parse_and_are_sized_for_their_scale(preset):
    small, full = _preset(preset, "small"), _preset(preset, "full")
    assert small.num_cpus <= 2 and full.num_cpus > small.num_cpus
    for study in (small, full):
        params = {r.family: validate_options(r.family, r.model) for r in study.runs}
        assert len(params) >= 2, f"{study.name}: one model family"
        assert any(f in TRANSFORMERS and n >= 1_000_000 for f, n in params.items()), params
    assert "Expected cost" in rp.preset_text(preset, "full")[0] and "COST_" not in rp.preset_text(preset, "full")[0]


def test_drift_presets_are_lr_sweeps_of_three_learning_rates_or_more():
    for scale in rp.SCALES:
        got = sweeps(_preset("drift", scale))
        assert len(got) >= 4
        assert all(len({s.lr for s in specs}) >= 3 for specs in got.values())
        optimizers = {(specs[0].optimizer, specs[0].weight_decay > 0) for specs in got.values()}
        assert ("sgd", False) in optimizers and ("sgd", True) in optimizers  # the law and its control sweep
        assert any(o != "sgd" for o, _ in optimizers)
    assert sorted(sweeps(_preset("drift", "small"))) == ["cnn-adam", "cnn-sgd", "cnn-sgd-wd", "gpt-sgd"]


def test_presets_ship_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "reproduce/*.toml" in data["eqlab.pipeline.studies"]
    shipped = {p.name for p in resources.files("eqlab.pipeline.studies").joinpath("reproduce").iterdir()}
    assert {f"{f.preset}-{s}.toml" for f in rp.FINDINGS for s in rp.SCALES} <= shipped


def test_verdict_lines_count_predictions_and_controls_from_the_findings_table(tmp_path):
    from eqlab.pipeline import store

    study = _preset("drift", "small")
    rows = [{"finding": "conservation_drift_slope", "control": c, "verdict": v, "symmetry": "relu_rescale"}
            for c, v in ((False, "holds"), (False, "holds"), (True, "violated"), (True, "violated"))]
    store.write_rows(tmp_path, "findings", "cnn-sgd", store.RUN_LEVEL, rows, study=study.name)
    store.write_rows(tmp_path, "findings", "gpt-sgd", store.RUN_LEVEL, rows[:1] + rows[2:3], study=study.name)
    store.write_rows(tmp_path, "findings", "cnn-sgd-lr0.01", 0,
                     [{"finding": "flat_symmetry_direction", "control": False, "verdict": "holds"}], study=study.name)
    drift, flat, wd = rp.verdict_lines(tmp_path, study, [rp.BY_NAME["drift"], rp.BY_NAME["flat"]])
    assert drift.startswith("drift (conservation_drift_slope): predictions: 3 holds; negative controls: 3 violated")
    assert drift.endswith("model families: digits_cnn, gpt2_text")
    assert "predictions: 1 holds; negative controls: no rows; model families: digits_cnn" in flat
    # one line per row finding, even without rows
    assert wd.startswith("flat (wd_stationary_rayleigh): predictions: no rows; negative controls: no rows")
