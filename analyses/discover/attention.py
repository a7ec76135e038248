"""Attention heads: Q/K and V/O GL(d_head) per head, and the key-bias translation (catalog rows 1c, 6a, 7a).

Anchor: a matmul whose two inputs both come (through views, splits, transposes) from parameterised linear
maps, and whose output reaches a softmax over its last axis through parameter-free scalings and additive
masks: scores = Q Kᵀ. Q's features are the contracted axis; the remaining leading axes are (batch, head).
The V side: the matmul of that softmax's output with another projected tensor, whose features then flow
(through transposes/reshapes) into an output projection.
"""
from __future__ import annotations

from eqlab.analyses.discover import score_bias
from eqlab.analyses.discover.algebra import Cause
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph
from eqlab.analyses.discover.patterns import Candidate, _producer_affine, _shape, _short
from eqlab.analyses.discover.ops import affine, shared_caveats
from eqlab.analyses.transforms import GLFamily, Permutation, TranslationFamily

_MASKING = {"add", "mul", "div", "__add__", "__mul__", "__truediv__", "masked_fill", "where", "type", "to"}


_SOFTCAP = {"tanh"}   # parameter-free elementwise maps of the scores (Gemma 2's softcap c·tanh(s/c))


def _to_softmax(graph: Graph, t):
    """Follow t through scalings/masks and parameter-free softcaps to a softmax over the last axis:
    (softmax op, why not, names of the nonlinear maps passed) — (None, why not, []) when there is none."""
    passed = []
    for _ in range(12):
        cons = graph.consumers(t)
        if len(cons) != 1:
            return None, f"the product is read by {len(cons)} ops, not one softmax path", []
        op, pos = cons[0]
        if op.name == "softmax":
            dim = op.arg(1, "dim", -1)
            if dim % t.dim() != t.dim() - 1:
                return None, "the softmax is not over the key axis", []
            return op, "", passed
        if op.name in ("view", "reshape") and pos == op.tensor_positions()[0] and \
                op.outputs[0].shape[-1] == t.shape[-1] and op.outputs[0].dim() == t.dim():
            pass   # Falcon views (batch, heads, q, k) scores as what they already are: keys stay last
        elif op.name in _SOFTCAP and not graph.has_param_input(op):
            passed.append(op.name)   # keeps whatever keeps every q·k; a per-query score shift it does not
        elif op.name not in _MASKING or graph.has_param_input(op):
            return None, (f"between the scores and a softmax sits {op.name}"
                          + (" with a parameter (a learned score bias or softcap)" if graph.has_param_input(op) else
                             ", which is not a scaling, additive mask or softcap")), []
        t = op.outputs[0]
    return None, "no softmax within 12 ops of the product", []


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
    except (RuntimeError, ValueError, IndexError, TypeError):  # an op that cannot be replayed on labels
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

    site = f"attention scores at op {sm.index}"
    aq, rq = cm.linear_origin(graph, q)
    ak, rk = cm.linear_origin(graph, kt)
    if aq is None or ak is None:
        return reject(site, "qk_gl", "Q/K: the queries or keys are not a projection followed by parameter-free "
                      "ops (e.g. a per-head QK norm with a gain sits in between)")
    Jq, Jk = cm.feature_maps(aq, rq, q), cm.feature_maps(ak, rk, kt, transpose=True)
    if Jq is not None and Jk is not None and Jk.shape[2] == 1 < Jq.shape[2]:
        Jk = Jk.expand(-1, -1, Jq.shape[2], -1, -1)   # multi-query: the score matmul broadcasts one K head
    if Jq is None or Jk is None or Jq.shape[2] != Jk.shape[2]:
        return reject(site, "qk_gl", "Q/K: the region between the projections and the scores is not linear and "
                      "token-local, or query and key head counts differ")
    sq, sk = cm.head_supports(Jq), cm.head_supports(Jk)
    m = len(sq[0])
    if any(len(x) != m for x in sq + sk):
        return reject(site, "qk_gl", "Q/K: heads read different numbers of projection features")
    blocks, basis, moving = [], None, False
    for hk, hs in _groups_by(sk):
        As = []
        for h in hs:
            Lq, Lk = Jq[sq[h]][:, :, h], Jk[hk][:, :, h]                 # (m, B, T, d)
            A = torch.einsum("ibtd,jbsd->btsij", Lq, Lk).reshape(-1, m, m)
            As.append(A)
            moving |= bool((A - A[:1]).abs().max() > 1e-12 * A.abs().max())
        b_ = cm.pair_basis(torch.cat(As), m)
        if basis is not None and b_ != basis:  # not one family (not seen yet)
            return reject(site, "qk_commutant", "Q/K: different heads keep different subalgebras")
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
        # known by construction not to hold: a hard cause, so the full GL is a control next to its commutant
        out.append(Candidate(GLFamily(f"qk_gl[{where}]", "qk_gl", blocks), cav + [Cause(why, "rotary", soft=False)]))
    return out, (aq, ak, sq, sk)


