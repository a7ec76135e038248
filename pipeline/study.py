"""Study files (TOML): load, validate field by field, and expand into run specifications.

Every problem is reported as ``StudyError`` naming the field (``runs[1].lr``) so the CLI can print
one line and exit non-zero before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from eqlab.models.registry import FAMILIES, OptionError, validate_options

DEFAULT_STUDY = "default.toml"
OPTIMIZERS = ("sgd", "adam", "adamw")  # sgd takes momentum; weight_decay: L2 (sgd, adam) or decoupled (adamw)
DTYPES = ("float32", "float64")
# Study and run names become folder names under results/: one safe path component each.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
SEED_LIMIT = 2**32  # numpy's seed range; derived seeds (seed * 1_000_003 + step) stay far below torch's 2**63
MAX_STEPS = 10**9
MAX_CPUS = 4096


class StudyError(ValueError):
    """A malformed study file; the message names the offending field."""


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    family: str
    model: dict
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    steps: int
    checkpoint_steps: tuple[int, ...]
    train_workers: int
    seed: int
    # sha256 of a user family's file ("path/to/file.py:FUNC"; ``family`` is then its resolved path), taken
    # when the study is loaded; "" for a registered family
    family_digest: str = ""

    def hash_identity(self) -> dict:
        """What determines the run's results (`pipeline/hashing.py`): its fields, with a user family named
        by its file's name, function and content digest rather than by where the file lies (a study moved,
        or unpacked by Ray Jobs in another folder, is the same study; an edited file is not). A registered
        family's identity is exactly its fields as before user families existed, so its keys stay valid."""
        d = asdict(self)
        if not self.family_digest:
            del d["family_digest"]
        else:
            path, func = self.family.rsplit(":", 1)
            d["family"] = f"{Path(path).name}:{func}"
        return d


from eqlab.analyses.curvature.defaults import TABLE as _CURVATURE_TABLE  # noqa: E402  (torch-free)

_CURVATURE = _CURVATURE_TABLE["float64"]  # budgets are the same in every dtype; tol is the dtype's own


@dataclass(frozen=True)
class SpectraSpec:
    top_k: int = 5
    tol: float | None = None  # None: sqrt(eps) of `dtype` (analyses/curvature/defaults.py), set on construction
    max_iter: int = _CURVATURE.max_iter
    workers: int = 2
    examples: int = 512
    microbatch: int = 128
    dtype: str = "float64"
    block_top_k: int = 1  # per-block (per-layer) spectra: top eigenvalues of each H_bb; 0 = off
    density_probes: int = _CURVATURE.slq_probes  # SLQ spectral density: Rademacher probes per checkpoint; 0 = off
    density_steps: int = _CURVATURE.slq_steps    # Lanczos steps per probe (Gauss rule with that many nodes)
    # GPUs each Hessian actor asks Ray for (spectra and block-spectra pools); 0: the CPU. Fractional
    # shares of one GPU are allowed (several actors on one device); more than one is not (an actor
    # computes on one device). Checked against the cluster's GPUs when the study starts (`budget.py`).
    num_gpus: float = 0.0

    def __post_init__(self):
        if self.tol is None:  # a float32 study gets float32's reachable tolerance, not float64's
            object.__setattr__(self, "tol", _CURVATURE_TABLE[self.dtype].tol)


@dataclass(frozen=True)
class IdentitiesSpec:
    dtypes: tuple[str, ...] = ("float64", "float32")
    examples: int = 256
    probes: int = 2


FINDINGS_SIZES = ("examples", "probes", "top_k", "max_iter")  # [findings] keys every finding's settings share


