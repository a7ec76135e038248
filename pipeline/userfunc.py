"""Bring your own model: ``FILE.py:FUNC`` returning ``{"model", "batch", "loss"}``, or a local
`transformers` model folder (a config, with or without weights).

Loading is done the same way in the driver and in every Ray actor (the source is a small picklable
description, not the model), so sharded workers rebuild exactly the user's model and batch.

The contract a ``FILE.py:FUNC`` is held to (checked on load, each failure one line naming it):
``model`` is a ``torch.nn.Module`` with at least one trainable floating-point parameter; ``batch`` is
``(inputs, targets)`` where inputs is a tensor or a dict of tensors (passed as ``model(**inputs)``) and
targets a tensor with at least one example; ``model(inputs)`` returns a tensor or a transformers
``ModelOutput``; ``loss(outputs, targets)`` returns a finite scalar tensor that depends on the
parameters. The batch is used as given; only to split it across ``--workers N`` (or to take the first
``--examples`` for `eqlab inspect`) are inputs and targets cut along their first dimension together,
which they must then share. Two keys are optional: ``test``, held-out ``(inputs, targets)`` of the same
form, and ``symmetries``, ``{transformation family: why}`` that the model must carry (as
`models/symmetry_decls.py` declares them for the registered families). No other key is accepted.

`eqlab inspect` and `eqlab spectrum` call ``FUNC()``. A study's run (``family = "FILE.py:FUNC"``, see
`load_family`) calls ``FUNC(**model, seed=seed)`` — the run's model options as keywords, and its seed
where FUNC has a ``seed`` parameter (or ``**kwargs``) — after ``torch.manual_seed(seed)``; there the
batch is the training set (minibatches are drawn from it), so inputs must be one tensor sharing its
first dimension with the targets (`check_trainable`).

torch is imported only when a model is loaded, never at import of this module.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


class UserModelError(ValueError):
    """The user's FILE.py:FUNC or model folder cannot be used; the message says why."""


