"""Model families by name: how to build the network, its loss, and its data.

Importing this module does not import torch or transformers: each family names its builders by module
path (imported on first use) and declares its options as plain-Python checks, so a study file can be
validated — option names *and* values, and the parameter count — before any heavy import.

A family may also be a user's own ``"path/to/file.py:FUNC"`` (`is_user_family`): it is built by
`eqlab.pipeline.userfunc.load_family` under the one contract `eqlab inspect` holds a user's model to,
and its options can only be checked by calling FUNC, so `validate_options` builds it (once per file
content and options in a process). ``family`` is then the file's resolved path; `pipeline/study.py`
resolves it relative to the study file.
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from eqlab.models import symmetry_decls as expect

MAX_PARAMS = 100_000_000  # a study's model must fit beside its Lanczos basis on one machine


class OptionError(ValueError):
    """A bad model option: ``key`` is the option's name, the message says what is wrong."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class Task:
    """A model with its loss and its fixed train/test batches: everything a study needs of a family."""

    family: str
    model: Any      # torch.nn.Module
    loss: Callable  # (outputs, targets) -> scalar mean loss
    train: tuple    # (inputs, targets)
    test: tuple


@dataclass(frozen=True)
class Option:
    """One model option's type and range. ``kind``: int, float, str, bool or int_list."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False       # floats: strictly > 0
    choices: tuple = ()
    length: int | None = None    # int_list: exact length
    why: str = ""                # appended to a range error, e.g. "the digits have 10 classes"

    def check(self, value) -> str | None:
        """None if ``value`` is acceptable, else what is wrong with it."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if self.kind == "str":
            if not isinstance(value, str):
                return f"expected a string, got {value!r}"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)} (got {value!r})"
            return None
        if self.kind == "int_list":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                return f"expected a list of integers, got {value!r}"
            if self.length is not None and len(value) != self.length:
                return f"expected a list of {self.length} integers, got {len(value)} ({value!r})"
            for j, v in enumerate(value):
                bad = self._range(v)
                if bad:
                    return f"[{j}] {bad}"
            return None
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"expected an integer, got {value!r}"
            return self._range(value)
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"expected a finite number, got {value!r}"
            if self.positive and value <= 0:
                return f"must be > 0 (got {value})" + (f": {self.why}" if self.why else "")
            return self._range(value)
        raise AssertionError(self.kind)

    def _range(self, v) -> str | None:
        why = f": {self.why}" if self.why else ""
        if self.minimum is not None and v < self.minimum:
            return f"must be >= {self.minimum:g} (got {v}){why}"
        if self.maximum is not None and v > self.maximum:
            return f"must be <= {self.maximum:g} (got {v}){why}"
        return None


def _lazy(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    model_path: str   # "module:callable" building the network from the options
    data_path: str    # "module:callable" building (train, test) from seed, dtype and data_options
    loss_path: str    # "module:callable" (outputs, targets) -> scalar
    data_options: tuple[str, ...]  # options shared with the data builder (e.g. the modulus p)
    options: dict[str, Option] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # the builder's defaults (for cross checks)
    n_params: Callable[[dict], int] | None = None  # trainable parameters for the given options
    cross_check: Callable[[dict], OptionError | None] | None = None
    # full options -> {transformation family (as eqlab.analyses.discover names it): why it is expected}
    symmetries: Callable[[dict], dict[str, str]] | None = None

    @property
    def build_model(self) -> Callable:
        return _lazy(self.model_path)

    @property
    def build_data(self) -> Callable:
        return _lazy(self.data_path)

    @property
    def loss(self) -> Callable:
        return _lazy(self.loss_path)


def _cnn_params(o: dict) -> int:
    c1, c2 = o["channels"]
    h, k = o["hidden"], o["classes"]
    return (9 * c1 + c1) + 2 * c1 + (9 * c1 * c2 + c2) + 2 * c2 + (16 * c2 * h + h) + (h * k + k)


def _gpt2_params(o: dict) -> int:
    v, e, n = o["p"] + 1, o["n_embd"], o["n_layer"]
    block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e + (4 * e * e + 4 * e) + (4 * e * e + e)
    head = 0 if o["tie_word_embeddings"] else v * e  # a tied unembedding is the token embedding
    return v * e + 3 * e + n * block + 2 * e + head


def _gpt2_cross(o: dict) -> OptionError | None:
    if o["n_embd"] % o["n_head"]:
        return OptionError("n_head", f"must divide n_embd = {o['n_embd']} (got {o['n_head']})")
    return None


# Activations of transformers' ACT2FN without parameters of their own (checked against it in the tests).
GPT2_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh", "quick_gelu",
                    "silu", "swish", "tanh", "sigmoid", "mish", "relu2", "relu6", "leaky_relu", "linear")

