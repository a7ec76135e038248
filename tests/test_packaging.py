"""One top-level package: everything of ours is `eqlab.*`, so a user's own `models`, `pipeline` or
`analyses` module — in their working directory, on their path, or in a Ray Train worker's — neither
shadows ours nor is shadowed by it."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from tiny_study import LIGHT, tiny_study

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "analyses", "models", "eqlab")
BARE = {"pipeline", "analyses", "models"}


def _sources():
    for folder in (*FOLDERS, "tests", "bench"):
        yield from (p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def test_no_module_imports_a_bare_top_level_name():
    """From the repository root a bare `import pipeline` still resolves (cwd on sys.path), so a
    leftover would pass every test here and break for users; the source itself must not have one."""
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in BARE]
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (the folders map under eqlab); a new subpackage that is not
    listed would be missing from a wheel while an editable install hides it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"eqlab" + ("" if folder == "eqlab" else "." + ".".join(init.parent.relative_to(ROOT).parts))
             for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))


def test_a_study_runs_from_a_folder_with_the_users_own_models_and_pipeline(tmp_path):
    """A working directory holding the user's `models/` and `pipeline/` packages (which fail loudly if
    anything of ours imports them): `eqlab run` trains through Ray Train workers, computes spectra and
    checks identities there, exactly as from anywhere else."""
    for name in BARE:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (tmp_path / "study.toml").write_text(tiny_study("shadow", findings=LIGHT))
    # `-m` puts the working directory first on the driver's sys.path; Ray puts it on the workers'
    out = subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", "run", "study.toml", "--results", "results"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "own" not in out.stderr, out.stderr[-3000:]
    import pyarrow.parquet as pq
    spectra = list((tmp_path / "results").rglob("spectra/**/*.parquet"))
    assert spectra and pq.read_table(spectra[0]).num_rows > 0
    assert list((tmp_path / "results").rglob("identities/**/*.parquet"))
