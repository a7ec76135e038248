"""Streams read only through LayerNorms: one joint scale and per-row translations (catalog 3a, 3b, 4a, 4b).

Starting from each layer_norm's input, walk back through pass-through ops and parameter-free adds (the
residual connections) to the tensors that *write* the stream: linear maps (their weight and bias) and
embedding lookups, or parameters written into the stream as they are (position embeddings, a class token). Scaling every writer by the same factor scales the stream; LN removes it (up to eps).
Adding a multiple of 1_D to any writer's output moves the stream along 1_D; LN's mean subtraction removes it
exactly (eps plays no role). Both require every reader of the stream to be a LayerNorm over its last axis:
a reader outside (post-LN blocks, where the stream also feeds a sublayer directly) is reported as a caveat.
"""
from __future__ import annotations

from eqlab.analyses.discover.algebra import Cause, eps_cause
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph
from eqlab.analyses.discover.ops import _only_feeds, affine, shared_caveats
from eqlab.analyses.discover.patterns import Candidate, _shape, _short
from eqlab.analyses.transforms import Permutation, ScaleFamily, TranslationFamily

_ADD = {"add", "__add__", "__radd__"}
_NORMS = ("layer_norm", "rms_norm")  # rms_norm: no mean subtraction, so the stream has no translation


def _eps(op):
    e = op.arg(4, "eps", 1e-5) if op.name == "layer_norm" else op.arg(3, "eps", None)
    return 0.0 if e is None else float(e)


def _stream(graph: Graph, start):
    """(stream tensor ids, writers, problems) of the stream that reaches ``start``."""
    seen, writers, problems, todo = {}, [], [], [start]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen[id(t)] = t
        prod = graph.producer(t)
        if prod is None:
            if graph.param(t) is not None:  # a parameter written straight into the stream (ViT's
                writers.append(graph.param(t))  # position embeddings, an expanded class token)
            else:
                problems.append("the stream has a source that is not a parameterised linear map or embedding")
            continue
        op, _ = prod
        pos = op.tensor_positions()
        if (op.name in _ADD and len(pos) == 2) or op.name == "cat":
            # residual adds (a parameter added directly is itself a writer) and concatenations of
            # token groups (class token + patches): every input is part of the stream
            todo += [op.leaves[p] for p in pos]
            continue
        data = graph._data_input(op)
        if data is not None and graph.is_passthrough(op, data, pooling=False):
            todo.append(op.leaves[data])
            continue
        a = affine(graph, op)
        if a is not None and a.kind in ("linear", "embedding") and op.outputs[0] is t:
            writers.append(a)
            continue
        problems.append(f"the stream is produced by {op.name}, which a joint scale does not pass through")
    return seen, writers, problems


def residual_stream(graph: Graph, pairs=None) -> list[Candidate]:
    out, done = [], set()
    by_norm = {p.producer.op.index: p for p in (pairs or []) if p.act is None}
    lns = [op for op in graph.ops_named(*_NORMS) if len(op.arg(1, "normalized_shape")) == 1]
    for ln in reversed(lns):  # the last LayerNorm sees the whole stream; earlier ones read parts of it
        x = ln.leaves[ln.tensor_positions()[0]]
        if id(x) in done:
            continue
        seen, writers, problems = _stream(graph, x)
        done |= set(seen)
        pre = "ln" if ln.name == "layer_norm" else "rms"
        if not writers or problems:
            reject(f"stream read by {ln.name} at op {ln.index}", f"{pre}_residual_scale",
                   problems[0] if problems else "the stream has no parameterised writer")
            continue
        readers = set()
        for t in seen.values():
            for op, _ in graph.consumers(t):
                if op.name in _NORMS and op.leaves[op.tensor_positions()[0]] is t:
                    readers.add(op.index)
                elif not any(id(o) in seen for o in op.outputs):
                    problems.append(f"the stream is read by {op.name} outside a LayerNorm (e.g. post-LN)")
        kinds = {op.name for op in graph.ops if op.index in readers}
        reader_ops = [op for op in graph.ops if op.index in readers]
        eps = {(op.name, _eps(op)) for op in reader_ops}
        shared = [c for a in writers if not isinstance(a, str) for c in shared_caveats(graph, a)]
        cav = problems + shared
        for n, e in sorted(eps):
            if e > 0:  # the largest predicted effect among the readers with this eps
                causes = [eps_cause(op, f"{n} eps={e:g}: the joint scale is broken by ~eps/Var(stream)")
                          for op in reader_ops if (op.name, _eps(op)) == (n, e)]
                cav.append(max(causes, key=lambda c: c.size or 0.0))
        cav += sorted({c for op in graph.ops if op.index in readers for c in getattr(op, "precision", [])})
        pre = "ln" if kinds == {"layer_norm"} else "rms"
        family = f"{pre}_residual_scale" if len(writers) > 1 else f"{pre}_scale"
        gens = []
        terms, shapes = [], {}
        for a in sorted(writers, key=lambda a: a.op.index if not isinstance(a, str) else -1):
            if isinstance(a, str):  # a bare parameter: it scales as a whole, and shifts along its last axis
                shapes[a] = list(_shape(graph, a))
                gens.append([a, None, None, 1.0])
                terms.append([a, len(shapes[a]) - 1, None, "broadcast"])
                continue
            gens.append([a.weight, None, None, 1.0])
            shapes[a.weight] = list(_shape(graph, a.weight))
            terms.append([a.weight, a.w_out, None, "broadcast"])
            if a.bias:
                gens.append([a.bias, None, None, 1.0])
                shapes[a.bias] = list(_shape(graph, a.bias))
                terms.append([a.bias, 0, None, "broadcast"])
        first = writers[0] if isinstance(writers[0], str) else writers[0].weight
        tag = (f"{len(writers)} writers->{len(readers)} {pre}_norms" if len(writers) > 1 else
               f"{_short(first)}->{len(readers)} {pre}_norms")
        out.append(Candidate(ScaleFamily(f"{family}[{tag}]", family, [gens]), cav))
        if pairs is not None and not problems:
            out += _permutation(graph, writers, reader_ops, by_norm, tag, pre)
        if pre != "ln":  # some reader only divides by the rms (no mean subtraction): no translation
            continue
        tfam = "ln_residual_translation" if len(writers) > 1 else "ln_translation"
        out.append(Candidate(TranslationFamily(f"{tfam}[{tag}]", tfam, terms, shapes), list(problems) + shared))
    return out


