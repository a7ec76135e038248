"""Checkpoint files: the model's state dict as safetensors plus the metrics measured at that step."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
OPTIMIZER = "optimizer.pt"  # lets a restarted training worker continue exactly where it stopped


def step_dir_name(step: int) -> str:
    return f"step={step:06d}"


def save(directory: str | Path, model: torch.nn.Module, metrics: dict, optimizer=None) -> None:
    d = Path(directory)
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, d / WEIGHTS)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), d / OPTIMIZER)
    (d / METRICS).write_text(json.dumps(metrics))


def load_optimizer_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / OPTIMIZER, weights_only=True)


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / WEIGHTS)


def load_metrics(directory: str | Path) -> dict:
    return json.loads((Path(directory) / METRICS).read_text())


def list_steps(run_dir: str | Path) -> dict[int, Path]:
    """Completed checkpoints (weights and metrics both present) under a run's storage folder."""
    out = {}
    for d in Path(run_dir).glob("step=*"):
        if (d / WEIGHTS).exists() and (d / METRICS).exists():
            out[int(d.name.split("=")[1])] = d
    return dict(sorted(out.items()))
