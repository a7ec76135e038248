"""Training through Ray Train (`TorchTrainer`), checkpointing on the run's log-spaced step schedule.

Every rank draws the same seeded minibatch each step and keeps its own slice of it, so the DDP
gradient is the full-minibatch gradient whatever the worker count. All ranks call `train.report` at
every checkpoint step (it is a barrier); rank 0 attaches the checkpoint folder ``step=NNNNNN``.

Resume: a run folder whose checkpoints all carry this run's training hash (and pass `checkpoint.verify`)
is handed back to Ray Train, which restores its latest checkpoint, so a run killed mid-training goes on
from there; a folder from another configuration is replaced. Divergence (a non-finite loss) ends the run
at that step: it is reported, not checkpointed, and `train_run` returns it as ``diverged_at``.

Devices: each worker computes on ``ray.train.torch.get_device()`` (its GPU when Ray Train gave it one,
the CPU otherwise): the model, every minibatch, the evaluation batches and the all-reduced numbers live
there; the minibatch indices are drawn on the CPU, so the run's data order is the same on any device.
Checkpoint weights are written from CPU copies; the optimizer state keeps the device it was saved from
and is read back onto the CPU first, so a run started on a GPU resumes on a CPU node and back.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from eqlab.analyses.curvature import functional as F
from eqlab.models import build_task
from eqlab.models.losses import accuracy
from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline import interrupt
from eqlab.pipeline.devices import to_device
from eqlab.pipeline.hashing import config_hash
from eqlab.pipeline.study import RunSpec

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints


def train_hash(spec: RunSpec) -> str:
    """Everything that determines the weights at every checkpoint."""
    return config_hash("train", spec)


@dataclass(frozen=True)
class TrainResult:
    checkpoints: dict[int, Path]       # step -> folder, for the checkpoints written (all, unless diverged)
    diverged_at: int | None = None     # first step whose training loss (or weights) was not finite


def _all_ranks_mean(value: float, world: int, stop: bool = False,
                    device: torch.device | None = None) -> tuple[float, bool]:
    """The mean over ranks of one number (NaN or inf anywhere makes it non-finite on every rank, so the
    ranks agree on divergence as they must: one would otherwise skip a report barrier), and whether any
    rank was asked to stop (carried in the same all-reduce, so every rank stops after the same step).
    ``device``: the worker's (NCCL reduces CUDA tensors only; gloo CPU ones)."""
    t = torch.tensor([value, 1.0 if stop else 0.0], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0].item()) / world, bool(t[1].item() > 0)


def _grad_norm(model) -> float:
    """‖∇L‖ of this step's (DDP-averaged) minibatch gradient, in float64."""
    sq = [p.grad.detach().double().square().sum() for p in model.parameters() if p.grad is not None]
    return math.sqrt(float(sum(sq))) if sq else 0.0


def _all_ranks_finite(value: float, world: int, device: torch.device | None = None) -> bool:
    """Whether every rank saw a finite loss (ranks must agree, or one would skip a report barrier)."""
    ok = torch.tensor([1.0 if math.isfinite(value) else 0.0], device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def make_optimizer(spec: RunSpec, params):
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":  # decoupled weight decay (Loshchilov & Hutter), torch's default betas
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def minibatch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=g)[: min(batch_size, n)]


