"""Offset norm gains (Gemma's RMSNorm: y = n(x) ⊙ (1 + w)) moved into the linear maps that read them.

The effective gain is g = w + o (o = 1 in Gemma), a parameter-free scalar added to a parameter before the
product with the normalised x. Scaling g_c by a_c and every reader's input column(s) c by 1/a_c is exact (the
gain comes after the normalisation: eps plays no role), but in the stored coordinate w it is the affine map
w_c → a_c(w_c + o) − o, not a scaling of w: an `OffsetScaleFamily` (ξ_w = D ⊙ (w + o)). Scaling w itself
(ignoring the offset) is the negative control.
"""
from __future__ import annotations

from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph, axis_labels
from eqlab.analyses.discover.ops import affine, shared_caveats
from eqlab.analyses.discover.patterns import Candidate, _groups, _short
from eqlab.analyses.discover.transfers import _readers
from eqlab.analyses.transforms import OffsetScaleFamily, ScaleFamily

_MUL = {"mul", "__mul__", "__rmul__"}
_ADD = {"add", "__add__", "__radd__"}
_CASTS = {"to", "type", "type_as", "float", "double", "view", "reshape", "contiguous"}


def _through_casts(graph: Graph, t):
    """t walked back through casts / views: (origin tensor, ids of the ops passed)."""
    ops = set()
    while True:
        prod = graph.producer(t)
        if prod is None or prod[0].name not in _CASTS:
            return t, ops
        data = graph._data_input(prod[0])
        if data is None:
            return t, ops
        ops.add(id(prod[0]))
        t = prod[0].leaves[data]


def _offset_param(graph: Graph, t):
    """(param name, offset o, ids of the ops computing w + o) when t is (a cast of) w + o with w a 1-d
    parameter (through casts) and o a python number; else None."""
    t, ops = _through_casts(graph, t)
    prod = graph.producer(t)
    if prod is None or prod[0].name not in _ADD:
        return None
    add = prod[0]
    tensors = [add.leaves[p] for p in add.tensor_positions()]
    scalars = [v for v in add.leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(tensors) != 1 or len(scalars) != 1 or add.arg(2, "alpha", 1) != 1:
        return None
    w, wops = _through_casts(graph, tensors[0])
    name = graph.param(w)
    if name is None or w.dim() != 1:
        return None
    return name, float(scalars[0]), ops | wops | {id(add)}


def offset_gains(graph: Graph) -> list[Candidate]:
    out = []
    for norm in graph.ops_named("rms_norm", "layer_norm"):
        a = affine(graph, norm)
        if a is None or a.weight is not None:
            continue   # a plain gain is the gain rescale's (patterns.rescales)
        cons = graph.consumers(norm.outputs[0])
        if len(cons) != 1 or cons[0][0].name not in _MUL or len(cons[0][0].tensor_positions()) != 2:
            continue   # no product after the norm: no gain at all (patterns names that)
        mul, pos = cons[0]
        other = [mul.leaves[p] for p in mul.tensor_positions() if p != pos][0]
        found = _offset_param(graph, other)
        site = f"{norm.name} at op {norm.index}"
        if found is None:
            continue
        w, o, gain_ops = found
        family = f"{'rms' if norm.name == 'rms_norm' else 'ln'}_offset_gain_rescale"
        D = norm.outputs[0].shape[-1]
        if other.shape[-1] != D or other.numel() != D:
            reject(site, family, "the offset gain is not one entry per normalised feature")
            continue
        readers, why = _readers(graph, mul.outputs[0], shift=False)
        if not readers:
            reject(site, family, f"the gained output is not read only by linear maps: {why}")
            continue
        start = mul.outputs[0]
        terms, cav, bad = [], [], None
        for cons_a, chain in readers:
            end = cons_a.data
            axis = end.dim() + (cons_a.in_axis if cons_a.in_axis < 0 else cons_a.in_axis - end.dim())
            labels = axis_labels(chain, tuple(start.shape), start.dim() - 1, axis)
            if labels is None:
                bad = f"the features do not reach {_short(cons_a.weight)} as whole features (labels mix)"
                break
            terms.append((cons_a, _groups(labels)))
            cav += [c for c in shared_caveats(graph, cons_a) if c not in cav]
        if bad:
            reject(site, family, bad)
            continue
        uses = [op.name for op, _ in graph.param_uses(w) if id(op) not in gain_ops]
        if uses:
            cav.append(f"parameter {w} is also read by {', '.join(sorted(set(uses)))}: the rescale moves those too")
        cav += getattr(norm, "precision", [])
        gens = [[[w, 0, [c], 1.0]] + [[r.weight, r.w_in, g[c], -1.0] for r, g in terms if c in g]
                for c in range(D)]
        more = f"(+{len(terms) - 1})" if len(terms) > 1 else ""
        name = f"{family}[{_short(w)}->{_short(terms[0][0].weight)}{more}]"
        out.append(Candidate(OffsetScaleFamily(name, family, gens, {w: o}), cav))
    return out


def controls(cands) -> list:
    """The same rescale applied to w instead of w + o (the offset ignored): w → a·w is not a symmetry."""
    out = []
    for c in cands:
        t = c.transformation
        if isinstance(t, OffsetScaleFamily):
            out.append(ScaleFamily(f"offset_ignored[{t.name.split('[', 1)[1]}", "negative_control", t.generators,
                                   expected=False))
    return out