@dataclass(frozen=True)
class FindingsSpec:
    """The ``[findings]`` section: the findings stage's sizes and which findings it runs.

    A size left unset (None) is each finding's own default (its module's ``SETTINGS``, over the stage's
    `findings_stage.DEFAULTS`); one set here applies to every finding. ``include`` names findings of the
    registry (`pipeline/findings_stage.py`); None runs all registered. Checked on construction: a bad
    value raises `StudyError` naming ``findings.<field>``."""
    examples: int | None = None   # training examples of the findings batch (its first ones)
    probes: int | None = None     # random generator directions per symmetry family
    top_k: int | None = None      # top Hessian eigenpairs the alignment finding tests
    max_iter: int | None = None   # Lanczos steps (HVPs) for those eigenpairs
    include: tuple[str, ...] | None = None

    def __post_init__(self):
        lows = {"examples": 2, "probes": 1, "top_k": 1, "max_iter": 2}
        for key, low in lows.items():
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise StudyError(f"findings.{key}: expected an integer, got {v!r}")
            if not low <= v <= 10**7:
                raise StudyError(f"findings.{key}: must be in [{low}, 10000000] (got {v})")
        if self.top_k is not None and self.max_iter is not None and self.max_iter < self.top_k:
            raise StudyError(f"findings.max_iter: must be >= findings.top_k = {self.top_k} (got {self.max_iter})")
        if self.include is None:
            return
        if not isinstance(self.include, tuple) or not self.include:
            raise StudyError("findings.include: expected a non-empty list of finding names (leave it out to run all)")
        from eqlab.pipeline.findings_stage import FINDINGS  # the registry (imports torch): only when named

        for j, name in enumerate(self.include):
            if not isinstance(name, str) or name not in FINDINGS:
                raise StudyError(f"findings.include[{j}]: {name!r} is not a registered finding (registered: "
                                 f"{', '.join(FINDINGS)})")
            if self.include.index(name) != j:
                raise StudyError(f"findings.include[{j}]: {name!r} is listed twice")

    def sizes(self) -> dict:
        """The sizes this study sets (the rest are each finding's defaults)."""
        return {k: getattr(self, k) for k in FINDINGS_SIZES if getattr(self, k) is not None}


@dataclass(frozen=True)
class Schedule:
    """How the study's runs share the cluster (`pipeline/budget.py`); it changes when rows are computed,
    never what they hold, so it is not part of the study's hash."""
    concurrent_runs: int = 1            # runs trained and analysed at the same time
    analyse_while_training: bool = True  # a run's stages start on each checkpoint as it lands


@dataclass(frozen=True)
class Study:
    name: str
    seed: int
    num_cpus: float
    runs: tuple[RunSpec, ...]
    spectra: SpectraSpec = field(default_factory=SpectraSpec)
    identities: IdentitiesSpec = field(default_factory=IdentitiesSpec)
    source: str = ""
    schedule: Schedule = field(default_factory=Schedule)
    findings: FindingsSpec = field(default_factory=FindingsSpec)

    @property
    def hash(self) -> str:
        """The study's provenance hash (written beside every row): runs by their `RunSpec.hash_identity`,
        without the schedule, and without ``findings`` while it is the default (studies from before the
        section existed keep their hash)."""
        what = {k: v for k, v in asdict(self).items() if k != "schedule"}
        what["runs"] = [r.hash_identity() for r in self.runs]
        if self.spectra.num_gpus == 0:  # CPU spectra, as every study before the setting existed: same hash
            del what["spectra"]["num_gpus"]
        if self.findings == FindingsSpec():
            del what["findings"]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:16]


def log_spaced_steps(steps: int, n: int) -> tuple[int, ...]:
    """n checkpoint steps from 0 to ``steps``, evenly spaced in log(step + 1) (fewer if they collide)."""
    return tuple(sorted({int(round(math.exp(math.log(steps + 1) * i / (n - 1)))) - 1 for i in range(n)}))


