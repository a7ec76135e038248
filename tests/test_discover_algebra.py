"""Discovery decides what an activation allows from its algebra, not from one batch: the ReLU6 rescale that
no pre-activation of the batch reaches 6 is broken (and says it only holds locally), leaky ReLU's is exact,
a bounded activation is odd only with symmetric bounds; and exact findings are checked on inputs x3.
Each claim has an independent float64 check of the loss and a negative control."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eqlab.analyses.discover import discover
from eqlab.analyses.identities import chain_length, gamma, unit_roundoff

torch.set_num_threads(1)


def _mlp(act, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    return model, F.cross_entropy, batch


def loss_change(model, loss, batch, edit, low=None):
    """(|L(edited) − L| / max|L|, its rounding level) in float64: the level is γ_n(u)·(|L| + |L'| + 2·M_f)
    / max|L| — each loss a chain of n-term sums (n = 2·params + inputs + outputs, identities' model), plus
    what a relative rounding of every output entry does to L (M_f = Σ|∂L/∂f·f|). ``low = (dtype, m)``: an op
    the model computes in a coarser dtype whatever its own (Mixtral's router softmax in float32), reducing
    over m entries, adds its γ_{m+1}(u_low) to the level."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        edit(dict(moved.named_parameters()))
    x, y = batch
    out = model(x)
    f = out.logits if hasattr(out, "logits") else out
    L0 = loss(out, y)
    (gf,) = torch.autograd.grad(L0, f)
    with torch.no_grad():
        L1 = loss(moved(x), y)
    mf = float((gf * f).detach().abs().sum())
    s = max(abs(float(L0)), abs(float(L1)))
    g = gamma(chain_length(model, batch), unit_roundoff(torch.float64))
    if low is not None:
        g += gamma(low[1] + 1, unit_roundoff(low[0]))
    level = g * (abs(float(L0)) + abs(float(L1)) + 2 * mf) / s
    return abs(float(L1) - float(L0)) / s, level


def _rescale(unit_scale):
    """Hidden unit i: incoming row and bias × a_i, outgoing column × 1/a_i."""
    def edit(p):
        a = torch.as_tensor(unit_scale, dtype=torch.float64)
        p["0.weight"].mul_(a[:, None]), p["0.bias"].mul_(a), p["2.weight"].div_(a[None, :])
    return edit


def test_relu6_rescale_is_broken_by_its_bound_even_where_the_batch_does_not_reach_it():
    model, loss, batch = _mlp(nn.ReLU6())
    pre = model[0](batch[0]).detach()
    d = discover(model, loss, batch)
    (f,) = [f for f in d.found if f.transformation.family.endswith("_rescale") and "softmax" not in f.transformation.family]
    assert f.verdict == "broken" and f.cause == "algebra" and not f.verified, f.as_row()
    assert "bound" in f.reason and "6" in f.reason
    # the batch never reaches 6 (pre-activations ~ ±1.5): the identities hold on it — the claim the
    # issue found — and the verdict says that the agreement is local, not a symmetry of the model
    # (the classifier says "numerically unchanged on this batch" only when every order is within its level)
    assert float(pre.abs().max()) < 6 and "numerically unchanged on this batch only (local)" in f.reason
    # independent float64 check: a rescale by 3 is invisible on the batch, but not on inputs x3 / x10
    r, level = loss_change(model, loss, batch, _rescale([3.0] * 8))
    assert r <= level, (r, level)
    big = (10 * batch[0], batch[1])   # pre-activations past 6/3: the rescaled units saturate differently
    r, level = loss_change(model, loss, big, _rescale([3.0] * 8))
    assert r > 1e3 * level, (r, level)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1)])
def test_homogeneous_activations_keep_an_exact_rescale_on_the_batch_and_on_inputs_x3(act):
    model, loss, batch = _mlp(act)
    d = discover(model, loss, batch)
    f = next(f for f in d.found if f.transformation.family == "relu_rescale")
    assert f.verdict == "exact" and f.cause == "" and f.residual_x3 == f.residual_x3, f.as_row()
    for scale in (1.0, 3.0, 10.0):       # positive: any input scale, any positive per-unit factor
        b = (scale * batch[0], batch[1])
        r, level = loss_change(model, loss, b, _rescale(torch.linspace(0.3, 3.0, 8)))
        assert r <= level, (scale, r, level)
    # negative control: a negative factor is not a positive rescale (ReLU(−x) ≠ −ReLU(x))
    r, level = loss_change(model, loss, batch, _rescale([-1.0] + [1.0] * 7))
    assert r > 1e3 * level, (r, level)


def test_bounded_activation_is_odd_only_with_symmetric_bounds():
    sym, loss, batch = _mlp(nn.Hardtanh(-1.0, 1.0))
    d = discover(sym, loss, batch)
    flips = [f for f in d.found if f.transformation.family == "sign_flip"]
    assert len(flips) == 1 and flips[0].verdict == "exact", [f.as_row() for f in flips]
    assert any(f.transformation.family == "hardtanh_rescale" and f.verdict == "broken" for f in d.found)
    flip_unit0 = _rescale([-1.0] + [1.0] * 7)
    r, level = loss_change(sym, loss, (3 * batch[0], batch[1]), flip_unit0)
    assert r <= level, (r, level)                                # positive: hardtanh(−x) = −hardtanh(x)
    relu6, loss, batch = _mlp(nn.ReLU6())
    assert "sign_flip" not in discover(relu6, loss, batch).families(verified_only=False)
    r, level = loss_change(relu6, loss, batch, flip_unit0)        # negative: relu6 is not odd
    assert r > 1e3 * level, (r, level)


def test_integer_inputs_skip_the_x3_check_and_say_so_by_nan():
    model, loss, batch = _mlp(nn.ReLU())
    ids = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    d = discover(ids, loss, (torch.randint(0, 5, (16, 3)), batch[1]))
    assert all(f.residual_x3 != f.residual_x3 for f in d.found)   # NaN: token ids cannot be scaled
    assert all(f.residual_x3 == f.residual_x3 for f in discover(model, loss, batch).found if f.verified)


def test_inputs_x3_check_demotes_what_holds_only_on_the_batch():
    """The safety net under the algebra: a transformation exact on the batch (ReLU6 rescale, pre-activations
    under 6) handed to the x3 check as if nothing had flagged it is demoted there, with its residual; the
    ReLU rescale of the same net stays exact (positive)."""
    from eqlab.analyses.discover import Found, _check_scaled_inputs

    found = []
    for act in (nn.ReLU6(), nn.ReLU()):
        model, loss, batch = _mlp(act)
        (f,) = [f for f in discover(model, loss, batch).found if f.transformation.family.endswith("_rescale")
                and "softmax" not in f.transformation.family]
        pretend = Found(f.transformation, True, f.residual, f.residuals, [], "", "exact", f.tolerance)
        # x3 of x3: pre-activations up to ~13, past the bound 6 where a rescale by e^{0.5·c} moves them
        _check_scaled_inputs(model, loss, (3 * batch[0], batch[1]), [pretend], 1, 0)
        found.append(pretend)
    relu6, relu = found
    assert relu6.verdict == "broken" and relu6.cause == "inputs_x3" and "not a symmetry" in relu6.reason, relu6.as_row()
    assert relu.verdict == "exact" and relu.residual_x3 == relu.residual_x3, relu.as_row()
