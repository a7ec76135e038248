"""Graph patterns that carry a symmetry, each turned into a `Transformation` plus caveats.

Every finder walks the recorded op graph (analyses.discover.graph) from an anchor op (a softmax, a
batch_norm, an activation, an attention score matmul, ...) to the parameterised ops around it. Caveats are
the things seen on the way that are expected to break the symmetry (norm eps, a non-homogeneous activation,
shared parameters, extra consumers); verification decides, the caveats explain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eqlab.analyses.discover.algebra import Cause, activation_algebra, algebra_cause
from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph, axis_labels
from eqlab.analyses.discover.ops import (ELEMENTWISE_ACT, ELEMENTWISE_MATH, LINEAR_OPS, NORM_OPS, Affine,
                                   affine, labels_out, shared_caveats)
from eqlab.analyses.transforms import Permutation, ScaleFamily, SignFlip, Transformation, TranslationFamily


@dataclass
class Candidate:
    transformation: Transformation
    caveats: list = field(default_factory=list)


def _short(name: str | None) -> str:
    return (name or "?").removesuffix(".weight").removesuffix(".bias")


def _producer_affine(graph: Graph, t, kinds=("linear",), pooling=False):
    """The affine op that produces t through pass-through ops: (Affine, chain) or (None, None)."""
    origin, chain = graph.walk_back(t, pooling=pooling)
    prod = graph.producer(origin)
    if prod is None:
        return None, None
    a = affine(graph, prod[0])
    if a is None or a.kind not in kinds or a.op.outputs[0] is not origin:
        return None, None
    return a, chain


def _groups(labels):
    """producer feature -> ordered list of end positions carrying it."""
    out: dict[int, list[int]] = {}
    for j, r in enumerate(labels):
        out.setdefault(r, []).append(j)
    return out


# ------------------------------------------------------------------------------------ (a) softmax translation
def softmax_translations(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops_named("cross_entropy", "log_softmax", "softmax"):
        x = op.leaves[op.tensor_positions()[0]]
        if op.name == "cross_entropy":
            dim = 1 if x.dim() > 1 else 0
        else:
            dim = op.arg(1, "dim", -1)
        dim = dim % x.dim()
        site = f"{op.name} at op {op.index}"
        a, chain = _producer_affine(graph, x)
        if a is None or a.weight is None:
            reject(site, "softmax_translation", "the logits are not a linear map's output through views")
            continue
        labels = labels_out(graph, a, chain, dim)
        if labels is None or len(set(labels)) != len(labels):
            reject(site, "softmax_translation", f"{_short(a.weight)}'s features do not reach the class axis one to one")
            continue
        rows = sorted(labels)
        shapes = {a.weight: list(_shape(graph, a.weight))}
        terms = [[a.weight, a.w_out, rows, "broadcast"]]
        if a.bias is not None:
            shapes[a.bias] = list(_shape(graph, a.bias))
            terms.append([a.bias, 0, rows, "broadcast"])
        t = TranslationFamily(f"softmax_translation[{_short(a.weight)}]", "softmax_translation", terms, shapes)
        cav = shared_caveats(graph, a)
        if not graph.single_consumer_chain(a.op.outputs[0], chain):
            cav.append("the logits are also read outside the softmax (e.g. a z-loss or logit penalty)")
        out.append(Candidate(t, cav))
    return out


def _shape(graph: Graph, name: str):
    for op, pos in graph.param_uses(name):
        return tuple(op.leaves[pos].shape)
    raise KeyError(name)


# ------------------------------------------------------------------------------- (b) BatchNorm scale, shift
def batchnorm_scales(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops_named("batch_norm"):
        bn = affine(graph, op)
        site = f"batch_norm {_short(bn.weight) if bn.weight else op.index}"
        a, chain = _producer_affine(graph, bn.data)
        if a is None:
            prod = graph.producer(graph.walk_back(bn.data)[0])
            what = prod[0].name if prod else "an input"
            groups = prod[0].arg(6, "groups", 1) if prod and prod[0].name.startswith("conv") else 1
            reject(site, "bn_scale", f"the normalised input comes from {what}" +
                   (f" with groups={groups} (grouped/depthwise convolutions are not read as per-channel maps)"
                    if groups != 1 else ", not a linear map or convolution through views"))
            continue
        labels = labels_out(graph, a, chain, 1)
        if labels is None:
            reject(site, "bn_scale", f"{_short(a.weight)}'s channels do not reach the BN channel axis as whole channels")
            continue
        cav = list(bn.caveats) + shared_caveats(graph, a)
        if not graph.single_consumer_chain(a.op.outputs[0], chain + [(op, 0, 0)]):
            cav.append("the pre-normalisation activations are also read elsewhere")
        per_channel = [[r] for r in labels]  # BN channel c is fed by producer features labels[c]
        gens = [[[a.weight, a.w_out, rs, 1.0]] + ([[a.bias, 0, rs, 1.0]] if a.bias else []) for rs in per_channel]
        nm = f"{_short(a.weight)}->{_short(bn.weight) if bn.weight else 'batch_norm'}"
        out.append(Candidate(ScaleFamily(f"bn_scale[{nm}]", "bn_scale", gens), cav))
        if a.bias is not None:  # the mean subtraction removes any per-channel constant (catalog 2d)
            sh = {a.bias: list(_shape(graph, a.bias))}
            tf = TranslationFamily(f"bn_translation[{nm}]", "bn_translation",
                                   [[a.bias, 0, sorted(labels), "free"]], sh)
            out.append(Candidate(tf, [c for c in cav if "eval mode" in c]))
    return out


# --------------------------------------------------------------------- (c) rescale across an activation
@dataclass
class Reader:
    """One linear map reading the producer's features: producer feature -> its input positions."""

    consumer: Affine
    groups: dict


