"""The ``[findings]`` study section and the findings registry (issue 11).

The stage's sizes (examples, probes, top_k, max_iter) and which findings run (``include``) come from the
study, over each finding module's SETTINGS, over the stage's DEFAULTS; the resolved settings are the
findings stage's key, so changing one recomputes the findings rows and nothing else. A bad key, value
or finding name is one line naming the field.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from eqlab.pipeline import cli
from eqlab.pipeline import (findings_align, findings_blocks, findings_discrete, findings_flat, findings_indefinite,
                            findings_wd)
from eqlab.pipeline.findings_stage import DEFAULTS, FINDINGS, STAGE, Finding, findings_rows, resolved_settings
from eqlab.pipeline.stage import Checkpoints, StageContext
from eqlab.pipeline.study import FindingsSpec, StudyError, parse_study
from tiny_study import tiny_study

BASE = tomllib.loads(tiny_study("findings_settings"))


def study_with(findings: dict | None):
    data = copy.deepcopy(BASE)
    if findings is not None:
        data["findings"] = findings
    return parse_study(data)


def test_the_registry_is_keyed_by_each_modules_finding_name():
    assert FINDINGS["flat_symmetry_direction"].rows is findings_flat.flat_direction_rows
    assert FINDINGS["gradient_hessian_alignment"].rows is findings_align.alignment_rows
    assert list(FINDINGS) == [m.FINDING for m in (findings_flat, findings_align, findings_blocks, findings_indefinite,
                                                  findings_discrete, findings_wd)]
    assert all(f.name == n for n, f in FINDINGS.items())


def test_without_a_section_every_registered_finding_runs_with_the_stage_defaults():
    study = study_with(None)
    assert study.findings == FindingsSpec()
    got = resolved_settings(study.findings)
    assert list(got) == list(FINDINGS)
    for name, s in got.items():  # the constants the stage had before the section existed, unless a module says
        assert s == {**DEFAULTS, **FINDINGS[name].settings}
    assert DEFAULTS == {"examples": 64, "probes": 2, "top_k": 3, "max_iter": 60}


def test_study_values_apply_to_every_finding_and_include_picks_them():
    study = study_with({"examples": 16, "probes": 1, "top_k": 2, "max_iter": 20,
                        "include": ["gradient_hessian_alignment"]})
    assert study.findings == FindingsSpec(16, 1, 2, 20, ("gradient_hessian_alignment",))
    assert resolved_settings(study.findings) == {
        "gradient_hessian_alignment": {**DEFAULTS, **findings_align.__dict__.get("SETTINGS", {}),
                                       "examples": 16, "probes": 1, "top_k": 2, "max_iter": 20}}


def test_a_modules_own_settings_sit_under_the_studys(monkeypatch):
    def rows(*_):
        return []

    own = Finding("own_defaults", rows, {"top_k": 7, "own_budget": 11})
    monkeypatch.setitem(FINDINGS, own.name, own)
    plain = resolved_settings(FindingsSpec())
    assert plain["own_defaults"] == {**DEFAULTS, "top_k": 7, "own_budget": 11}
    assert plain["flat_symmetry_direction"]["top_k"] == DEFAULTS["top_k"]  # one module's default is its own
    set_here = resolved_settings(FindingsSpec(top_k=4))
    assert set_here["own_defaults"] == {**DEFAULTS, "top_k": 4, "own_budget": 11}
    assert resolved_settings(FindingsSpec(include=("own_defaults",))).keys() == {"own_defaults"}


def test_finding_of_reads_the_modules_name_and_defaults():
    import types

    module = types.SimpleNamespace(FINDING="made_up", SETTINGS={"probes": 5})
    f = Finding.of(module, len)
    assert (f.name, f.rows, f.settings) == ("made_up", len, {"probes": 5})
    assert Finding.of(types.SimpleNamespace(FINDING="bare"), len).settings == {}  # SETTINGS is optional


def _key(study, stage=STAGE):
    ctx = StageContext(study, Path("unused"), log=lambda *_: None)
    ck = Checkpoints(steps={0: Path("unused")}, keys={0: "checkpoint-key"})
    return {o.name: stage.key(ctx, ck, 0, o) for o in stage.outputs}


def test_the_settings_are_the_findings_key_and_only_theirs():
    from eqlab.pipeline.identities import STAGE as IDENTITIES
    from eqlab.pipeline.spectra_stage import STAGE as SPECTRA

    base = study_with(None)
    written_default = study_with({"probes": DEFAULTS["probes"]})  # the default, written out: nothing to redo
    assert _key(written_default) == _key(base)
    changed = [study_with({"probes": 1}), study_with({"examples": 32}), study_with({"max_iter": 30}),
               study_with({"top_k": 2}), study_with({"include": ["flat_symmetry_direction"]})]
    keys = [_key(s)["findings"] for s in changed]
    assert len(set(keys) | {_key(base)["findings"]}) == len(changed) + 1  # each one recomputes the rows
    for s in changed:  # and no other stage's rows
        assert _key(s, IDENTITIES) == _key(base, IDENTITIES) and _key(s, SPECTRA) == _key(base, SPECTRA)


BAD = [
    ({"bogus": 1}, "findings.bogus: unknown field"),
    ({"include": ["flat_symmetry_direction", "nope"]}, "findings.include[1]: 'nope' is not a registered finding"),
    ({"include": ["flat_symmetry_direction", "flat_symmetry_direction"]}, "findings.include[1]: 'flat_symmetry_direction' is listed twice"),
    ({"include": []}, "findings.include: expected a non-empty list"),
    ({"include": "flat_symmetry_direction"}, "findings.include: expected a list of finding names"),
    ({"include": [3]}, "findings.include[0]: 3 is not a registered finding"),
    ({"examples": 1}, "findings.examples: must be in [2, 10000000] (got 1)"),
    ({"probes": 0}, "findings.probes: must be in [1, 10000000] (got 0)"),
    ({"top_k": "3"}, "findings.top_k: expected an integer, got '3'"),
    ({"max_iter": True}, "findings.max_iter: expected an integer, got True"),
    ({"top_k": 5, "max_iter": 4}, "findings.max_iter: must be >= findings.top_k = 5 (got 4)"),
]


@pytest.mark.parametrize("section, expect", BAD, ids=[e.split(":")[0] + f"-{i}" for i, (_, e) in enumerate(BAD)])
def test_a_bad_section_names_the_field(section, expect):
    with pytest.raises(StudyError) as e:
        study_with(section)
    assert str(e.value).startswith(expect), (str(e.value), expect)


def test_a_bad_section_from_the_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from test_bad_input import toml_dumps

    data = copy.deepcopy(BASE)
    data["findings"] = {"include": ["nope"]}
    (tmp_path / "study.toml").write_text(toml_dumps(data))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "study.toml", "--results", "results"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eqlab: error: findings.include[0]: 'nope'"), err
    assert not (tmp_path / "results").exists()


def test_the_stage_runs_what_the_section_says(tmp_path):
    """Rows from the findings stage's own function on a saved checkpoint (no Ray): include picks the
    findings, probes and examples size them."""
    import torch

    from eqlab.models import build_task
    from eqlab.pipeline import checkpoint as ckpt
    from test_study_userfamily import write_study
    from eqlab.pipeline.study import load_study

    (run,) = load_study(write_study(tmp_path)).runs
    task = build_task(run.family, run.model, seed=run.seed, dtype=torch.float64)
    d = tmp_path / "ckpt"
    d.mkdir()
    ckpt.save(d, task.model, {"step": 0})
    only_flat = findings_rows(run, str(d), resolved_settings(FindingsSpec(examples=16, probes=1,
                                                                          include=("flat_symmetry_direction",))))
    assert only_flat and {r["finding"] for r in only_flat} == {"flat_symmetry_direction"}
    assert {(r["n_examples"], r["probes"]) for r in only_flat} == {(16, 1)}
    # the predictions hold and their controls are violated on this 51-parameter ReLU MLP
    assert all(r["verdict"] == ("violated" if r["control"] else "holds") for r in only_flat), only_flat
    both = findings_rows(run, str(d), resolved_settings(FindingsSpec(
        examples=16, probes=1, top_k=1, max_iter=20, include=("flat_symmetry_direction", "gradient_hessian_alignment"))))
    assert {r["finding"] for r in both} == {"flat_symmetry_direction", "gradient_hessian_alignment"}
    assert {r["rank"] for r in both if r["finding"] == "gradient_hessian_alignment"} == {0}  # top_k = 1
