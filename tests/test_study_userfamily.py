"""A study's run of a user's own family, ``family = "path/to/file.py:FUNC"`` (issue 10).

FUNC is held to the one contract `eqlab inspect` / `eqlab spectrum` use (`pipeline/userfunc.py`), called
as FUNC(**model options, seed=seed); the path is taken from the study file's folder; the run's keys
carry the file's content hash, not its location. Bad input is one line naming the field, exit 2,
nothing written. One tiny study (a 51-parameter MLP, 2 checkpoints) runs through the real local Ray
cluster: Ray Train, the Hessian actor, the identity, conservation and findings tasks all build it.
"""
from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from eqlab.pipeline import cli
from eqlab.pipeline.hashing import config_hash, file_digest
from eqlab.pipeline.study import RunSpec, StudyError, load_study, parse_study
from eqlab.pipeline.train import train_hash
from tiny_study import tiny_study_head

F64 = torch.float64

MLP = '''
import torch
from torch import nn


def make(hidden=6, n=64, seed=0, declare=True):
    g = torch.Generator().manual_seed(1234)  # the data are fixed; the run's seed sets the initialisation
    X = torch.randn(n + 32, 4, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3)).double()
    out = {"model": model, "batch": (X[:n], y[:n]), "test": (X[n:], y[n:]), "loss": nn.functional.cross_entropy}
    if declare:
        out["symmetries"] = {"relu_rescale": "ReLU is positively homogeneous",
                             "permutation": "hidden units are interchangeable"}
    return out
'''

STUDY = tiny_study_head("userfam") + '''[findings]
examples = 32
probes = 1
top_k = 2
max_iter = 30
include = ["flat_symmetry_direction", "gradient_hessian_alignment"]   # the two the assertions are about
[[runs]]
name = "mlp"
family = "{family}"
model = {model}
lr = 0.1
batch_size = 16
steps = 2
n_checkpoints = 2
'''


def _mlp_params(hidden: int) -> int:
    return (4 * hidden + hidden) + (hidden * 3 + 3)


def write_study(folder: Path, family: str = "models/mlp.py:make", model: str = "{ hidden = 6 }",
                source: str = MLP) -> Path:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models" / "mlp.py").write_text(source)
    path = folder / "study.toml"
    path.write_text(STUDY.format(family=family, model=model))
    return path


# --- loading: the path, the digest, the options ---------------------------------------------------------


