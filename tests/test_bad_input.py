"""Bad input, table-driven: study files, model files, CLI flags, results paths, corrupt inputs and SQL.

Every case must end with exit status != 0, exactly one line on stderr starting ``eqlab: error:``, no
traceback, and nothing written (each case runs in its own folder, whose every file is compared before
and after). Cases run in-process through ``pipeline.cli.main`` (fast); a few run the real console script.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from eqlab.pipeline import cli
from eqlab.pipeline.study import local_cpus

# --- helpers ------------------------------------------------------------------------------------------


def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "nan" if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else repr(x))
    if isinstance(x, str):
        return json.dumps(x)  # JSON's escapes (\\uXXXX included) are valid in TOML basic strings
    if isinstance(x, list):
        return "[" + ", ".join(_toml_value(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in x.items()) + " }"
    raise TypeError(type(x))


def toml_dumps(data: dict) -> str:
    """Enough TOML for study files: top-level scalars, tables, arrays of tables, inline tables."""
    out = [f"{k} = {_toml_value(v)}" for k, v in data.items()
           if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    for k, v in data.items():
        if isinstance(v, dict):
            out += [f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for t in v:
                out += [f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in t.items()]
    return "\n".join(out) + "\n"


def default_study() -> dict:
    return tomllib.loads(resources.files("eqlab.pipeline.studies").joinpath("default.toml").read_text())


def tree(root: Path) -> dict:
    """Every file and folder under ``root`` with its size and modification time."""
    snap = {}
    for p in root.rglob("*"):
        st = p.lstat()
        snap[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return snap


MODEL_HEADER = """
import math
import torch
from torch import nn

def good():
    torch.manual_seed(0)
    return {"model": nn.Linear(3, 2), "batch": (torch.randn(4, 3), torch.randint(0, 2, (4,))),
            "loss": nn.functional.cross_entropy}