@dataclass
class Pair:
    """producer (per-feature affine) -> [activation] -> consumers (linear maps reading those features).

    Several readers are allowed (a LayerNorm read by separate query/key/value projections): a rescale or
    permutation of the producer's features must then be undone in every one of them."""

    producer: Affine
    act: str | None
    readers: list             # [Reader], at least one
    caveats: list
    upstream: Affine | None = None  # for a norm producer: the linear map feeding it (for permutations)
    up_labels: list | None = None
    act_op: object = None           # the activation op itself (its arguments decide its algebra)

    @property
    def homogeneous(self) -> bool:
        return self.act_op is not None and activation_algebra(self.act_op)[0]

    @property
    def odd(self) -> bool:
        return self.act_op is not None and activation_algebra(self.act_op)[1]

    @property
    def consumer(self) -> Affine:
        return self.readers[0].consumer

    @property
    def groups(self) -> dict:
        return self.readers[0].groups


def _linear_readers(graph: Graph, start, pooling: bool):
    """Every reader of ``start`` as (linear Affine, chain from start), through pass-through ops; None when
    any path ends somewhere else (a residual add, a loss, a nonlinearity)."""
    out, todo = [], [(start, [])]
    while todo:
        t, pre = todo.pop()
        end, chain, cons = graph.walk_forward(t, pooling=pooling)
        chain = pre + chain
        if not cons:
            return None
        if len(cons) > 1:
            # a fan-out: follow each branch separately (each pass-through or a linear read directly)
            for op, pos in cons:
                if graph.is_passthrough(op, pos, pooling) and len(op.outputs) == 1:
                    todo.append((op.outputs[0], chain + [(op, pos, 0)]))
                else:
                    a = affine(graph, op)
                    if a is None or a.kind != "linear" or a.data is not end or a.w_in is None:
                        return None
                    out.append((a, chain))
            continue
        a = affine(graph, cons[0][0])
        if a is None or a.kind != "linear" or a.data is not end or a.w_in is None:
            return None  # (w_in None: a grouped conv whose input channels no single filter slice reads)
        out.append((a, chain))
    return out


COMPOSITE = "composite_activation"


