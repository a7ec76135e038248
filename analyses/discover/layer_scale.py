"""Per-channel scales after a linear map (ConvNeXt / CaiT / DINOv2 layer scale, x + γ ⊙ (h Wᵀ + b)).

Anchor: an elementwise product of a parameter γ (through views only) and a tensor that is a linear map's
(or convolution's) output through pass-through ops, γ varying along one axis that carries the map's output
features one to one. γ_c → γ_c·s_c with row c of W and b_c → /s_c leaves the product, hence everything
downstream, unchanged: a diagonal GL, exact whatever reads the product, provided nothing else reads the
map's output (then that reader would see the rescaled rows).
"""
from __future__ import annotations

from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph
from eqlab.analyses.discover.ops import labels_out, shared_caveats
from eqlab.analyses.discover.patterns import Candidate, _producer_affine, _short
from eqlab.analyses.transforms import ScaleFamily

_MUL = {"mul", "__mul__", "__rmul__"}
_VIEWS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "to", "type", "type_as", "float", "double",
          "contiguous", "clone", "expand"}


def _param_through_views(graph: Graph, t):
    """(the parameter t is a view / cast of, keeping its flat element order; the ids of the view ops), or
    (None, None)."""
    ops = set()
    while graph.param(t) is None:
        prod = graph.producer(t)
        if prod is None or prod[0].name not in _VIEWS:
            return None, None
        data = graph._data_input(prod[0])
        if data is None or (prod[0].leaves[data].numel() != t.numel() and prod[0].name != "expand"):
            return None, None
        ops.add(id(prod[0]))
        t = prod[0].leaves[data]
    return t, ops


def _scale_axis(gamma, x):
    """The axis of x along which the broadcast gamma varies (its only axis of size > 1), or None."""
    if gamma.dim() > x.dim():
        return None
    shape = [1] * (x.dim() - gamma.dim()) + list(gamma.shape)
    axes = [i for i, n in enumerate(shape) if n > 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return None
    return axes[0]


def layer_scales(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops:
        if op.name not in _MUL or len(op.tensor_positions()) != 2 or len(op.outputs) != 1:
            continue
        P = op.tensor_positions()
        xs = [op.leaves[p] for p in P]
        gammas = [_param_through_views(graph, x) for x in xs]
        if sum(g is not None for g, _ in gammas) != 1:
            continue
        k = 0 if gammas[0][0] is not None else 1
        g_view, (p_gamma, views), x = xs[k], gammas[k], xs[1 - k]
        if p_gamma.dim() != 1:
            continue     # a per-channel vector only (a matrix of scales is not one diagonal GL)
        gname = graph.param(p_gamma)
        site = f"per-channel scale {_short(gname)}"
        axis = _scale_axis(g_view, x)
        if axis is None or g_view.numel() != p_gamma.numel():
            reject(site, "layer_scale_rescale", "the scale does not vary along exactly one axis of the product")
            continue
        a, chain = _producer_affine(graph, x)
        if a is None:
            prod = graph.producer(graph.walk_back(x, pooling=False)[0])
            what = prod[0].name if prod else "an input"
            reject(site, "layer_scale_rescale", f"the scaled tensor comes from {what}, not a linear map through views")
            continue
        labels = labels_out(graph, a, chain, axis)
        if labels is None or sorted(labels) != list(range(len(labels))):
            reject(site, "layer_scale_rescale", f"{_short(a.weight)}'s output features do not reach the scaled "
                   "axis one to one")
            continue
        cav = shared_caveats(graph, a)
        others = [o.name for o, _ in graph.param_uses(gname) if o is not op and id(o) not in views]
        if others:
            cav.append(f"parameter {gname} is also read by {', '.join(sorted(set(others)))}: the rescale moves those too")
        if not graph.single_consumer_chain(a.op.outputs[0], chain + [(op, P[1 - k], 0)]):
            cav.append(f"{_short(a.weight)}'s output is also read outside the scaled product")
        gens = []
        for c, r in enumerate(labels):   # γ index c multiplies the map's output feature r
            g = [[gname, 0, [c], 1.0], [a.weight, a.w_out, [r], -1.0]]
            if a.bias:
                g.append([a.bias, 0, [r], -1.0])
            gens.append(g)
        name = f"layer_scale_rescale[{_short(a.weight)}->{_short(gname)}]"
        out.append(Candidate(ScaleFamily(name, "layer_scale_rescale", gens), cav))
    return out


def controls(cands) -> list:
    """Wrong sign: γ and the map's rows scaled together (the product moves by s²)."""
    out = []
    for c in cands:
        t = c.transformation
        if t.family != "layer_scale_rescale":
            continue
        gens = [[g[0]] + [[p, d, i, -k] for p, d, i, k in g[1:]] for g in t.generators]
        out.append(ScaleFamily(f"layer_scale_wrong_sign[{t.name.split('[', 1)[1]}", "negative_control", gens,
                               expected=False))
    return out
