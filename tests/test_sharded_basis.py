"""Lanczos on a basis sharded by parameter slice over Ray actors equals local Lanczos, survives a
worker dying mid-run (restored from driver-owned checkpoints), and block Lanczos runs on it too."""
import numpy as np
import pytest
import ray
import torch

from eqlab.analyses.curvature.block_lanczos import block_lanczos
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.models import build_task
from eqlab.pipeline.sharded_basis import ShardedBasis
from eqlab.pipeline.spectra import FamilySource, hessian_batches

CNN = {"channels": [2, 3], "hidden": 6, "bn_eps": 1e-12}
EXAMPLES, MICRO = 80, 32
SOURCE = FamilySource("digits_cnn", CNN, 0, EXAMPLES, MICRO)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference():
    task = build_task("digits_cnn", CNN, seed=0, dtype=torch.float64)
    task.model.train()
    op = HessianOperator(task.model, task.loss, hessian_batches("digits_cnn", CNN, 0, EXAMPLES, MICRO, torch.float64),
                         method="double_backward")
    return op, lanczos(op.matvec, op.dim, k=4, tol=1e-10, max_iter=120)


@pytest.fixture(scope="module")
def basis(ray_cluster):
    b = ShardedBasis(SOURCE, workers=2, dtype="float64", cpus_per_worker=0.5)
    yield b
    b.shutdown()


def same(a, b):
    scale = abs(float(b.eigenvalues[0]))
    assert a.n_matvec == b.n_matvec
    assert np.abs(a.eigenvalues.numpy() - b.eigenvalues.numpy()).max() <= 1e-10 * scale
    assert np.abs(np.abs((a.eigenvectors * b.eigenvectors).sum(0).numpy()) - 1).max() <= 1e-8
    assert all(a.converged) and max(a.residuals) <= 1e-10 * a.scale


def test_sharded_basis_lanczos_equals_local(reference, basis):
    op, local = reference
    assert basis.load(None) == op.dim
    assert basis.bounds[0] == 0 and basis.bounds[-1] == op.dim and len(basis.bounds) == 3
    sharded = lanczos(None, op.dim, k=4, tol=1e-10, max_iter=120, backend=basis)
    same(sharded, local)
    assert basis.n_examples == EXAMPLES and np.allclose(sharded.alphas, local.alphas, rtol=0, atol=1e-10)


def test_worker_killed_mid_run_is_restored_and_result_unchanged(reference, basis):
    op, local = reference
    basis.load(None)
    apply, calls = basis.apply, []

    def killing_apply(X):
        calls.append(1)
        if len(calls) == 6:  # slices of 6 basis vectors live only on the workers now
            ray.kill(basis.actors[1], no_restart=True)
        return apply(X)

    basis.apply = killing_apply
    try:
        before = basis.replaced
        crashed = lanczos(None, op.dim, k=4, tol=1e-10, max_iter=120, backend=basis)
    finally:
        del basis.apply
    assert basis.replaced == before + 1
    same(crashed, local)


def test_block_lanczos_on_the_sharded_basis(reference, basis):
    op, _ = reference
    basis.load(None)
    sharded = block_lanczos(backend=basis, k=3, block_size=2, tol=1e-10, max_iter=120)
    local = block_lanczos(op.matmat, op.dim, k=3, block_size=2, tol=1e-10, max_iter=120)
    same(sharded, local)


def test_without_checkpoints_a_death_is_reported(ray_cluster):
    b = ShardedBasis(SOURCE, workers=2, dtype="float64", cpus_per_worker=0.5, checkpoint=False)
    try:
        b.load(None)
        x = b.apply(b.random(1, 0))
        b.append(b.random(1, 0), x)
        ray.kill(b.actors[0], no_restart=True)
        with pytest.raises(RuntimeError, match="slices of the basis"):
            for _ in range(20):  # the kill lands asynchronously
                b.project(x)
    finally:
        b.shutdown()