class _Fields:
    """Typed reads from one TOML table that name the field on error and reject unknown keys."""

    def __init__(self, table, where: str):
        if not isinstance(table, dict):
            raise StudyError(f"{where}: expected a table, got {type(table).__name__}")
        self.table, self.where, self.seen = table, where, set()

    def _get(self, key, default, required):
        self.seen.add(key)
        if key not in self.table:
            if required:
                raise StudyError(f"{self._name(key)}: required field is missing")
            return default
        return self.table[key]

    def _name(self, key):
        return f"{self.where}.{key}" if self.where else key

    def str(self, key, default=None, required=False, choices=None):
        v = self._get(key, default, required)
        if not isinstance(v, str) or not v:
            raise StudyError(f"{self._name(key)}: expected a non-empty string, got {v!r}")
        if choices and v not in choices:
            raise StudyError(f"{self._name(key)}: must be one of {', '.join(choices)} (got {v!r})")
        return v

    def name(self, key, default=None, required=False):
        """A study or run name: it becomes a folder, so one safe path component."""
        v = self.str(key, default, required)
        if not SAFE_NAME.fullmatch(v):
            raise StudyError(f"{self._name(key)}: use ASCII letters, digits, '-', '_' and '.' (not first), "
                             f"at most 100 characters (got {v!r})")
        return v

    def int(self, key, default=None, required=False, minimum=None, maximum=None, why=""):
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, int):
            raise StudyError(f"{self._name(key)}: expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise StudyError(f"{self._name(key)}: must be >= {minimum} (got {v})")
        if maximum is not None and v > maximum:
            raise StudyError(f"{self._name(key)}: must be <= {maximum} (got {v}){why}")
        return v

    def float(self, key, default=None, required=False, positive=False, nonnegative=False, maximum=None):
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StudyError(f"{self._name(key)}: expected a finite number, got {v!r}")
        if positive and v <= 0:
            raise StudyError(f"{self._name(key)}: must be > 0 (got {v})")
        if nonnegative and v < 0:
            raise StudyError(f"{self._name(key)}: must be >= 0 (got {v})")
        if maximum is not None and v > maximum:
            raise StudyError(f"{self._name(key)}: must be <= {maximum:g} (got {v:g})")
        return float(v)

    def done(self):
        extra = sorted(set(self.table) - self.seen)
        if extra:
            raise StudyError(f"{self._name(extra[0])}: unknown field")


def _user_family(ref: str, base: Path, where: str) -> tuple[str, str]:
    """("resolved/path/file.py:FUNC", sha256 of the file) for a study's ``family = "file.py:FUNC"``; the
    path is relative to the study file's folder (``base``)."""
    from eqlab.pipeline.hashing import file_digest

    path, func = ref.rsplit(":", 1)
    if not func.isidentifier():
        raise StudyError(f"{where}.family: {ref}: {func!r} is not a function name (expected FILE.py:FUNC)")
    resolved = (base / path).resolve()
    if not resolved.is_file():
        raise StudyError(f"{where}.family: {ref}: {'not a file' if resolved.exists() else 'no such file'} "
                         f"({resolved}; a relative path is taken from the study file's folder)")
    try:
        digest = file_digest(resolved)
    except OSError as e:
        raise StudyError(f"{where}.family: {ref}: cannot read ({e.strerror or type(e).__name__})") from None
    return f"{resolved}:{func}", digest


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _run(table, i: int, seed: int, n_params: dict | None = None, where: str | None = None,
         base: Path | None = None) -> RunSpec:
    from eqlab.models.registry import is_user_family, user_family_parameters

    where = where or f"runs[{i}]"
    f = _Fields(table, where)
    name = f.name("name", required=True)
    family = written = f.str("family", required=True)
    digest = ""
    if is_user_family(family):
        family, digest = _user_family(family, base or Path.cwd(), where)
    elif family not in FAMILIES:
        raise StudyError(f"{where}.family: must be one of {', '.join(FAMILIES)} or a user's \"FILE.py:FUNC\" "
                         f"(got {family!r})")
    model = f._get("model", {}, False)
    if not isinstance(model, dict):
        raise StudyError(f"{where}.model: expected a table of model options")
    if digest:  # FUNC's keywords: any TOML value that JSON can carry into the hash (not a date)
        try:
            json.dumps(model)
        except (TypeError, ValueError):
            bad = next(k for k, v in model.items() if not _jsonable(v))
            raise StudyError(f"{where}.model.{bad}: {model[bad]!r} cannot be a model option (dates and times "
                             "are not)") from None
    from eqlab.pipeline.userfunc import UserModelError

    try:
        # names and values, plain Python; a user family's options only FUNC can judge: built once, here
        count = (user_family_parameters(family, model, seed, written)
                 if digest else validate_options(family, model))
    except OptionError as e:
        raise StudyError(f"{where}.model{'.' + e.key if e.key else ''}: {e}") from None
    except UserModelError as e:
        raise StudyError(f"{where}.family: {e}") from None
    if n_params is not None:
        n_params[i] = count
    steps = f.int("steps", required=True, minimum=1, maximum=MAX_STEPS)
    n_ckpt = f.int("n_checkpoints", 6, minimum=2, maximum=1000)
    explicit = f._get("checkpoint_steps", None, False)
    if explicit is not None:
        if not isinstance(explicit, list) or not explicit or len(explicit) > 1000:
            raise StudyError(f"{where}.checkpoint_steps: expected a list of 1 to 1000 integers in [0, {steps}]")
        for j, s in enumerate(explicit):
            if isinstance(s, bool) or not isinstance(s, int):  # bool is an int in Python: name it
                raise StudyError(f"{where}.checkpoint_steps[{j}]: expected an integer, got {s!r}")
            if not 0 <= s <= steps:
                raise StudyError(f"{where}.checkpoint_steps[{j}]: must be in [0, {steps}] (got {s})")
        ckpts = tuple(sorted(set(explicit) | {0}))
    else:
        ckpts = log_spaced_steps(steps, n_ckpt)
    spec = RunSpec(
        run_id=name, family=family, model=model,
        optimizer=f.str("optimizer", "sgd", choices=OPTIMIZERS),
        lr=f.float("lr", required=True, positive=True),
        momentum=f.float("momentum", 0.0, nonnegative=True),
        weight_decay=f.float("weight_decay", 0.0, nonnegative=True),
        batch_size=f.int("batch_size", 128, minimum=1, maximum=10**7),
        steps=steps, checkpoint_steps=ckpts,
        train_workers=f.int("train_workers", 1, minimum=1, maximum=256),
        seed=f.int("seed", seed, minimum=0, maximum=SEED_LIMIT - 1),
        family_digest=digest,
    )
    f.done()
    if spec.train_workers > spec.batch_size:
        raise StudyError(f"{where}.train_workers: must be <= batch_size = {spec.batch_size} "
                         f"(each worker trains on its own slice of the minibatch; got {spec.train_workers})")
    return spec


# Grid axes: run fields that take one value each; a grid expands bases × the product of the axes' values.
# Each axis's short tag goes into the generated run name (cnn-sgd-lr0.05-s1), in this order.
GRID_AXES = {"optimizer": "", "lr": "lr", "momentum": "mom", "weight_decay": "wd", "batch_size": "bs",
             "steps": "steps", "seed": "s"}


def _axis_value(axis: str, j: int, v):
    """One axis value, checked as the run field it becomes (named grid.lr[1])."""
    f = _Fields({axis: v}, "grid")
    where = f"grid.{axis}[{j}]"
    try:
        if axis == "optimizer":
            return f.str(axis, choices=OPTIMIZERS)
        if axis == "lr":
            return f.float(axis, positive=True)
        if axis in ("momentum", "weight_decay"):
            return f.float(axis, nonnegative=True)
        if axis == "seed":
            return f.int(axis, minimum=0, maximum=SEED_LIMIT - 1)
        return f.int(axis, minimum=1, maximum=MAX_STEPS if axis == "steps" else 10**7)
    except StudyError as e:
        raise StudyError(where + str(e)[len(f"grid.{axis}"):]) from None


def _tag(axis: str, v) -> str:
    return f"{GRID_AXES[axis]}{v:g}" if isinstance(v, float) else f"{GRID_AXES[axis]}{v}"


def expand_grid(grid) -> list[tuple[str, dict]]:
    """[(where, run table)] for every base run × every combination of the axes, with readable names:
    base name, then one tag per axis (``cnn-adam-lr0.001-s1``). Fields are checked where they are written."""
    import itertools

    g = _Fields(grid, "grid")
    bases = g._get("runs", None, True)
    if not isinstance(bases, list) or not bases:
        raise StudyError("grid.runs: expected at least one [[grid.runs]] table (the runs the axes vary)")
    axes = {}
    for axis in GRID_AXES:
        values = g._get(axis, None, False)
        if values is None:
            continue
        if not isinstance(values, list) or not values:
            raise StudyError(f"grid.{axis}: expected a non-empty list of values")
        axes[axis] = [_axis_value(axis, j, v) for j, v in enumerate(values)]
        dup = next((v for v in axes[axis] if axes[axis].count(v) > 1), None)
        if dup is not None:
            raise StudyError(f"grid.{axis}: {dup!r} is listed twice")
    g.done()
    if not axes:
        raise StudyError(f"grid: name at least one axis to vary ({', '.join(GRID_AXES)})")
    out = []
    for j, base in enumerate(bases):
        if not isinstance(base, dict):
            raise StudyError(f"grid.runs[{j}]: expected a table, got {type(base).__name__}")
        clash = next((a for a in axes if a in base), None)
        if clash:
            raise StudyError(f"grid.runs[{j}].{clash}: set by the grid axis grid.{clash}; remove one of them")
        if not isinstance(base.get("name"), str):
            raise StudyError(f"grid.runs[{j}].name: required (the prefix of the generated run names)")
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            name = "-".join([base["name"], *(_tag(a, v) for a, v in values.items())])
            out.append((f"grid.runs[{j}] ({name})", {**base, **values, "name": name}))
    return out


def _findings(table) -> FindingsSpec:
    """The ``[findings]`` section (see `FindingsSpec`)."""
    fs = _Fields(table, "findings")
    sizes = {k: fs.int(k, None) for k in FINDINGS_SIZES if k in fs.table}
    include = fs._get("include", None, False)
    if include is not None and not isinstance(include, list):
        raise StudyError(f"findings.include: expected a list of finding names, got {include!r}")
    fs.done()
    return FindingsSpec(**sizes, include=None if include is None else tuple(include))


GPU_QUANTUM = 1e-4  # Ray accounts resources in units of 1e-4 (pipeline/budget.py's QUANTUM)


def _actor_gpus(sp: _Fields, default: float) -> float:
    """``[spectra] num_gpus``: GPUs per Hessian actor, in [0, 1] and in Ray's unit. There is no ``auto``:
    the device changes the rounding of every product (and so the rows' keys), which must follow from the
    study file, not from the cluster it happened to run on (README, "GPUs")."""
    if sp.table.get("num_gpus") == "auto":
        sp.seen.add("num_gpus")
        raise StudyError("spectra.num_gpus: 'auto' is not offered; give the GPUs per Hessian actor (e.g. 0.25, "
                         "or 1), or 0 for the CPU (README, \"GPUs\")")
    v = sp.float("num_gpus", default, nonnegative=True, maximum=1.0)
    units = v / GPU_QUANTUM
    if abs(units - round(units)) > 1e-6:  # Ray would drop the rest of a finer share without a word
        raise StudyError(f"spectra.num_gpus: must be a multiple of Ray's resource unit {GPU_QUANTUM:g} (got {v!r})")
    return v


def parse_study(data: dict, source: str = "", base: str | Path | None = None) -> Study:
    """``base``: the folder a user family's relative ``FILE.py`` is taken from (the study file's; default
    the current directory)."""
    base = Path(base) if base is not None else Path.cwd()
    top = _Fields(data, "")
    s = _Fields(top._get("study", {}, False), "study")
    name = s.name("name", "study")
    seed = s.int("seed", 0, minimum=0, maximum=SEED_LIMIT - 1)
    s.done()
    r = _Fields(top._get("ray", {}, False), "ray")
    num_cpus = r.float("num_cpus", 2, positive=True, maximum=MAX_CPUS)
    concurrent = r.int("concurrent_runs", 1, minimum=1, maximum=MAX_CPUS)
    overlap = r._get("analyse_while_training", True, False)
    if not isinstance(overlap, bool):
        raise StudyError(f"ray.analyse_while_training: expected true or false (got {overlap!r})")
    r.done()
    sp = _Fields(top._get("spectra", {}, False), "spectra")
    d = SpectraSpec()
    spectra = SpectraSpec(
        top_k=sp.int("top_k", d.top_k, minimum=1, maximum=10_000),
        tol=sp.float("tol", None, positive=True, maximum=1.0) if "tol" in sp.table else None,
        max_iter=sp.int("max_iter", d.max_iter, minimum=2, maximum=100_000),
        workers=sp.int("workers", d.workers, minimum=1, maximum=max(1, math.ceil(num_cpus)),
                       why=" (ray.num_cpus: each Hessian actor needs a CPU)"),
        examples=sp.int("examples", d.examples, minimum=1, maximum=10**7),
        microbatch=sp.int("microbatch", d.microbatch, minimum=1, maximum=10**7),
        dtype=sp.str("dtype", d.dtype, choices=DTYPES),
        block_top_k=sp.int("block_top_k", d.block_top_k, minimum=0, maximum=10_000),
        density_probes=sp.int("density_probes", d.density_probes, minimum=0, maximum=10_000),
        density_steps=sp.int("density_steps", d.density_steps, minimum=1, maximum=100_000),
        num_gpus=_actor_gpus(sp, d.num_gpus))
    sp.done()
    if spectra.max_iter < spectra.top_k:
        raise StudyError("spectra.max_iter: must be >= spectra.top_k")
    floor = _CURVATURE_TABLE[spectra.dtype].min_tol
    if spectra.tol < floor:
        raise StudyError(f"spectra.tol: {spectra.tol:g} is below what {spectra.dtype} products can resolve "
                         f"(4·eps = {floor:.2g}; default sqrt(eps) = {_CURVATURE_TABLE[spectra.dtype].tol:g})")
    idf = _Fields(top._get("identities", {}, False), "identities")
    di = IdentitiesSpec()
    dtypes = idf._get("dtypes", list(di.dtypes), False)
    if not isinstance(dtypes, list) or not dtypes or any(not isinstance(t, str) or t not in DTYPES for t in dtypes):
        raise StudyError(f"identities.dtypes: expected a non-empty list from {', '.join(DTYPES)} (got {dtypes!r})")
    dup = next((t for t in dtypes if dtypes.count(t) > 1), None)
    if dup:
        raise StudyError(f"identities.dtypes: {dup!r} is listed twice (each dtype once: {dtypes!r})")
    identities = IdentitiesSpec(dtypes=tuple(dtypes),
                                examples=idf.int("examples", di.examples, minimum=2, maximum=10**7),
                                probes=idf.int("probes", di.probes, minimum=1, maximum=1000))
    idf.done()
    runs_data = top._get("runs", [], False)
    grid = top._get("grid", None, False)
    if "runs" not in data and grid is None:
        raise StudyError("runs: required field is missing (a study needs [[runs]] tables or a [grid] of runs)")
    if not isinstance(runs_data, list) or (not runs_data and grid is None):
        raise StudyError("runs: expected at least one [[runs]] table (or a [grid] of runs)")
    tables = [(f"runs[{i}]", t) for i, t in enumerate(runs_data)] + (expand_grid(grid) if grid is not None else [])
    n_params: dict[int, int] = {}
    runs = tuple(_run(t, i, seed, n_params, where, base) for i, (where, t) in enumerate(tables))
    names = [r.run_id for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise StudyError(f"{tables[names.index(dup, names.index(dup) + 1)][0]}.name: duplicate run name {dup!r}")
    for i, r in enumerate(runs):  # Lanczos cannot find more eigenvalues than the Hessian has
        if spectra.top_k > n_params[i]:
            raise StudyError(f"spectra.top_k: must be <= the parameter count of every run (got {spectra.top_k}; "
                             f"{tables[i][0]} {r.run_id!r} has {n_params[i]} parameters)")
    findings = _findings(top._get("findings", {}, False))
    top.done()
    schedule = Schedule(concurrent_runs=min(concurrent, len(runs)), analyse_while_training=overlap)
    return Study(name=name, seed=seed, num_cpus=num_cpus, runs=runs, spectra=spectra,
                 identities=identities, source=source, schedule=schedule, findings=findings)


def load_study(path: str | Path | None = None) -> Study:
    """Load and validate a study file; ``None`` loads the default study shipped with eqlab."""
    if path is None:
        text = resources.files("eqlab.pipeline.studies").joinpath(DEFAULT_STUDY).read_text()
        source = f"<default study {DEFAULT_STUDY}>"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise StudyError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StudyError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                             "TOML files are UTF-8") from None
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{source}: not valid TOML ({e})") from None
    return parse_study(data, source, base=Path(path).resolve().parent if path is not None else None)


def plan(study: Study) -> list[dict]:
    """What each run will cost, from the config alone (no torch): parameters, steps, checkpoints, and
    the HVPs its spectra may spend (caps: top-k Lanczos stops earlier when converged; block spectra,
    identities and conservation come on top and depend on the model's blocks and symmetries)."""
    sp = study.spectra
    out = []
    for r in study.runs:
        n_ckpt = len(r.checkpoint_steps)
        density = sp.density_probes * sp.density_steps
        out.append({"run": r.run_id, "family": shown_family(r), "optimizer": r.optimizer, "lr": r.lr,
                     "weight_decay": r.weight_decay, "seed": r.seed,
                     "parameters": validate_options(r.family, r.model), "steps": r.steps,
                     "examples_trained": r.steps * r.batch_size, "checkpoints": n_ckpt,
                     "checkpoint_steps": list(r.checkpoint_steps), "train_workers": r.train_workers,
                     "hvps_planned_max": n_ckpt * (sp.max_iter + density)})
    return out


def shown_family(run: RunSpec) -> str:
    """A run's family as a user reads it: a user family's path relative to the current folder when it
    lies below it (the resolved path otherwise)."""
    if not run.family_digest:
        return run.family
    path, func = run.family.rsplit(":", 1)
    try:
        return f"{Path(path).relative_to(Path.cwd())}:{func}"
    except ValueError:
        return run.family


def user_family_files(study: Study, study_file: str | Path) -> list[tuple[Path, Path]]:
    """(the file, its path relative to the study file's folder) for every user family of the study: what
    a cluster job's working directory must hold beside the study file (`pipeline/jobs.py`), so that the
    job resolves each ``family`` as it was written. A file outside that folder cannot travel with it."""
    folder = Path(study_file).resolve().parent
    out: dict[Path, Path] = {}
    for i, run in enumerate(study.runs):
        if not run.family_digest:
            continue
        path = Path(run.family.rsplit(":", 1)[0])
        try:
            out[path] = path.relative_to(folder)
        except ValueError:
            raise StudyError(f"runs[{i}].family: {path} is outside the study file's folder {folder}; a cluster "
                             "job receives that folder's files only (move the file beside the study)") from None
    return sorted(out.items())


def local_cpus() -> int:
    """CPUs this process may run on (the embedded local cluster's ceiling)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_local(study: Study) -> None:
    """Checks that hold only for the embedded local cluster (no ``--address``): it runs on this machine."""
    cpus = local_cpus()
    if study.num_cpus > cpus:
        raise StudyError(f"ray.num_cpus: {study.num_cpus:g} is more than this machine's {cpus} CPUs (the "
                         "embedded local cluster runs here; use --address for a larger cluster)")
