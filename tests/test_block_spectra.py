"""Per-block spectra on a Hessian pool (each block's products summed over the actors' data shards)
against dense sub-block eigh."""
import numpy as np
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.identities import chain_length, rounding_bound, unit_roundoff
from eqlab.models import build_task
from eqlab.pipeline.block_spectra import block_spectra, layer_blocks
from eqlab.pipeline.spectra import FamilySource, hessian_batches

CNN = {"channels": [2, 3], "hidden": 6, "bn_eps": 1e-12}
SOURCE = FamilySource("digits_cnn", CNN, 0, 64, 32)
TOL = 1e-10


def test_block_spectra_match_dense_sub_blocks(ray_cluster):
    task = build_task("digits_cnn", CNN, seed=0, dtype=torch.float64)
    task.model.train()
    blocks = layer_blocks(task.model)
    assert len(blocks) >= 3 and all(len(v) >= 1 for v in blocks.values())
    rows = block_spectra(SOURCE, blocks, workers=2, k=2, tol=TOL, cpus_per_worker=0.5)
    assert [r["block"] for r in rows] == [b for b in blocks for _ in range(2)]

    batches = hessian_batches("digits_cnn", CNN, 0, 64, 32, torch.float64)
    full = HessianOperator(task.model, task.loss, batches, method="double_backward")
    H = dense_hessian(full)
    n = chain_length(task.model, batches[0]) + len(batches)   # one micro-batch's chain + the sum over them
    for block, names in blocks.items():
        # the block Hessian is the diagonal sub-block of the full Hessian
        idx = torch.cat([torch.arange(full.dim)[full.space.slice(n)] for n in ParamSpace(task.model, names).names])
        Hb = H[idx][:, idx]
        spectrum = np.linalg.eigvalsh(Hb.numpy())
        exact = spectrum[::-1][:2]
        got = np.array([r["eigenvalue"] for r in rows if r["block"] == block])
        # Lanczos rule: ‖Hv − θv‖ ≤ TOL·max|θ| ≤ TOL·‖H_bb‖₂, so |θ − λ| ≤ that (Bauer–Fike, symmetric);
        # float64: the pool's HVPs and the dense H are each 4 passes of n-term sums (≤ 4γ_n‖H_bb‖_F apart
        # from exact), eigvalsh is backward stable (≤ dim·u‖H_bb‖_F)
        h2, hf = float(np.abs(spectrum).max()), float(Hb.norm())
        bound = TOL * h2 + (2 * rounding_bound(n, passes=4) + len(idx) * unit_roundoff(torch.float64)) * hf
        assert np.abs(got - exact).max() <= bound, (block, got, exact, bound)
        assert all(r["converged"] for r in rows if r["block"] == block)