def _why(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception the user's code raised."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_func_ref(ref: str) -> bool:
    return ":" in ref and ref.rsplit(":", 1)[0].endswith(".py")


def _exec_module(path: Path, label: str):
    try:
        source = path.read_bytes()
    except OSError as e:
        raise UserModelError(f"{label}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        if e.lineno is None:  # e.g. null bytes: not a place in the file
            raise UserModelError(f"{label}: not Python source ({e.msg})") from None
        raise UserModelError(f"{label}: syntax error at line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # e.g. null bytes
        raise UserModelError(f"{label}: not Python source ({e})") from None
    spec = importlib.util.spec_from_file_location(f"eqlab_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so the user's module can be pickled by reference if needed
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:
        sys.modules.pop(spec.name, None)
        raise UserModelError(f"{label}: importing it raised {_why(e)}") from None
    return module


def _load_module_func(path: Path, func: str, label: str):
    """The user's function ``func`` of the file at ``path`` (the file is executed afresh)."""
    file_label = label.rsplit(":", 1)[0]
    if not path.exists():
        raise UserModelError(f"{file_label}: no such file")
    if not path.is_file():
        raise UserModelError(f"{file_label}: not a file")
    module = _exec_module(path, file_label)
    if not callable(getattr(module, func, None)):
        raise UserModelError(f"{file_label}: has no function {func!r}")
    return getattr(module, func)


def _load_func(path: Path, func: str, label: str | None = None) -> dict:
    """``FUNC()``: the form `eqlab inspect` and `eqlab spectrum` call."""
    label = label or f"{path}:{func}"
    fn = _load_module_func(path, func, label)
    try:
        out = fn()
    except (Exception, SystemExit) as e:
        raise UserModelError(f"{label}: raised {_why(e)}") from None
    check_contract(out, label)
    return out


class OptionNotAccepted(UserModelError):
    """A study's model option that FUNC's signature does not take (``key`` names it; "" for a missing one)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def takes_seed(fn) -> bool:
    """Whether FUNC has a ``seed`` parameter (or ``**kwargs``): a study passes the run's seed only then."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    return any(p.name == "seed" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def check_signature(fn, options: dict, label: str) -> None:
    """Raise `OptionNotAccepted` unless ``FUNC(**options[, seed=])`` binds: every option a keyword FUNC
    takes, every parameter without a default given (by the options, or ``seed``)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: the call itself will say
    params = sig.parameters
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    keywords = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in sorted(options):
        if key == "seed":
            raise OptionNotAccepted(key, f"{label}: 'seed' is the run's seed field, not a model option")
        if key not in keywords and not var_kw:
            raise OptionNotAccepted(key, f"{label}: takes no option {key!r} (its keyword parameters: "
                                         f"{', '.join(sorted(keywords)) or 'none'})")
    given = set(options) | ({"seed"} if takes_seed(fn) else set())
    for n, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty or n in given:
            continue
        if p.kind == p.POSITIONAL_ONLY:
            raise OptionNotAccepted("", f"{label}: parameter {n!r} is positional-only; a study passes options "
                                        "as keywords")
        raise OptionNotAccepted(n, f"{label}: needs option {n!r} (no default); set it in the run's model table")


def load_family(path: Path, func: str, options: dict, seed: int, label: str, full_check: bool = True) -> dict:
    """``FUNC(**options, seed=seed)`` (seed only where FUNC takes it) after ``torch.manual_seed(seed)``,
    held to the contract and to `check_trainable`: a study's run of a user family. ``full_check=False``
    skips the forward pass of `check_contract` (a worker rebuilding what the driver checked)."""
    import torch

    fn = _load_module_func(path, func, label)
    check_signature(fn, options, label)
    kwargs = {**options, **({"seed": seed} if takes_seed(fn) else {})}
    torch.manual_seed(seed)
    try:
        out = fn(**kwargs)
    except (Exception, SystemExit) as e:
        raise UserModelError(f"{label}: raised {_why(e)}") from None
    if full_check:
        check_contract(out, label)
    else:
        check_structure(out, label)
    check_trainable(out, label)
    return out


def check_trainable(out: dict, label: str) -> None:
    """What training and the study's stages add to the contract: they draw minibatches by indexing the
    inputs (``X[idx]``), so inputs are one tensor sharing its first dimension with the targets."""
    for key in ("batch", "test"):
        if key not in out:
            continue
        X, y = out[key]
        if not hasattr(X, "shape") or isinstance(X, dict):
            raise UserModelError(f"{label}: in a study, {key!r} inputs must be one tensor (minibatches are drawn "
                                 f"by indexing it), got {type(X).__name__}")
        if not shares_leading_dim((X, y)):
            raise UserModelError(f"{label}: in a study, {key!r} inputs {_shape(X)} and targets {_shape(y)} must "
                                 "share their first (example) dimension")


def _leading(t) -> int | None:
    import torch

    return int(t.shape[0]) if torch.is_tensor(t) and t.dim() > 0 else None


def input_tensors(inputs) -> list:
    import torch

    if isinstance(inputs, dict):
        return [v for v in inputs.values() if torch.is_tensor(v)]
    return [inputs] if torch.is_tensor(inputs) else []


def shares_leading_dim(batch) -> bool:
    """Whether every input tensor and the targets have the same first dimension (the batch can be cut)."""
    X, y = batch
    dims = {_leading(t) for t in input_tensors(X)} | {_leading(y)}
    return len(dims) == 1 and None not in dims


def n_examples(batch) -> int:
    """Examples in ``(inputs, targets)``: the targets' first dimension (the mean the loss takes)."""
    return _leading(batch[1]) or 0


def _shape(t) -> str:
    return str(tuple(int(s) for s in t.shape))


REQUIRED_KEYS = ("model", "batch", "loss")
OPTIONAL_KEYS = ("test", "symmetries")


def check_contract(out, label: str) -> None:
    """Raise `UserModelError` unless ``out`` is a usable ``{"model", "batch", "loss"}`` (see module doc).
    Runs the model and the loss once on the batch (buffers such as BN statistics are restored)."""
    model, X, y, loss = check_structure(out, label)
    _check_forward(model, X, y, loss, label)
    if "test" in out:  # the checkpoints' test_loss is measured on it
        _check_forward(model, *out["test"], loss, label, what="'test' data")


def _check_pair(pair, label: str, key: str):
    """``(inputs, targets)`` of the ``batch`` or ``test`` entry; returns them."""
    import torch

    word = "batch" if key == "batch" else repr(key)
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise UserModelError(f"{label}: {key!r} must be a tuple (inputs, targets), got "
                             f"{type(pair).__name__}{' of length ' + str(len(pair)) if isinstance(pair, (tuple, list)) else ''}")
    X, y = pair
    if isinstance(X, dict):
        if not X or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in X.items()):
            raise UserModelError(f"{label}: {word} inputs as a dict must map names to tensors (model(**inputs))")
    elif not torch.is_tensor(X):
        raise UserModelError(f"{label}: {word} inputs are {type(X).__name__}; expected a tensor or a dict of tensors")
    if not torch.is_tensor(y):
        raise UserModelError(f"{label}: {word} targets are {type(y).__name__}; expected a tensor")
    if y.dim() == 0:
        raise UserModelError(f"{label}: {word} targets are a 0-d tensor; they need a first (example) dimension")
    if y.shape[0] == 0 or any(t.numel() == 0 for t in input_tensors(X)):
        raise UserModelError(f"{label}: the {word} is empty (targets {_shape(y)}, inputs "
                             f"{', '.join(_shape(t) for t in input_tensors(X))})")
    return X, y


def _check_symmetries(decl, label: str) -> None:
    if not isinstance(decl, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v.strip()
                                             for k, v in decl.items()):
        raise UserModelError(f"{label}: 'symmetries' must map transformation family names (as eqlab inspect "
                             "reports them, e.g. 'relu_rescale') to why each is expected, both strings")


def check_structure(out, label: str):
    """The contract's checks that need no forward pass; returns (model, inputs, targets, loss)."""
    import torch

    if not isinstance(out, dict):
        raise UserModelError(f"{label}: returned {type(out).__name__}, expected a dict with keys 'model', "
                             "'batch', 'loss'")
    missing = [k for k in ("model", "batch", "loss") if k not in out]
    if missing:
        raise UserModelError(f"{label}: the returned dict has no {', '.join(repr(k) for k in missing)} "
                             f"(got keys {', '.join(repr(k) for k in out) or 'none'}; needs 'model', 'batch', 'loss')")
    unknown = [k for k in out if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        raise UserModelError(f"{label}: the returned dict has an unknown key {unknown[0]!r} (keys: 'model', "
                             "'batch', 'loss'; optional: 'test', 'symmetries')")
    model, batch, loss = out["model"], out["batch"], out["loss"]
    if not isinstance(model, torch.nn.Module):
        raise UserModelError(f"{label}: 'model' is {type(model).__name__}, not a torch.nn.Module")
    params = list(model.named_parameters())
    if not params:
        raise UserModelError(f"{label}: the model has no parameters")
    for name, p in params:
        if not p.is_floating_point():
            raise UserModelError(f"{label}: parameter {name!r} is {p.dtype}; parameters must be floating point "
                                 "(register integer state as a buffer)")
    if not any(p.requires_grad for _, p in params):
        raise UserModelError(f"{label}: the model has no trainable parameters (all {len(params)} have "
                             "requires_grad=False)")
    X, y = _check_pair(batch, label, "batch")
    if "test" in out:
        _check_pair(out["test"], label, "test")
    if "symmetries" in out:
        _check_symmetries(out["symmetries"], label)
    if not callable(loss):
        raise UserModelError(f"{label}: 'loss' must be a callable (outputs, targets) -> scalar")
    return model, X, y, loss


def _check_forward(model, X, y, loss, label: str, what: str = "batch") -> None:
    """The model and the loss once on ``what`` (buffers such as BN statistics are restored)."""
    import torch

    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    try:
        with torch.enable_grad():
            try:
                outputs = model(**X) if isinstance(X, dict) else model(X)
            except Exception as e:
                raise UserModelError(f"{label}: the model fails on the {what} (inputs "
                                     f"{', '.join(_shape(t) for t in input_tensors(X))}): {_why(e)}") from None
            if isinstance(outputs, (tuple, list)) and not hasattr(outputs, "keys"):
                raise UserModelError(f"{label}: the model returned a {type(outputs).__name__}; return a tensor "
                                     "(or a transformers ModelOutput): pick the output in forward()")
            try:
                value = loss(outputs, y)
            except Exception as e:
                raise UserModelError(f"{label}: the loss fails on the model's outputs and the targets "
                                     f"{_shape(y)}: {_why(e)}") from None
            if not torch.is_tensor(value):
                raise UserModelError(f"{label}: loss returned {type(value).__name__}, expected a scalar tensor")
            if value.numel() != 1 or value.dim() != 0:
                raise UserModelError(f"{label}: loss returned a tensor of shape {_shape(value)}, expected a scalar")
            if not value.is_floating_point():
                raise UserModelError(f"{label}: loss returned a {value.dtype} tensor, expected a floating-point scalar")
            v = float(value.detach())
            if v != v or v in (float("inf"), float("-inf")):
                raise UserModelError(f"{label}: loss is {v} on the {what}, expected a finite number")
            if not value.requires_grad:
                raise UserModelError(f"{label}: loss does not depend on the model's trainable parameters "
                                     "(it has no gradient)")
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved and saved[k].shape == b.shape:
                    b.copy_(saved[k])


def _mean_square_output(outputs, targets):
    """Loss for a headless encoder: half the mean squared final hidden state (written out so both
    double backward and forward-over-reverse work)."""
    from eqlab.models.losses import logits_of

    h = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else logits_of(outputs)
    return 0.5 * h.pow(2).mean()


def _token_ce(outputs, targets):
    import torch

    from eqlab.models.losses import logits_of

    logits = logits_of(outputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parse_overrides(items: list[str] | None) -> tuple[tuple[str, object], ...]:
    """``["num_hidden_layers=1", "layer_norm_eps=0"]`` → typed (key, value) pairs for a config."""
    out = []
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.isidentifier():
            raise UserModelError(f"--config {item!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False}.get(text.lower(), text)
        out.append((key, value))
    return tuple(out)


def _load_transformers(folder: Path, overrides=(), batch_size: int = 4, seq_len: int = 16, seed: int = 0) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for a folder it cannot read
        raise UserModelError(f"{folder}: not a transformers model folder ({type(e).__name__})") from None
    for key, value in overrides:  # e.g. num_hidden_layers=1 to study one layer of a large checkpoint
        if not hasattr(config, key):
            raise UserModelError(f"--config {key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    config._attn_implementation = "eager"  # SDPA on the CPU has no double backward / forward AD
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    try:
        if has_weights:
            model = AutoModel.from_pretrained(folder, config=config, attn_implementation="eager")
        else:
            model = AutoModel.from_config(config, attn_implementation="eager")
    except Exception as e:
        raise UserModelError(f"{folder}: cannot build the model from its config"
                             f"{' and --config' if overrides else ''}: {_why(e)}") from None
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise UserModelError(f"{folder}: the config has no usable vocab_size (eqlab feeds random token ids)")
    # Unused heads (e.g. BERT's pooler for a loss on the hidden states) have a zero derivative.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"model": model.eval(), "batch": ({"input_ids": ids}, torch.zeros(batch_size)),
            "loss": _mean_square_output}


# One loaded model per (ref, overrides), left by `UserSource.preload` for the next `load` in this process
# (the CLI validates a model before the command runs, without building it twice).
_PRELOADED: dict[tuple, dict] = {}


@dataclass(frozen=True)
class UserSource:
    """A picklable reference to the user's model: ``FILE.py:FUNC`` or a transformers folder."""

    ref: str
    shards: int = 1  # cut the batch into this many near-equal micro-batches (one or more per worker)
    overrides: tuple = ()  # (key, value) config fields for a transformers folder (see parse_overrides)

    def _load(self) -> dict:
        if _is_func_ref(self.ref):
            if self.overrides:
                raise UserModelError("--config applies to a transformers model folder, not FILE.py:FUNC")
            path, func = self.ref.rsplit(":", 1)
            if not func.isidentifier():
                raise UserModelError(f"{self.ref}: {func!r} is not a function name")
            return _load_func(Path(path).resolve(), func, self.ref)
        folder = Path(self.ref)
        if folder.is_dir():
            return _load_transformers(folder, self.overrides)
        if self.ref.endswith(".py") or (":" in self.ref and ".py" in self.ref):
            raise UserModelError(f"{self.ref}: expected FILE.py:FUNC (the function after a colon)")
        raise UserModelError(f"{self.ref}: expected FILE.py:FUNC or a transformers model folder"
                             f"{'' if folder.exists() else ' (no such folder)'}")

    def load(self) -> dict:
        d = _PRELOADED.pop((self.ref, self.overrides), None)
        return d if d is not None else self._load()

    def preload(self) -> dict:
        """Load and check the model now; the next `load` in this process gets this very object."""
        d = self._load()
        _PRELOADED[(self.ref, self.overrides)] = d
        return d

    def __call__(self, dtype):
        """(model, loss, micro-batches) in ``dtype``, the model in the mode the user left it in:
        the HessianShard source protocol."""
        import torch

        d = self.load()
        model = d["model"].to(dtype)
        X, y = d["batch"]
        cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t
        X = {k: cast(v) for k, v in X.items()} if isinstance(X, dict) else cast(X)
        y = cast(y)
        if self.shards <= 1:
            return model, d["loss"], [(X, y)]  # the batch as the user gave it
        from eqlab.pipeline.spectra import microbatches

        if not shares_leading_dim((X, y)):
            raise UserModelError(f"{self.ref}: to split the batch over {self.shards} workers, inputs and targets "
                                 "must share their first dimension (got inputs "
                                 f"{', '.join(_shape(t) for t in input_tensors(X))}, targets {_shape(y)})")
        if len(y) < self.shards:
            raise UserModelError(f"{self.ref}: the batch has {len(y)} examples, fewer than the {self.shards} "
                                 "workers it would be split over")
        size = -(-len(y) // self.shards)  # ceil: every shard gets a micro-batch
        return model, d["loss"], microbatches((X, y), size)
