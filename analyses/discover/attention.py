"""Attention heads: Q/K and V/O GL(d_head) per head, and the key-bias translation (catalog rows 1c, 6a, 7a).

Anchor: a matmul whose two inputs both come (through views, splits, transposes) from parameterised linear
maps, and whose output reaches a softmax over its last axis through parameter-free scalings and additive
masks: scores = Q Kᵀ. Q's features are the contracted axis; the remaining leading axes are (batch, head).
The V side: the matmul of that softmax's output with another projected tensor, whose features then flow
(through transposes/reshapes) into an output projection.
"""
from __future__ import annotations

from eqlab.analyses.discover.graph import Graph, axis_labels
from eqlab.analyses.discover.patterns import Candidate, _producer_affine, _shape, _short
from eqlab.analyses.discover.ops import affine, shared_caveats
from eqlab.analyses.transforms import GLFamily, TranslationFamily

_MASKING = {"add", "mul", "div", "__add__", "__mul__", "__truediv__", "masked_fill", "where", "type", "to"}


def _to_softmax(graph: Graph, t):
    """Follow t through scalings/masks (no parameters) to a softmax over the last axis."""
    for _ in range(8):
        cons = graph.consumers(t)
        if len(cons) != 1:
            return None
        op, pos = cons[0]
        if op.name == "softmax":
            dim = op.arg(1, "dim", -1)
            return op if dim % t.dim() == t.dim() - 1 else None
        if op.name not in _MASKING or graph.has_param_input(op):
            return None
        t = op.outputs[0]
    return None


def _precision_caveats(sm) -> list:
    """A softmax with a fixed ``dtype`` (``softmax(x, dtype=float32)`` in many eager attention
    implementations) is evaluated in that precision whatever the model's dtype: float64 checks of anything
    downstream are limited to it."""
    import torch

    dt = sm.arg(3, "dtype")
    if isinstance(dt, torch.dtype) and dt.is_floating_point and torch.finfo(dt).eps > torch.finfo(torch.float64).eps:
        return [f"attention softmax has a fixed dtype={str(dt).replace('torch.', '')}: float64 checks are "
                f"limited to ~{torch.finfo(dt).eps:.0e} relative"]
    return []


def axis_labels_nd(chain, origin_shape, axis):
    """Labels (origin index along ``axis``) of the chain's end as a full tensor, or None when mixed."""
    import torch

    from eqlab.analyses.discover.graph import propagate

    n = origin_shape[axis]
    vec = torch.arange(n, dtype=torch.float64)
    shape = [1] * len(origin_shape)
    shape[axis] = n
    try:
        out = propagate(chain, vec.reshape(shape).expand(*origin_shape).contiguous())
    except Exception:  # noqa: BLE001
        return None
    if not torch.equal(out, torch.round(out)):
        return None
    return out.long()


def _per_head(lab, feat_axis):
    """lab (batch, head..., token, feat) with feat at ``feat_axis`` -> list of per-head feature lists,
    requiring labels constant over batch and token axes."""
    lab = lab.movedim(feat_axis, -1)          # (..., feat) with the token axis now at -2
    if lab.dim() < 3:
        return None
    lab = lab.movedim(-2, 0)                  # (token, batch, heads..., feat)
    if not bool((lab == lab[:1]).all()):
        return None
    lab = lab[0]                              # (batch, heads..., feat)
    if not bool((lab == lab[:1]).all()):
        return None
    lab = lab[0].reshape(-1, lab.shape[-1])   # (heads, feat)
    return [row.tolist() for row in lab]


def _groups_by(heads):
    """[(features, [head indices reading exactly them])] in first-seen order."""
    out: dict[tuple, list] = {}
    for h, f in enumerate(heads):
        out.setdefault(tuple(f), []).append(h)
    return [(list(f), hs) for f, hs in out.items()]


