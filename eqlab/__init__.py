"""eqlab: what parameter symmetries predict about gradients and Hessians, measured.

The one top-level package. Its parts keep the repository's layout and are mapped here by pyproject.toml:
`eqlab.analyses` (the toolbox: transformations, identities, curvature engine; pure torch),
`eqlab.models` (model families and what they carry), `eqlab.pipeline` (studies, Ray jobs, storage, CLI).
Importing `eqlab` loads neither torch nor Ray: the CLI starts fast and parses configs before either.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("eqlab")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
