"""Mixture-of-experts blocks with 3-d expert parameters (transformers 5 fuses each expert bank into one tensor:
gate_up_proj (E, 2I, H), down_proj (E, H, I)) on Mixtral and Qwen3-MoE (tiny configs, float64, eager
experts). Found from the graph: the per-expert rescale of each expert's linear (up) factor and the expert
permutation that moves the router's rows with the experts, both exact; the experts (accumulated with an
in-place index_add_) are not reported unused. Each has an independent float64 check (the reported slices
edited by hand, the model run through functional_call) and a negative control that must move the loss by an
amount known in closed form."""
import pytest
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.discover.slices import SliceScaleFamily
from eqlab.analyses.discover.zoo import ZOO
from eqlab.analyses.transforms import Transformation

from hand_checks import REL, loss_at as _loss

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def moe(request):
    model, loss, batch = ZOO[request.param]()
    return model, loss, batch, discover(model, loss, batch)


def _family(d, family):
    return [f for f in d.found if f.transformation.family == family]


def test_expert_permutation_moves_the_router_rows_and_is_exact(moe):
    model, loss, batch, d = moe
    (f,) = _family(d, "expert_permutation")
    assert f.verdict == "exact", f.as_row()
    names = {t[0]: t for t in f.transformation.terms}
    banks = [n for n in names if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    (router,) = [n for n in names if n not in banks]
    assert len(banks) == 2 and all(names[n][1] == 0 and names[n][2][:2] == [1, 0] for n in names)
    params = dict(model.named_parameters())

    def swap(which):
        out = dict(params)
        for n in which:
            out[n] = out[n].index_select(0, torch.tensor(names[n][2]))
        return out

    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, swap(names)) - base) <= REL * abs(base)
    # negative: the experts swapped without the router = the router swapped alone (an expert relabelling)
    moved = _loss(model, loss, batch, swap(banks)) - base
    expected = _loss(model, loss, batch, swap([router])) - base
    assert abs(expected) > 1e6 * REL * abs(base)
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)


def test_per_expert_rescale_of_the_linear_factor_is_exact(moe):
    model, loss, batch, d = moe
    fs = _family(d, "expert_glu_rescale")
    n_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert len(fs) == n_experts and all(f.verdict == "exact" for f in fs), [f.as_row() for f in fs]
    f = fs[1]
    t = f.transformation
    assert isinstance(t, SliceScaleFamily) and Transformation.from_json(t.to_json()).generators == t.generators
    inter = model.config.intermediate_size if "Mixtral" in type(model).__name__ else model.config.moe_intermediate_size
    (up, ups), (down, downs) = [(g[0], g[2]) for g in t.generators[0]]
    assert ups == [[1], [inter]] and downs == [[1], [0]] and t.n_generators == inter  # expert 1, unit 0
    params = dict(model.named_parameters())
    a = torch.linspace(0.5, 2.0, inter, dtype=torch.float64)
    gu, dn = params[t.generators[0][0][0]].clone(), params[t.generators[0][1][0]].clone()
    gu[1, inter:] *= a[:, None]                 # expert 1: up rows x a (its gate rows untouched)
    dn[1, :, :] /= a[None, :]                   # expert 1: down columns / a
    names = (t.generators[0][0][0], t.generators[0][1][0])
    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, {**params, names[0]: gu, names[1]: dn}) - base) <= REL * abs(base)
    # negative: scale the up rows only; the loss moves exactly as much as scaling the down columns by a does
    # (unit r's output is (a·u_r)·w_r = u_r·(a·w_r))
    up_only = params[names[0]].clone()
    up_only[1, inter:] *= a[:, None]
    down_only = params[names[1]].clone()
    down_only[1] *= a[None, :]
    moved = _loss(model, loss, batch, {**params, names[0]: up_only}) - base
    expected = _loss(model, loss, batch, {**params, names[1]: down_only}) - base
    assert abs(expected) > 1e6 * REL * abs(base)
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)


def test_gate_side_rescale_is_broken_by_its_algebra_and_a_control(moe):
    _, _, _, d = moe
    fs = _family(d, "expert_silu_gate_rescale")
    assert fs and all(f.verdict == "broken" and f.cause == "algebra" and not f.transformation.expected for f in fs)


def test_index_add_experts_are_used(moe):
    model, loss, batch, d = moe
    assert not _family(d, "unused_parameter"), [f.as_row() for f in _family(d, "unused_parameter")]
    # their gradients are non-zero (the finder's verdict agrees with autograd)
    model.zero_grad()
    x, y = batch
    loss(model(x), y).backward()
    banks = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert banks and all(float(p.grad.abs().max()) > 0 for p in banks)
