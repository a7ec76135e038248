"""Orchestration: studies, Ray jobs, training, spectra workers, storage and the CLI.

This is the only package that knows about Ray, disks, Parquet and the command line.
"""
from eqlab.pipeline.env import apply_defaults as _apply_env_defaults

__version__ = "0.1.0"

# Before anything imports Ray: keep the embedded cluster on loopback and offline.
_apply_env_defaults()