FAMILIES: dict[str, Family] = {
    "digits_cnn": Family(
        "eqlab.models.digits_cnn:DigitsCNN", "eqlab.models.digits_cnn:digits_data", "eqlab.models.losses:cross_entropy", (),
        options={"channels": Option("int_list", minimum=1, maximum=4096, length=2),
                 "hidden": Option("int", minimum=1, maximum=1_000_000),
                 "classes": Option("int", minimum=10, maximum=1_000_000, why="the digits have 10 classes"),
                 # torch rejects eps <= 0 for BatchNorm in training mode; 1e-20 is the exact-symmetry limit (1e-12 leaves a measurable ~1e-11 violation)
                 "bn_eps": Option("float", positive=True, maximum=1e6,
                                  why="BatchNorm needs eps > 0 in training mode (use 1e-20 for the exact limit)"),
                 "activation": Option("str", choices=("relu", "gelu", "tanh"))},
        defaults={"channels": [8, 16], "hidden": 32, "classes": 10, "bn_eps": 1e-5, "activation": "relu"},
        n_params=_cnn_params, symmetries=expect.digits_cnn),
    "modadd_gpt2": Family(
        "eqlab.models.modadd_gpt2:modadd_gpt2", "eqlab.models.modadd_gpt2:modadd_data", "eqlab.models.losses:last_token_cross_entropy",
        ("p",),
        options={"p": Option("int", minimum=2, maximum=1000, why="the data are all p * p pairs"),
                 "n_embd": Option("int", minimum=1, maximum=16_384),
                 "n_layer": Option("int", minimum=1, maximum=256),
                 "n_head": Option("int", minimum=1, maximum=1024),
                 "activation": Option("str", choices=GPT2_ACTIVATIONS),
                 "layer_norm_epsilon": Option("float", minimum=0, maximum=1e6),
                 "tie_word_embeddings": Option("bool")},
        defaults={"p": 13, "n_embd": 32, "n_layer": 1, "n_head": 2, "activation": "relu",
                  "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False},
        n_params=_gpt2_params, cross_check=_gpt2_cross, symmetries=expect.modadd_gpt2),
}


# The model zoo (issue 10) is declared in its own module, with these same classes.
from eqlab.models.zoo_families import ZOO  # noqa: E402  (needs Family and Option above)

FAMILIES.update(ZOO)


def is_user_family(family: str) -> bool:
    """A user's ``FILE.py:FUNC`` rather than a registered family's name."""
    from eqlab.pipeline.userfunc import _is_func_ref  # torch-free

    return _is_func_ref(family)


def _options_key(family: str, options: dict | None) -> tuple[str, str]:
    return family, json.dumps(options or {}, sort_keys=True)


# A user family's declared symmetries by (family, options), left by `build_task` in this process so that
# `expected_symmetries` (the identity stage calls it right after building the task) does not build twice.
_USER_DECLARED: dict[tuple[str, str], dict[str, str]] = {}
# Trainable parameter counts of user families already checked in this process, by (family, digest, options).
_USER_COUNTS: dict[tuple[str, str, str], int] = {}


def _load_user(family: str, options: dict | None, seed: int, full_check: bool, label: str | None = None) -> dict:
    from pathlib import Path

    from eqlab.pipeline.userfunc import load_family

    path, func = family.rsplit(":", 1)
    d = load_family(Path(path), func, dict(options or {}), seed, label or family, full_check=full_check)
    _USER_DECLARED[_options_key(family, options)] = dict(d.get("symmetries", {}))
    return d


def expected_symmetries(family: str, options: dict | None = None) -> dict[str, str]:
    """{transformation family: why} that the family must carry with these options ({} if none declared).
    A user family declares them in FUNC's ``symmetries`` (none: nothing is expected, all is discovered)."""
    if is_user_family(family):
        key = _options_key(family, options)
        if key not in _USER_DECLARED:
            _load_user(family, options, 0, full_check=False)
        return dict(_USER_DECLARED[key])
    fam = FAMILIES[family]
    return fam.symmetries({**fam.defaults, **(options or {})}) if fam.symmetries else {}


def missing_symmetries(family: str, options: dict | None, found) -> list[str]:
    """One line per expected symmetry that ``found`` (an `eqlab.analyses.discover.Discovery`, or its list
    of Found) does not verify: never found, or found and broken (its worst residual and reason)."""
    found = list(getattr(found, "found", found))
    out = []
    for name, why in sorted(expected_symmetries(family, options).items()):
        mine = [f for f in found if f.transformation.family == name]
        if not mine:
            out.append(f"{name}: expected ({why}), not found")
        elif not any(f.verified for f in mine):
            worst = max(mine, key=lambda f: f.residual)
            out.append(f"{name}: expected ({why}), found {len(mine)}, none verified "
                       f"(worst residual {worst.residual:.2e}: {worst.reason})")
    return out


def user_family_parameters(family: str, options: dict, seed: int = 0, label: str | None = None) -> int:
    """Build a user family once (the full contract, forward pass included) and count its trainable
    parameters; an option FUNC does not take is an `OptionError` naming it. Cached by the file's content.
    ``label``: how messages name the family (the study's ``FILE.py:FUNC`` as written)."""
    from pathlib import Path

    from eqlab.pipeline.hashing import file_digest
    from eqlab.pipeline.userfunc import OptionNotAccepted, UserModelError

    path = Path(family.rsplit(":", 1)[0])
    try:
        digest = file_digest(path) if path.is_file() else ""
    except OSError:
        digest = ""  # load_family names the problem
    key = (family, digest, json.dumps(options, sort_keys=True))
    if key not in _USER_COUNTS or not digest:
        try:
            d = _load_user(family, options, seed, full_check=True, label=label)
        except OptionNotAccepted as e:
            raise OptionError(e.key, str(e)) from None
        n = sum(p.numel() for p in d["model"].parameters() if p.requires_grad)
        if n > MAX_PARAMS:
            raise UserModelError(f"{label or family}: the model has {n:,} parameters, more than eqlab's limit of {MAX_PARAMS:,}")
        _USER_COUNTS[key] = n
    return _USER_COUNTS[key]


def model_options(family: str) -> set[str]:
    """The keyword options a family's model builder accepts (used to validate study files)."""
    return set(FAMILIES[family].options)


def validate_options(family: str, options: dict) -> int:
    """Check every option's name and value; returns the model's trainable parameter count.
    Raises `OptionError` naming the first bad option. Plain Python: nothing is built or imported, except
    for a user family (`user_family_parameters`: FUNC is the only judge of its options)."""
    if is_user_family(family):
        return user_family_parameters(family, options)
    fam = FAMILIES[family]
    for key in sorted(options):
        if key not in fam.options:
            raise OptionError(key, f"not an option of family {family!r} (options: {', '.join(sorted(fam.options))})")
        bad = fam.options[key].check(options[key])
        if bad:
            raise OptionError(key, bad)
    full = {**fam.defaults, **options}
    if fam.cross_check:
        err = fam.cross_check(full)
        if err:
            raise err
    n = fam.n_params(full) if fam.n_params else 0
    if n > MAX_PARAMS:
        raise OptionError("", f"these options give {n:,} parameters, more than eqlab's limit of {MAX_PARAMS:,}")
    return n


def _user_task(family: str, options: dict | None, seed: int, dtype) -> Task:
    """A user family's Task: FUNC's model and loss, its ``batch`` as the training set and ``test`` (or,
    without one, the batch again) as the test set, floating tensors cast to ``dtype`` like a registered
    family's data. The structure is checked, not the forward pass: the driver ran that on loading the study."""
    d = _load_user(family, options, seed, full_check=False)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # integer inputs and class targets stay
    pair = lambda p: (cast(p[0]), cast(p[1]))
    train = pair(d["batch"])
    test = pair(d["test"]) if "test" in d else train
    return Task(family, d["model"].to(dtype), d["loss"], train, test)


def build_task(family: str, options: dict | None = None, seed: int = 0, dtype=None) -> Task:
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if is_user_family(family):
        return _user_task(family, options, seed, dtype)
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    fam, options = FAMILIES[family], dict(options or {})
    torch.manual_seed(seed)
    model = fam.build_model(**options).to(dtype)
    full = {**fam.defaults, **options}  # the family's defaults, so model and data agree (e.g. image_size)
    data_kw = {k: full[k] for k in fam.data_options if k in full}
    train, test = fam.build_data(seed=seed, dtype=dtype, **data_kw)
    return Task(family, model, fam.loss, train, test)