def attention_groups(graph: Graph) -> list:
    """Q/K, V/O and head-permutation candidates of every attention block: each side is found on its own,
    so a Q/K path the finder cannot read (a QK norm) does not hide the V/O change of basis."""
    out, bias_readers, joint = [], _bias_readers(graph), {}
    for op in graph.ops_named("matmul"):
        P = op.tensor_positions()
        if len(P) != 2:
            continue
        q, kt = op.leaves[P[0]], op.leaves[P[1]]
        if q.dim() < 3 or graph.param(q) or graph.param(kt):
            continue
        sm, why, softcap = _to_softmax(graph, op.outputs[0])
        if sm is None:
            if graph.has_param_input(op) is False and _is_projected(graph, q) and _is_projected(graph, kt):
                reject(f"matmul at op {op.index}", "qk_gl", f"not read as attention scores: {why}")
            continue
        qk, heads_q, heads_k, aq, ak = _query_key(graph, op, q, kt, sm)
        if softcap:  # a key-bias translation shifts each query's scores by a constant: softmax-only
            cause = Cause(f"the scores pass {', '.join(softcap)} (a softcap) before the softmax: a per-query score "
                          "shift is not removed by it", "softcap", soft=False)
            for c in qk:
                if c.transformation.family == "key_bias_translation":
                    c.caveats.append(cause)
        out += qk
        vo = _value_output(graph, sm, heads_q)
        if vo is None:
            continue
        out.append(vo)
        if heads_q is None or aq is None:
            heads_q, heads_k, aq, ak = _heads_through_norms(graph, q, kt, vo)
        if heads_q is None:
            reject(f"attention scores at op {sm.index}", "head_permutation",
                   "the query/key head layout could not be read (labels do not pass the Q/K path)")
            continue
        biases = score_bias.score_biases(graph, op.outputs[0], sm)
        swaps = _head_swap(graph, (aq, ak) + vo.heads, heads_q, heads_k, biases, bias_readers)
        shared = tuple(sorted(n for n, _, _ in biases.learned if bias_readers.get(n, 1) > 1))
        if shared and swaps:
            joint.setdefault(shared, []).append(swaps[0])
        out += swaps
    return out + [c for names, cs in joint.items() if (c := _joint_swap(graph, names, cs)) is not None]


def _joint_swap(graph: Graph, tables, swaps):
    """One head permutation of every block that adds the same learned bias table (T5: the first block's
    relative-position bias, reused by all): the blocks' swaps together, the table's columns moved once."""
    perms, site = {}, f"score bias {', '.join(_short(t) for t in tables)}"
    for c in swaps:
        for name, axis, perm in c.transformation.terms:
            if perms.setdefault((name, axis), perm) != perm:
                return reject(site, "head_permutation", f"the blocks sharing the table swap different heads "
                              f"({_short(name)})")
    cav = [cv for c in swaps for cv in c.caveats if getattr(cv, "kind", "") != "shared"]
    terms = [[n, a, p] for (n, a), p in perms.items()]
    return Candidate(Permutation(f"head_permutation[{len(swaps)} blocks sharing {_short(tables[0])}]",
                                 "head_permutation", terms), cav)


def _bias_readers(graph: Graph) -> dict:
    """learned score-bias parameter -> how many attention blocks add it to their scores (T5 computes its
    relative-position bias in the first block and every later block reuses it)."""
    from eqlab.analyses.discover.norms import _param_dependent

    dep, count = _param_dependent(graph), {}
    for op in graph.ops_named("matmul"):
        P = op.tensor_positions()
        if len(P) != 2 or op.leaves[P[0]].dim() < 3 or graph.param(op.leaves[P[0]]) or graph.param(op.leaves[P[1]]):
            continue
        sm, _, _ = _to_softmax(graph, op.outputs[0])
        if sm is None:
            continue
        names = {graph.param(p) for _, b, _ in score_bias._path_adds(graph, op.outputs[0], sm) if id(b) in dep
                 for p in score_bias._param_tensors(graph, b)}
        for n in names:
            count[n] = count.get(n, 0) + 1
    return count


def _qk_norm(graph: Graph, q, kt, sm) -> list:
    from eqlab.analyses.discover.qk_norm import qk_norm_candidates

    return qk_norm_candidates(graph, q, kt, sm)