def _elementwise_region(graph: Graph, x):
    """The activation written as several elementwise ops on x (each op's tensor inputs are x, earlier
    region tensors or parameter-free scalars; shapes stay x's). Returns (exit tensor, op names) when the
    region has exactly one tensor read from outside it and is more than one known activation op."""
    region, ops, changed = {id(x): x}, {}, True
    while changed:  # to a fixed point: an op joins once all of its tensor inputs are in the region
        changed = False
        for t in list(region.values()):
            for op, _ in graph.consumers(t):
                if id(op) in ops:
                    continue
                ins = [op.leaves[p] for p in op.tensor_positions()]
                if op.name in ELEMENTWISE_MATH and len(op.outputs) == 1 and op.outputs[0].shape == x.shape \
                        and all(id(i) in region or (i.numel() == 1 and not graph.param(i)) for i in ins):
                    ops[id(op)] = op
                    region[id(op.outputs[0])] = op.outputs[0]
                    changed = True
    if any(id(op) not in ops for op, _ in graph.consumers(x)):
        return None  # x itself is read outside: not an activation's private input
    ops = sorted(ops.values(), key=lambda o: o.index)
    if not ops or (len(ops) == 1 and ops[0].name in ELEMENTWISE_ACT):
        return None
    ids = {id(o) for o in ops}
    exits = [op.outputs[0] for op in ops if any(id(c) not in ids for c, _ in graph.consumers(op.outputs[0]))
             or not graph.consumers(op.outputs[0])]
    if len(exits) != 1 or not any(o.name in ELEMENTWISE_ACT or o.name in ("pow", "__pow__", "erf", "exp")
                                  for o in ops):
        return None  # a plain affine rescaling (x*c + d) is not an activation
    return exits[0], sorted({o.name for o in ops})


def _no_gain_reason(graph: Graph, op) -> str:
    """Why a normalisation has no gain to rescale: none, or an offset gain (1 + w) (Gemma's RMSNorm)."""
    cons = graph.consumers(op.outputs[0])
    params = set(graph._param)
    for c, pos in cons[:1]:
        for p in c.tensor_positions():
            prod = graph.producer(c.leaves[p]) if p != pos else None
            if c.name in ("mul", "__mul__") and prod and prod[0].name in ("add", "__add__", "__radd__") \
                    and graph.ancestors(c.leaves[p]) & params:
                return ("the gain is an offset (1 + w) applied after the norm: its rescale w -> a(1 + w) - 1 is "
                        "affine, not a scaling (proposed as the offset gain rescale, offset_gain.py)")
    return "the normalisation has no gain parameter"


def activation_pairs(graph: Graph) -> list[Pair]:
    from eqlab.analyses.discover.norms import _param_dependent

    pairs, dep = [], _param_dependent(graph)
    anchors = [op for op in graph.ops if op.name in ELEMENTWISE_ACT]
    # a norm layer's affine read directly by linear maps (LN gain -> next linear(s), no activation)
    anchors += [op for op in graph.ops if op.name in NORM_OPS]
    # activations composed of elementwise ops, anchored at the linear map whose output they read
    composite = {}
    for op in graph.ops:
        a = affine(graph, op) if op.name in LINEAR_OPS else None
        if a is None or a.kind != "linear" or a.op.outputs[0] is not op.outputs[0]:
            continue
        x, chain, _ = graph.walk_forward(op.outputs[0], pooling=False)
        r = _elementwise_region(graph, x)
        if r is not None:
            composite[op.index] = (a, chain, r[0])
            anchors.append(op)
    for op in anchors:
        if op.index in composite:
            prod, pchain, start = composite[op.index]
            act = COMPOSITE
        elif op.name in NORM_OPS:
            prod, act, pchain = affine(graph, op), None, []
            if prod is None or prod.weight is None:
                reject(f"{op.name} at op {op.index}", "gain_rescale", _no_gain_reason(graph, op))
                continue
            start = op.outputs[0]
        else:
            x = op.leaves[op.tensor_positions()[0]]
            prod, pchain = _producer_affine(graph, x, kinds=("linear", "norm"))
            if (prod is None or prod.weight is None) and id(x) in dep:  # (rotary sin/cos of positions: not a unit)
                reject(f"{op.name} at op {op.index}", f"{op.name}_rescale",
                       "the activation's input is not a per-feature linear map or norm output (through views)")
                continue
            if prod is None or prod.weight is None:
                continue
            act, start = op.name, op.outputs[0]
        site = f"{_short(prod.weight)} -> {act or 'readers'}"
        family = f"{act}_rescale" if act else f"{op.name}_gain_rescale"
        found = _linear_readers(graph, start, pooling=act is not None)
        if not found:
            reject(site, family, "the output is not read only by linear maps (a residual add, a loss or another "
                   "nonlinearity reads it)")
            continue
        readers, cav = [], shared_caveats(graph, prod)
        for consumer, cchain in found:
            end = consumer.data
            # labels pass an activation unchanged (elementwise: same shape, same positions)
            full = pchain + ([(op, op.tensor_positions()[0], 0)] if act and act != COMPOSITE else []) + cchain
            labels = labels_out(graph, prod, full, end.dim() + (consumer.in_axis if consumer.in_axis < 0 else
                                                                consumer.in_axis - end.dim()))
            if labels is None:
                reject(site, family, f"features do not reach {_short(consumer.weight)} as whole features (labels mix)")
                break
            readers.append(Reader(consumer, _groups(labels)))
            cav += [c for c in shared_caveats(graph, consumer) if c not in cav]
        else:
            # (a norm producer's own output is ``start``: all of its readers were just checked)
            own = pchain + ([(op, 0, 0)] if act != COMPOSITE else [])
            if act and not graph.single_consumer_chain(prod.op.outputs[0], own):
                cav.append("the producer's output is also read elsewhere (e.g. a residual connection)")
            if any(set(r.groups) != set(readers[0].groups) for r in readers):
                reject(site, family, "the readers see different features: not one per-feature transformation")
                continue
            up, up_labels = None, None
            if prod.kind == "norm" and prod.op.name == "batch_norm":
                up, uchain = _producer_affine(graph, prod.data)
                up_labels = labels_out(graph, up, uchain, 1) if up is not None else None
            pairs.append(Pair(prod, act, readers, cav, up, up_labels,
                              op if act is not None and act != COMPOSITE else None))
    return pairs


