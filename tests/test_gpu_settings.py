"""The GPU settings on a machine without one: `[spectra] num_gpus` validates (and stays out of CPU
studies' hashes and keys), the budget splits a cluster's GPUs so every pool of every run in flight
fits at once, the request reaches the Hessian actors' Ray options, and every device choice picks the
CPU here. What runs on CUDA is bench/gpu_check.py's to show; nothing here fakes a GPU."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from eqlab.pipeline import checkpoint as ckpt
from eqlab.pipeline.budget import QUANTUM, floor_share, run_share
from eqlab.pipeline.devices import to_device
from eqlab.pipeline.spectra_stage import pool_settings
from eqlab.pipeline.study import StudyError, parse_study

RUN = {"name": "cnn", "family": "digits_cnn", "model": {"channels": [2, 3], "hidden": 6}, "lr": 0.1,
       "batch_size": 16, "steps": 2, "n_checkpoints": 2}


def study(spectra: dict | None = None, runs: int = 1, concurrent: int = 1, train_workers: int = 1):
    return parse_study({"ray": {"num_cpus": 2, "concurrent_runs": concurrent},
                        "spectra": {"workers": 2, "examples": 32, "microbatch": 16, **(spectra or {})},
                        "runs": [{**RUN, "name": f"r{i}", "train_workers": train_workers} for i in range(runs)]})


def test_num_gpus_defaults_to_the_cpu_and_keeps_cpu_studies_hashes_and_keys():
    cpu, explicit, gpu = study(), study({"num_gpus": 0}), study({"num_gpus": 0.25})
    assert cpu.spectra.num_gpus == 0.0 and gpu.spectra.num_gpus == 0.25
    assert explicit.hash == cpu.hash != gpu.hash  # a GPU study's rows say so; a CPU one's did not change
    assert "device" not in pool_settings(cpu) and pool_settings(gpu)["device"] == "cuda"
    assert {k: v for k, v in pool_settings(gpu).items() if k != "device"} == pool_settings(cpu)


@pytest.mark.parametrize("value,complaint", [
    (1.5, "must be <= 1"), (-0.25, "must be >= 0"), (True, "expected a finite number"),
    ("1", "expected a finite number"), ("auto", "'auto' is not offered"),
    (0.00005, "multiple of Ray's resource unit"), (0.33333, "multiple of Ray's resource unit"),
])
def test_a_bad_num_gpus_is_one_error_naming_the_field(value, complaint):
    with pytest.raises(StudyError) as e:
        study({"num_gpus": value})
    assert str(e.value).startswith("spectra.num_gpus: ") and complaint in str(e.value), str(e.value)


def test_fractional_and_whole_shares_in_rays_unit_are_accepted():
    for v in (0.0001, 0.125, 0.5, 1):
        assert study({"num_gpus": v}).spectra.num_gpus == v


def test_the_budget_refuses_a_pool_the_runs_in_flight_cannot_all_hold():
    with pytest.raises(StudyError, match=r"spectra\.num_gpus: .* but this cluster has 0 GPUs"):
        run_share(study({"num_gpus": 0.5}), gpus=0)
    two_runs = study({"num_gpus": 0.5}, runs=2, concurrent=2)  # 2 actors x 0.5 = 1 GPU per run, 0.5 each
    with pytest.raises(StudyError, match=r"= 1 GPUs per run, .* 0\.5 for each of the 2 runs in flight"):
        run_share(two_runs, gpus=1)
    # the control: a quarter each fills a run's half exactly, and is accepted
    share = run_share(study({"num_gpus": 0.25}, runs=2, concurrent=2), gpus=1)
    assert (share.gpus, share.analysis_gpus) == (0.5, 0.5)
    assert run_share(study(), gpus=0).gpus == 0.0  # CPU studies ask nothing of a GPU-less cluster


def test_training_gets_the_rest_whole_gpus_per_ddp_rank_or_the_cpu():
    def per_worker(gpus, num_gpus, train_workers, overlap=True):
        s = study({"num_gpus": num_gpus}, train_workers=train_workers)
        if not overlap:
            s = parse_study({"ray": {"num_cpus": 2, "analyse_while_training": False},
                             "spectra": {"workers": 2, "examples": 32, "microbatch": 16, "num_gpus": num_gpus},
                             "runs": [{**RUN, "train_workers": train_workers}]})
        return run_share(s, gpus=gpus).per_train_worker_gpus(train_workers)

    assert per_worker(0, 0, 1) == 0.0                 # no GPUs: CPU training (gloo)
    assert per_worker(1, 0, 1) == 1.0                 # CPU spectra: training takes the GPU
    assert per_worker(1, 0.25, 1) == 0.5              # one worker shares the GPU with the pool's 2 x 0.25
    assert per_worker(1, 0.25, 2) == 0.0              # two DDP ranks cannot share one GPU (NCCL): CPUs
    assert per_worker(2, 0, 2) == 1.0                 # one whole GPU per rank
    assert per_worker(1, 0.5, 1) == 0.0               # the pool holds the only GPU: training on CPUs
    assert per_worker(1, 0.5, 1, overlap=False) == 1.0  # ...unless analysis waits for training to end


def test_every_accepted_budget_fits_all_runs_in_flight_at_once():
    """The no-deadlock invariant: for every accepted combination, the runs in flight together ask for at
    most the cluster's GPUs (pools and training groups all placed at once, none waiting on another).
    Sums of at most 8 multiples of QUANTUM: their rounding is far below QUANTUM / 2."""
    accepted = refused = 0
    for total, runs, actors, num_gpus, train_workers in itertools.product(
            (0, 1, 2, 8), (1, 2, 3), (1, 2), (0, 0.25, 0.5, 1), (1, 2)):
        s = parse_study({"ray": {"num_cpus": 3, "concurrent_runs": runs},
                         "spectra": {"workers": actors, "examples": 32, "microbatch": 16, "num_gpus": num_gpus},
                         "runs": [{**RUN, "name": f"r{i}", "train_workers": train_workers} for i in range(runs)]})
        pool = actors * num_gpus
        if pool > floor_share(total, runs) + QUANTUM / 2:  # more than a run's share of the GPUs
            with pytest.raises(StudyError, match=r"^spectra\.num_gpus: "):
                run_share(s, gpus=total)
            refused += 1
            continue
        share = run_share(s, gpus=total)
        accepted += 1
        per_run = share.analysis_gpus + train_workers * share.per_train_worker_gpus(train_workers)
        assert runs * per_run <= total + QUANTUM / 2, (total, runs, actors, num_gpus, train_workers)
    assert accepted and refused  # both sides of the rule were exercised


def test_to_device_on_the_cpu_hands_back_the_same_tensors():
    """What keeps CPU results bit-identical: moving a batch to the CPU copies nothing."""
    X, y, ids = torch.randn(4, 3, dtype=torch.float64), torch.arange(4), torch.arange(8).view(4, 2)
    moved = to_device((X, y), torch.device("cpu"))
    assert moved[0] is X and moved[1] is y
    assert to_device({"input_ids": ids}, torch.device("cpu"))["input_ids"] is ids


def test_a_gpu_saved_optimizer_state_loads_on_this_cpu(tmp_path, monkeypatch):
    """optimizer.pt written by a GPU worker (its storages tagged cuda:0, all torch.save records of the
    device) resumes on a CPU node; the plain torch.load it replaced refuses the same file here."""
    state = {"state": {0: {"exp_avg": torch.arange(3.0, dtype=torch.float64)}}, "param_groups": []}
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / ckpt.OPTIMIZER)
    if not torch.cuda.is_available():  # the control: without map_location the file cannot be read here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / ckpt.OPTIMIZER, weights_only=True)
    loaded = ckpt.load_optimizer_state(tmp_path)
    assert loaded["state"][0]["exp_avg"].device.type == "cpu"
    assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_train_scaling_asks_ray_for_gpus_only_when_given_and_never_half_a_gpu_per_ddp_rank():
    from eqlab.pipeline.train import scaling

    cpu = scaling(2, 0.5, 0.0)
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 0.5}
    one = scaling(1, 1.0, 0.5)
    assert one.use_gpu and one.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert scaling(2, 1.0, 1.0).resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ValueError, match="NCCL refuses two ranks on one device"):
        scaling(2, 1.0, 0.5)


SOURCE_ARGS = ("digits_cnn", {"channels": [2, 3], "hidden": 6}, 0, 32, 16)


def test_pool_actors_get_the_requested_resources_and_compute_on_the_cpu_here(ray_cluster):
    """num_gpus = 0 reaches the actors' options (Ray assigned them their CPUs and no GPU) and their
    models live on the CPU; a GPU request this cluster cannot place is refused before any actor is made
    (Ray would leave it pending for ever); on a cluster with GPUs the same request lands on CUDA."""
    import ray

    from eqlab.pipeline.spectra import FamilySource, ShardedHessian

    source = FamilySource(*SOURCE_ARGS)
    pool = ShardedHessian(source, workers=2, dtype="float64", cpus_per_worker=0.5, channel=False)
    try:
        where = pool.where()
    finally:
        pool.shutdown()
    assert [w["device"] for w in where] == ["cpu", "cpu"] and all(w["gpu_ids"] == [] for w in where)
    assert all(w["resources"] == {"CPU": 0.5} for w in where), where  # the request Ray granted, no GPU key
    if ray.cluster_resources().get("GPU", 0) == 0:
        with pytest.raises(RuntimeError, match="asking for 0.5 GPU each, but the Ray cluster has 0 GPUs"):
            ShardedHessian(source, workers=1, num_gpus=0.5, channel=False)
    else:  # a machine with a GPU: the request is granted and the model moves there
        pool = ShardedHessian(source, workers=1, num_gpus=0.5, channel=False)
        try:
            [w] = pool.where()
        finally:
            pool.shutdown()
        assert w["device"].startswith("cuda") and w["resources"].get("GPU") == 0.5


def test_a_plain_ray_task_without_gpus_computes_on_the_cpu(ray_cluster):
    import ray

    from eqlab.pipeline.devices import assigned_device

    @ray.remote(num_cpus=0.5, num_gpus=0)
    def where():
        return str(assigned_device()), ray.get_gpu_ids()

    assert ray.get(where.remote()) == ("cpu", [])