"""


def write_model(tmp: Path, body: str | None = None, name: str = "m.py") -> str:
    src = MODEL_HEADER + ("def make():\n" + "\n".join("    " + ln for ln in body.strip().splitlines()) + "\n"
                          if body else "")
    (tmp / name).write_text(src)
    return name


def write_results(tmp: Path) -> Path:
    """A results folder with a `spectra` and a `runs` table (Parquet written directly with pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = tmp / "res"
    for table, rows in (("spectra", {"run_id": ["cnn", "cnn"], "step": [0, 3], "eigenvalue": [1.5, 2.5]}),
                        ("runs", {"run_id": ["cnn"], "step": [-1], "family": ["digits_cnn"]})):
        (res / table / "cnn").mkdir(parents=True)
        pq.write_table(pa.table(rows), res / table / "cnn" / ("run.parquet" if table == "runs" else "000000000.parquet"))
    return res


# --- the cases ----------------------------------------------------------------------------------------
# Each case: (id, build(tmp) -> argv, text the one error line must contain).

def study(mutate, expect):
    def build(tmp):
        data = default_study()
        mutate(data)
        (tmp / "study.toml").write_text(toml_dumps(data))
        return ["run", "study.toml", "--results", "results"]
    return build, expect


def study_text(text, expect, binary=False):
    def build(tmp):
        path = tmp / "study.toml"
        path.write_bytes(text) if binary else path.write_text(text)
        return ["run", "study.toml", "--results", "results"]
    return build, expect


def model(body, expect, cmd="spectrum", extra=()):
    def build(tmp):
        ref = write_model(tmp, body) + ":make"
        more = ["--results", "results"] if cmd == "inspect" else []
        return [cmd, ref, *more, *extra]
    return build, expect


def flags(extra, expect):
    def build(tmp):
        return ["spectrum", write_model(tmp) + ":good", *extra]
    return build, expect


def sql(text, expect):
    def build(tmp):
        res = write_results(tmp)
        return ["query", "--results", str(res), text]
    return build, expect


def raw(argv_fn, expect):
    return argv_fn, expect


def _set(path, value):
    """mutate(data): set data[a][b]... = value along ``path``; value None deletes."""
    def mutate(d):
        for k in path[:-1]:
            d = d[k]
        if value is None:
            d.pop(path[-1])
        else:
            d[path[-1]] = value
    return mutate


TINY_CNN = {"channels": [1, 1], "hidden": 1, "bn_eps": 1e-12}  # 61 parameters

STUDY_CASES = [
    ("study-non-utf8", study_text(b"[study]\nname = \"caf\xe9\"\n", "not UTF-8", binary=True)),
    ("study-invalid-toml", study_text("[study\nname = 1\n", "not valid TOML")),
    ("study-binary-garbage", study_text(b"\x00\x01\x02\xff\xfe", "not UTF-8", binary=True)),
    ("study-nul-bytes", study_text("\x00\x00[study]", "not valid TOML")),
    ("study-empty-file", study_text("", "runs: required field is missing")),
    ("study-missing-file", raw(lambda tmp: ["run", "nope.toml", "--results", "results"], "nope.toml: cannot read")),
    ("study-is-a-folder", raw(lambda tmp: (tmp / "d.toml").mkdir() or ["run", "d.toml", "--results", "results"],
                              "d.toml: cannot read")),
    ("cnn-activation-softplus", study(_set(["runs", 0, "model", "activation"], "softplus"), "runs[0].model.activation: must be one of")),
    ("cnn-channels-one", study(_set(["runs", 0, "model", "channels"], [4]), "runs[0].model.channels: expected a list of 2")),
    ("cnn-channels-bool", study(_set(["runs", 0, "model", "channels"], [4, True]), "runs[0].model.channels")),
    ("cnn-hidden-negative", study(_set(["runs", 0, "model", "hidden"], -4), "runs[0].model.hidden: must be >= 1 (got -4)")),
    ("cnn-bn-eps-zero", study(_set(["runs", 0, "model", "bn_eps"], 0.0), "runs[0].model.bn_eps: must be > 0")),
    ("cnn-bn-eps-string", study(_set(["runs", 0, "model", "bn_eps"], "tiny"), "runs[0].model.bn_eps: expected a finite number")),
    ("cnn-classes-too-few", study(_set(["runs", 0, "model", "classes"], 5), "runs[0].model.classes: must be >= 10")),
    ("cnn-unknown-option", study(_set(["runs", 0, "model", "width"], 3), "runs[0].model.width: not an option")),
    ("cnn-model-too-large", study(_set(["runs", 0, "model"], {"channels": [4096, 4096], "hidden": 1_000_000}),
                                  "runs[0].model: these options give")),
    ("model-not-a-table", study(_set(["runs", 0, "model"], 3), "runs[0].model: expected a table")),
    ("gpt2-head-not-dividing", study(_set(["runs", 1, "model", "n_head"], 3), "runs[1].model.n_head: must divide n_embd")),
    ("gpt2-activation-unknown", study(_set(["runs", 1, "model", "activation"], "softplus"), "runs[1].model.activation")),
    ("gpt2-p-one", study(_set(["runs", 1, "model", "p"], 1), "runs[1].model.p: must be >= 2")),
    ("gpt2-tie-int", study(_set(["runs", 1, "model", "tie_word_embeddings"], 1), "runs[1].model.tie_word_embeddings")),
    ("study-seed-huge", study(_set(["study", "seed"], 2**63 - 1), "study.seed: must be <=")),
    ("run-seed-2-32", study(_set(["runs", 0, "seed"], 2**32), "runs[0].seed: must be <=")),
    ("top-k-above-params", study(lambda d: (d["runs"][0].update(model=TINY_CNN), d["spectra"].update(top_k=100, max_iter=200)),
                                 "spectra.top_k: must be <= the parameter count")),
    ("num-cpus-1e9", study(_set(["ray", "num_cpus"], 1e9), "ray.num_cpus: must be <=")),
    ("num-cpus-above-machine", study(lambda d: d["ray"].update(num_cpus=local_cpus() + 1), "ray.num_cpus:")),
    ("checkpoint-steps-bool", study(_set(["runs", 0, "checkpoint_steps"], [True, 5]), "runs[0].checkpoint_steps[0]: expected an integer")),
    ("checkpoint-steps-out-of-range", study(_set(["runs", 0, "checkpoint_steps"], [5, 10**6]), "runs[0].checkpoint_steps[1]")),
    ("run-name-non-ascii", study(_set(["runs", 0, "name"], "réseau"), "runs[0].name: use ASCII letters")),
    ("run-name-dot-leading", study(_set(["runs", 0, "name"], ".hidden"), "runs[0].name")),
    ("run-name-slash", study(_set(["runs", 0, "name"], "a/b"), "runs[0].name")),
    ("study-name-traversal", study(_set(["study", "name"], "../../x"), "study.name: use ASCII letters")),
    ("study-name-absolute", study(_set(["study", "name"], "/tmp/eqlab-abs"), "study.name")),
    ("identities-dtype-twice", study(_set(["identities", "dtypes"], ["float64", "float64"]), "identities.dtypes: 'float64' is listed twice")),
    ("identities-dtype-float16", study(_set(["identities", "dtypes"], ["float16"]), "identities.dtypes")),
    ("lr-string", study(_set(["runs", 0, "lr"], "fast"), "runs[0].lr: expected a finite number")),
    ("lr-nan", study(_set(["runs", 0, "lr"], math.nan), "runs[0].lr: expected a finite number")),
    ("steps-huge", study(_set(["runs", 0, "steps"], 10**12), "runs[0].steps: must be <=")),
    ("spectra-workers-100", study(_set(["spectra", "workers"], 100), "spectra.workers: must be <=")),
    ("spectra-tol-zero", study(_set(["spectra", "tol"], 0), "spectra.tol: must be > 0")),
    ("train-workers-above-batch", study(lambda d: d["runs"][0].update(train_workers=4, batch_size=2), "runs[0].train_workers")),
    ("unknown-run-field", study(_set(["runs", 0, "stpes"], 3), "runs[0].stpes: unknown field")),
    ("duplicate-run-name", study(_set(["runs", 1, "name"], "cnn"), "runs[1].name: duplicate run name")),
]

def _bert(tmp: Path) -> bool:
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=32).save_pretrained(tmp / "bert")
    return True


