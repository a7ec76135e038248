"""The matrix form of the Q/K and V/O identities (rows 6a, 7a) per head on GPT-2, BERT and ViT classes."""
import pytest
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.curvature.functional import loss_function, named_params, value_and_grad
from eqlab.analyses.identities import _block_cols, chain_length, gl_matrix_check, rounding_bound
from eqlab.analyses.transforms import GLFamily
from eqlab.models import hf_tiny



def _tolerances(model, loss, batch, t):
    """Per block: the rounding bound of max|lhs − rhs| / max(max|lhs|, max|rhs|) when the identity holds."""
    theta = named_params(model)
    _, g = value_and_grad(loss_function(model, loss, batch), theta)
    rb = rounding_bound(chain_length(model, batch), passes=3)
    out = []
    for b in t.blocks:
        side = lambda m, x, y: sum(_block_cols(x[p], d, i).T @ _block_cols(y[p], d, i)  # noqa: E731
                                   for p, d, i, mm in b if mm == m)
        mag = side("M", {k: v.abs() for k, v in theta.items()}, {k: v.abs() for k, v in g.items()}) \
            + side("-MT", {k: v.abs() for k, v in g.items()}, {k: v.abs() for k, v in theta.items()})
        scale = max(float(side("M", theta, g).abs().max()), float(side("-MT", g, theta).abs().max()))
        out.append(rb * float(mag.max()) / scale)
    return out


def _sharpen(model, factor=30.0):
    """Scale every attention projection up so that the softmax is far from uniform (at init the loss
    barely sees Q/K, and an O(1) control would be measured against tiny numbers)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("c_attn", "query", "key", "q_proj", "k_proj")) and n.endswith("weight"):
                p.mul_(factor)


@pytest.mark.parametrize("build", [hf_tiny.gpt2, hf_tiny.bert_classifier, hf_tiny.vit])
def test_qk_and_vo_matrix_identities_per_head(build):
    model, loss, batch = build()
    _sharpen(model)
    m64 = model.double()
    fams = [t for t in discover(m64, loss, batch).verified if t.family in ("qk_gl", "vo_gl")]
    assert {t.family for t in fams} == {"qk_gl", "vo_gl"}
    for t in fams:
        r = gl_matrix_check(m64, loss, batch, t)
        assert len(r.per_block) == 2 and min(r.lhs_norms) > 0          # two heads, each seen by the loss
        # (ViT's softmax runs in float32 inside the model, but G_Q and G_K both come from the same score
        # gradient, so the matrix identity still holds to float64 roundoff)
        # float64: g is 2 passes of n-term sums (2γ_n per entry), each lhs/rhs entry one more m-term sum
        # (m ≤ n): |Δ(lhs − rhs)_ij| ≤ 3γ_n·(|X(θ)|ᵀ|X(g)| + |Y(g)|ᵀ|Y(θ)|)_ij, over the same scale
        tol = _tolerances(m64, loss, batch, t)
        assert all(r_ <= tl for r_, tl in zip(r.per_block, tol)), (t.name, r.per_block, tol)


@pytest.mark.parametrize("build", [hf_tiny.gpt2, hf_tiny.bert_classifier])
def test_wrong_head_pairing_fails_by_order_one(build):
    """Control: query head 0 paired with key head 1 (and vice versa) is not a symmetry."""
    model, loss, batch = build()
    _sharpen(model)
    m64 = model.double()
    qk = next(t for t in discover(m64, loss, batch).verified if t.family == "qk_gl")
    keys = [[term for term in b if term[3] == "-MT"] for b in qk.blocks]
    queries = [[term for term in b if term[3] == "M"] for b in qk.blocks]
    swapped = GLFamily("qk_swapped_heads", "negative_control", [queries[0] + keys[1], queries[1] + keys[0]],
                       expected=False)
    r = gl_matrix_check(m64, loss, batch, swapped)
    assert r.residual > 0.1, r.per_block           # effect-size floor (not a rounding bound): O(1) miss
    assert r.residual > 1e6 * max(_tolerances(m64, loss, batch, swapped))  # and far outside rounding
