"""Training through Ray Train (`TorchTrainer`), checkpointing on the run's log-spaced step schedule.

Every rank draws the same seeded minibatch each step and keeps its own slice of it, so the DDP
gradient is the full-minibatch gradient whatever the worker count. All ranks call `train.report` at
every checkpoint step (it is a barrier); rank 0 attaches the checkpoint folder ``step=NNNNNN``.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from analyses.curvature import functional as F
from models import build_task
from models.losses import accuracy
from pipeline import checkpoint as ckpt
from pipeline.study import RunSpec


def make_optimizer(spec: RunSpec, params):
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def minibatch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=g)[: min(batch_size, n)]


def evaluate(task, model) -> dict:
    """Losses and accuracies in eval mode, plus the full-train-set gradient norm in train mode."""
    with torch.no_grad():
        model.eval()
        out_tr, out_te = model(task.train[0]), model(task.test[0])
        metrics = {
            "train_loss": float(task.loss(out_tr, task.train[1])), "test_loss": float(task.loss(out_te, task.test[1])),
            "train_acc": accuracy(out_tr, task.train[1]), "test_acc": accuracy(out_te, task.test[1]),
        }
    model.train()
    params = F.named_params(model)
    _, g = F.value_and_grad(F.loss_function(model, task.loss, task.train), params)
    metrics["param_norm"] = float(F.norm(params))
    metrics["grad_norm"] = float(F.norm(g))
    return metrics


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (V2 API). After a worker failure Ray restarts the group, and the
    loop resumes from the latest reported checkpoint (weights and optimizer state): minibatches are a
    function of (seed, step), so the resumed run is the same run."""
    import ray.train
    from ray.train import Checkpoint

    spec = RunSpec(**{**config["spec"], "checkpoint_steps": tuple(config["spec"]["checkpoint_steps"])})
    torch.set_num_threads(config.get("threads", 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = build_task(spec.family, spec.model, seed=spec.seed)
    plain = task.model
    opt = make_optimizer(spec, plain.parameters())
    start, restored = 0, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            plain.load_state_dict(ckpt.load_state(d))
            opt.load_state_dict(ckpt.load_optimizer_state(d))
            start = ckpt.load_metrics(d)["step"]
    model = ray.train.torch.prepare_model(plain) if world > 1 else plain  # DDP over gloo on CPUs
    X, y = task.train
    checkpoints = set(spec.checkpoint_steps)
    for step in range(start, spec.steps + 1):
        if step in checkpoints and not (restored is not None and step == start):
            metrics = {"step": step, **(evaluate(task, plain) if rank == 0 else {})}
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    ckpt.save(d, plain, metrics, opt)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                                     checkpoint_dir_name=ckpt.step_dir_name(step))
                else:
                    ray.train.report(metrics)
        if step == spec.steps:
            break
        _inject_failure(config, step)
        idx = minibatch_indices(len(y), spec.batch_size, spec.seed, step)[rank::world]
        model.train()
        opt.zero_grad(set_to_none=True)
        task.loss(model(X[idx]), y[idx]).backward()
        opt.step()


def _inject_failure(config: dict, step: int) -> None:
    """Fault injection for tests: crash this worker once at ``fail_once_at`` (a marker file records it)."""
    at, marker = config.get("fail_once_at"), config.get("fail_marker")
    if at is not None and step == at and marker and not Path(marker).exists():
        Path(marker).write_text("crashed")
        raise RuntimeError(f"injected worker failure at step {step}")


def _watch(run_dir: Path, spec: RunSpec, stop: threading.Event, log) -> None:
    seen: set[int] = set()
    while not stop.wait(0.5):
        for step, d in ckpt.list_steps(run_dir).items():
            if step not in seen:
                seen.add(step)
                m = ckpt.load_metrics(d)
                log(f"[train] {spec.run_id}: checkpoint step {step}/{spec.steps}  "
                    f"train loss {m['train_loss']:.4f}  test acc {m['test_acc']:.3f}")


def train_run(spec: RunSpec, storage: Path, cpus_per_worker: float = 1.0, log=print, max_failures: int = 3,
              inject: dict | None = None) -> dict[int, Path]:
    """Train one run on the connected Ray cluster; returns {step: checkpoint folder}.
    A failed worker group is restarted up to ``max_failures`` times and resumes from its last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.env import worker_env

    storage = Path(storage).resolve()
    run_dir = storage / spec.run_id
    # Training is deterministic from the seed, so an incomplete earlier attempt is simply redone;
    # removing it also keeps Ray Train from treating the folder as a run to restore.
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": asdict(spec), "threads": max(1, int(cpus_per_worker)), **(inject or {})},
        scaling_config=ScalingConfig(num_workers=spec.train_workers, use_gpu=torch.cuda.is_available(),
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=spec.run_id, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir, spec, stop, log), daemon=True)
    t0 = time.time()
    log(f"[train] {spec.run_id}: {spec.family}, {spec.optimizer} lr={spec.lr}, {spec.steps} steps on "
        f"{spec.train_workers} Ray Train worker(s); checkpoints at {list(spec.checkpoint_steps)}")
    watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        watcher.join()
    if result.error:
        raise RuntimeError(f"training run {spec.run_id!r} failed: {result.error}")
    steps = ckpt.list_steps(run_dir)
    missing = set(spec.checkpoint_steps) - set(steps)
    if missing:
        raise RuntimeError(f"training run {spec.run_id!r} is missing checkpoints {sorted(missing)}")
    log(f"[train] {spec.run_id}: done in {time.time() - t0:.1f}s")
    return steps
