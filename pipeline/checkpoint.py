"""Checkpoint files: the model's state dict as safetensors plus the metrics measured at that step.

``manifest.json`` is written last: the sha256 of every other file and the run's training config hash.
A checkpoint counts only when its manifest is there (`list_steps`); `verify` re-reads the files and
compares digests and hash before a rerun trusts it, and the weights digest keys every row derived from
the checkpoint (so retrained weights invalidate the spectra and checks computed from the old ones).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
OPTIMIZER = "optimizer.pt"  # lets a restarted training worker continue exactly where it stopped
MANIFEST = "manifest.json"
DIVERGED = "diverged"          # the folder (and its file diverged.json) that records a diverged run


def step_dir_name(step: int) -> str:
    return f"step={step:06d}"


def save(directory: str | Path, model: torch.nn.Module, metrics: dict, optimizer=None, config_hash: str = "") -> None:
    from eqlab.pipeline.hashing import file_digest

    d = Path(directory)
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, d / WEIGHTS)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), d / OPTIMIZER)
    (d / METRICS).write_text(json.dumps(metrics))
    files = [WEIGHTS, METRICS] + ([OPTIMIZER] if optimizer is not None else [])
    manifest = {"config_hash": config_hash, "sha256": {f: file_digest(d / f) for f in files}}
    (d / MANIFEST).write_text(json.dumps(manifest))


def save_divergence(directory: str | Path, step: int, config_hash: str) -> None:
    """A run that diverged at ``step``: reported to Ray Train like a checkpoint so a rerun finds it."""
    from eqlab.pipeline.hashing import file_digest

    d = Path(directory)
    (d / f"{DIVERGED}.json").write_text(json.dumps({"step": step}))
    manifest = {"config_hash": config_hash, "sha256": {f"{DIVERGED}.json": file_digest(d / f"{DIVERGED}.json")}}
    (d / MANIFEST).write_text(json.dumps(manifest))


def diverged_at(directory: str | Path) -> int | None:
    f = Path(directory) / f"{DIVERGED}.json"
    return json.loads(f.read_text())["step"] if f.exists() else None


def manifest(directory: str | Path) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


def verify(directory: str | Path, config_hash: str) -> str | None:
    """Why a checkpoint cannot be trusted for ``config_hash`` (None: every file is whole and matches)."""
    from eqlab.pipeline.hashing import file_digest

    d = Path(directory)
    try:
        m = manifest(d)
        if m.get("config_hash") != config_hash:
            return "it was trained with another configuration"
        for name, digest in m["sha256"].items():
            if file_digest(d / name) != digest:
                return f"{name} does not match its manifest digest (truncated or modified)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest is unreadable ({e})"
    return None


def weights_digest(directory: str | Path) -> str:
    return manifest(directory)["sha256"][WEIGHTS]


def load_optimizer_state(directory: str | Path) -> dict:
    """Read onto the CPU whatever device it was saved from (a GPU worker's state on a CPU node, or on
    another GPU); `torch.optim.Optimizer.load_state_dict` then moves it beside the parameters."""
    return torch.load(Path(directory) / OPTIMIZER, map_location="cpu", weights_only=True)


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights on the CPU (`save` writes CPU copies; safetensors' ``device`` made explicit)."""
    return load_file(Path(directory) / WEIGHTS, device="cpu")


def load_metrics(directory: str | Path) -> dict:
    return json.loads((Path(directory) / METRICS).read_text())


def list_steps(run_dir: str | Path) -> dict[int, Path]:
    """Completed checkpoints (manifest written, so every file is complete) under a run's storage folder."""
    out = {}
    for d in Path(run_dir).glob("step=*"):
        if (d / MANIFEST).exists() and (d / WEIGHTS).exists() and (d / METRICS).exists():
            out[int(d.name.split("=")[1])] = d
    return dict(sorted(out.items()))
