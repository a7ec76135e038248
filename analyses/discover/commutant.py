"""Queries/keys that reach the scores through position-dependent linear maps (a rotary embedding, or any
other parameter-free linear region): the maps are *measured* by replaying the region, and the Q/K
symmetries are the solutions of a linear system instead of being assumed to be all of GL(d).

q_in[b,h,t] = x_q[b,t,S_h]·Lq[b,h,t] and k_in[b,h,s] = x_k[b,s,S'_h]·Lk[b,h,s], so the scores are
x_q·A·x_kᵀ with A = Lq[b,h,t]·Lk[b,h,s]ᵀ. A pair (M, N) acting as x_q ↦ x_q·e^{sM}, x_k ↦ x_k·e^{sN}
keeps every score iff M A + A Nᵀ = 0 for every A: the null space of that system, with one (M, N) shared
by the query heads reading the same key head (grouped-query attention). Without position dependence
(A = I) it is {N = −Mᵀ}, plain GL(d); a rotary embedding leaves the commutant of its rotations.
"""
from __future__ import annotations

import torch

from eqlab.analyses.discover.norms import _aliases, _param_dependent, _replay
from eqlab.analyses.discover.ops import affine


def linear_origin(graph, t):
    """(Affine producing the only parameter-dependent input of the region ending at t, region ops), or
    (None, None). The region: t's backward closure over parameter-free ops, constants allowed."""
    dep = _param_dependent(graph)
    origins, ops, todo, seen = {}, {}, [t], set()
    while todo:
        u = todo.pop()
        if id(u) in seen or id(u) not in dep:
            continue
        seen.add(id(u))
        prod = graph.producer(u)
        if prod is None:
            return None, None
        op = prod[0]
        a = affine(graph, op)
        if a is not None and a.kind == "linear" and op.outputs[0] is u:
            origins[id(u)] = a
            continue
        if graph.has_param_input(op) or _aliases(op):
            return None, None
        ops[id(op)] = op
        todo += [op.leaves[p] for p in op.tensor_positions()]
    if len(origins) != 1 or not ops:
        return None, None
    return next(iter(origins.values())), sorted(ops.values(), key=lambda o: o.index)


_REPLAY_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)


def one_hot_responses(end, o):
    """torch.stack([end(e_i) for i]) with e_i = o's shape, 1 at feature i of every row: one vmapped replay
    of the region (its cost independent of the width), or — when an op in it cannot be vmapped — one
    replay per feature."""
    n = o.shape[-1]
    eye = torch.eye(n, dtype=o.dtype).reshape(n, *([1] * (o.dim() - 1)), n).expand(n, *o.shape).contiguous()
    try:
        return torch.func.vmap(end)(eye)
    except _REPLAY_ERRORS:
        return torch.stack([end(eye[i]) for i in range(n)])


def feature_maps(a, ops, t, transpose=False):
    """J[i, b, h, t, :] = what origin feature i (set to 1 at every token) becomes at the region's end,
    as float64; None unless the region is linear and token-local (checked on a random origin)."""
    o = a.op.outputs[0]
    if o.dim() != 3:
        return None
    end = lambda v: (lambda y: y.transpose(-1, -2) if transpose else y)(_replay(ops, o, v)[id(t)])  # noqa: E731
    try:
        J = one_hot_responses(end, o).double()                       # (n, B, H, T, d)
        if J.dim() != 5:
            return None
        x = torch.randn_like(o)
        pred = torch.einsum("bti,ibhtd->bhtd", x.double(), J)
        got = end(x).double()
    except _REPLAY_ERRORS:  # a region we cannot replay is not vouched for
        return None
    tol = 1e-5 if o.dtype == torch.float32 else 1e-10
    if float((pred - got).abs().max()) > tol * max(float(got.abs().max()), 1e-30):
        return None
    return J


def head_supports(J):
    """Per head: the origin features it reads (sorted), from where J is nonzero."""
    nz = J.abs().amax(dim=(1, 3, 4)) > 1e-12 * float(J.abs().max())  # (n, H)
    return [torch.nonzero(nz[:, h]).flatten().tolist() for h in range(nz.shape[1])]


def _rref(R, tol=1e-9):
    R = R.clone()
    rows, cols = R.shape
    r = 0
    for c in range(cols):
        if r == rows:
            break
        p = int(torch.argmax(R[r:, c].abs())) + r
        if R[p, c].abs() < tol:
            continue
        R[[r, p]] = R[[p, r]]
        R[r] /= R[r, c].clone()
        for i in range(rows):
            if i != r:
                R[i] -= R[i, c] * R[r]
        r += 1
    return R[:r]


def _snap(R):
    """Solver roundoff off a structured basis: tiny entries to 0, near-integers to integers."""
    R = torch.where(R.abs() < 1e-9, torch.zeros_like(R), R)
    near = (R - R.round()).abs() < 1e-9
    return torch.where(near, R.round(), R)


def pair_basis(As, m):
    """Basis of {(M, N): M A + A Nᵀ = 0 ∀ A ∈ As} (As: (K, m, m) float64) as sparse [mode, i, j, v] lists."""
    # the condition is linear in A: the ≤ m² matrices s_i·v_i of span(As)'s SVD (however many tokens and
    # examples gave As) stack to a C with the same singular values and null space, since As = U·(S·Vh) with
    # U orthonormal; each keeps its weight s_i (a unit v_i of a weak direction would carry SVD noise of
    # ~u/s_i into the constraints). Directions under 1e-12 of the largest are the noise floor.
    flat = As.reshape(As.shape[0], -1)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = s > 1e-12 * float(s.max())
    As = (s[keep, None] * vh[keep]).reshape(-1, m, m)
    cols = []
    for k in range(2 * m * m):
        x = torch.zeros(2 * m * m, dtype=torch.float64)
        x[k] = 1
        M, N = x[:m * m].reshape(m, m), x[m * m:].reshape(m, m)
        cols.append((M @ As + As @ N.T).reshape(-1))
    C = torch.stack(cols, 1)
    C = C / C.abs().max()
    # only V is needed: with at least as many rows as unknowns the thin SVD has all of it (the full one
    # would build a rows x rows U — B·T²·m² squared — which is what made this slow)
    _, S, Vh = torch.linalg.svd(C, full_matrices=C.shape[0] < C.shape[1])
    S = torch.cat([S, torch.zeros(Vh.shape[0] - S.numel(), dtype=S.dtype)])
    null = Vh[S < 1e-9 * float(S.max())]
    if null.numel() == 0:
        return []
    R = _rref(null)
    snapped = _snap(R)
    if float((C @ snapped.T).abs().max()) < 1e-10:
        R = snapped
    out = []
    for row in R:
        e = []
        for k in torch.nonzero(row).flatten().tolist():
            mode, kk = ("M", k) if k < m * m else ("N", k - m * m)
            e.append([mode, kk // m, kk % m, float(row[k])])
        out.append(e)
    return out


def is_plain_gl(basis, m):
    """The basis spans {(M, −Mᵀ)}: all of GL(m), nothing lost."""
    return len(basis) == m * m and all(
        any(x[0] == "N" and x[1] == j and x[2] == i and x[3] == -v for x in e)
        for e in basis for mode, i, j, v in e if mode == "M")