def _heads_through_norms(graph: Graph, q, kt, vo):
    """(query heads, key heads per query head, q Affine, k Affine) read at per-head QK norms' inputs; key
    heads are paired with query heads like the value heads are (the same repeat of KV heads: a wrong guess
    fails verification, it cannot pass it), or Nones."""
    from eqlab.analyses.discover.qk_norm import norm_origin, projection_heads

    nq, _ = norm_origin(graph, q)
    nk, _ = norm_origin(graph, kt)
    if nq is None or nk is None:
        return None, None, None, None
    aq, hq = projection_heads(graph, nq)
    ak, hk = projection_heads(graph, nk)
    heads_v = vo.heads[2]
    kv = [list(x) for x in dict.fromkeys(tuple(h) for h in heads_v)]
    if aq is None or ak is None or len(hq) != len(heads_v) or len(hk) != len(kv):
        return None, None, None, None
    return hq, [hk[kv.index(list(h))] for h in heads_v], aq, ak


def _is_projected(graph: Graph, t) -> bool:
    return _producer_affine(graph, t)[0] is not None


def _query_key(graph: Graph, op, q, kt, sm):
    """(Q/K candidates, query heads, key heads, q Affine, k Affine); heads None when not read."""
    site = f"attention scores at op {sm.index}"
    aq, cq = _producer_affine(graph, q)
    ak, ck = _producer_affine(graph, kt)
    lq = lk = None
    if aq is not None and ak is not None and aq.w_out is not None and ak.w_out is not None:
        lq, lk = axis_labels_nd(cq, tuple(aq.op.outputs[0].shape), -1), \
            axis_labels_nd(ck, tuple(ak.op.outputs[0].shape), -1)
    if lq is None or lk is None:
        # not a plain projection (walking back through a cat can follow the non-rotary half of a partial
        # rotary embedding): measure the linear, position-dependent region instead (RoPE)
        found = _rotary_qk(graph, q, kt, sm)
        if found is None:
            return _qk_norm(graph, q, kt, sm), None, None, None, None
        cands, (aq, ak, heads_q, heads_k) = found
        return cands, heads_q, heads_k, aq, ak
    heads_q = _per_head(lq, -1)           # q: (..., Tq, d): features last, tokens second to last
    heads_k = _per_head(lk.transpose(-1, -2), -1)  # kᵀ: (..., d, Tk)
    if not heads_q or not heads_k or len(heads_q) != len(heads_k):
        reject(site, "qk_gl", "Q/K: per-head feature sets are not constant over batch and tokens")
        return [], None, None, None, None
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
    out = [Candidate(GLFamily(f"qk_gl[{where}]", "qk_gl", blocks), cav)]
    if ak.bias is not None:  # adding δ to the key bias shifts every score of a query by q·δ
        cols = sorted({c for h in heads_k for c in h})
        tf = TranslationFamily(f"key_bias_translation[{_short(ak.bias)}]", "key_bias_translation",
                               [[ak.bias, 0, cols, "free"]], {ak.bias: list(_shape(graph, ak.bias))})
        out.append(Candidate(tf, _precision_caveats(sm)))
    else:
        reject(site, "key_bias_translation", "the key projection has no bias")
    return out, heads_q, heads_k, aq, ak


