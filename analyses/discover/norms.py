"""Normalisations written as several torch ops (RMSNorm, ScaleNorm x/‖x‖, a hand-written LayerNorm),
recognised from what their ops *do*, not from a class or op name, and fused into one synthetic op that
the patterns already understand (``rms_norm`` or ``layer_norm``, with the native signatures).

A candidate region starts at a tensor x that a last-axis reduction (mean, sum, norm, var) reads through
parameter-free elementwise ops, and is the forward closure of x over parameter-free ops (every other input
a constant: no parameter among its ancestors). Its single exit y (shape of x) is then *probed* by replaying
the region: it is a row normaliser when it is (asymptotically, so that an eps does not hide it) positively
0-homogeneous, F(a·x) = F(b·x), and row-local; it is mean-free (a LayerNorm) when also F(x + c·1) = F(x).
Eps-like scalar constants added inside are kept as the op's eps (the patterns name it as what breaks the
scale invariance). A following multiply / add by a per-feature parameter becomes the op's gain / bias.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from eqlab.analyses.discover.ops import ELEMENTWISE_MATH

_REDUCE = {"mean", "sum", "norm", "vector_norm", "linalg_vector_norm", "var", "std"}
_CAST = {"to", "type", "float", "double"}
_MUL = {"mul", "__mul__", "__rmul__"}
_ADD = {"add", "__add__", "__radd__"}
MAX_REGION = 32


def _param_dependent(graph) -> set[int]:
    dep = set()
    for op in graph.ops:
        if any(graph.param(op.leaves[p]) or id(op.leaves[p]) in dep for p in op.tensor_positions()):
            dep |= {id(o) for o in op.outputs}
    return dep


def _roots(graph, t, dep):
    """The tensors met walking back from a reduction's input through single-data-input, same-shape
    elementwise ops, farthest first (the region may have to start before the farthest one's consumers
    fan out: Gemma's scaled embeddings feed both the first norm and the residual, so its norm starts at its
    own cast of them)."""
    path = [t]
    while True:
        prod = graph.producer(t)
        if prod is None:
            return path[::-1]
        op = prod[0]
        data = [op.leaves[p] for p in op.tensor_positions() if id(op.leaves[p]) in dep or graph.param(op.leaves[p])]
        if op.name not in ELEMENTWISE_MATH | _CAST or graph.has_param_input(op) or len(data) != 1 \
                or data[0].shape != t.shape:
            return path[::-1]
        t = data[0]
        path.append(t)


def _aliases(op):
    """``x.to(its own dtype)`` returns x itself: not dataflow (the Graph ignores it too)."""
    ins = {id(op.leaves[p]) for p in op.tensor_positions()}
    return any(id(o) in ins for o in op.outputs)


def _region(graph, x, dep):
    """Ops (index order) of the parameter-free forward closure of x, or None when it grows too large."""
    inside, ops, changed = {id(x)}, {}, True
    while changed:
        changed = False
        for op in graph.ops:
            if id(op) in ops or graph.has_param_input(op) or _aliases(op):
                continue
            ins = [op.leaves[p] for p in op.tensor_positions()]
            if any(id(i) in inside for i in ins) and all(id(i) in inside or id(i) not in dep for i in ins):
                ops[id(op)] = op
                inside |= {id(o) for o in op.outputs}
                changed = True
                if len(ops) > MAX_REGION:
                    return None
    return sorted(ops.values(), key=lambda o: o.index)


def _replay(ops, x, value):
    env = {id(x): value}
    for op in ops:
        leaves = [env.get(id(v), v) if torch.is_tensor(v) else v for v in op.leaves]
        args, kwargs = tree_unflatten(leaves, op.spec)
        outs = [o for o in tree_flatten(op.func(*args, **kwargs))[0] if torch.is_tensor(o)]
        for o, r in zip(op.outputs, outs):
            env[id(o)] = r
    return env


def _close(a, b, tol):
    return float((a - b).abs().max()) <= tol * max(float(a.abs().max()), float(b.abs().max()), 1e-30)


def _probe(ops, x, y):
    """(is a row normaliser, is mean-free), from replays of the region on scaled / shifted / perturbed x."""
    x0 = x.detach()
    tol = 1e-4 if x0.dtype == torch.float64 else 1e-3
    F = lambda v: _replay(ops, x, v)[id(y)]  # noqa: E731
    try:
        if not _close(F(x0), y, tol):
            return False, False
        big = 1e4 / max(float(x0.abs().max()), 1e-30)   # far out, where an eps no longer matters
        ya, yb = F(big * x0), F(3 * big * x0)
        if not _close(ya, yb, tol) or _close(ya, F(-big * x0), tol):
            return False, False                          # not 0-homogeneous (or even: |x|-like)
        rows = x0.reshape(-1, x0.shape[-1])
        if rows.shape[0] > 1:                             # row-local: perturbing row 0 leaves the others
            pert = rows.clone()
            pert[0] = pert[0] * 2 + 1
            yp = F(pert.reshape(x0.shape)).reshape(rows.shape)
            if not _close(yp[1:], F(x0).reshape(rows.shape)[1:], tol):
                return False, False
        shift = big * (x0 + 10 * x0.abs().max())
        return True, _close(F(shift), ya, tol)
    except Exception:  # noqa: BLE001 - a region we cannot replay is not vouched for
        return False, False


def _eps(ops):
    out = 0.0
    for op in ops:
        if op.name in _ADD | {"clamp", "clamp_min"}:
            out += sum(float(v) for v in op.leaves if isinstance(v, float))
    return out


def _param_operand(graph, op, t, shape):
    """The parameter ``op`` combines with t elementwise along the last axis (shape (D,)), or None."""
    P = op.tensor_positions()
    if len(P) != 2 or len(op.outputs) != 1 or op.outputs[0].shape != t.shape:
        return None
    other = [op.leaves[p] for p in P if op.leaves[p] is not t]
    if len(other) != 1 or graph.param(other[0]) is None or tuple(other[0].shape) != shape:
        return None
    return other[0]


def _fused_op(graph, ops, x, y, mean_free, eps):
    from eqlab.analyses.discover.graph import Op

    D = x.shape[-1]
    used, w, b, out = list(ops), None, None, y
    cons = graph.consumers(out)
    if len(cons) == 1 and cons[0][0].name in _MUL and (w := _param_operand(graph, cons[0][0], out, (D,))) is not None:
        used.append(cons[0][0])
        out = cons[0][0].outputs[0]
        cons = graph.consumers(out)
        if mean_free and len(cons) == 1 and cons[0][0].name in _ADD \
                and (b := _param_operand(graph, cons[0][0], out, (D,))) is not None:
            used.append(cons[0][0])
            out = cons[0][0].outputs[0]

    def func(input, normalized_shape, weight=None, *rest):
        bias = rest[0] if mean_free and rest else None
        z = _replay(ops, x, input)[id(y)]
        z = z * weight if weight is not None else z
        return z + bias if bias is not None else z

    args = (x, (D,), w, b, eps) if mean_free else (x, (D,), w, eps)
    leaves, spec = tree_flatten((args, {}))
    op = Op(ops[0].index, "layer_norm" if mean_free else "rms_norm", func, leaves, spec, [out])
    op.fused = [o.name for o in used]  # what it was written with (for reports)
    # a cast to a fixed dtype inside (HF's RMSNorm upcasts to float32) limits every float64 check through it
    # (traced in float32 such a cast is an alias the region skips: look at every cast of a region tensor)
    inside = {id(x)} | {id(t) for o in ops for t in o.outputs}
    casts = [o for o in graph.ops if o.name in _CAST and any(id(o.leaves[p]) in inside for p in o.tensor_positions())]
    low = {a for o in casts for a in o.leaves
           if isinstance(a, torch.dtype) and a.is_floating_point and torch.finfo(a).eps > 1e-15}
    op.precision = [f"the normalisation is computed in {str(a).replace('torch.', '')} whatever the model dtype: "
                    f"float64 checks through it are limited to ~{torch.finfo(a).eps:.0e}" for a in sorted(low, key=str)]
    return op, used


def fuse_norms(graph):
    """The graph's ops with every recognised normalisation region replaced by one synthetic op."""
    dep = _param_dependent(graph)
    replaced, fused = set(), []
    for r in graph.ops:
        if r.name not in _REDUCE or id(r) in replaced or graph.has_param_input(r):
            continue
        inp = r.leaves[r.tensor_positions()[0]]
        if inp.dim() < 1 or r.outputs[0].numel() * inp.shape[-1] != inp.numel():
            continue  # not a reduction over the last axis only
        for x in _roots(graph, inp, dep):   # the farthest root whose region has one exit
            ops = _region(graph, x, dep)
            if not ops or any(id(o) in replaced for o in ops):
                continue
            ids = {id(o) for o in ops}
            exits = [o for op in ops for o in op.outputs
                     if not graph.consumers(o) or any(id(c) not in ids for c, _ in graph.consumers(o))]
            if len(exits) == 1 and exits[0].shape == x.shape:
                break
        else:
            continue
        is_norm, mean_free = _probe(ops, x, exits[0])
        if not is_norm:
            continue
        op, used = _fused_op(graph, ops, x, exits[0], mean_free, _eps(ops))
        replaced |= {id(o) for o in used}
        fused.append(op)
    if not fused:
        return graph.ops
    return sorted([o for o in graph.ops if id(o) not in replaced] + fused, key=lambda o: o.index)
