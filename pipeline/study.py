"""Study files (TOML): load, validate field by field, and expand into run specifications.

Every problem is reported as ``StudyError`` naming the field (``runs[1].lr``) so the CLI can print
one line and exit non-zero before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from models.registry import FAMILIES, model_options

DEFAULT_STUDY = "default.toml"
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "float64")


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


@dataclass(frozen=True)
class SpectraSpec:
    top_k: int = 5
    tol: float = 1e-6
    max_iter: int = 80
    workers: int = 2
    examples: int = 512
    microbatch: int = 128
    dtype: str = "float64"
    block_top_k: int = 1  # per-block (per-layer) spectra: top eigenvalues of each H_bb; 0 = off
    density_probes: int = 2   # SLQ spectral density: Rademacher probes per checkpoint; 0 = off
    density_steps: int = 30   # Lanczos steps per probe (Gauss rule with that many nodes)


@dataclass(frozen=True)
class IdentitiesSpec:
    dtypes: tuple[str, ...] = ("float64", "float32")
    examples: int = 256
    probes: int = 2


@dataclass(frozen=True)
class Study:
    name: str
    seed: int
    num_cpus: float
    runs: tuple[RunSpec, ...]
    spectra: SpectraSpec = field(default_factory=SpectraSpec)
    identities: IdentitiesSpec = field(default_factory=IdentitiesSpec)
    source: str = ""

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:16]


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

    def int(self, key, default=None, required=False, minimum=None):
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, int):
            raise StudyError(f"{self._name(key)}: expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise StudyError(f"{self._name(key)}: must be >= {minimum} (got {v})")
        return v

    def float(self, key, default=None, required=False, positive=False, nonnegative=False):
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StudyError(f"{self._name(key)}: expected a finite number, got {v!r}")
        if positive and v <= 0:
            raise StudyError(f"{self._name(key)}: must be > 0 (got {v})")
        if nonnegative and v < 0:
            raise StudyError(f"{self._name(key)}: must be >= 0 (got {v})")
        return float(v)

    def done(self):
        extra = sorted(set(self.table) - self.seen)
        if extra:
            raise StudyError(f"{self._name(extra[0])}: unknown field")


def _run(table, i: int, seed: int) -> RunSpec:
    f = _Fields(table, f"runs[{i}]")
    name = f.str("name", required=True)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise StudyError(f"runs[{i}].name: use letters, digits, '-' and '_' only (got {name!r})")
    family = f.str("family", required=True, choices=tuple(FAMILIES))
    model = f._get("model", {}, False)
    if not isinstance(model, dict):
        raise StudyError(f"runs[{i}].model: expected a table of model options")
    bad = sorted(set(model) - model_options(family))
    if bad:
        raise StudyError(f"runs[{i}].model.{bad[0]}: not an option of family {family!r} "
                         f"(options: {', '.join(sorted(model_options(family)))})")
    steps = f.int("steps", required=True, minimum=1)
    n_ckpt = f.int("n_checkpoints", 6, minimum=2)
    explicit = f._get("checkpoint_steps", None, False)
    if explicit is not None:
        if not isinstance(explicit, list) or not all(isinstance(s, int) and 0 <= s <= steps for s in explicit):
            raise StudyError(f"runs[{i}].checkpoint_steps: expected a list of integers in [0, {steps}]")
        ckpts = tuple(sorted(set(explicit) | {0}))
    else:
        ckpts = log_spaced_steps(steps, n_ckpt)
    spec = RunSpec(
        run_id=name, family=family, model=model,
        optimizer=f.str("optimizer", "sgd", choices=OPTIMIZERS),
        lr=f.float("lr", required=True, positive=True),
        momentum=f.float("momentum", 0.0, nonnegative=True),
        weight_decay=f.float("weight_decay", 0.0, nonnegative=True),
        batch_size=f.int("batch_size", 128, minimum=1),
        steps=steps, checkpoint_steps=ckpts,
        train_workers=f.int("train_workers", 1, minimum=1),
        seed=f.int("seed", seed, minimum=0),
    )
    f.done()
    return spec


def parse_study(data: dict, source: str = "") -> Study:
    top = _Fields(data, "")
    s = _Fields(top._get("study", {}, False), "study")
    name = s.str("name", "study")
    seed = s.int("seed", 0, minimum=0)
    s.done()
    r = _Fields(top._get("ray", {}, False), "ray")
    num_cpus = r.float("num_cpus", 2, positive=True)
    r.done()
    sp = _Fields(top._get("spectra", {}, False), "spectra")
    d = SpectraSpec()
    spectra = SpectraSpec(
        top_k=sp.int("top_k", d.top_k, minimum=1), tol=sp.float("tol", d.tol, positive=True),
        max_iter=sp.int("max_iter", d.max_iter, minimum=2), workers=sp.int("workers", d.workers, minimum=1),
        examples=sp.int("examples", d.examples, minimum=1),
        microbatch=sp.int("microbatch", d.microbatch, minimum=1), dtype=sp.str("dtype", d.dtype, choices=DTYPES),
        block_top_k=sp.int("block_top_k", d.block_top_k, minimum=0),
        density_probes=sp.int("density_probes", d.density_probes, minimum=0),
        density_steps=sp.int("density_steps", d.density_steps, minimum=1))
    sp.done()
    if spectra.max_iter < spectra.top_k:
        raise StudyError("spectra.max_iter: must be >= spectra.top_k")
    idf = _Fields(top._get("identities", {}, False), "identities")
    di = IdentitiesSpec()
    dtypes = idf._get("dtypes", list(di.dtypes), False)
    if not isinstance(dtypes, list) or not dtypes or any(t not in DTYPES for t in dtypes):
        raise StudyError(f"identities.dtypes: expected a non-empty list from {', '.join(DTYPES)} (got {dtypes!r})")
    identities = IdentitiesSpec(dtypes=tuple(dtypes), examples=idf.int("examples", di.examples, minimum=2),
                                probes=idf.int("probes", di.probes, minimum=1))
    idf.done()
    runs_data = top._get("runs", None, True)
    if not isinstance(runs_data, list) or not runs_data:
        raise StudyError("runs: expected at least one [[runs]] table")
    runs = tuple(_run(t, i, seed) for i, t in enumerate(runs_data))
    names = [r.run_id for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise StudyError(f"runs[{names.index(dup, names.index(dup) + 1)}].name: duplicate run name {dup!r}")
    top.done()
    return Study(name=name, seed=seed, num_cpus=num_cpus, runs=runs, spectra=spectra,
                 identities=identities, source=source)


def load_study(path: str | Path | None = None) -> Study:
    """Load and validate a study file; ``None`` loads the default study shipped with eqlab."""
    if path is None:
        text = resources.files("pipeline.studies").joinpath(DEFAULT_STUDY).read_text()
        source = f"<default study {DEFAULT_STUDY}>"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise StudyError(f"{path}: cannot read ({e.strerror})") from None
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{source}: not valid TOML ({e})") from None
    return parse_study(data, source)