MODEL_CASES = [
    ("func-raises", model('raise RuntimeError("no data here")', "m.py:make: raised RuntimeError: no data here")),
    ("syntax-error", raw(lambda tmp: (tmp / "s.py").write_text("def make(:\n    pass\n") and ["inspect", "s.py:make", "--results", "results"],
                         "s.py: syntax error at line 1")),
    ("import-raises", raw(lambda tmp: (tmp / "i.py").write_text("import no_such_module_eqlab\n") and ["spectrum", "i.py:make"],
                          "i.py: importing it raised ModuleNotFoundError")),
    ("nul-bytes-source", raw(lambda tmp: (tmp / "z.py").write_bytes(b"def make():\x00\n") and ["spectrum", "z.py:make"], "z.py: not Python source")),
    ("missing-file", raw(lambda tmp: ["inspect", "missing.py:make", "--results", "results"], "missing.py: no such file")),
    ("no-such-function", raw(lambda tmp: ["spectrum", write_model(tmp) + ":nothing"], "m.py: has no function 'nothing'")),
    ("no-function-given", raw(lambda tmp: ["spectrum", write_model(tmp)], "expected FILE.py:FUNC")),
    ("returns-list", model("return [1, 2]", "m.py:make: returned list, expected a dict")),
    ("dict-without-loss", model("d = good(); d.pop('loss'); return d", "the returned dict has no 'loss'")),
    ("model-not-module", model("d = good(); d['model'] = 3; return d", "'model' is int, not a torch.nn.Module")),
    ("no-parameters", model("d = good(); d['model'] = nn.ReLU(); return d", "the model has no parameters")),
    ("frozen-parameters", model("d = good(); d['model'].requires_grad_(False); return d", "has no trainable parameters")),
    ("integer-parameter", model("d = good(); d['model'].register_parameter('count', nn.Parameter(torch.ones(2, dtype=torch.long), "
                                "requires_grad=False)); return d", "parameter 'count' is torch.int64")),
    ("wrong-batch-shape", model("d = good(); d['batch'] = (torch.randn(4, 5), d['batch'][1]); return d",
                                "the model fails on the batch (inputs (4, 5))")),
    ("batch-not-pair", model("d = good(); d['batch'] = (d['batch'][0],); return d", "'batch' must be a tuple (inputs, targets)")),
    ("targets-not-tensor", model("d = good(); d['batch'] = (d['batch'][0], [0, 1, 0, 1]); return d", "batch targets are list")),
    ("empty-batch", model("return {**good(), 'batch': (torch.randn(0, 3), torch.zeros(0, dtype=torch.long))}", "the batch is empty")),
    ("loss-not-scalar", model("return {**good(), 'loss': lambda o, y: nn.functional.cross_entropy(o, y, reduction='none')}",
                              "m.py:make: loss returned a tensor of shape (4,), expected a scalar")),
    ("loss-nan", model("return {**good(), 'loss': lambda o, y: o.sum() * float('nan')}", "loss is nan on the batch")),
    ("loss-float", model("return {**good(), 'loss': lambda o, y: 1.0}", "loss returned float, expected a scalar tensor")),
    ("loss-no-gradient", model("return {**good(), 'loss': lambda o, y: torch.tensor(1.0)}", "does not depend on the model's")),
    ("loss-not-callable", model("return {**good(), 'loss': 3}", "'loss' must be a callable")),
    ("loss-raises", model("return {**good(), 'loss': lambda o, y: nn.functional.mse_loss(o, y)}", "the loss fails on the model's outputs")),
    ("model-returns-tuple", model("class T(nn.Module):\n    def __init__(self):\n        super().__init__(); self.l = nn.Linear(3, 2)\n"
                                  "    def forward(self, x):\n        return self.l(x), x\n"
                                  "return {**good(), 'model': T(), 'loss': lambda o, y: o[0].sum()}",
                                  "the model returned a tuple", cmd="inspect")),
    ("inspect-examples-zero", raw(lambda tmp: ["inspect", write_model(tmp) + ":good", "--examples", "0", "--results", "results"],
                                  "argument --examples: must be >= 1 (got 0)")),
    ("config-on-file-ref", raw(lambda tmp: ["spectrum", write_model(tmp) + ":good", "--config", "a=1"],
                               "--config applies to a transformers model folder")),
    ("config-not-key-value", raw(lambda tmp: ["inspect", write_model(tmp) + ":good", "--config", "novalue", "--results", "results"],
                                 "--config 'novalue': expected KEY=VALUE")),
    ("empty-model-folder", raw(lambda tmp: (tmp / "hf").mkdir() or ["inspect", "hf", "--results", "results"],
                               "not a transformers model folder")),
    ("hf-config-override-invalid", raw(lambda tmp: _bert(tmp) and ["spectrum", "bert", "--config", "num_attention_heads=3"],
                                       "bert: cannot build the model from its config and --config: ValueError")),
    ("hf-config-no-such-field", raw(lambda tmp: _bert(tmp) and ["inspect", "bert", "--config", "no_such_field=1",
                                                                "--results", "results"], "has no such field")),
    ("neither-file-nor-folder", raw(lambda tmp: ["spectrum", "nowhere"], "nowhere: expected FILE.py:FUNC or a transformers")),
]

