"""Gated units h = a ⊙ u read by linear maps (SwiGLU / GeGLU / ReGLU, bilinear GLU), anchored at an
elementwise product of two parameter-derived tensors, never at a layer name.

A side u that is itself a linear map's output (through pass-through ops) enters h linearly: scaling its
row i by α and the readers' column(s) i by 1/α is exact for any gate, and α = −1 is a sign flip. A side
σ(g) behind an activation has the same rescale only when σ is positively homogeneous (ReLU: ReGLU); for
SiLU/GELU it is proposed and reported broken with that reason. Swapping two units (both producers' rows and
the readers' columns) is exact whatever σ is.
"""
from __future__ import annotations

from eqlab.analyses.discover.algebra import Cause, algebra_cause
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph
from eqlab.analyses.discover.ops import ELEMENTWISE_ACT, labels_out
from eqlab.analyses.discover.patterns import (Candidate, Pair, Reader, _groups, _linear_readers, _pair_name,
                                        _producer_affine, _rescale_generators, _shape)
from eqlab.analyses.transforms import Permutation, ScaleFamily, SignFlip

_MUL = {"mul", "__mul__", "__rmul__"}


def _side(graph: Graph, t):
    """(Affine, chain to t, activation or None) for one factor of the product."""
    a, chain = _producer_affine(graph, t)
    if a is not None:
        return a, chain, None, None
    origin, post = graph.walk_back(t, pooling=False)
    prod = graph.producer(origin)
    if prod is None or prod[0].name not in ELEMENTWISE_ACT:
        return None
    act = prod[0]
    a, pre = _producer_affine(graph, act.leaves[act.tensor_positions()[0]])
    if a is None:
        return None
    return a, pre + [(act, act.tensor_positions()[0], 0)] + post, act.name, act


def product_factors(graph: Graph, op):
    """The two factors of an elementwise product of activations (no parameter, both of the output's shape),
    or None."""
    P = op.tensor_positions()
    if len(P) != 2 or len(op.outputs) != 1:
        return None
    xs = [op.leaves[p] for p in P]
    if any(graph.param(x) or x.shape != op.outputs[0].shape for x in xs):
        return None
    return xs


def _pairs(graph: Graph, op):
    xs = product_factors(graph, op)
    if xs is None:
        return None
    P = op.tensor_positions()
    sides = [_side(graph, x) for x in xs]
    found = _linear_readers(graph, op.outputs[0], pooling=False)
    if any(s is None for s in sides) or not found or sides[0][0].op is sides[1][0].op:
        if all(s is not None for s in sides) or found:  # a product of parameter-derived tensors: say why
            why = ("a factor is not a linear map's output, directly or behind one activation"
                   if any(s is None for s in sides) else
                   "the product is not read only by linear maps" if not found else
                   "both factors come from the same linear map")
            reject(f"elementwise product at op {op.index}", "glu_rescale", why)
        return None
    pairs = []
    for (a, chain, act, act_op), pos in zip(sides, P):
        readers = []
        for consumer, cchain in found:
            end = consumer.data
            lab = labels_out(graph, a, chain + [(op, pos, 0)] + cchain,
                             end.dim() + (consumer.in_axis if consumer.in_axis < 0 else consumer.in_axis - end.dim()))
            if lab is None:
                return reject(f"elementwise product at op {op.index}", "glu_rescale",
                              "the gated units do not reach the reader as whole features (labels mix)")
            readers.append(Reader(consumer, _groups(lab)))
        cav = []
        if not graph.single_consumer_chain(a.op.outputs[0], chain + [(op, pos, 0)]):
            cav.append("the factor is also read outside the product")
        pairs.append(Pair(a, act, readers, cav, act_op=act_op))
    if [r.groups for r in pairs[0].readers] != [r.groups for r in pairs[1].readers]:
        return reject(f"elementwise product at op {op.index}", "glu_rescale",
                      "the two factors do not line up unit by unit")
    return pairs


def gated_units(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops:
        if op.name not in _MUL:
            continue
        pairs = _pairs(graph, op)
        if pairs is None:
            continue
        for p in pairs:
            if p.act is None:
                fam, cav = "glu_rescale", list(p.caveats)
            elif p.homogeneous:
                fam, cav = f"{p.act}_gate_rescale", list(p.caveats)
            else:
                fam = f"{p.act}_gate_rescale"
                cav = list(p.caveats) + [Cause("gate " + algebra_cause(p.act_op), "algebra", soft=False)]
            out.append(Candidate(ScaleFamily(f"{fam}[{_pair_name(p)}]", fam, _rescale_generators(p)), cav))
            if p.act is None:  # α = −1 of the same rescale: a discrete symmetry of the linear factor
                r = sorted(p.groups)[0]
                terms = [[p.producer.weight, p.producer.w_out, [r]]] + \
                    ([[p.producer.bias, 0, [r]]] if p.producer.bias else [])
                terms += [[rd.consumer.weight, rd.consumer.w_in, rd.groups[r]] for rd in p.readers]
                out.append(Candidate(SignFlip(f"sign_flip[{_pair_name(p)}]({r})", "sign_flip", terms),
                                     list(p.caveats)))
        out += _unit_swap(graph, pairs)
    return out


def _unit_swap(graph: Graph, pairs) -> list[Candidate]:
    feats = sorted(pairs[0].groups)
    if len(feats) < 2:
        return []
    i, j = feats[:2]
    perms = {}
    for p in pairs:
        for name, dim in [[p.producer.weight, p.producer.w_out]] + ([[p.producer.bias, 0]] if p.producer.bias else []):
            perm = perms.setdefault((name, dim), list(range(_shape(graph, name)[dim])))
            perm[i], perm[j] = perm[j], perm[i]
    for r in pairs[0].readers:
        perm = perms.setdefault((r.consumer.weight, r.consumer.w_in),
                                list(range(_shape(graph, r.consumer.weight)[r.consumer.w_in])))
        for a, b in zip(r.groups[i], r.groups[j]):
            perm[a], perm[b] = perm[b], perm[a]
    terms = [[n, d, perm] for (n, d), perm in perms.items()]
    name = f"permutation[{_pair_name(pairs[0])}+{pairs[1].producer.weight.removesuffix('.weight')}]({i}<->{j})"
    return [Candidate(Permutation(name, "permutation", terms), [])]
