"""Bias transfers: a shift of one bias, compensated in the biases of the linear maps that read it.

* norm bias → readers: a normalisation's output y = γ ⊙ n(x) + β read only by linear maps (through views,
  splits, transposes): β → β + δ moves y by δ at every position, and b_k → b_k − W_k δ keeps every reader's
  output y W_kᵀ + b_k. Exact (eps plays no role: β comes after the normalisation) when *every* reader is a
  linear map with its own bias; a residual add, a nonlinearity or a loss reading y is named as the reason
  no transfer is proposed.
* value bias → output projection: V = x W_Vᵀ + b_V enters P V with P a softmax over the contracted axis, whose
  rows sum to 1: P (V + 1δᵀ) = P V + 1δᵀ, and the heads' concatenation reaches o_proj as it is, so
  b_O → b_O − W_O δ (each value feature summed over the query heads that read it, GQA) compensates exactly.

Found from the graph (the same anchors as the rescale and V/O finders); the transformation is a
`BiasTransferFamily` (affine finite elements, generator with a part linear in W).
"""
from __future__ import annotations

from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import SCALAR, Graph
from eqlab.analyses.discover.ops import NORM_OPS, affine, labels_out, shared_caveats
from eqlab.analyses.discover.patterns import Candidate, _groups, _short
from eqlab.analyses.transforms import BiasTransferFamily

_PREFIX = {"layer_norm": "ln", "batch_norm": "bn", "rms_norm": "rms"}


def _readers(graph: Graph, start, shift: bool = True):
    """([(linear Affine, chain from start)], "") when every path from ``start`` through pass-through ops
    ends in a linear map reading it as its data input, else ([], why not). ``shift``: what moves is a shift
    (a scalar multiple on the way would rescale it), not a per-feature scale (which commutes with it)."""
    out, todo = [], [(start, [])]
    while todo:
        t, pre = todo.pop()
        end, chain, cons = graph.walk_forward(t, pooling=False)
        chain = pre + chain
        scaled = [o.name for o, _, _ in chain if o.name in SCALAR]
        if scaled and shift:   # a shift δ reaches the reader as c·δ: the compensation W δ would be off by c
            return [], f"a scalar multiple ({scaled[0]}) sits between it and a reader"
        if not cons:
            return [], "the output is a model output (read by the loss directly)"
        for op, pos in cons:
            if len(cons) > 1 and graph.is_passthrough(op, pos, False) and len(op.outputs) == 1:
                todo.append((op.outputs[0], chain + [(op, pos, 0)]))
                continue
            a = affine(graph, op)
            if a is None or a.kind != "linear" or a.data is not end:
                return [], f"the output is also read by {op.name}, which is not a linear map (e.g. a residual add)"
            if op.name.startswith("conv") and shift and (_padded(op) or op.arg(6, "groups", 1) != 1):
                return [], (f"a padded or grouped convolution ({op.name}) reads it: zero padding makes a constant "
                            "input shift position-dependent at the borders" if _padded(op) else
                            f"a grouped convolution ({op.name}) reads it")
            if a.w_in is None:
                return [], f"{_short(a.weight)} does not read the features one input slice each"
            out.append((a, chain))
    return out, ""


def _padded(conv) -> bool:
    """Whether a convolution pads its input (then a constant shift is not constant over its taps)."""
    p = conv.arg(4, "padding", 0)
    if isinstance(p, str):
        return p != "valid"
    return any(int(x) != 0 for x in (p if isinstance(p, (tuple, list)) else [p]))


def _reader_groups(graph: Graph, prod, cons, chain):
    """Source feature -> positions along the reader weight's input axis (None: labels mix)."""
    end = cons.data
    axis = end.dim() + (cons.in_axis if cons.in_axis < 0 else cons.in_axis - end.dim())
    labels = labels_out(graph, prod, chain, axis)
    return None if labels is None else _groups(labels)


def _family(name, family, src, index, readers, coef=-1.0, expected=True):
    """readers: [(Affine, {source feature: positions})]."""
    terms = [[a.bias, a.weight, a.w_in, [groups.get(i, []) for i in index], coef] for a, groups in readers]
    return BiasTransferFamily(name, family, [src, index], terms, expected=expected)


