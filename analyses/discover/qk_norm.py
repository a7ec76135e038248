"""Attention whose queries/keys are normalised per head (Qwen3, OLMo-style QK norm) before the scores.

q = R(w_q ⊙ n(x W_qᵀ)), k = R'(w_k ⊙ n(x W_kᵀ)) with n a per-row RMS/Layer norm and R, R' the parameter-free
(rotary) region up to the scores. A GL(d_head) change of basis of the projections does not pass the norm's
gain, but a *diagonal* one of the gains does, when it commutes with the region: scale the q gain on a set
of dims by e^s and the k gain on the dims they meet in the scores by e^{-s}. The sets are the connected
components of the bipartite graph "q dim i meets k dim j in some score" — measured by replaying the region
on one-hot inputs (one pass per head dim), so a rotary pair (i, i + d/2) is one set and a non-rotary dim its
own. Also read here: which projection rows form each head (for the head permutation).
"""
from __future__ import annotations

import torch

from eqlab.analyses.discover.commutant import one_hot_responses
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.norms import _aliases, _param_dependent, _replay
from eqlab.analyses.discover.patterns import Candidate, _producer_affine, _short
from eqlab.analyses.transforms import ScaleFamily

_NORMS = ("rms_norm", "layer_norm")


def norm_origin(graph, t):
    """(norm op, region ops from its output to t) when t is reached from exactly one per-row norm through
    parameter-free ops; else (None, why)."""
    dep = _param_dependent(graph)
    norms, ops, todo, seen = {}, {}, [t], set()
    while todo:
        u = todo.pop()
        if id(u) in seen or id(u) not in dep:
            continue
        seen.add(id(u))
        prod = graph.producer(u)
        if prod is None:
            return None, "a parameter-dependent tensor without a producer"
        op = prod[0]
        if op.name in _NORMS and op.outputs[0] is u:
            norms[id(op)] = op
            continue
        if graph.has_param_input(op) or _aliases(op):
            return None, f"{op.name} with a parameter sits between the projection and the scores"
        ops[id(op)] = op
        todo += [op.leaves[p] for p in op.tensor_positions()]
    if len(norms) != 1:
        return None, f"{len(norms)} normalisations reach the scores, not one"
    return next(iter(norms.values())), sorted(ops.values(), key=lambda o: o.index)


def projection_heads(graph, norm):
    """(projection Affine, [rows of head h]) for the per-row norm ``norm`` fed by a linear map through views:
    the norm acts row by row, so each row (one head at one token) keeps its projection rows."""
    from eqlab.analyses.discover.attention import axis_labels_nd

    x = norm.leaves[norm.tensor_positions()[0]]
    a, chain = _producer_affine(graph, x)
    if a is None:
        return None, None
    lab = axis_labels_nd(chain, tuple(a.op.outputs[0].shape), -1)
    if lab is None or lab.shape[-1] != x.shape[-1]:
        return None, None
    heads, seen = [], set()
    for row in lab.reshape(-1, lab.shape[-1]).tolist():
        if tuple(row) not in seen:
            seen.add(tuple(row))
            heads.append(row)
    if sorted(c for h in heads for c in h) != sorted(set(c for h in heads for c in h)):
        return None, None  # heads overlap: not a partition of the projection rows
    return a, heads


def _maps(norm, ops, t, transpose):
    """J[i] = the region's end (as (B, H, T, d)) for the norm output one-hot on dim i; None if not linear."""
    o = norm.outputs[0]
    end = lambda v: (lambda y: y.transpose(-1, -2) if transpose else y)(_replay(ops, o, v)[id(t)])  # noqa: E731
    try:
        J = one_hot_responses(end, o).double()
        x = torch.randn_like(o)
        got = end(x).double()
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
        return None
    if J.dim() != 5:
        return None
    # linear and local in the normalised entry: the sum of one-hot responses weighted by x reproduces end(x)
    # when x is constant along the other axes; for a general x check superposition over the dims instead
    pred = sum(end(x * (torch.arange(o.shape[-1]) == i).to(x)).double() for i in range(o.shape[-1]))
    scale = max(float(got.abs().max()), 1e-300)
    # replaying the same float ops in a different grouping: agreement to a few ulps of the largest entry
    if float((pred - got).abs().max()) > 64 * torch.finfo(o.dtype).eps * scale * o.shape[-1]:
        return None
    return J