def _rescale_generators(p: Pair, sign_out: float = -1.0):
    gens = []
    for r in sorted(p.groups):
        g = [[p.producer.weight, p.producer.w_out, [r], 1.0]]
        if p.producer.bias:
            g.append([p.producer.bias, 0, [r], 1.0])
        for rd in p.readers:
            g.append([rd.consumer.weight, rd.consumer.w_in, rd.groups[r], sign_out])
        gens.append(g)
    return gens


def _pair_name(p: Pair):
    more = f"(+{len(p.readers) - 1})" if len(p.readers) > 1 else ""
    return f"{_short(p.producer.weight)}->{_short(p.consumer.weight)}{more}"


def rescales(graph: Graph, pairs=None) -> list[Candidate]:
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act is None:
            family = {"layer_norm": "ln_gain_rescale", "rms_norm": "rms_gain_rescale"}.get(p.producer.op.name,
                                                                                           "bn_gain_rescale")
            name = family
            cav = list(p.caveats)
        else:
            family = "relu_rescale" if p.homogeneous else f"{p.act}_rescale"
            name = family
            cav = list(p.caveats)
            if p.act == COMPOSITE:
                cav.append(Cause("an activation composed of elementwise ops (e.g. gelu_new's tanh form) is not "
                                 "positively homogeneous (σ(αx) ≠ ασ(x))", "algebra", soft=False))
            elif not p.homogeneous:
                cav.append(algebra_cause(p.act_op))
        out.append(Candidate(ScaleFamily(f"{name}[{_pair_name(p)}]", family, _rescale_generators(p)), cav))
    return out


# ------------------------------------------------------------------------------- (d) negative controls
def negative_controls_from(graph: Graph, pairs=None) -> list[Transformation]:
    """Declared transformations that are NOT symmetries; a correct checker must reject them."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.homogeneous:  # wrong sign: scale in- and outgoing weights together
            out.append(ScaleFamily(f"relu_rescale_wrong_sign[{_pair_name(p)}]", "negative_control",
                                   _rescale_generators(p, sign_out=+1.0), expected=False))
    for c in softmax_translations(graph):
        t = c.transformation
        w = t.terms[0]
        rows = w[2][:1]  # shift a single class only: changes the softmax
        terms = [[w[0], w[1], rows, "broadcast"]] + [[b[0], 0, rows, "broadcast"] for b in t.terms[1:]]
        out.append(TranslationFamily(f"softmax_translation_one_class[{t.name.split('[')[1]}", "negative_control",
                                     terms, t.shapes, expected=False))
    return out


# --------------------------------------------------------------------- (g) permutations and sign flips
def _unit_terms(p: Pair):
    """(param, axis) slices indexed by the producer's features (and the linear map feeding a BN producer)."""
    terms = [[p.producer.weight, p.producer.w_out]]
    if p.producer.bias:
        terms.append([p.producer.bias, 0])
    if p.upstream is not None:
        terms += [[p.upstream.weight, p.upstream.w_out]] + ([[p.upstream.bias, 0]] if p.upstream.bias else [])
    return terms