def evaluate(task, model) -> dict:
    """Losses and accuracies in eval mode, plus the full-train-set gradient norm in train mode (the
    task's batches on the model's device: `train_loop` moves them once)."""
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
    import ray.train.torch
    from ray.train import Checkpoint

    spec = RunSpec(**{**config["spec"], "checkpoint_steps": tuple(config["spec"]["checkpoint_steps"])})
    torch.set_num_threads(config.get("threads", 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = build_task(spec.family, spec.model, seed=spec.seed)
    device = ray.train.torch.get_device()  # this worker's GPU when Ray Train gave it one, else the CPU
    # the data once on the device (the families' data sets are small); the same tensors on the CPU
    task = replace(task, model=task.model.to(device), train=to_device(task.train, device),
                   test=to_device(task.test, device))
    plain = task.model
    opt = make_optimizer(spec, plain.parameters())  # after the move: its state lives beside the parameters
    start, restored = 0, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            if ckpt.diverged_at(d) is not None:  # a rerun of a run that diverged: nothing more to train
                return
            plain.load_state_dict(ckpt.load_state(d))  # copied into the parameters, wherever they are
            opt.load_state_dict(ckpt.load_optimizer_state(d))  # read on the CPU, moved to the parameters'
            start = ckpt.load_metrics(d)["step"]
    # DDP over gloo on CPUs, NCCL on GPUs; the model is on its device already
    model = ray.train.torch.prepare_model(plain, move_to_device=False) if world > 1 else plain
    X, y = task.train
    stop_file = config.get("stop_file")
    checkpoints = set(spec.checkpoint_steps)
    history: list[dict] = []  # per-step metrics since the last checkpoint, saved with the next one
    for step in range(start, spec.steps + 1):
        if step in checkpoints and not (restored is not None and step == start):
            metrics = {"step": step, **(evaluate(task, plain) if rank == 0 else {})}
            finite = _all_ranks_finite(metrics.get("train_loss", 0.0) + metrics.get("param_norm", 0.0), world,
                                       device)
            if not finite:  # diverged weights are not a checkpoint anyone should analyse
                return _report_divergence(step, rank, config["train_hash"])
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    # the steps since the last checkpoint travel in its metrics.json, not in Ray's report
                    # saved_at: when this checkpoint existed (the overlap of training and analysis is read from it)
                    ckpt.save(d, plain, {**metrics, "history": history, "saved_at": time.time()}, opt,
                              config_hash=config["train_hash"])
                    history = []
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                                     checkpoint_dir_name=ckpt.step_dir_name(step))
                else:
                    ray.train.report(metrics)
        if step == spec.steps:
            break
        _inject_failure(config, step)
        _inject_pause(config, step)
        idx = minibatch_indices(len(y), spec.batch_size, spec.seed, step)[rank::world].to(device)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(X[idx]), y[idx])
        # rank 0 looks for the study's stop file (Ctrl-C in the driver: pipeline/interrupt.py)
        mean_loss, stop = _all_ranks_mean(float(loss), world, rank == 0 and stop_file is not None
                                          and os.path.exists(stop_file), device)
        if stop:  # the checkpoints reported so far are whole and listed: a rerun resumes from the last
            return
        if not math.isfinite(mean_loss):
            return _report_divergence(step, rank, config["train_hash"])
        loss.backward()
        if rank == 0:
            history.append({"train_step": step, "loss": mean_loss, "grad_norm": _grad_norm(plain),
                            "lr": float(opt.param_groups[0]["lr"])})
        opt.step()


