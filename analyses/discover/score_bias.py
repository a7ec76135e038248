"""Additive attention-score biases: what a head permutation must carry with it, or why it cannot.

On the path from the score product Q Kᵀ to its softmax, every added tensor B (broadcast to the scores,
heads on axis -3) is one of
* learned: computed from a parameter P (T5's relative-attention-bias embedding, Swin's relative position
  bias table), read by a sub-graph that only gathers, reshapes and adds constants to it. Replaying that
  sub-graph with P replaced by integer labels along one of its axes (minus its value at P = 0, which
  removes the constants it adds) says which column of P each head's scores get: a head permutation must
  permute those columns of P too;
* fixed: not computed from a parameter (ALiBi's per-head slopes, a buffer or a function of positions).
  A transformation of the parameters cannot move it, so swapping two heads whose fixed biases differ is
  not a symmetry (a hard cause: broken, never exact); where they coincide it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eqlab.analyses.discover.norms import _replay

_ADD = {"add", "__add__", "__radd__", "add_"}
HEAD_AXIS = -3   # scores (batch..., heads, queries, keys)


@dataclass
class ScoreBiases:
    learned: list = field(default_factory=list)   # [(param, axis, column of P read by each head)]
    fixed: list = field(default_factory=list)     # [tensor broadcast to the scores' shape]
    problems: list = field(default_factory=list)  # why a learned bias's head columns could not be read


def _path_adds(graph, t, sm):
    """The (add op, other operand, scores there) on the single-consumer path from t to the softmax op."""
    out = []
    for _ in range(12):
        cons = graph.consumers(t)
        if len(cons) != 1:
            break
        op, pos = cons[0]
        if op is sm:
            break
        if op.name in _ADD:
            out += [(op, op.leaves[p], t) for p in op.tensor_positions() if p != pos and op.leaves[p].numel() > 1]
        t = op.outputs[0]
    return out


def _subgraph(graph, param, target):
    """The ops (in order) on a path from the parameter tensor to ``target``."""
    anc = graph.ancestors(target)
    dep, ops = {id(param)}, []
    for op in graph.ops:
        ins = [id(op.leaves[p]) for p in op.tensor_positions()]
        if any(i in dep for i in ins) and any(id(o) in anc for o in op.outputs):
            ops.append(op)
            dep |= {id(o) for o in op.outputs}
    return ops


def _head_columns(graph, param, bias, scores_shape):
    """(axis of P, the column of P each head reads) for a learned score bias, or (None, why)."""
    ops = _subgraph(graph, param, bias)
    heads = scores_shape[HEAD_AXIS]
    try:
        with torch.no_grad():
            base = _replay(ops, param, torch.zeros_like(param))[id(bias)]
            labelled = []
            for axis in range(param.dim()):
                shape = [1] * param.dim()
                shape[axis] = -1
                lab = torch.arange(1, param.shape[axis] + 1, dtype=param.dtype).reshape(shape).expand(param.shape)
                labelled.append(_replay(ops, param, lab.contiguous())[id(bias)])
    except Exception as e:  # noqa: BLE001 - an op we cannot replay: we cannot vouch for the columns
        return None, f"the bias cannot be replayed from {graph.param(param)} ({type(e).__name__})"
    base = base.expand(scores_shape).movedim(HEAD_AXIS, 0).reshape(heads, -1)
    ok = base.abs() < 1e30                      # positions a mask fills with -inf / finfo.min say nothing
    for axis, out in enumerate(labelled):
        d = out.expand(scores_shape).movedim(HEAD_AXIS, 0).reshape(heads, -1) - base
        cols = []
        for h in range(heads):
            v = d[h][ok[h]]
            if v.numel() == 0 or not torch.equal(v, v[:1].expand_as(v)) or float(v[0]) != round(float(v[0])):
                break
            cols.append(int(round(float(v[0]))) - 1)
        else:
            if len(set(cols)) == heads:
                return axis, cols
    return None, (f"no axis of {graph.param(param)} is read one column per head (the bias mixes table entries "
                  "across heads)")


def score_biases(graph, scores, sm) -> ScoreBiases:
    """The additive biases on the path from the score product's output ``scores`` to softmax ``sm``."""
    from eqlab.analyses.discover.norms import _param_dependent

    dep, out = _param_dependent(graph), ScoreBiases()
    if scores.dim() < 3:
        return out
    heads = scores.shape[HEAD_AXIS]
    for op, b, s in _path_adds(graph, scores, sm):
        if s.dim() < 3 or s.shape[HEAD_AXIS] != heads:
            out.problems.append(f"the scores are reshaped to {tuple(s.shape)} before a bias is added: "
                                "heads not on axis -3")
            continue
        try:
            bb = b.expand(s.shape)
        except RuntimeError:
            out.problems.append(f"a score bias of shape {tuple(b.shape)} does not broadcast to the scores")
            continue
        if id(b) not in dep:
            out.fixed.append(bb)
            continue
        params = [t for t in _param_tensors(graph, b)]
        for p in params:
            axis, cols = _head_columns(graph, p, b, tuple(s.shape))
            if axis is None:
                out.problems.append(cols)
            else:
                out.learned.append((graph.param(p), axis, cols))
    return out


def _param_tensors(graph, t):
    """The parameter tensors among t's ancestors."""
    seen, todo, out = set(), [t], []
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if graph.param(x) is not None:
            out.append(x)
            continue
        prod = graph.producer(x)
        if prod is not None:
            todo += [prod[0].leaves[p] for p in prod[0].tensor_positions()]
    return out


def differs(fixed: torch.Tensor, h1: int, h2: int) -> bool:
    """Whether heads h1, h2 get different fixed biases (exact comparison: a fixed term is not rounded by a
    transformation, so any difference is a real one)."""
    a, b = fixed.select(fixed.dim() + HEAD_AXIS, h1), fixed.select(fixed.dim() + HEAD_AXIS, h2)
    finite = (a.abs() < 1e30) & (b.abs() < 1e30)
    return not torch.equal(a[finite], b[finite])