def _value_output(graph: Graph, sm, heads_q):
    """P = softmax(...) -> (dropout, casts) -> P @ V -> (transposes, reshapes) -> output projection."""
    site = f"attention probabilities at op {sm.index}"
    no = lambda why: reject(site, "vo_gl", "V/O GL: skipped — " + why)  # noqa: E731
    t = sm.outputs[0]
    for _ in range(6):
        cons = graph.consumers(t)
        if len(cons) != 1:
            return no(f"the probabilities are read by {len(cons)} ops, not one P @ V product")
        op, pos = cons[0]
        if op.name == "matmul":
            break
        if op.name not in ("dropout", "type", "to") and not (op.name in ("view", "reshape")
                                                            and op.outputs[0].shape == t.shape):
            return no(f"the probabilities pass {op.name} before P @ V")
        t = op.outputs[0]
    else:
        return no("no P @ V product within 6 ops of the softmax")
    P = op.tensor_positions()
    if pos != P[0] or len(P) != 2:
        return no("the probabilities are not the left factor of a two-tensor matmul")
    v = op.leaves[P[1]]
    av, cv = _producer_affine(graph, v)
    if av is None:
        return no("the values are not a linear projection followed by views/transposes")
    lv = axis_labels_nd(cv, tuple(av.op.outputs[0].shape), -1)
    if lv is None:
        return no("value projection features do not reach P @ V as whole features")
    heads_v = _per_head(lv, -1)
    if not heads_v:
        return no("per-head value features are not constant over batch and tokens")
    # P @ V keeps V's feature axis: follow the matmul output with V's labels attached.
    o = op.outputs[0]
    end, chain, cons = graph.walk_forward(o, pooling=False)
    if len(cons) != 1:
        return no(f"the head outputs are read by {len(cons)} ops, not one output projection")
    ao = affine(graph, cons[0][0])
    if ao is None or ao.kind != "linear" or ao.data is not end:
        return no("o_proj input is not a concatenation of value heads I could locate (no linear map reads it)")
    import torch

    from eqlab.analyses.discover.graph import propagate

    n_flat = o.shape[-1]
    if o.dim() >= 3 and len(heads_v) != o.shape[-3]:
        if v.dim() >= 3 and v.shape[-3] == 1 and len(heads_v) == 1:   # multi-query: one V head broadcast
            heads_v = heads_v * o.shape[-3]
        else:
            return no(f"{len(heads_v)} value heads do not line up with the {o.shape[-3]} heads of P @ V")
    # label o's entries by the V feature they carry: heads from the batch/head axes, features from the last
    lab = torch.empty(o.shape, dtype=torch.float64)
    hv = torch.tensor(heads_v, dtype=torch.float64)        # (heads, d)
    lab[...] = hv.reshape(*([1] * (o.dim() - 3)), *o.shape[-3:-2], 1, n_flat) if o.dim() >= 3 else hv
    try:
        lo = propagate(chain, lab)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # an op that cannot be replayed on labels
        return no(f"the head outputs cannot be followed to the output projection ({type(e).__name__}: {e})"[:300])
    lo = lo.movedim(ao.in_axis, -1).reshape(-1, lo.shape[ao.in_axis])
    if not bool((lo == lo[:1]).all()):
        return no("the output projection's input features vary over batch/tokens")
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
                return no("o_proj input is not a concatenation of value heads in head order")
            b.append([ao.weight, ao.w_in, js, "-MT"])
        blocks.append(b)
    cav = shared_caveats(graph, ao) + _precision_caveats(sm)
    c = Candidate(GLFamily(f"vo_gl[{_short(av.weight)}->{_short(ao.weight)}]", "vo_gl", blocks), cav)
    c.heads = (av, ao, heads_v, [[h * d + j for j in range(d)] for h in range(len(heads_v))])
    return c


def _head_swap(graph: Graph, affs, heads_q, heads_k, biases=None, bias_readers=None):
    """Swap key/value head 0 with 1 together with the query heads reading them (pairwise, in order) and
    their output-projection slices; with a single key/value head, swap its first two query heads. A learned
    additive score bias (a relative-position table with a head axis) has its swapped heads' columns swapped
    too; a fixed one (ALiBi slopes) that differs between swapped heads makes the swap broken (a hard cause)."""
    from eqlab.analyses.transforms import Permutation

    aq, ak, av, ao, heads_v, o_cols = affs
    groups = _groups_by(heads_k)
    site = f"attention {_short(ao.weight)}"
    if len(heads_v) != len(heads_q) or len(o_cols) != len(heads_q):
        return reject(site, "head_permutation", f"{len(heads_q)} query heads but {len(heads_v)} value heads and "
                      f"{len(o_cols)} output slices") or []
    if len(groups) >= 2 and len(groups[0][1]) == len(groups[1][1]):
        qpairs, kv = list(zip(groups[0][1], groups[1][1])), (groups[0][1][0], groups[1][1][0])
    elif len(groups[0][1]) >= 2:
        qpairs, kv = [tuple(groups[0][1][:2])], None
    else:
        return reject(site, "head_permutation", "a single head: nothing to permute") or []
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
    cav = []
    if biases is not None:
        if biases.problems:
            return reject(site, "head_permutation", "a learned score bias: " + biases.problems[0]) or []
        for name, axis, cols in biases.learned:   # head h's scores get column cols[h] of the bias table
            perm = perms.setdefault((name, axis), list(range(_shape(graph, name)[axis])))
            for h1, h2 in qpairs:
                perm[cols[h1]], perm[cols[h2]] = perm[cols[h2]], perm[cols[h1]]
            if (bias_readers or {}).get(name, 1) > 1:
                cav.append(Cause(f"the score bias {_short(name)} is added in {bias_readers[name]} attention blocks: "
                                 "swapping its head columns for one block moves the others' biases", "shared",
                                 soft=False))
        fixed = [(h1, h2) for b in biases.fixed for h1, h2 in qpairs if score_bias.differs(b, h1, h2)]
        if fixed:
            h1, h2 = fixed[0]
            cav.append(Cause(f"a fixed additive score term (not a parameter: e.g. ALiBi's per-head slopes) differs "
                             f"between heads {h1} and {h2}; no change of the parameters moves it with them",
                             "fixed_bias",
                             soft=False))
    terms = [[n, d, p] for (n, d), p in perms.items()]
    what = "kv heads 0<->1" if kv is not None else f"query heads {qpairs[0][0]}<->{qpairs[0][1]}"
    return [Candidate(Permutation(f"head_permutation[{_short(ao.weight)}]({what})", "head_permutation", terms), cav)]