def norm_bias_transfers(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops_named(*NORM_OPS):
        a = affine(graph, op)
        if a is None:
            continue
        family = f"{_PREFIX[op.name]}_bias_transfer"
        site = f"{op.name} {_short(a.weight or a.bias) if (a.weight or a.bias) else op.index}"
        if a.bias is None:
            if op.name != "rms_norm":   # (an RMSNorm never has one: nothing was considered)
                reject(site, family, "the normalisation has no bias parameter")
            continue
        found, why = _readers(graph, op.outputs[0])
        if not found:
            reject(site, family, f"not every reader compensates a shift of the bias: {why}")
            continue
        readers, cav = [], shared_caveats(graph, a)
        for cons, chain in found:
            if cons.bias is None:
                readers = None
                reject(site, family, f"the reader {_short(cons.weight)} has no bias to absorb W δ")
                break
            groups = _reader_groups(graph, a, cons, chain)
            if groups is None:
                readers = None
                reject(site, family, f"the features do not reach {_short(cons.weight)} as whole features (labels mix)")
                break
            readers.append((cons, groups))
            cav += [c for c in shared_caveats(graph, cons) if c not in cav]
        if not readers:
            continue
        index = list(range(a.op.outputs[0].shape[a.out_axis]))
        more = f"(+{len(readers) - 1})" if len(readers) > 1 else ""
        name = f"{family}[{_short(a.bias)}->{_short(readers[0][0].weight)}{more}]"
        out.append(Candidate(_family(name, family, a.bias, index, readers), cav))
    return out


def value_bias_transfers(graph: Graph) -> list[Candidate]:
    """The value projection's bias into the output projection's, at every attention block whose scores reach
    a softmax over the key axis (the anchor of the V/O finder)."""
    from eqlab.analyses.discover.attention import _precision_caveats, _to_softmax, _value_output

    out, done = [], set()
    for op in graph.ops_named("matmul"):
        P = op.tensor_positions()
        if len(P) != 2 or op.leaves[P[0]].dim() < 3 or graph.has_param_input(op):
            continue
        sm, _, _ = _to_softmax(graph, op.outputs[0])
        if sm is None or sm.index in done:
            continue
        done.add(sm.index)
        site = f"attention probabilities at op {sm.index}"
        vo = _value_output(graph, sm, None)   # its reasons (vo_gl) are the attention finder's own, deduplicated
        if vo is None:
            reject(site, "value_bias_transfer", "the value heads could not be located in the output projection's "
                   "input (see the vo_gl reason)")
            continue
        av, ao, heads_v, _ = vo.heads
        if av.bias is None:
            reject(site, "value_bias_transfer", f"the value projection {_short(av.weight)} has no bias")
            continue
        if ao.bias is None:
            reject(site, "value_bias_transfer", f"the output projection {_short(ao.weight)} has no bias to absorb "
                   "W_O δ")
            continue
        d = len(heads_v[0])
        index = sorted({c for h in heads_v for c in h})
        groups = {c: [h * d + hv.index(c) for h, hv in enumerate(heads_v) if c in hv] for c in index}
        cav = shared_caveats(graph, av) + shared_caveats(graph, ao) + _precision_caveats(sm)
        name = f"value_bias_transfer[{_short(av.bias)}->{_short(ao.bias)}]"
        out.append(Candidate(_family(name, "value_bias_transfer", av.bias, index, [(ao, groups)]), cav))
    return out


def transfers(graph: Graph) -> list[Candidate]:
    return norm_bias_transfers(graph) + value_bias_transfers(graph)


def controls(cands) -> list:
    """Per transfer: the wrong sign (b_k + W_k δ), and, with several readers, one reader left out."""
    out = []
    for c in cands:
        t = c.transformation
        if not isinstance(t, BiasTransferFamily):
            continue
        tag = t.name.split("[", 1)[1]
        src, index = t.source
        out.append(BiasTransferFamily(f"bias_transfer_wrong_sign[{tag}", "negative_control", [src, index],
                                      [r[:4] + [-r[4]] for r in t.readers], expected=False))
        if len(t.readers) > 1:
            out.append(BiasTransferFamily(f"bias_transfer_missing_reader[{tag}", "negative_control", [src, index],
                                          t.readers[:-1], expected=False))
    return out