FLAG_CASES = [
    ("workers-zero", flags(["--workers", "0"], "argument --workers: must be >= 1 (got 0)")),
    ("workers-above-cpus", flags(["--workers", str(local_cpus() + 1)], "--workers")),
    ("workers-1000", flags(["--workers", "1000"], "must be <= 256")),
    ("workers-above-examples", flags(["--workers", "5"], "--workers 5")),
    ("top-negative", flags(["--top", "-1"], "argument --top: must be >= 0")),
    ("top-above-params", flags(["--top", "9"], "--top 9: the model has only 8 trainable parameters")),
    ("bottom-above-params", flags(["--bottom", "9"], "--bottom 9: the model has only 8")),
    ("top-above-max-iter", flags(["--top", "5", "--max-iter", "3"], "--top 5: more than --max-iter 3")),
    ("top-zero-nothing", flags(["--top", "0"], "nothing to compute")),
    ("top-not-int", flags(["--top", "abc"], "argument --top: expected an integer, got 'abc'")),
    ("block-invalid-regex", flags(["--block", "["], "--block '[': not a valid regular expression")),
    ("block-matches-nothing", flags(["--block", "^nomatch$"], "--block '^nomatch$': matches no trainable parameter")),
    ("tol-zero", flags(["--tol", "0"], "argument --tol: must be a finite number > 0")),
    ("tol-nan", flags(["--tol", "nan"], "argument --tol")),
    ("max-iter-zero", flags(["--max-iter", "0"], "argument --max-iter: must be >= 1")),
    ("density-steps-zero", flags(["--density", "--density-steps", "0"], "argument --density-steps")),
    ("probes-negative", flags(["--density", "--probes", "-2"], "argument --probes")),
    ("trace-matvecs-two", flags(["--trace", "--trace-matvecs", "2"], "argument --trace-matvecs: must be >= 3")),
    ("dtype-float16", flags(["--dtype", "float16"], "argument --dtype: invalid choice")),
    ("sharded-basis-alone", flags(["--sharded-basis"], "--sharded-basis needs --workers >= 2")),
    ("method-with-workers", flags(["--method", "compiled", "--workers", "2"], "--method applies in-process")),
    ("unknown-flag", flags(["--frobnicate"], "unrecognized arguments: --frobnicate")),
    ("no-command", raw(lambda tmp: [], "the following arguments are required")),
    ("unknown-command", raw(lambda tmp: ["frobnicate"], "invalid choice")),
    ("split-token-batch", model("V = 5\nclass Tok(nn.Module):\n    def __init__(self):\n        super().__init__(); self.e = nn.Embedding(V, V)\n"
                                "    def forward(self, x):\n        return self.e(x)\n"
                                "torch.manual_seed(0)\nreturn {'model': Tok(), 'batch': (torch.randint(0, V, (2, 3)), torch.randint(0, V, (6,))),\n"
                                "        'loss': lambda o, y: nn.functional.cross_entropy(o.reshape(-1, V), y)}",
                                "--workers", extra=["--workers", "2"])),
]


