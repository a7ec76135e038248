"""Connecting to Ray: an embedded local cluster on loopback by default, or an existing cluster.

The embedded cluster binds to 127.0.0.1, starts no dashboard unless asked, sends no usage stats, and
declares its CPUs explicitly (Ray's resources are logical; the stages size their actors from them).
"""
from __future__ import annotations

import logging

from pipeline.env import apply_defaults, worker_env


def connect(num_cpus: float = 2, address: str | None = None, dashboard: bool = False,
            object_store_mb: int = 512) -> dict:
    """Start (or join) Ray; returns the cluster's resources. Reuses an already initialised Ray."""
    import ray

    apply_defaults()
    if not ray.is_initialized():
        runtime_env = {"env_vars": worker_env()}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     object_store_memory=object_store_mb * 2**20, runtime_env=runtime_env,
                     log_to_driver=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    return ray.cluster_resources()