def _permutation(graph: Graph, writers, norms, by_norm, tag, pre) -> list[Candidate]:
    """Swap stream features 0 and 1 everywhere they are written or read: every writer's output axis, every
    norm's gain and bias, every linear map reading a norm's output (its input positions carrying them).
    A parameter with several uses (tied input/output embeddings: the embedding writes the stream, the same
    matrix reads ln_f's output) gets one permutation per axis, which then must agree for all of its uses;
    a use of a moved parameter that is none of these leaves the transformation broken (named)."""
    family, site = f"{pre}_residual_permutation", f"stream {tag}"
    width = norms[0].leaves[norms[0].tensor_positions()[0]].shape[-1]
    swap = list(range(width))
    swap[0], swap[1] = 1, 0
    perms, covered = {}, set()

    def put(name, axis, perm):
        if name is None:
            return True
        old = perms.setdefault((name, axis), perm)
        return old == perm

    for a in writers:
        if isinstance(a, str):
            if not put(a, len(_shape(graph, a)) - 1, swap):
                return reject(site, family, f"{_short(a)} is moved twice along one axis in different ways") or []
            continue
        covered.add(a.op.index)
        if a.out_axis != -1:   # channels-first (a convolution): its channels reach the norm through a permute
            return reject(site, family, f"{_short(a.weight)} writes the stream with its features on axis "
                          f"{a.out_axis}, not last") or []
        if _shape(graph, a.weight)[a.w_out] != width or not (put(a.weight, a.w_out, swap) and put(a.bias, 0, swap)):
            return reject(site, family, f"{_short(a.weight)} does not write the stream one feature per output") or []
    for n in norms:
        pair = by_norm.get(n.index)
        if pair is None:
            return reject(site, family, f"the output of {n.name} at op {n.index} is not read only by linear maps") or []
        covered.add(n.index)
        if not (put(pair.producer.weight, 0, swap) and put(pair.producer.bias, 0, swap)):
            return reject(site, family, "a norm gain is moved in two different ways") or []
        for r in pair.readers:
            c = r.consumer
            covered.add(c.op.index)
            perm = list(range(_shape(graph, c.weight)[c.w_in]))
            for x, y in zip(r.groups[0], r.groups[1]):
                perm[x], perm[y] = y, x
            if not put(c.weight, c.w_in, perm):
                return reject(site, family, f"{_short(c.weight)} would be permuted differently by two of its uses "
                              "(a shared weight read along the same axis in two roles)") or []
    cav = []
    by_index = {op.index: op for op in graph.ops}
    for name, _ in perms:   # a `.T` read that only feeds a covered map is part of that map (FalconLinear)
        other = {op.name for op, _ in graph.param_uses(name) if op.index not in covered
                 and not any(_only_feeds(graph, op, by_index[i]) for i in covered)}
        if other:
            cav.append(Cause(f"{_short(name)} is also read by {', '.join(sorted(other))}, which the permutation does "
                             "not account for", "shared", soft=False))
    terms = [[name, axis, perm] for (name, axis), perm in perms.items()]
    return [Candidate(Permutation(f"{family}[{tag}](0<->1)", family, terms), cav)]
