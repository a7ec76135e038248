"""float32 Lanczos at large dim: Ritz values as accurate as float32 products allow, and no pair flagged
converged with an error above its reported bound (bench/ gpt2s_3l: Ritz values 2e-3·λ1 high at 21.5M).

The operator is a float32 diagonal with a known spectrum (the values themselves, read in float64), so the
truth costs nothing at 10⁵–10⁶ dims. Its eigenvectors are coordinate vectors: localised, which is what
makes float32 running sums fail in both ways — same-sign sums (qᵀq, qᵀHq, ‖r‖) biased low, and
Gram–Schmidt coefficients qᵀr ≈ 0 from a few large terms ±‖q‖∞‖r‖∞ that swamp the small ones."""
import warnings

import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.backend import column_norms, inner
from eqlab.analyses.curvature.defaults import for_dtype
from eqlab.analyses.curvature.lanczos import lanczos

torch.set_num_threads(1)
F32 = torch.float32
TOP = [150.0245, 57.29, 49.5825, 42.2338, 36.1975, 29.3379]  # the gpt2s_3l reference top-6


def diagonal(n, seed):
    """A float32 diagonal: the top values above, the rest uniform in [−1, 5), in a random order."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g, dtype=torch.float64) * 6 - 1
    d[: len(TOP)] = torch.tensor(TOP, dtype=torch.float64)
    d = d[torch.randperm(n, generator=g)].to(F32)
    mv = lambda v: d * v  # noqa: E731  (one rounding per entry: relative error ≤ 2^-24)
    mv.dtype = F32  # the products' dtype, for the defaults table
    exact = np.sort(d.double().numpy())[::-1]  # the spectrum, exactly (float32 values read in float64)
    return mv, exact


def test_inner_products_accumulate_in_float64():
    # same-sign terms at 2^22 entries: the case float32 BLAS gets systematically wrong
    n = 1 << 22
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).abs_()
    y = x * 3 + torch.rand(n, generator=g)
    exact = float(x.double() @ y.double())  # float32 products are exact in float64; the sum is off by
    size = float(x.double().abs() @ y.double().abs())  # ≤ n·2^-53·Σ|x_i y_i|, as is the checked value
    bound = 2 * n * 2.0 ** -53 * size
    assert abs(float(inner(x, y)[0, 0]) - exact) <= bound
    assert abs(float(column_norms(x)[0]) ** 2 - float(x.double() @ x.double())) <= 2 * n * 2.0 ** -53 * float(x.double() @ x.double())
    # control: a float32 dot is far outside that bound here (so the check above is not vacuous)
    assert abs(float(torch.dot(x, y)) - exact) > 1e3 * bound


@pytest.mark.parametrize("n,seed", [(1 << 17, 0), (1 << 17, 1), (1 << 20, 2)])
def test_float32_ritz_values_are_accurate_and_flags_honest(n, seed):
    mv, exact = diagonal(n, seed)
    table = for_dtype(F32)
    for kw in (dict(), dict(rtol=1e-6)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # must converge: no "not converged" warning
            res = lanczos(mv, n, k=5, dtype=F32, max_iter=60, seed=seed, **kw)
        err = np.abs(res.eigenvalues.numpy() - exact[:5])
        # |θ − λ| is a float64 difference of O(λ1) values: its rounding (≤ 2 eps64·λ1) is far below
        # any bound lanczos reports (≥ 16 eps32·max|θ|)
        assert all(res.converged) and res.verified, (n, seed, kw)
        assert (err <= np.asarray(res.errors)).all(), (n, seed, kw, err / exact[0], res.errors)
        # and as accurate as the products: each float32 product carries ≤ 2^-24 relative error per
        # entry, so θ can be held to the dtype's own rounding floor (16 eps·λ1), not to tol
        assert (err <= 16 * table.eps * exact[0]).all(), (n, seed, kw, err / exact[0])
        # the Ritz vectors returned are unit vectors to float32 rounding (√dim·2^-24 per norm at most)
        norms = column_norms(res.eigenvectors)
        assert np.abs(norms - 1).max() <= np.sqrt(n) * 2.0 ** -24, norms
