"""The Ray actor pool: sharded HVPs equal the single-process operator, Lanczos matches dense eigh,
and a worker that dies mid-Lanczos is replaced without changing the result."""
import os

import numpy as np
import pytest
import ray
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.models import build_task
from eqlab.pipeline.spectra import FamilySource, ShardedHessian, hessian_batches, spectrum_rows

CNN = {"channels": [2, 3], "hidden": 6, "bn_eps": 1e-12}
EXAMPLES, MICRO = 80, 32  # three unequal micro-batches (32, 32, 16) over two actors (64 vs 16 examples)
SOURCE = FamilySource("digits_cnn", CNN, 0, EXAMPLES, MICRO)


def trained_state():
    torch.manual_seed(0)
    task = build_task("digits_cnn", CNN, seed=0, dtype=torch.float64)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    X, y = task.train
    for i in range(30):
        opt.zero_grad()
        task.loss(task.model(X[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]).backward()
        opt.step()
    return task, {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def reference_operator(task):
    task.model.train()
    return HessianOperator(task.model, task.loss,
                           hessian_batches("digits_cnn", CNN, 0, EXAMPLES, MICRO, torch.float64),
                           method="double_backward")


def test_sharded_products_match_single_process_and_dense_spectrum(ray_cluster):
    task, state = trained_state()
    ref = reference_operator(task)
    pool = ShardedHessian(SOURCE, workers=2, dtype="float64", cpus_per_worker=0.5)
    try:
        assert pool.load(state) == ref.dim
        v = torch.randn(ref.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        sharded, single = pool.matvec(v), ref.matvec(v)
        assert torch.linalg.norm(sharded - single) / torch.linalg.norm(single) <= 1e-12
        assert pool.n_examples == EXAMPLES
        V = torch.randn(ref.dim, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        before = pool.n_hvp
        sharded, single = pool.matmat(V), ref.matmat(V)  # k columns per round trip
        assert torch.linalg.norm(sharded - single) / torch.linalg.norm(single) <= 1e-12
        assert pool.n_hvp - before == 5
        one, single_one = pool @ V[:, 0], ref.matvec(V[:, 0])  # each actor may pick its own conv path: round-off
        assert torch.linalg.norm(one - single_one) <= 1e-12 * torch.linalg.norm(single_one)

        rows, tri = spectrum_rows(pool, state, top_k=4, tol=1e-10, max_iter=120)
        exact = np.linalg.eigvalsh(dense_hessian(ref).numpy())[::-1][:4]
        got = np.array([r["eigenvalue"] for r in rows])
        assert np.max(np.abs(got - exact) / np.abs(exact)) <= 1e-6, (got, exact)
        assert all(r["converged"] and r["residual"] <= 1e-8 * abs(exact[0]) for r in rows)
        assert len(tri["alphas"]) == rows[0]["iterations"] and rows[0]["hvps"] >= rows[0]["iterations"]
    finally:
        pool.shutdown()


def test_actor_killed_mid_lanczos_is_replaced_and_result_unchanged(ray_cluster):
    task, state = trained_state()
    pool = ShardedHessian(SOURCE, workers=2, dtype="float64", cpus_per_worker=0.5)
    try:
        clean, _ = spectrum_rows(pool, state, top_k=3, tol=1e-10, max_iter=120)
        matvec, calls = pool.matvec, []

        def killing_matvec(v):
            calls.append(1)
            if len(calls) == 5:  # a crash in the middle of the Krylov recurrence
                ray.kill(pool.actors[1], no_restart=True)
            return matvec(v)

        pool.matvec = killing_matvec
        crashed, _ = spectrum_rows(pool, state, top_k=3, tol=1e-10, max_iter=120)
        assert pool.replaced >= 1
        assert pool.channel is not None  # the products went back to the same-node channel afterwards
        for a, b in zip(clean, crashed):
            assert abs(a["eigenvalue"] - b["eigenvalue"]) <= 1e-10 * abs(clean[0]["eigenvalue"])
    finally:
        pool.shutdown()


def test_channel_products_equal_ray_products_and_actor_errors_surface_as_ray_errors(ray_cluster):
    """The same-node channel is used on one machine, gives bit-identical products to plain Ray calls on
    the same actors, and an error inside an actor is raised as Ray reports it (the product is redone
    over Ray), after which the pool still works over a new channel."""
    task, state = trained_state()
    pool = ShardedHessian(SOURCE, workers=2, dtype="float64", cpus_per_worker=0.5)
    try:
        dim = pool.load(state)
        assert pool.channel is not None
        V = torch.randn(dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        over_channel = (pool.matvec(V[:, 0]), pool.matmat(V))
        with pool.ray_calls_only():
            over_ray = (pool.matvec(V[:, 0]), pool.matmat(V))
        assert all(torch.equal(a, b) for a, b in zip(over_channel, over_ray))
        assert pool.n_examples == EXAMPLES

        with pytest.raises(ray.exceptions.RayTaskError, match="size|shape|match"):
            pool.matvec(torch.ones(dim + 1, dtype=torch.float64))  # a vector of the wrong length
        assert pool.channel is None  # the failed channel is gone; the next Ray product opens a new one
        assert torch.equal(pool.matvec(V[:, 0]), over_ray[0])
        assert pool.channel is not None
        assert torch.equal(pool.matvec(V[:, 0]), over_channel[0])
        assert ray.get([a.__ray_call__.remote(lambda _: os.environ.get("MALLOC_ARENA_MAX")) for a in pool.actors]) \
            == ["1", "1"]  # channel threads allocate from the main heap (pipeline/allocator.py)
    finally:
        pool.shutdown()


def test_embedded_cluster_workers_skip_task_event_reporting(ray_cluster):
    """Without a dashboard nothing reads Ray's task events, and reporting them lengthens every actor
    call a sharded HVP makes; the embedded cluster turns them off, and its workers must inherit that."""
    import os

    import ray

    @ray.remote(num_cpus=0.1)
    def seen() -> str | None:
        return os.environ.get("RAY_task_events_report_interval_ms")

    assert ray.get(seen.remote()) == "0"
