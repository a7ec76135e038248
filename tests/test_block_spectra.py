"""Per-block spectra on Ray actors (each owns whole blocks, all the data) against dense sub-block eigh."""
import numpy as np
import torch

from analyses.curvature.dense import dense_hessian
from analyses.curvature.operator import HessianOperator
from analyses.curvature.params import ParamSpace
from models import build_task
from pipeline.block_spectra import assign, block_spectra, layer_blocks
from pipeline.spectra import FamilySource, hessian_batches

CNN = {"channels": [2, 3], "hidden": 6, "bn_eps": 1e-12}
SOURCE = FamilySource("digits_cnn", CNN, 0, 64, 32)
torch.set_num_threads(1)


def test_assign_balances_by_size():
    plan = assign({"a": 10, "b": 7, "c": 5, "d": 4}, 2)
    assert plan == [["a", "d"], ["b", "c"]]
    assert assign({"a": 1}, 3) == [["a"], [], []]


def test_block_spectra_match_dense_sub_blocks(ray_cluster):
    task = build_task("digits_cnn", CNN, seed=0, dtype=torch.float64)
    task.model.train()
    blocks = layer_blocks(task.model)
    assert len(blocks) >= 3 and all(len(v) >= 1 for v in blocks.values())
    rows = block_spectra(SOURCE, blocks, workers=2, k=2, tol=1e-10, cpus_per_worker=0.5)
    assert [r["block"] for r in rows] == [b for b in blocks for _ in range(2)]

    batches = hessian_batches("digits_cnn", CNN, 0, 64, 32, torch.float64)
    full = HessianOperator(task.model, task.loss, batches, method="double_backward")
    H = dense_hessian(full)
    for block, names in blocks.items():
        # the block Hessian is the diagonal sub-block of the full Hessian
        idx = torch.cat([torch.arange(full.dim)[full.space.slice(n)] for n in ParamSpace(task.model, names).names])
        exact = np.linalg.eigvalsh(H[idx][:, idx].numpy())[::-1][:2]
        got = np.array([r["eigenvalue"] for r in rows if r["block"] == block])
        scale = max(abs(exact[0]), 1e-12)
        assert np.abs(got - exact).max() <= 1e-8 * scale, (block, got, exact)
        assert all(r["converged"] for r in rows if r["block"] == block)
