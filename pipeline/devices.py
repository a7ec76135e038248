"""Where a Ray worker computes, and moving batches there: one rule for training and the Hessian actors.

A worker computes on a GPU only when Ray assigned it one (its resource request asked for ``num_gpus``);
otherwise on the CPU, whatever the machine has. So the device follows from the study's resource
settings, never from what the driver or a node happens to see.
"""
from __future__ import annotations

import os

import torch


def to_device(x, device: torch.device):
    """A batch (tensors, dicts, tuples or lists of them) on ``device``; the same tensors where they are
    there already (on the CPU nothing is copied)."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def assigned_device() -> torch.device:
    """The CUDA device of the first GPU Ray assigned this worker (`ray.get_gpu_ids`), or the CPU when it
    was assigned none. A GPU from Ray that torch cannot see is an error, not a silent fall back to the
    CPU: the study asked for GPU products."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"Ray assigned GPU {ids} to this worker, but torch {torch.__version__} sees no CUDA "
                           f"device (CUDA build: {torch.version.cuda or 'none'}); set [spectra] num_gpus = 0")
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so the first is index 0 of those torch sees
    # (unless the node told Ray not to set it: then the id is the index)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return torch.device("cuda", visible.index(ids[0]) if ids[0] in visible else int(ids[0]))