def _rotary_qk(graph: Graph, q, kt, sm):
    """Q/K through a measured linear region: the commutant family (and the full GL it breaks)."""
    import torch

    from eqlab.analyses.discover import commutant as cm
    from eqlab.analyses.transforms import SubGLFamily

    aq, rq = cm.linear_origin(graph, q)
    ak, rk = cm.linear_origin(graph, kt)
    if aq is None or ak is None:
        return None
    Jq, Jk = cm.feature_maps(aq, rq, q), cm.feature_maps(ak, rk, kt, transpose=True)
    if Jq is None or Jk is None or Jq.shape[2] != Jk.shape[2]:
        return None
    sq, sk = cm.head_supports(Jq), cm.head_supports(Jk)
    m = len(sq[0])
    if any(len(x) != m for x in sq + sk):
        return None
    blocks, basis, moving = [], None, False
    for hk, hs in _groups_by(sk):
        As = []
        for h in hs:
            Lq, Lk = Jq[sq[h]][:, :, h], Jk[hk][:, :, h]                 # (m, B, T, d)
            A = torch.einsum("ibtd,jbsd->btsij", Lq, Lk).reshape(-1, m, m)
            As.append(A)
            moving |= bool((A - A[:1]).abs().max() > 1e-12 * A.abs().max())
        b_ = cm.pair_basis(torch.cat(As), m)
        if basis is not None and b_ != basis:
            return None  # different heads keep different subalgebras: not one family (not seen yet)
        basis = b_
        b = []
        for h in hs:
            b += [[aq.weight, aq.w_out, sq[h], "M"]] + ([[aq.bias, 0, sq[h], "M"]] if aq.bias else [])
        b += [[ak.weight, ak.w_out, hk, "-MT"]] + ([[ak.bias, 0, hk, "-MT"]] if ak.bias else [])
        blocks.append(b)
    cav = shared_caveats(graph, aq) + (shared_caveats(graph, ak) if ak.op is not aq.op else [])
    cav += _precision_caveats(sm)
    where, out = _short(aq.weight), []
    if cm.is_plain_gl(basis, m):
        out.append(Candidate(GLFamily(f"qk_gl[{where}]", "qk_gl", blocks), cav))
    else:
        if basis:
            out.append(Candidate(SubGLFamily(f"qk_commutant[{where}]", "qk_commutant", blocks, basis), cav))
        why = ("rotary embedding: the queries and keys pass through position-dependent linear maps before "
               f"the scores, which keep only their commutant ({len(basis)} of {m * m} generators per head)"
               if moving else "a linear map between the projections and the scores keeps only "
               f"{len(basis)} of {m * m} generators per head")
        out.append(Candidate(GLFamily(f"qk_gl[{where}]", "qk_gl", blocks), cav + [why]))
    return out, (aq, ak, sq, sk)


def attention_groups(graph: Graph) -> list:
    out = []
    for op in graph.ops_named("matmul"):
        P = op.tensor_positions()
        if len(P) != 2:
            continue
        q, kt = op.leaves[P[0]], op.leaves[P[1]]
        if q.dim() < 3 or graph.param(q) or graph.param(kt):
            continue
        sm = _to_softmax(graph, op.outputs[0])
        if sm is None:
            continue
        aq, cq = _producer_affine(graph, q)
        ak, ck = _producer_affine(graph, kt)
        if aq is None or ak is None or aq.w_out is None or ak.w_out is None:
            found = _rotary_qk(graph, q, kt, sm)   # a linear but position-dependent region (RoPE)
            if found is None:
                continue
            cands, (aq, ak, heads_q, heads_k) = found
            out += cands
        else:
            lq, lk = axis_labels_nd(cq, tuple(aq.op.outputs[0].shape), -1), \
                axis_labels_nd(ck, tuple(ak.op.outputs[0].shape), -1)
            if lq is None or lk is None:
                continue
            heads_q = _per_head(lq, -1)           # q: (..., Tq, d): features last, tokens second to last
            heads_k = _per_head(lk.transpose(-1, -2), -1)  # kᵀ: (..., d, Tk)
            if not heads_q or not heads_k or len(heads_q) != len(heads_k):
                continue
            cav = shared_caveats(graph, aq) + (shared_caveats(graph, ak) if ak.op is not aq.op else [])
            cav += _precision_caveats(sm)
            blocks = []
            for hk, hs in _groups_by(heads_k):   # query heads sharing a key head share one M (GQA)
                b = []
                for h in hs:
                    b += [[aq.weight, aq.w_out, heads_q[h], "M"]] + ([[aq.bias, 0, heads_q[h], "M"]] if aq.bias else [])
                b += [[ak.weight, ak.w_out, hk, "-MT"]] + ([[ak.bias, 0, hk, "-MT"]] if ak.bias else [])
                blocks.append(b)
            where = _short(aq.weight)
            out.append(Candidate(GLFamily(f"qk_gl[{where}]", "qk_gl", blocks), cav))
            if ak.bias is not None:  # adding δ to the key bias shifts every score of a query by q·δ
                cols = sorted({c for h in heads_k for c in h})
                tf = TranslationFamily(f"key_bias_translation[{_short(ak.bias)}]", "key_bias_translation",
                                       [[ak.bias, 0, cols, "free"]], {ak.bias: list(_shape(graph, ak.bias))})
                out.append(Candidate(tf, _precision_caveats(sm)))
        vo = _value_output(graph, sm, heads_q)
        if vo is not None:
            out.append(vo)
            out += _head_swap(graph, (aq, ak) + vo.heads, heads_q, heads_k)
    return out