def _report_divergence(step: int, rank: int, thash: str) -> None:
    """Record divergence as Ray Train's latest checkpoint (its metrics are what the driver gets back, and
    a rerun restores it instead of training into the same NaNs again)."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {"step": step, "diverged_at": step}
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            ckpt.save_divergence(d, step, thash)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=ckpt.DIVERGED)
        else:
            ray.train.report(metrics)


def _inject_pause(config: dict, step: int) -> None:
    """Test hook: at ``pause_at``, wait until the file ``until_exists`` appears (e.g. a row the analysis of
    an earlier checkpoint writes), so a test can show analysis running while training waits; gives up
    with an error after ``pause_limit_s`` (the analysis never started: it was not overlapping)."""
    at, path = config.get("pause_at"), config.get("until_exists")  # "{run_id}" in it: this run's id
    if at is None or step != at or not path:
        return
    path = path.format(run_id=config["spec"]["run_id"])
    deadline = time.time() + config.get("pause_limit_s", 120)
    stop_file = config.get("stop_file")  # a held worker still stops on Ctrl-C, at the step it holds
    while not Path(path).exists() and not (stop_file and os.path.exists(stop_file)):
        if time.time() > deadline:
            raise RuntimeError(f"injected pause at step {step}: {path} never appeared")
        time.sleep(0.1)


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


def prepare_run_dir(run_dir: Path, thash: str, log) -> None:
    """Keep a run folder Ray Train can resume from; replace one it must not resume.

    Kept: every checkpoint carries ``thash`` and is whole, and Ray's snapshot lists only those. A
    checkpoint that is incomplete (an upload cut short) is removed if the snapshot does not list it.
    Anything else (another configuration, a corrupt listed checkpoint, no snapshot) is removed whole:
    training is deterministic from the seed, so it is simply redone. Callers hold the results lock.
    """
    if not run_dir.exists():
        return
    snapshot = run_dir / SNAPSHOT
    listed = set()
    try:
        listed = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text()).get("checkpoint_results", [])}
    except (OSError, ValueError, KeyError, TypeError):
        snapshot = None
    reason = None if snapshot else "no resumable Ray Train state"
    incomplete = []
    for d in sorted(run_dir.glob("step=*")) + sorted(run_dir.glob(ckpt.DIVERGED)):
        why = ckpt.verify(d, thash)
        if why is None:
            continue
        if why.startswith("it was trained with another") or d.name in listed:
            reason = f"{d.name}: {why}"
            break
        incomplete.append(d)
    if reason is None and not listed:
        reason = "no checkpoint reported yet"
    if reason:
        log(f"[train] {run_dir.name}: starting over ({reason})")
        shutil.rmtree(run_dir)
        return
    for d in incomplete:
        shutil.rmtree(d)
    log(f"[train] {run_dir.name}: resuming from the latest of {len(listed)} verified checkpoint(s)")


def _interruptible(base):
    """TorchTrainer whose Ctrl-C aborts the run and then raises KeyboardInterrupt in the driver (and
    which starts no Ray Data service when it is given no datasets).

    Ray Train's own handler (2.60) aborts the controller and lets `fit` return as if it had finished,
    or exits 0; and it stays installed after `fit`, swallowing every later Ctrl-C of the study. Here
    the first Ctrl-C asks the controller to abort (its checkpoints so far are kept, whole), a second
    one raises at once, and `train_run` restores the previous handler and re-raises after `fit`."""

    class Interruptible(base):
        interrupted = False

        def _create_default_callbacks(self):
            # Without `datasets=` Ray Train 2.60 still starts a DatasetManager actor, which imports Ray
            # Data and starts its autoscaling coordinator: two processes, ≈ 5 s of CPU per run on 2
            # cores, for nothing (every run here loads its own data in the worker).
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

        def _register_sigint_handler(self, controller):
            def handler(signum, frame):
                if self.interrupted:
                    raise KeyboardInterrupt("training (second Ctrl-C)")
                self.interrupted = True
                controller.abort.remote()  # no wait here: fit returns once the workers stopped

            signal.signal(signal.SIGINT, handler)

    return Interruptible


def default_gpus_per_worker(workers: int) -> float:
    """Without a budget (`budget.RunShare.per_train_worker_gpus`): a whole GPU per worker where the
    connected cluster has one for each, else the CPU."""
    from eqlab.pipeline.budget import RunShare, cluster_gpus

    return RunShare(cpus=0.0, overlap=False, gpus=cluster_gpus()).per_train_worker_gpus(workers)


def scaling(workers: int, cpus_per_worker: float, gpus_per_worker: float):
    """Ray Train's `ScalingConfig`: ``gpus_per_worker`` > 0 makes every worker a GPU worker (NCCL)."""
    from ray.train import ScalingConfig

    if not 0 <= gpus_per_worker <= 1 or (workers > 1 and 0 < gpus_per_worker < 1):
        raise ValueError(f"gpus_per_worker: a whole GPU per worker, or a fraction of one for a single worker "
                         f"(NCCL refuses two ranks on one device); got {gpus_per_worker:g} for {workers} workers")
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def train_run(spec: RunSpec, storage: Path, cpus_per_worker: float = 1.0, log=print, max_failures: int = 3,
              inject: dict | None = None, prepared: bool = False,
              gpus_per_worker: float | None = None) -> TrainResult:
    """Train one run on the connected Ray cluster; returns its checkpoints (and the step it diverged at).
    A failed worker group is restarted up to ``max_failures`` times and resumes from its last checkpoint.
    ``prepared``: the caller already ran `prepare_run_dir` (it reads checkpoints while this trains).
    ``gpus_per_worker``: GPUs each Ray Train worker asks for (0: train on CPUs); None:
    `default_gpus_per_worker` (a study passes its run's budget, `budget.RunShare`).
    Runs in any thread; in the main thread a Ctrl-C aborts it directly (`_interruptible`), elsewhere
    through `pipeline.interrupt` (the stop file)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer as RayTorchTrainer

    TorchTrainer = _interruptible(RayTorchTrainer)

    from eqlab.pipeline.cluster import train_backend_config
    from eqlab.pipeline.env import worker_env

    storage = Path(storage).resolve()
    run_dir = storage / spec.run_id
    thash = train_hash(spec)
    gpus = default_gpus_per_worker(spec.train_workers) if gpus_per_worker is None else gpus_per_worker
    if not prepared:
        prepare_run_dir(run_dir, thash, log)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": asdict(spec), "threads": max(1, int(cpus_per_worker)), "train_hash": thash,
                           "stop_file": str(storage / interrupt.STOP_FILE), **(inject or {})},
        # GPUs from the cluster's resources (the budget's), never from whether the driver sees CUDA
        scaling_config=scaling(spec.train_workers, cpus_per_worker, gpus),
        run_config=RunConfig(name=spec.run_id, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env()}),
        torch_config=train_backend_config(),  # rendezvous store on rank 0's node address only
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir, spec, stop, log), daemon=True)
    t0 = time.time()
    log(f"[train] {spec.run_id}: {spec.family}, {spec.optimizer} lr={spec.lr}, {spec.steps} steps on "
        f"{spec.train_workers} Ray Train worker(s){f' with {gpus:g} GPU each' if gpus else ''}; "
        f"checkpoints at {list(spec.checkpoint_steps)}")
    watcher.start()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except Exception:
        # a terminal's Ctrl-C reaches Ray's processes too: the controller or a worker may die of it
        if trainer.interrupted or interrupt.STOP.is_set():
            raise interrupt.Stopped(f"training of run {spec.run_id!r}") from None
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)  # Ray Train leaves its own handler installed after fit
        stop.set()
        watcher.join()
    if trainer.interrupted or interrupt.STOP.is_set():
        raise interrupt.Stopped(f"training of run {spec.run_id!r}")
    if result.error:
        raise RuntimeError(f"training run {spec.run_id!r} failed: {result.error}")
    steps = {s: d for s, d in ckpt.list_steps(run_dir).items() if s in spec.checkpoint_steps}
    diverged = (result.metrics or {}).get("diverged_at")
    if diverged is not None:
        log(f"[train] {spec.run_id}: DIVERGED at step {diverged} (non-finite loss); "
            f"{len(steps)} checkpoint(s) before it kept")
        return TrainResult(steps, int(diverged))
    missing = set(spec.checkpoint_steps) - set(steps)
    if missing:
        raise RuntimeError(f"training run {spec.run_id!r} is missing checkpoints {sorted(missing)}")
    log(f"[train] {spec.run_id}: done in {time.time() - t0:.1f}s")
    return TrainResult(steps)