def _file(tmp: Path, name="afile") -> Path:
    (tmp / name).write_text("not a folder\n")
    return tmp / name


RESULTS_CASES = [
    ("run-results-is-file", raw(lambda tmp: ["run", "--results", str(_file(tmp))], "is a file, not a folder")),
    ("run-results-under-file", raw(lambda tmp: ["run", "--results", str(_file(tmp) / "sub")], "is a file, not a folder")),
    ("inspect-results-is-file", raw(lambda tmp: ["inspect", write_model(tmp) + ":good", "--results", str(_file(tmp))],
                                    "is a file, not a folder")),
    ("query-results-is-file", raw(lambda tmp: ["query", "--results", str(_file(tmp)), "select 1"], "not a folder")),
    ("query-results-missing", raw(lambda tmp: ["query", "--results", "nothing-here", "select 1"], "no results at nothing-here")),
    ("query-default-results-missing", raw(lambda tmp: ["query", "select 1"], "no results at results/default")),
]

SQL_CASES = [
    ("sql-empty", sql("", "empty SQL")),
    ("sql-only-semicolons", sql(" ; ; ", "empty SQL")),
    ("sql-copy-out", raw(lambda tmp: ["query", "--results", str(write_results(tmp)),
                                      f"copy (select * from spectra) to '{tmp / 'leak.csv'}'"], "only a read-only SELECT")),
    ("sql-overwrite-result", raw(lambda tmp: ["query", "--results", str(write_results(tmp)),
                                              f"copy (select 9 as eigenvalue) to '{tmp / 'res/spectra/cnn/000000000.parquet'}' "
                                              "(format parquet, use_tmp_file false)"], "only a read-only SELECT")),
    ("sql-read-passwd", sql("select * from read_csv('/etc/passwd', sep = ':')", "Permission Error")),
    ("sql-read-text", sql("select * from read_text('/etc/hostname')", "Permission Error")),
    ("sql-glob-etc", sql("select * from glob('/etc/*')", "Permission Error")),
    ("sql-sniff-csv", sql("select * from sniff_csv('/etc/passwd')", "Permission Error")),
    ("sql-read-outside-via-dotdot", raw(lambda tmp: ["query", "--results", str(write_results(tmp)),
                                                     f"select * from read_csv('{tmp}/res/../../../../etc/passwd')"],
                                        "Permission Error")),
    ("sql-attach", raw(lambda tmp: ["query", "--results", str(write_results(tmp)), f"attach '{tmp / 'x.db'}' as x"],
                       "only a read-only SELECT")),
    ("sql-set", sql("set enable_external_access = true", "only a read-only SELECT")),
    ("sql-create-table", sql("create table t as select 1", "only a read-only SELECT")),
    ("sql-install", sql("install httpfs", "only a read-only SELECT")),
    ("sql-explain-analyze-copy", raw(lambda tmp: ["query", "--results", str(write_results(tmp)),
                                                  f"explain analyze copy (select 1) to '{tmp / 'res' / 'x.csv'}'"],
                                     "only a read-only SELECT")),
    ("sql-pragma", sql("pragma enable_profiling", "only a read-only SELECT")),
    ("sql-two-statements", sql("select 1; select 2", "expected one SQL statement, got 2")),
    ("sql-typo-hint", sql("select * from spectr", 'Did you mean "spectra"')),
    ("sql-column-hint", sql("select eigenvalu from spectra", "eigenvalue")),
    ("sql-syntax", sql("selec 1", "syntax error")),
    ("sql-corrupt-parquet", raw(lambda tmp: (write_results(tmp) / "spectra" / "cnn" / "000000000.parquet").write_bytes(b"PAR1garbage")
                                and ["query", "--results", str(tmp / "res"), "select * from spectra"],
                                "cannot read table spectra")),
]