def _value_output(graph: Graph, sm, heads_q):
    """P = softmax(...) -> (dropout, casts) -> P @ V -> (transposes, reshapes) -> output projection."""
    t = sm.outputs[0]
    for _ in range(6):
        cons = graph.consumers(t)
        if len(cons) != 1:
            return None
        op, pos = cons[0]
        if op.name == "matmul":
            break
        if op.name not in ("dropout", "type", "to") :
            return None
        t = op.outputs[0]
    else:
        return None
    P = op.tensor_positions()
    if pos != P[0] or len(P) != 2:
        return None
    v = op.leaves[P[1]]
    av, cv = _producer_affine(graph, v)
    if av is None:
        return None
    lv = axis_labels_nd(cv, tuple(av.op.outputs[0].shape), -1)
    if lv is None:
        return None
    heads_v = _per_head(lv, -1)
    if not heads_v:
        return None
    # P @ V keeps V's feature axis: follow the matmul output with V's labels attached.
    o = op.outputs[0]
    end, chain, cons = graph.walk_forward(o, pooling=False)
    if len(cons) != 1:
        return None
    ao = affine(graph, cons[0][0])
    if ao is None or ao.kind != "linear" or ao.data is not end:
        return None
    import torch

    from eqlab.analyses.discover.graph import propagate

    n_flat = o.shape[-1]
    # label o's entries by the V feature they carry: heads from the batch/head axes, features from the last
    lab = torch.empty(o.shape, dtype=torch.float64)
    hv = torch.tensor(heads_v, dtype=torch.float64)        # (heads, d)
    lab[...] = hv.reshape(*([1] * (o.dim() - 3)), *o.shape[-3:-2], 1, n_flat) if o.dim() >= 3 else hv
    try:
        lo = propagate(chain, lab)
    except Exception:  # noqa: BLE001
        return None
    lo = lo.movedim(ao.in_axis, -1).reshape(-1, lo.shape[ao.in_axis])
    if not bool((lo == lo[:1]).all()):
        return None
    rows = lo[0].long().tolist()                            # consumer input feature j carries V feature rows[j]
    blocks = []
    # o_proj input position j carries (query head j // d, V feature rows[j]): with grouped-query attention
    # several query heads read the same V head, so one M acts on that V head and on all of their O slices
    d = len(heads_v[0])
    for hv, hs in _groups_by(heads_v):
        b = [[av.weight, av.w_out, hv, "M"]] + ([[av.bias, 0, hv, "M"]] if av.bias else [])
        for h in hs:
            js = [h * d + hv.index(c) for c in hv] if len(rows) == len(heads_v) * d else None
            if js is None or any(rows[j] != c for j, c in zip(js, hv)):
                return None
            b.append([ao.weight, ao.w_in, js, "-MT"])
        blocks.append(b)
    cav = shared_caveats(graph, ao) + _precision_caveats(sm)
    c = Candidate(GLFamily(f"vo_gl[{_short(av.weight)}->{_short(ao.weight)}]", "vo_gl", blocks), cav)
    c.heads = (av, ao, heads_v, [[h * d + j for j in range(d)] for h in range(len(heads_v))])
    return c


def _head_swap(graph: Graph, affs, heads_q, heads_k):
    """Swap key/value head 0 with 1 together with the query heads reading them (pairwise, in order) and
    their output-projection slices; with a single key/value head, swap its first two query heads."""
    from eqlab.analyses.transforms import Permutation

    aq, ak, av, ao, heads_v, o_cols = affs
    groups = _groups_by(heads_k)
    if len(heads_v) != len(heads_q) or len(o_cols) != len(heads_q):
        return []
    if len(groups) >= 2 and len(groups[0][1]) == len(groups[1][1]):
        qpairs, kv = list(zip(groups[0][1], groups[1][1])), (groups[0][1][0], groups[1][1][0])
    elif len(groups[0][1]) >= 2:
        qpairs, kv = [tuple(groups[0][1][:2])], None
    else:
        return []
    perms = {}

    def swap(a, axis, f, g, bias=False):
        name = a.bias if bias else a.weight
        if name is None:
            return
        perm = perms.setdefault((name, axis), list(range(_shape(graph, name)[axis])))
        for x, y in zip(f, g):
            perm[x], perm[y] = perm[y], perm[x]

    for h1, h2 in qpairs:
        for bias in (False, True):
            swap(aq, 0 if bias else aq.w_out, heads_q[h1], heads_q[h2], bias)
        swap(ao, ao.w_in, o_cols[h1], o_cols[h2])
    if kv is not None:
        g1, g2 = kv
        for a, hs in ((ak, heads_k), (av, heads_v)):
            for bias in (False, True):
                swap(a, 0 if bias else a.w_out, hs[g1], hs[g2], bias)
    terms = [[n, d, p] for (n, d), p in perms.items()]
    what = "kv heads 0<->1" if kv is not None else f"query heads {qpairs[0][0]}<->{qpairs[0][1]}"
    return [Candidate(Permutation(f"head_permutation[{_short(ao.weight)}]({what})", "head_permutation", terms), [])]