def test_the_path_is_taken_from_the_study_files_folder_and_dry_run_shows_the_run(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative path must not depend on where eqlab is started
    study = load_study(path)
    (run,) = study.runs
    file = (tmp_path / "proj" / "models" / "mlp.py").resolve()
    assert run.family == f"{file}:make" and run.family_digest == file_digest(file)
    assert cli.main(["run", str(path), "--dry-run", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["family"] == f"{file}:make" and row["parameters"] == _mlp_params(6) == 51
    monkeypatch.chdir(tmp_path)  # shown relative to the current folder when below it
    assert cli.main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "proj/models/mlp.py:make" in out and " 51 " in out, out


def test_keys_follow_the_files_content_not_its_location(tmp_path):
    a = load_study(write_study(tmp_path / "a"))
    moved = load_study(write_study(tmp_path / "b"))  # the same study and file in another folder
    assert a.runs[0].family != moved.runs[0].family
    assert train_hash(a.runs[0]) == train_hash(moved.runs[0])  # (the study's own hash names its source file)
    edited = load_study(write_study(tmp_path / "c", source=MLP + "\n# an edit\n"))
    assert train_hash(edited.runs[0]) != train_hash(a.runs[0]) and edited.hash != a.hash
    wider = load_study(write_study(tmp_path / "d", model="{ hidden = 7 }"))
    assert train_hash(wider.runs[0]) != train_hash(a.runs[0])


def test_the_files_a_cluster_job_needs_beside_the_study(tmp_path):
    from eqlab.pipeline.study import user_family_files

    path = write_study(tmp_path / "proj")
    file = (tmp_path / "proj" / "models" / "mlp.py").resolve()
    assert user_family_files(load_study(path), path) == [(file, Path("models/mlp.py"))]
    assert user_family_files(load_study(None), "pipeline/studies/default.toml") == []  # registered families only
    outside = write_study(tmp_path / "other", family=f"{file}:make")  # an absolute path elsewhere
    with pytest.raises(StudyError, match=r"runs\[0\]\.family: .* is outside the study file's folder"):
        user_family_files(load_study(outside), outside)


def test_a_registered_familys_keys_are_those_from_before_user_families():
    # pinned from the code before this change (commit 221cff3): a registered run's training key and a
    # study's hash must not move, or every stored checkpoint and row of existing studies would be redone
    spec = RunSpec(run_id="cnn", family="digits_cnn", model={"channels": [2, 4], "hidden": 8}, optimizer="sgd",
                   lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=16, steps=2, checkpoint_steps=(0, 2),
                   train_workers=1, seed=0)
    assert config_hash("train", spec) == "0600b7bc1c15b34a"
    import tomllib

    from tiny_study import tiny_study

    assert parse_study(tomllib.loads(tiny_study("pinned"))).hash == "03c311ac106bf752"


def test_func_gets_the_options_and_the_seed_and_builds_the_task_in_the_dtype_asked(tmp_path):
    from eqlab.models import build_task, expected_symmetries

    (run,) = load_study(write_study(tmp_path)).runs
    t0 = build_task(run.family, run.model, seed=0, dtype=torch.float32)
    t1 = build_task(run.family, run.model, seed=1, dtype=torch.float32)
    assert t0.model[0].weight.shape == (6, 4) and t0.model[0].weight.dtype == torch.float32
    assert t0.train[0].dtype == torch.float32 and t0.train[1].dtype == torch.int64  # class targets stay integer
    assert len(t0.train[1]) == 64 and len(t0.test[1]) == 32
    assert not torch.equal(t0.model[0].weight, t1.model[0].weight)  # seed=seed reached FUNC
    assert torch.equal(t0.train[0], t1.train[0])
    assert set(expected_symmetries(run.family, run.model)) == {"relu_rescale", "permutation"}
    # one contract: `eqlab inspect` / `eqlab spectrum` take the same FUNC (called as FUNC(), its defaults)
    from eqlab.pipeline.userfunc import UserSource

    d = UserSource(run.family).load()
    assert d["model"][0].weight.shape == (6, 4) and set(d) == {"model", "batch", "test", "loss", "symmetries"}
    assert expected_symmetries(run.family, {"declare": False}) == {}  # none declared: all is discovered


def test_a_grid_of_a_user_family_builds_it_once_per_options(tmp_path, monkeypatch, capsys):
    counted = MLP.replace("    g = torch.Generator()", "    open(__file__ + '.calls', 'a').write('x')\n    g = torch.Generator()")
    path = write_study(tmp_path, source=counted)
    text = path.read_text()
    runs_at = text.index("[[runs]]")
    path.write_text(text[:runs_at] + textwrap.dedent('''
        [grid]
        lr = [0.1, 0.05]
        seed = [0, 1]
        [[grid.runs]]
        name = "mlp"
        family = "models/mlp.py:make"
        model = { hidden = 5 }
        batch_size = 16
        steps = 2
        n_checkpoints = 2
        '''))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "study.toml", "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["mlp-lr0.1-s0", "mlp-lr0.1-s1", "mlp-lr0.05-s0", "mlp-lr0.05-s1"]
    assert {r["parameters"] for r in rows} == {_mlp_params(5)}
    # one build checks the file and the options for the whole grid (and the dry run's parameter counts)
    assert (tmp_path / "models" / "mlp.py.calls").read_text() == "x"


# --- bad input: one line naming the field, exit 2, nothing written --------------------------------------

BAD = [
    ("missing-file", "models/nope.py:make", None, "runs[0].family: models/nope.py:make: no such file"),
    ("missing-func", "models/mlp.py:build", None, "runs[0].family: models/mlp.py: has no function 'build'"),
    ("not-a-name", "models/mlp.py:1x", None, "runs[0].family: models/mlp.py:1x: '1x' is not a function name"),
    ("unknown-option", "models/mlp.py:make", "{ width = 3 }",
     "runs[0].model.width: ", "takes no option 'width' (its keyword parameters: declare, hidden, n, seed)"),
    ("seed-as-option", "models/mlp.py:make", "{ seed = 3 }", "runs[0].model.seed: ", "the run's seed field"),
    ("wrong-shape", "models/bad.py:make", None, "runs[0].family: ", "returned tuple, expected a dict"),
    ("scalar-loss", "models/bad.py:vector_loss", None, "runs[0].family: ", "loss returned a tensor of shape (4,)"),
    ("dict-inputs", "models/bad.py:dict_inputs", None, "runs[0].family: ", "'batch' inputs must be one tensor"),
    ("unknown-key", "models/bad.py:typo", None, "runs[0].family: ", "unknown key 'tset'"),
    ("needs-option", "models/bad.py:needs", None, "runs[0].model.width: ", "needs option 'width' (no default)"),
    ("bad-test", "models/bad.py:bad_test", None, "runs[0].family: ", "the model fails on the 'test' data"),
    ("raises", "models/bad.py:boom", None, "runs[0].family: ", "raised RuntimeError: no data here"),
]

BAD_FUNCS = '''
import torch
from torch import nn

def _ok():
    return nn.Linear(3, 2), (torch.randn(4, 3), torch.randint(0, 2, (4,)))

def make():
    return _ok()

def vector_loss():
    m, b = _ok()
    return {"model": m, "batch": b, "loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")}

def dict_inputs():
    m, (X, y) = _ok()
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = m
        def forward(self, x):
            return self.lin(x)
    return {"model": M(), "batch": ({"x": X}, y), "loss": nn.functional.cross_entropy}

def typo():
    m, b = _ok()
    return {"model": m, "batch": b, "tset": b, "loss": nn.functional.cross_entropy}

def needs(width, seed=0):
    m, b = _ok()
    return {"model": m, "batch": b, "loss": nn.functional.cross_entropy}

def bad_test():
    m, b = _ok()
    return {"model": m, "batch": b, "test": (torch.randn(4, 5), b[1]), "loss": nn.functional.cross_entropy}

def boom(seed=0):
    raise RuntimeError("no data here")
'''


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_user_family_is_one_line_naming_the_field(case, tmp_path, monkeypatch, capsys):
    _, family, model, *expect = case
    path = write_study(tmp_path, family=family, model=model or "{}")
    (tmp_path / "models" / "bad.py").write_text(BAD_FUNCS)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for argv in (["run", "study.toml", "--results", "results"], ["run", str(path), "--dry-run"]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("eqlab: error: "), err
        assert "Traceback" not in err and all(e in lines[0] for e in expect), (lines[0], expect)
    assert _tree(tmp_path) == before


def test_a_study_file_in_another_folder_is_named_as_written(tmp_path):
    path = write_study(tmp_path, family="../mlp.py:make")
    with pytest.raises(StudyError, match=r"runs\[0\]\.family: \.\./mlp\.py:make: no such file .*study file's folder"):
        load_study(path)


# --- end to end: the real local Ray cluster ----------------------------------------------------------------


def _dense_top_eigenvalue(run: RunSpec, checkpoint_uri: str, examples: int) -> float:
    """λ_max of the run's float64 Hessian on the spectra batch at a checkpoint, from the dense matrix."""
    from eqlab.analyses.curvature.dense import dense_eigh
    from eqlab.analyses.curvature.operator import HessianOperator
    from eqlab.pipeline import checkpoint as ckpt
    from eqlab.pipeline.spectra import FamilySource

    model, loss, batches = FamilySource(run.family, run.model, run.seed, examples, examples)(F64)
    model.load_state_dict(ckpt.load_state(checkpoint_uri.removeprefix("file://")))
    evals, _ = dense_eigh(HessianOperator(model, loss, batches, dtype=F64))
    return float(evals[-1])


def test_a_user_family_study_runs_every_stage_through_ray(ray_cluster, tmp_path):
    from eqlab.pipeline.query import run_query
    from eqlab.pipeline.runner import run_study

    study = load_study(write_study(tmp_path / "proj"))
    results = tmp_path / "results"
    run_study(study, results, log=lambda *_: None)
    q = lambda sql: run_query(results, sql)[1]
    (run,) = study.runs
    assert q("select family, status from runs") == [(run.family, "ok")]
    steps = list(run.checkpoint_steps)
    assert [r[0] for r in q("select step from checkpoints order by step")] == steps == [0, 2]
    # the Hessian actor built the model: the top eigenvalue of a 51-parameter float64 Hessian, against
    # the dense oracle at the final checkpoint (Lanczos' true-residual bound: |λ̂ - λ| <= r)
    spectra = q("select step, eigenvalue, residual from spectra where rank = 0 order by step")
    assert [s for s, _, _ in spectra] == steps
    (uri,) = q("select checkpoint_uri from checkpoints where step = 2")[0]
    top, r = spectra[-1][1:]
    exact = _dense_top_eigenvalue(run, uri, examples=study.spectra.examples)
    # a unit Ritz vector with true residual r has an eigenvalue within r (Weyl); 8·eps·|λ| covers eigh's rounding
    assert abs(top - exact) <= r + 8 * torch.finfo(F64).eps * abs(exact), (top, exact, r)
    # identity tasks: the declared symmetries were found and hold; no `missing` row
    verdicts = {(s, v) for s, v in q("select symmetry, verdict from identities where not control")}
    assert {("relu_rescale", "holds"), ("permutation", "holds")} <= verdicts, verdicts
    assert not any(v == "missing" for _, v in verdicts)
    # conservation replayed the step after step 0 on the user's model
    assert q("select count(*) from conservation")[0][0] > 0
    # findings: every prediction holds, every negative control is violated, sized by [findings]
    rows = q("select finding, control, verdict, n_examples, probes from findings")
    assert {f for f, *_ in rows} == {"flat_symmetry_direction", "gradient_hessian_alignment"}
    assert all(v == ("violated" if c else "holds") for _, c, v, _, _ in rows), rows
    assert {(n, p) for *_, n, p in rows} == {(32, 1)}
    ranks = q("select max(rank) from findings where finding = 'gradient_hessian_alignment'")[0][0]
    assert ranks == 1  # top_k = 2: ranks 0 and 1
