"""Mixture-of-experts blocks whose experts live in 3-d parameters (transformers 5 fuses them:
gate_up_proj (E, 2I, H), down_proj (E, H, I)), read off the graph, not off class names.

An expert's linear map is an ``F.linear`` whose weight is ``P[e]``, a scalar-index read of a 3-d
parameter P. Inside expert e, a gated product ``act(x W_g[e]ᵀ) ⊙ (x W_u[e]ᵀ)`` read by the expert's
output map W_d[e] has the per-expert unit rescale of its linear factor (row r of W_u[e] by a, column r of
W_d[e] by 1/a: exact for any gate), and the same on the gate side where the activation is positively
homogeneous (else proposed broken, by its algebra). The experts are interchangeable when the router moves
with them: the expert banks' slices e1, e2 and the router's rows e1, e2 (a linear map whose output, through
a softmax, feeds the top-k whose indices pick the experts) swapped together.

The experts' outputs are accumulated with an in-place ``index_add_``; the graph records it as its
out-of-place twin, so the expert parameters reach the loss (never reported unused).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqlab.analyses.discover.algebra import activation_algebra, algebra_cause
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.gated import product_factors
from eqlab.analyses.discover.graph import Graph, axis_labels
from eqlab.analyses.discover.ops import ELEMENTWISE_ACT, affine, shared_caveats
from eqlab.analyses.discover.patterns import Candidate, _short
from eqlab.analyses.discover.slices import SliceScaleFamily
from eqlab.analyses.transforms import Permutation

_MUL = {"mul", "__mul__", "__rmul__"}
_ROUTER_PATH = {"softmax", "float", "double", "to", "type"}


@dataclass
class ExpertLinear:
    op: object
    param: str            # the 3-d parameter the weight is a slice of
    expert: int           # the slice index along its axis 0
    index: object         # the index tensor (None for a Python int): what the router's top-k picks


def expert_linear(graph: Graph, op) -> ExpertLinear | None:
    """``op`` as F.linear(x, P[e]) with P a 3-d parameter and e a scalar index, else None."""
    if op.name != "linear":
        return None
    w, b = op.arg(1, "weight"), op.arg(2, "bias")
    prod = graph.producer(w)
    if prod is None or prod[0].name not in ("__getitem__", "select") or b is not None:
        return None
    g = prod[0]
    P = g.leaves[g.tensor_positions()[0]]
    if graph.param(P) is None or P.dim() != 3:
        return None
    idx = g.arg(1, "idx") if g.name == "__getitem__" else g.arg(2, "index")
    if g.name == "select" and g.arg(1, "dim") != 0:
        return None
    if torch.is_tensor(idx) and idx.dim() == 0 and not idx.is_floating_point():
        return ExpertLinear(op, graph.param(P), int(idx), idx)
    if isinstance(idx, int):
        return ExpertLinear(op, graph.param(P), idx, None)
    return None


def _side(graph: Graph, x, linears):
    """(ExpertLinear, chain from its output to x, activation op or None) of one factor, or None."""
    origin, chain = graph.walk_back(x, pooling=False)
    prod = graph.producer(origin)
    if prod is None:
        return None
    if prod[0].index in linears:
        return linears[prod[0].index], chain, None
    act = prod[0]
    if act.name not in ELEMENTWISE_ACT:
        return None
    o2, pre = graph.walk_back(act.leaves[act.tensor_positions()[0]], pooling=False)
    p2 = graph.producer(o2)
    if p2 is None or p2[0].index not in linears:
        return None
    return linears[p2[0].index], pre + [(act, act.tensor_positions()[0], 0)] + chain, act


def _gated(graph: Graph, op, linears):
    """The two factors of one expert's gated product and the expert map reading it, or None (with a reason
    recorded when the product is made of expert maps)."""
    xs = product_factors(graph, op)
    if xs is None:
        return None
    P = op.tensor_positions()
    sides = [_side(graph, x, linears) for x in xs]
    if any(s is None for s in sides):
        return None
    site = f"expert product at op {op.index}"
    end, chain, cons = graph.walk_forward(op.outputs[0], pooling=False)
    reader = linears.get(cons[0][0].index) if len(cons) == 1 else None
    if reader is None or cons[0][0].arg(0, "input") is not end:
        return reject(site, "expert_glu_rescale", "the product is not read by one expert's output map")
    if len({s[0].expert for s in sides} | {reader.expert}) != 1:
        return reject(site, "expert_glu_rescale", "the factors and the reader belong to different experts")
    out = []
    for (lin, pre, act), pos in zip(sides, P):
        full = pre + [(op, pos, 0)] + chain
        lab = axis_labels(full, tuple(lin.op.outputs[0].shape), lin.op.outputs[0].dim() - 1, end.dim() - 1)
        if lab is None or len(set(lab)) != len(lab):
            return reject(site, "expert_glu_rescale", "the expert's units do not reach its output map one to one")
        out.append((lin, act, lab))
    return out, reader


def _rescales(graph: Graph, linears) -> list[Candidate]:
    out = []
    for op in graph.ops:
        if op.name not in _MUL:
            continue
        found = _gated(graph, op, linears)
        if not found:
            continue
        sides, reader = found
        for lin, act, lab in sides:
            e = lin.expert
            gens = [[[lin.param, [0, 1], [[e], [row]], 1.0], [reader.param, [0, 2], [[e], [j]], -1.0]]
                    for j, row in enumerate(lab)]
            cav = []
            if act is None:
                family = "expert_glu_rescale"
            else:
                family = f"expert_{act.name}_gate_rescale"
                if not activation_algebra(act)[0]:
                    cav.append(algebra_cause(act))
            nm = f"{family}[{_short(lin.param)}[{e}]->{_short(reader.param)}[{e}]]"
            out.append(Candidate(SliceScaleFamily(nm, family, gens), cav))
    return out


def _router(graph: Graph, n_experts: int, indices):
    """The linear map whose outputs (through a softmax) feed a top-k whose indices the expert slices are
    picked by: its Affine, or (None, why)."""
    picked = set()
    for t in indices:
        picked |= graph.ancestors(t)
    for op in graph.ops_named("topk"):
        if len(op.outputs) < 2 or id(op.outputs[1]) not in picked:
            continue
        x = op.leaves[op.tensor_positions()[0]]
        for _ in range(8):
            prod = graph.producer(x)
            if prod is None:
                break
            p = prod[0]
            a = affine(graph, p)
            if a is not None and a.kind == "linear" and p.outputs[0] is x:
                if x.shape[-1] != n_experts:
                    return None, f"the router's {x.shape[-1]} outputs do not match {n_experts} experts"
                return a, ""
            data = graph._data_input(p)
            if data is None or not (p.name in _ROUTER_PATH or graph.is_passthrough(p, data, pooling=False)):
                break
            x = p.leaves[data]
        return None, "the top-k that picks the experts does not read a linear map's output through a softmax"
    return None, "no top-k over a router picks the expert slices (the indices come from elsewhere)"


def _permutations(graph: Graph, linears) -> list[Candidate]:
    banks: dict[tuple, dict] = {}
    by_index: dict[int, set] = {}
    for lin in linears.values():
        if lin.index is not None:
            by_index.setdefault(id(lin.index), set()).add(lin.param)
    for lin in linears.values():
        if lin.index is None:
            continue
        key = tuple(sorted(by_index[id(lin.index)]))
        bank = banks.setdefault(key, {"experts": set(), "indices": []})
        bank["experts"].add(lin.expert)
        bank["indices"].append(lin.index)
    out = []
    for params, bank in banks.items():
        site = f"experts {', '.join(_short(p) for p in params)}"
        seen = sorted(bank["experts"])
        if len(seen) < 2:
            reject(site, "expert_permutation", "fewer than two experts were routed to in the traced batch")
            continue
        n = next(op.leaves[p].shape[0] for op in graph.ops for p in op.tensor_positions()
                 if graph.param(op.leaves[p]) == params[0])
        router, why = _router(graph, n, bank["indices"])
        if router is None:
            reject(site, "expert_permutation", why)
            continue
        e1, e2 = seen[:2]
        perm = list(range(n))
        perm[e1], perm[e2] = e2, e1
        terms = [[p, 0, perm] for p in params] + [[router.weight, router.w_out, perm]]
        if router.bias:
            terms.append([router.bias, 0, perm])
        t = Permutation(f"expert_permutation[{_short(router.weight)}]({e1}<->{e2})", "expert_permutation", terms)
        out.append(Candidate(t, shared_caveats(graph, router)))
    return out


def experts(graph: Graph) -> list[Candidate]:
    linears = {op.index: lin for op in graph.ops_named("linear") if (lin := expert_linear(graph, op)) is not None}
    if not linears:
        return []
    return _rescales(graph, linears) + _permutations(graph, linears)