def permutations(graph: Graph, pairs=None, shapes=None) -> list[Candidate]:
    """Swap the first two hidden units of every producer -> activation -> consumer(s) pair (any elementwise
    activation; through a BatchNorm the filter feeding it moves too)."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act is None or len(p.groups) < 2:
            continue
        if p.producer.kind == "norm" and (p.upstream is None or p.up_labels is None
                                          or p.up_labels != list(range(len(p.up_labels)))):
            continue
        feats = sorted(p.groups)
        i, j = feats[0], feats[1]
        if any(len(r.groups[i]) != len(r.groups[j]) for r in p.readers):
            continue
        if any(r.consumer.w_in == r.consumer.w_out for r in p.readers) or \
                (p.upstream is not None and p.upstream.w_in == p.upstream.w_out) or \
                (p.producer.kind == "linear" and p.producer.w_in == p.producer.w_out):   # depthwise on either side
            reject(f"{_short(p.producer.weight)} -> {p.act}", "permutation", "a depthwise convolution reads these "
                   "channels: swapping its input channels also swaps its output channels")
            continue
        terms = []
        for name, dim in _unit_terms(p):
            perm = list(range(_shape(graph, name)[dim]))
            perm[i], perm[j] = j, i
            terms.append([name, dim, perm])
        for r in p.readers:  # each reader's input positions carrying unit i trade places with unit j's
            perm = list(range(_shape(graph, r.consumer.weight)[r.consumer.w_in]))
            for a, b in zip(r.groups[i], r.groups[j]):
                perm[a], perm[b] = b, a
            terms.append([r.consumer.weight, r.consumer.w_in, perm])
        out.append(Candidate(Permutation(f"permutation[{_pair_name(p)}]({i}<->{j})", "permutation", terms),
                             list(p.caveats)))
    return out


def sign_flips(graph: Graph, pairs=None) -> list[Candidate]:
    """Negate one unit (in- and outgoing weights) behind an odd activation."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if not p.odd or p.producer.kind != "linear":
            if p.act is not None and p.act != COMPOSITE:
                reject(f"{_short(p.producer.weight)} -> {p.act}", "sign_flip",
                       f"{p.act} is not odd (σ(−x) ≠ −σ(x))" if not p.odd else "the producer is a norm, not a linear map")
            continue
        r = sorted(p.groups)[0]
        terms = [[p.producer.weight, p.producer.w_out, [r]]] + ([[p.producer.bias, 0, [r]]] if p.producer.bias else [])
        terms += [[rd.consumer.weight, rd.consumer.w_in, rd.groups[r]] for rd in p.readers]
        cav = list(p.caveats)
        out.append(Candidate(SignFlip(f"sign_flip[{_pair_name(p)}]({r})", "sign_flip", terms), cav))
    return out


# ------------------------------------------------------------------------------- (h) unused parameters
def unused_parameters(graph: Graph) -> list[Candidate]:
    """Parameters the model reads but the loss never depends on (BERT's pooler under a loss on the hidden
    states): every direction is an exact symmetry, g = 0 and H = 0 on them."""
    if getattr(graph, "loss_value", None) is None or not torch.is_tensor(graph.loss_value):
        return []
    reach = graph.ancestors(graph.loss_value)
    used = {}
    for op in graph.ops:
        for p in op.tensor_positions():
            n = graph.param(op.leaves[p])
            if n is not None:
                used.setdefault(n, []).append(id(op.leaves[p]))
    unused = sorted(n for n, ids in used.items() if not any(i in reach for i in ids))
    if not unused:
        return []
    shapes = {n: list(_shape(graph, n)) for n in unused}
    terms = [[n, None, None, "free"] for n in unused]
    t = TranslationFamily(f"unused_parameter[{len(unused)} tensors]", "unused_parameter", terms, shapes)
    return [Candidate(t, [])]