def _components(C):
    """Connected components of the bipartite graph with edges C[i, j] != 0: [(q dims, k dims)]."""
    m, n = C.shape
    parent = list(range(m + n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in torch.nonzero(C).tolist():
        parent[find(i)] = find(m + j)
    comps: dict[int, tuple[list, list]] = {}
    for v in range(m + n):
        qs, ks = comps.setdefault(find(v), ([], []))
        (qs if v < m else ks).append(v if v < m else v - m)
    return [c for c in comps.values() if c[0] and c[1]]


def qk_norm_candidates(graph, q, kt, sm) -> list:
    """The gain rescale between a q norm and a k norm, or [] with the reason recorded."""
    site = f"attention scores at op {sm.index}"
    nq, rq = norm_origin(graph, q)
    nk, rk = norm_origin(graph, kt)
    if nq is None or nk is None:
        return reject(site, "qk_norm_gain_rescale", f"Q/K: {rq if nq is None else rk}") or []
    out = _head_scales(graph, nq) + _head_scales(graph, nk)
    wq, wk = graph.param(nq.arg(2, "weight")), graph.param(nk.arg(2, "weight"))
    if wq is None or wk is None or nq is nk:
        return reject(site, "qk_norm_gain_rescale", "Q/K: the query and key norms do not both have their own gain") or []
    Jq, Jk = _maps(nq, rq, q, False), _maps(nk, rk, kt, True)
    if Jq is None or Jk is None or Jq.shape[1:4] != Jk.shape[1:4] or Jq.shape[-1] != Jk.shape[-1]:
        return reject(site, "qk_norm_gain_rescale", "Q/K: the region after the norms is not linear, or the query "
                      "and key ends do not line up head by head") or []
    # |Σ_d Jq[i, b, h, t, d] Jk[j, b, h, s, d]| summed over b, h, t, s: does q dim i ever meet k dim j
    C = torch.einsum("ibhtd,jbhsd->bhtsij", Jq, Jk).abs().sum((0, 1, 2, 3))
    C = torch.where(C > 1e-9 * float(C.max()), C, torch.zeros_like(C))  # replay roundoff of exact zeros
    comps = _components(C)
    gens = [[[wq, 0, qs, 1.0], [wk, 0, ks, -1.0]] for qs, ks in comps]
    if not gens:
        return reject(site, "qk_norm_gain_rescale", "Q/K: no q dim meets a k dim") or out
    return out + [Candidate(ScaleFamily(f"qk_norm_gain_rescale[{_short(wq)}/{_short(wk)}]", "qk_norm_gain_rescale",
                                        gens), [])]


def _head_scales(graph, norm) -> list:
    """The norm divides each head's row by its own rms: each head's projection rows (and bias) scale on their
    own — exact for eps = 0, approximate by eps/mean(x²) otherwise (the cause carries the predicted size)."""
    from eqlab.analyses.discover.algebra import eps_cause
    from eqlab.analyses.discover.ops import shared_caveats

    a, heads = projection_heads(graph, norm)
    if a is None or len(heads) < 2:
        return []
    gens = [[[a.weight, a.w_out, rows, 1.0]] + ([[a.bias, 0, rows, 1.0]] if a.bias else []) for rows in heads]
    eps = norm.arg(4, "eps", 1e-5) if norm.name == "layer_norm" else norm.arg(3, "eps", None)
    cav = shared_caveats(graph, a)
    if eps:
        cav.append(eps_cause(norm, f"{norm.name} eps={float(eps):g}: each head's scale invariance is broken by "
                                   "~eps/mean(head²)"))
    cav += getattr(norm, "precision", [])
    return [Candidate(ScaleFamily(f"qk_norm_head_scale[{_short(a.weight)}]", "qk_norm_head_scale", gens), cav)]
