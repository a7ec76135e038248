"""eqlab: what parameter symmetries predict about gradients and Hessians, measured.

The one top-level package. Its parts keep the repository's layout and are mapped here by pyproject.toml:
`eqlab.analyses` (the toolbox: transformations, identities, curvature engine; pure torch),
`eqlab.models` (model families and what they carry), `eqlab.pipeline` (studies, Ray jobs, storage, CLI).
Importing `eqlab` loads neither torch nor Ray: the CLI starts fast and parses configs before either.
`eqlab.hessian(model, loss, batch)` (the Python API, `eqlab.api`) is loaded on first use.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("eqlab")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "hessian", "Hessian"]


def __getattr__(name: str):
    """``eqlab.hessian`` and ``eqlab.Hessian`` load torch on first use, not at ``import eqlab``."""
    if name == "hessian":
        from eqlab.api import hessian
        return hessian
    if name == "Hessian":
        from eqlab.analyses.curvature.api import Hessian
        return Hessian
    raise AttributeError(f"module 'eqlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"hessian", "Hessian"})
