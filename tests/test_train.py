"""Ray Train: checkpoints land on the schedule, and 2 DDP workers train exactly like 1 worker."""
import torch

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.study import parse_study
from eqlab.pipeline.train import train_run


def spec(workers: int):
    return parse_study({"runs": [{
        "name": f"gpt2w{workers}", "family": "modadd_gpt2", "model": {"p": 5, "n_embd": 8, "n_head": 2},
        "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "batch_size": 8, "steps": 6, "checkpoint_steps": [3, 6],
        "train_workers": workers}]}).runs[0]


def test_two_ddp_workers_match_one_worker(ray_cluster, tmp_path):
    # Every rank draws the same minibatch and keeps an equal half; DDP averages the two half-batch mean
    # gradients, which is the full-minibatch mean gradient. Without BatchNorm the runs must agree.
    # (SGD, not Adam: the key bias has an exactly zero gradient, and Adam's g/sqrt(v) turns the
    # all-reduce's rounding noise in it into O(lr) steps, so Adam runs agree only up to that.)
    one = train_run(spec(1), tmp_path, cpus_per_worker=1.0, log=lambda *_: None).checkpoints
    two = train_run(spec(2), tmp_path, cpus_per_worker=1.0, log=lambda *_: None).checkpoints
    assert sorted(one) == sorted(two) == [0, 3, 6]
    for step in (0, 3, 6):
        a, b = ckpt.load_state(one[step]), ckpt.load_state(two[step])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (step, k)
        m = ckpt.load_metrics(two[step])
        assert m["step"] == step and m["train_loss"] > 0 and m["grad_norm"] > 0
    assert ckpt.load_metrics(one[6])["train_loss"] < ckpt.load_metrics(one[0])["train_loss"]


def test_crashed_worker_resumes_from_checkpoint_with_identical_result(ray_cluster, tmp_path):
    clean = train_run(spec(1), tmp_path / "clean", log=lambda *_: None).checkpoints
    marker = tmp_path / "crashed-once"
    crashed = train_run(spec(1), tmp_path / "crash", log=lambda *_: None,
                        inject={"fail_once_at": 4, "fail_marker": str(marker)}).checkpoints
    assert marker.exists()  # the worker really died (after the step-3 checkpoint) and was restarted
    for step in (0, 3, 6):
        a, b = ckpt.load_state(clean[step]), ckpt.load_state(crashed[step])
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)


def test_a_trainer_without_datasets_starts_no_ray_data_service(ray_cluster):
    """Ray Train's DatasetsCallback starts a DatasetManager actor even with no datasets: ours drops it
    then (two processes fewer per run) and keeps it when datasets are given."""
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from eqlab.pipeline.train import _interruptible

    def kinds(**kw):
        trainer = _interruptible(TorchTrainer)(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kw)
        return {type(c) for c in trainer._create_default_callbacks()}

    assert DatasetsCallback not in kinds()
    assert DatasetsCallback in kinds(datasets={"train": ray.data.range(4)})