ALL = STUDY_CASES + MODEL_CASES + FLAG_CASES + RESULTS_CASES + SQL_CASES


def test_enough_cases():
    assert len(ALL) >= 60 and len({c[0] for c in ALL}) == len(ALL)


@pytest.mark.parametrize("build, expect", [c[1] for c in ALL], ids=[c[0] for c in ALL])
def test_bad_input(build, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(a) for a in build(tmp_path)]
    before = tree(tmp_path)
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc != 0, (argv, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqlab: error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert tree(tmp_path) == before, "something was written"
    assert not (tmp_path / "results").exists()


def test_read_only_results_refused(tmp_path, monkeypatch, capsys):
    """A folder this user cannot write (simulated: root may write anywhere) is refused before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p).name == "ro" else real(p, mode, **kw))
    before = tree(tmp_path)
    for argv in (["run", "--results", "ro/results"], ["inspect", write_model(tmp_path) + ":good", "--results", "ro"]):
        before = tree(tmp_path)
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc != 0 and err.splitlines() == [err.strip()] and "cannot write there" in err, err
        assert tree(tmp_path) == before


def test_query_still_answers_selects(tmp_path, capsys):
    res = write_results(tmp_path)
    before = tree(tmp_path)
    for q, want in [("select step, eigenvalue from spectra order by step", "2.5"),
                    ("select s.run_id, r.family from spectra s join runs r using (run_id) limit 1", "digits_cnn"),
                    (f"select count(*) as n from read_parquet('{res}/spectra/*/*.parquet')", "2"),
                    ("describe spectra", "eigenvalue"), ("from runs", "digits_cnn"),
                    ("explain select * from spectra", "physical_plan"),
                    ("with t as (select max(eigenvalue) m from spectra) select m from t;", "2.5")]:
        assert cli.main(["query", "--results", str(res), q]) == 0
        out, err = capsys.readouterr()
        assert want in out and not err, (q, out, err)
    assert tree(tmp_path) == before


def test_registry_matches_builders_without_torch_at_import():
    """Declared defaults equal the builders' own; the parameter formula equals the built models'."""
    code = ("import sys, eqlab, eqlab.models.registry as r, eqlab.pipeline.study, eqlab.pipeline.cli, eqlab.pipeline.query, eqlab.pipeline.userfunc; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

    import inspect

    import torch
    from transformers.activations import ACT2CLS

    from eqlab.models.registry import FAMILIES, GPT2_ACTIVATIONS, build_task, validate_options

    assert set(GPT2_ACTIVATIONS) <= set(ACT2CLS)
    for name, fam in FAMILIES.items():
        sig = inspect.signature(fam.build_model).parameters
        assert set(sig) == set(fam.options), name
        for k, v in fam.defaults.items():
            assert list(sig[k].default) == v if isinstance(v, list) else sig[k].default == v, (name, k)
    for family, opts in [("digits_cnn", {}), ("digits_cnn", {"channels": [3, 5], "hidden": 7, "classes": 12}),
                         ("modadd_gpt2", {}), ("modadd_gpt2", {"p": 7, "n_embd": 12, "n_layer": 2, "n_head": 3,
                                                               "tie_word_embeddings": True})]:
        task = build_task(family, opts, dtype=torch.float32)
        assert validate_options(family, opts) == sum(p.numel() for p in task.model.parameters() if p.requires_grad)


def _console(*args, cwd):
    exe = Path(sys.executable).with_name("eqlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "eqlab.pipeline.cli"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, cwd=cwd)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("kind", ["study", "flag", "sql", "model"])
def test_console_script(kind, tmp_path):
    """The real console script: exit 2, one line, no traceback, nothing written. The time is reported
    (pytest -s), not asserted."""
    if kind == "study":
        (tmp_path / "s.toml").write_text(toml_dumps({**default_study(), "study": {"name": "../../escape"}}))
        args = ["run", "s.toml"]
    elif kind == "flag":
        args = ["spectrum", write_model(tmp_path) + ":good", "--workers", "0"]
    elif kind == "sql":
        args = ["query", "--results", str(write_results(tmp_path)), "copy (select 1) to 'x.csv'"]
    else:
        args = ["inspect", write_model(tmp_path, 'raise ValueError("bad")') + ":make"]
    before = tree(tmp_path)
    proc, seconds = _console(*args, cwd=tmp_path)
    print(f"\n[timing] eqlab {kind} error answered in {seconds:.2f}s")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("eqlab: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
    assert tree(tmp_path) == before
